"""spectdose: Lu-177 SPECT/CT voxel dosimetry as a pure library (no web, queue or database)."""

from spectdose.errors import (
    CalibrationError,
    GeometryError,
    InputError,
    KernelError,
    SpectdoseError,
)
from spectdose.geometry import Grid, Volume, resample_to_grid

__all__ = [
    "SpectdoseError",
    "InputError",
    "GeometryError",
    "CalibrationError",
    "KernelError",
    "Grid",
    "Volume",
    "resample_to_grid",
]
# The one place of the version (pyproject reads it). It is part of every output UID: raise it with
# any change that can change a result, so a recomputation by new software is a new DICOM object.
__version__ = "0.2.0"
