"""DICOM export of results: RT Dose of absorbed dose, Parametric Map of dose rate.

Both sit on the CT's frame of reference and axes (the CT grid, or a coarser output grid
for ``--dose-grid``), copy the patient and study of the source so that a PACS files them
into the same study, reference every CT and NM instance they derive from, and take UIDs
derived from everything that changes them (input pixels and header facts, options,
software and model version), so an identical retry overwrites and any change is a new
object. They carry their warnings and how they were made. See ``docs/rtdose.md``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from spectdose.dicom.pmap import (
    DOSE_RATE_PER_MBQ_UNIT,
    DOSE_RATE_UNIT,
    MAP_16_BIT_MAX_ERROR,
    MEASURED_16_BIT_MAX_BOUND,
    MeasuredErrors,
    build_dose_rate_map,
    dose_rate_map_bits,
    read_dose_rate_map,
    sixteen_bit_rule,
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

# The RT Dose is written in 16 bits when rounding to the 16-bit step keeps every reference dose
# (the mean dose in tissue, each given region's mean) within this fraction; else in 32 bits.
# Rounding moves a voxel by at most half the step, so any mean moves by at most half the step
# too: the bound holds for the worst case, not only on average (docs/rtdose.md, "16 or 32 bits").
RTDOSE_16_BIT_MAX_ERROR = 1e-3


def rtdose_bits(dose_gy: np.ndarray, reference_gy: Iterable[float], *,
                measured_errors: MeasuredErrors | None = None) -> tuple[int, dict]:
    """16 or 32 bits for an RT Dose, and why (:func:`spectdose.dicom.pmap.sixteen_bit_rule`): 16 when
    half the 16-bit Dose Grid Scaling step (max / 65535, see :func:`dose_grid_scaling_ds`) is at most
    :data:`RTDOSE_16_BIT_MAX_ERROR` of the smallest positive reference dose, or, up to a worst case of
    1 %, when ``measured_errors(step)`` (the relative change of each quoted mean with the dose rounded
    to ``step``, measured on the volume) is at most that for every quoted mean.

    A PACS stores and shows a 16-bit dose more readily and in half the bytes. Without any
    positive reference dose: 32 bits.
    """
    top = float(np.max(dose_gy)) if np.size(dose_gy) else 0.0
    references = [float(r) for r in reference_gy if r is not None and np.isfinite(r) and r > 0]
    facts: dict = {"max_gy": top, "smallest_reference_gy": min(references) if references else None}
    if top <= 0 or not references:
        return (16 if top <= 0 else 32), {**facts, "bits": 16 if top <= 0 else 32,
                                          "max_rounding_error_gy": 0.0 if top <= 0 else None}
    step16 = float(dose_grid_scaling_ds(top, 2**16 - 1))
    bound16 = step16 / 2 / min(references)
    bits, rule = sixteen_bit_rule(bound16, step16, measured_errors, RTDOSE_16_BIT_MAX_ERROR)
    step = step16 if bits == 16 else float(dose_grid_scaling_ds(top, 2**32 - 1))
    return bits, {**facts, **rule, "bits": bits, "max_rounding_error_gy": step / 2,
                  "max_rounding_error_of_smallest_reference": step / 2 / min(references)}

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
    "RTDOSE_16_BIT_MAX_ERROR",
    "MEASURED_16_BIT_MAX_BOUND",
    "rtdose_bits",
    "MAP_16_BIT_MAX_ERROR",
    "dose_rate_map_bits",
]
