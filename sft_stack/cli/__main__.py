"""``python -m sft_stack.cli``: the ``sft`` command without its console script (sft_stack/cli/main.py)."""

import sys

from sft_stack.cli.main import main

# Guarded: prepare's worker processes re-import the main module.
if __name__ == "__main__":
    sys.exit(main())
