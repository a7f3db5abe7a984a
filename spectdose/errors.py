"""Errors the core raises; adapters map them to HTTP 4xx, DICOM statuses or failed jobs."""

__all__ = [
    "SpectdoseError",
    "InputError",
    "GeometryError",
    "CalibrationError",
    "KernelError",
]


class SpectdoseError(Exception):
    """Base class: a problem with the study or the request, stated for the user."""


class InputError(SpectdoseError):
    """The input is not a usable study: missing, unreadable, ambiguous or of the wrong kind."""


class GeometryError(SpectdoseError):
    """Volumes cannot be placed in patient space as asked (uneven spacing, tilt, no overlap)."""


class CalibrationError(SpectdoseError):
    """The SPECT values cannot be turned into activity (no units, no calibration factor)."""


class KernelError(SpectdoseError):
    """A dose voxel kernel cannot be made for the requested nuclide, medium or voxel size."""
