"""`python -m ratatouille_hub ...`, as `accelerate launch -m ratatouille_hub recycle ...` starts it."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the module (tools, tests) does not run the command
    sys.exit(main())
