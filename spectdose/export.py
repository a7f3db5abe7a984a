"""DICOM export of results: RT Dose of absorbed dose, Parametric Map of dose rate.

Both sit on the CT grid and frame of reference, copy the patient and study of the source
so that a PACS files them into the same study, reference every CT and NM instance they
derive from, and take UIDs derived from their inputs so that a rerun replaces rather than
duplicates. See ``docs/rtdose.md``.
"""

from .export_pmap import (
    DOSE_RATE_UNIT,
    PARAMETRIC_MAP_STORAGE,
    build_dose_rate_map,
    read_dose_rate_map,
    write_dose_rate_map,
)
from .export_rtdose import (
    DOSE_SUMMATION_TYPE,
    RT_DOSE_STORAGE,
    DoseSummationType,
    DoseType,
    DoseUnits,
    ExportError,
    build_rtdose,
    dose_grid_scaling_ds,
    read_rtdose,
    write_rtdose,
)

__all__ = [
    "ExportError",
    "DoseUnits",
    "DoseType",
    "DoseSummationType",
    "DOSE_SUMMATION_TYPE",
    "RT_DOSE_STORAGE",
    "PARAMETRIC_MAP_STORAGE",
    "DOSE_RATE_UNIT",
    "build_rtdose",
    "write_rtdose",
    "read_rtdose",
    "dose_grid_scaling_ds",
    "build_dose_rate_map",
    "write_dose_rate_map",
    "read_dose_rate_map",
]
