#!/usr/bin/env bash
# Model Ratatouille on a Slurm cluster: plan once, one array task per run, then one assembly job.
# Every node must see OUT (a shared filesystem) and the same HF cache (or reach the Hub).
#
#   OUT=/shared/pacs-sketch bash examples/slurm_array.sh     # the default recipe below
#   OUT=/shared/vlcs bash examples/slurm_array.sh --base org/base --target ./VLCS --runs 8   # any recycle flags
#
# Each stage is idempotent: resubmitting the array after failures trains only the runs not done (a run
# another task is training is waited for, never trained twice), and `assemble` names any run still missing.
set -euo pipefail

OUT=${OUT:-$PWD/ratatouille-output}
PARTITION=${PARTITION:-gpu}
if [ $# -gt 0 ]; then RECIPE=("$@"); else RECIPE=(--base microsoft/resnet-50 --target PACS --test-domain sketch --runs 20); fi
RECIPE+=(--output "$OUT")

# 1. The plan: fetches and vets the ingredients, pins them, and saves OUT/plan.json. No training.
ratatouille-hub plan "${RECIPE[@]}"
total=$(python3 -c "import json,sys; print(sum(len(p['runs']) for p in json.load(open(sys.argv[1]))['plans']))" "$OUT/plan.json")

# 2. One task per run, one GPU each. The first task to need the shared linear probe trains it; the others wait.
array=$(sbatch --parsable --partition "$PARTITION" --gres gpu:1 --array "0-$((total - 1))" \
  --job-name ratatouille-run --output "$OUT/slurm-%A_%a.log" \
  --wrap "ratatouille-hub run '$OUT' --index \$SLURM_ARRAY_TASK_ID")

# 3. The soup, once every task has ended (afterany: it names the runs still missing if some failed).
soup=$(sbatch --parsable --partition "$PARTITION" --gres gpu:1 --dependency "afterany:$array" \
  --job-name ratatouille-assemble --output "$OUT/slurm-assemble-%j.log" \
  --wrap "ratatouille-hub assemble '$OUT'")

echo "plan: $total runs in $OUT/plan.json; array job $array; assembly job $soup"
