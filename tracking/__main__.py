"""``python -m tracking sync|dashboard``: see tracking/cli.py."""

import sys

from tracking.cli import main

sys.exit(main())
