"""`python -m ratatouille_hub ...`, as `accelerate launch -m ratatouille_hub recycle ...` starts it."""

import sys

from .cli import main

sys.exit(main())
