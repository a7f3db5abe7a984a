"""DICOM export of results: RT Dose of absorbed dose, Parametric Map of dose rate.

Both sit on the CT's frame of reference and axes (the CT grid, or a coarser output grid
for ``--dose-grid``), copy the patient and study of the source so that a PACS files them
into the same study, reference every CT and NM instance they derive from, and take UIDs
derived from everything that changes them (input pixels and header facts, options,
software and model version), so an identical retry overwrites and any change is a new
object. They carry their warnings and how they were made. See ``docs/rtdose.md``.
"""


from spectdose.dicom.pmap import (
    DOSE_RATE_PER_MBQ_UNIT,
    DOSE_RATE_UNIT,
    build_dose_rate_map,
    read_dose_rate_map,
    write_dose_rate_map,
)
from spectdose.dicom.rtdose import (
    DOSE_SUMMATION_TYPE,
    DoseSummationType,
    DoseType,
    DoseUnits,
    ExportError,
    Replaces,
    build_rtdose,
    check_replacements,
    content_digest,
    dose_grid_scaling_ds,
    read_rtdose,
    replacements_from_summary,
    write_rtdose,
)
from spectdose.dose_grid import average_onto_grid, grid_for_option, output_grid

__all__ = [
    "ExportError",
    "Replaces",
    "replacements_from_summary",
    "check_replacements",
    "content_digest",
    "output_grid",
    "grid_for_option",
    "average_onto_grid",
    "DOSE_RATE_PER_MBQ_UNIT",
    "DoseUnits",
    "DoseType",
    "DoseSummationType",
    "DOSE_SUMMATION_TYPE",
    "DOSE_RATE_UNIT",
    "build_rtdose",
    "write_rtdose",
    "read_rtdose",
    "dose_grid_scaling_ds",
    "build_dose_rate_map",
    "write_dose_rate_map",
    "read_dose_rate_map",
]
