import sys

from sft_stack.demo.run import main

# Guarded: prepare's worker processes re-import the main module, and must not start another demo.
if __name__ == "__main__":
    sys.exit(main())
