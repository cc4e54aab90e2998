"""Where the shipped files are when the project is installed: the project root is the parent of the ``sft_stack``
package (an editable install, ``pip install -e .``, or a checkout on PYTHONPATH), which holds ``configs/``,
``ds_configs/``, ``launcher/run.py`` and ``slurm/`` next to the packages."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The repository root: sft_stack/common/project.py -> sft_stack/common -> sft_stack -> root."""
CONFIGS_DIR = PROJECT_ROOT / "configs"
"""The shipped run recipes (``sft configs`` lists them)."""
LAUNCHER = PROJECT_ROOT / "launcher" / "run.py"
"""The per-rank entry point ``sft train`` hands to the deepspeed launcher."""
SECRET_OVERRIDES_ENV = "SFT_SECRET_OVERRIDES"
"""Run-config overrides holding a credential, one per line: ``sft train`` moves them here from the command line
(which the deepspeed runner prints) and launcher/run.py applies them after the command line's overrides."""
