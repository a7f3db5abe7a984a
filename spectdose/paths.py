"""Where spectdose keeps files by default: the kernel cache and the network weights.

Torch-free and dependency-free, so a process that never runs the network (the gateway)
can find both without importing :mod:`spectdose.cnn`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MODELS_DIR", "default_cache_dir", "default_model_path"]

# $SPECTDOSE_MODELS_DIR (the Docker image sets it), else models/ of the checkout.
MODELS_DIR = Path(os.environ.get("SPECTDOSE_MODELS_DIR") or Path(__file__).resolve().parent.parent / "models")


def default_cache_dir() -> Path:
    """Kernel cache: $SPECTDOSE_CACHE_DIR, else $XDG_CACHE_HOME/spectdose, else ~/.cache/spectdose."""
    env = os.environ.get("SPECTDOSE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spectdose"


def default_model_path(variant: str = "dblurdosenet") -> Path:
    """The weights file of ``variant`` in :data:`MODELS_DIR`."""
    return MODELS_DIR / f"{variant}.pt"
