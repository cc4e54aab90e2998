"""The one exit-status convention and error prefix of every command (README, "Exit status and errors").

- 0: done;
- 2 (``USER_ERROR``): something the user can fix (a flag, a config key or value, a path, the data); one line on
  stderr, ``sft: error: <what>, <where>; <what to do>``, and no traceback. argparse's own usage errors exit 2 too;
- 1 (``FAILURE``): the command ran and failed for another reason: an internal error (with its traceback), a run
  whose loss stopped being finite, shards that no longer match their manifest (``sft verify``).
"""

from __future__ import annotations

import sys

USER_ERROR = 2
FAILURE = 1
PREFIX = "sft: error: "


def user_error(message: str) -> int:
    """Print ``sft: error: <message>`` on stderr and return USER_ERROR, for ``return user_error(...)``."""
    print(PREFIX + message, file=sys.stderr)
    return USER_ERROR
