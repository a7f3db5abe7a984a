"""Where spectdose keeps files by default: the kernel cache and the network weights.

Torch-free and dependency-free, so a process that never runs the network (the gateway)
can find both without importing :mod:`spectdose.cnn.inference`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["MODELS_DIR", "default_cache_dir", "default_model_path", "ensemble_path", "installed_models", "atomic_write"]

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


def ensemble_path(model_path: Path) -> Path:
    """The deep ensemble that gives the uncertainty of ``model_path``: ``<weights stem>_ensemble.pt`` beside it."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + "_ensemble.pt")


def installed_models(variant: str = "dblurdosenet") -> tuple[bool, bool]:
    """(weights installed, ensemble installed) for ``variant`` in :data:`MODELS_DIR`.

    One look at the files for every default that depends on them (the service's "auto"
    engine and "auto" uncertainty), so the two can never disagree about what is installed.
    """
    weights = default_model_path(variant)
    return weights.is_file(), ensemble_path(weights).is_file()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file so that readers see the old one or the whole new one, never a part.

    ``write`` fills a unique temporary file in the target folder, which is fsynced and renamed
    over the target (``os.replace`` is atomic on POSIX); the folder is then fsynced so the
    rename survives a crash. Fixed temporary names (``x.tmp``) collide when two processes write
    at once. The temporary file is removed on any failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
