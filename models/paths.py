"""Where hybridrag keeps its files: the shipped checkpoints, and the data directory it writes."""

from __future__ import annotations

import os
from pathlib import Path

# package data: the shipped checkpoints travel inside the wheel
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def data_dir() -> Path:
    """``$HYBRIDRAG_DATA_DIR``, else ``./data`` under the working directory (never inside the installed package)."""
    return Path(os.environ.get("HYBRIDRAG_DATA_DIR") or Path.cwd() / "data")
