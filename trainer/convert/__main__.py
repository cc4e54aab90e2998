"""``python -m trainer.convert``, the command's old name: it runs ``sft convert`` (sft_stack/cli/convert.py).

A new process, not an import: trainer/ sits below the command-line package and never imports it.
"""

import os
import sys

os.execv(sys.executable, [sys.executable, "-m", "sft_stack.cli.convert", *sys.argv[1:]])
