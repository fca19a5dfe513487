"""`python -m ratatouille_hub ...`, as `accelerate launch -m ratatouille_hub recycle ...` starts it."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned process imports this module as its parent's main
    sys.exit(main())
