"""Imported first by the Python scripts in scripts/: run them with the project's
virtualenv from a fresh shell. Under a virtualenv already (``.venv``'s python, or one the
caller activated) it does nothing; otherwise it makes sure ``.venv`` exists (``make``,
as ``make test`` does) and runs the script again with ``.venv``'s python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure() -> None:
    if sys.prefix != sys.base_prefix:
        return
    subprocess.run(["make", "-s", "-C", str(ROOT), ".venv/.installed"], check=True)
    python = ROOT / ".venv" / "bin" / "python"
    os.execv(python, [str(python), sys.argv[0], *sys.argv[1:]])


ensure()
