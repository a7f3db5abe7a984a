"""spectdose: Lu-177 SPECT/CT voxel dosimetry as a pure library (no web, queue or database)."""

from .errors import CalibrationError, GeometryError, InputError, KernelError, SpectdoseError
from .geometry import Grid, Volume, resample_to_grid

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
__version__ = "0.1.0"
