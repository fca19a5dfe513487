"""examples/slurm_array.sh against a stand-in `sbatch` that runs each job at once on this machine (the
array's tasks two at a time), so the example's commands are the ones tested, not a copy of them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from test_crash_safety import ENV, RECIPE_FLAGS

EXAMPLE = Path(__file__).parents[1] / "examples" / "slurm_array.sh"

FAKE_SBATCH = r"""#!/usr/bin/env bash
# Stand-in for sbatch: runs --wrap now; an --array A-B runs its tasks two at a time; prints a job id.
array=""; wrap=""
while [ $# -gt 0 ]; do
  case "$1" in
    --array) array="$2"; shift 2 ;;
    --wrap) wrap="$2"; shift 2 ;;
    --parsable) shift ;;
    *) shift 2 ;;
  esac
done
if [ -n "$array" ]; then
  for ((i=${array%-*}; i<=${array#*-}; i++)); do
    SLURM_ARRAY_TASK_ID=$i bash -c "$wrap" >> "$SBATCH_LOG" 2>&1 &
    if (( (i + 1) % 2 == 0 )); then wait; fi
  done
  wait
else
  bash -c "$wrap" >> "$SBATCH_LOG" 2>&1
fi
echo "$RANDOM"
"""


def test_the_slurm_example_plans_runs_and_assembles_the_soup_recycle_makes(tiny_world, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(FAKE_SBATCH)
    (fake / "sbatch").chmod(0o755)
    flags = ["--base", str(tiny_world.base), "--aux", *map(str, tiny_world.aux), "--target", str(tiny_world.target)]
    env = {
        **ENV,
        "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OUT": str(tmp_path / "cluster"),
        "SBATCH_LOG": str(tmp_path / "jobs.log"),
    }
    submitted = subprocess.run(
        ["bash", str(EXAMPLE), *flags, *RECIPE_FLAGS], capture_output=True, text=True, env=env, timeout=300
    )
    assert submitted.returncode == 0, submitted.stderr[-3000:] + (tmp_path / "jobs.log").read_text()[-3000:]
    assert f"plan: 3 runs in {tmp_path / 'cluster' / 'plan.json'}" in submitted.stdout

    alone = tmp_path / "alone"
    recycled = subprocess.run(
        [sys.executable, "-m", "ratatouille_hub", "recycle", *flags, *RECIPE_FLAGS, "--output", str(alone)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert recycled.returncode == 0, recycled.stderr[-3000:]
    digest = [
        hashlib.sha256((folder / "soup" / "model.safetensors").read_bytes()).hexdigest()
        for folder in (tmp_path / "cluster", alone)
    ]
    assert digest[0] == digest[1]
