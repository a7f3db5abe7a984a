"""RT Dose (PS3.3 A.18) of an absorbed-dose volume on the CT grid, written with pydicom.

highdicom has no RT Dose class, so the dataset is assembled here attribute by attribute;
``docs/rtdose.md`` explains each choice (summation type, scaling, UIDs, references).
The helpers shared with the Parametric Map writer (validation, deterministic UIDs,
references to the source series) live here too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from decimal import ROUND_CEILING, Decimal, localcontext
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    RTDoseStorage,
    generate_uid,
)

from spectdose.dicom._derived import file_meta
from spectdose.errors import SpectdoseError
from spectdose.geometry import Grid, Volume
from spectdose.study import SeriesRef, Study

__all__ = [
    "ExportError",
    "Replaces",
    "replacements_from_summary",
    "check_replacements",
    "content_digest",
    "series_description",
    "DoseUnits",
    "DoseType",
    "DoseSummationType",
    "DOSE_SUMMATION_TYPE",
    "build_rtdose",
    "write_rtdose",
    "read_rtdose",
    "dose_grid_scaling_ds",
    "derive_uid",
]

GRID_FRAME_OFFSET_VECTOR = Tag(0x3004, 0x000C)  # PS3.6: Grid Frame Offset Vector
MANUFACTURER = "spectdose"
# DICOM DS values are at most 16 bytes (PS3.5 6.2, Value Representation DS).
_DS_MAX_CHARS = 16
# Geometry tolerance between the dose grid and the CT grid, mm (the export contract).
_GRID_TOL_MM = 1e-3


class ExportError(SpectdoseError):
    """A result cannot be written as the DICOM object asked for (wrong grid, units or values)."""


class DoseUnits(enum.Enum):
    """Dose Units (3004,0002), PS3.3 C.8.8.3."""

    GY = "GY"
    RELATIVE = "RELATIVE"


class DoseType(enum.Enum):
    """Dose Type (3004,0004), PS3.3 C.8.8.3."""

    PHYSICAL = "PHYSICAL"
    EFFECTIVE = "EFFECTIVE"
    ERROR = "ERROR"


class DoseSummationType(enum.Enum):
    """Dose Summation Type (3004,000A), PS3.3 C.8.8.3 (Defined Terms)."""

    PLAN = "PLAN"
    MULTI_PLAN = "MULTI_PLAN"
    PLAN_OVERVIEW = "PLAN_OVERVIEW"
    FRACTION = "FRACTION"
    BEAM = "BEAM"
    BRACHY = "BRACHY"
    FRACTION_SESSION = "FRACTION_SESSION"
    BEAM_SESSION = "BEAM_SESSION"
    BRACHY_SESSION = "BRACHY_SESSION"
    CONTROL_POINT = "CONTROL_POINT"
    RECORD = "RECORD"


# The one we write; docs/rtdose.md records why (dciodvfy evidence for each candidate).
DOSE_SUMMATION_TYPE = DoseSummationType.PLAN_OVERVIEW


# --------------------------------------------------------------------------------------
# Shared helpers (also used by export_pmap)


@dataclasses.dataclass(frozen=True)
class Replaces:
    """An earlier output series that this result corrects, and why (said in the new header).

    ``series_instance_uid`` is the earlier series of the *same kind* of object (the RT Dose
    series for the RT Dose, the map's series for the map); ``reason`` is free text such as
    ``"corrected administration time"``.
    """

    series_instance_uid: str
    reason: str

    def __post_init__(self) -> None:
        uid = self.series_instance_uid
        if not (
            isinstance(uid, str)
            and len(uid) <= 64
            and re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", uid)
        ):
            raise ExportError(
                f"replaces: {self.series_instance_uid!r} is not a valid Series Instance UID"
            )
        if not self.reason.strip():
            raise ExportError("replaces: give the reason for the correction")

    def text(self) -> str:
        return f"replaces {self.series_instance_uid} ({self.reason.strip()})"


def replacements_from_summary(summary: Mapping, reason: str) -> dict[str, Replaces]:
    """``{"rtdose": Replaces(...), "doserate": Replaces(...)}`` for the outputs an earlier
    summary.json lists under ``uids``: what ``pipeline.run(..., replaces=)`` takes."""
    return {
        name: Replaces(uids["series_instance_uid"], reason)
        for name, uids in (summary.get("uids") or {}).items()
        if name in ("rtdose", "doserate")
    }


_REPLACEABLE_OUTPUTS = ("rtdose", "doserate")


def check_replacements(replaces: Mapping | None) -> dict[str, Replaces]:
    """``replaces`` as ``{output name: Replaces}``; refuses anything else with the expected form.

    Values may be :class:`Replaces` or their stored form ``{"series_instance_uid": ...,
    "reason": ...}``; output names are ``rtdose`` and ``doserate`` (each earlier series is
    replaced by the new object of its own kind).
    """
    if not replaces:
        return {}
    expected = (
        'replaces must map output names ("rtdose", "doserate") to '
        "Replaces(series_instance_uid, reason) or {series_instance_uid, reason}; "
        "export.replacements_from_summary(earlier_summary, reason) builds it"
    )
    if not isinstance(replaces, Mapping):
        raise ExportError(f"{expected}; got {type(replaces).__name__}")
    out = {}
    for name, value in replaces.items():
        if name not in _REPLACEABLE_OUTPUTS:
            raise ExportError(f"replaces: unknown output {name!r}; {expected}")
        if isinstance(value, Mapping):
            value = Replaces(
                str(value.get("series_instance_uid") or ""), str(value.get("reason") or "")
            )
        if not isinstance(value, Replaces):
            raise ExportError(f"{expected}; got {type(value).__name__} for {name!r}")
        out[name] = value
    return out


def derive_uid(kind: str, study: Study, *parts: str) -> str:
    """A UID that depends only on the source instances, the software version and ``parts``.

    ``parts`` carry everything else that changes the object: method, options and the
    :func:`content_digest` of the inputs. A rerun on identical inputs yields the same UID
    (an idempotent retry overwrites, never duplicates); any change in pixels, used header
    facts, options, calibration, software or model version yields a new one.
    The inputs are serialised as JSON (pydicom concatenates entropy sources, which would
    make ``("DVK", "")`` and ``("DV", "K")`` collide) and instances are sorted, so the
    order in which ingest happened to list the files does not matter.
    """
    inputs = {
        "generator": "spectdose",
        "software_version": software_version(),
        "kind": kind,
        "parts": list(parts),
        "ct": [study.ct_series.series_instance_uid, sorted(study.ct_series.sop_instance_uids)],
        "nm": [
            study.spect_series.series_instance_uid,
            sorted(study.spect_series.sop_instance_uids),
        ],
    }
    return str(generate_uid(entropy_srcs=[json.dumps(inputs, sort_keys=True)]))


def content_digest(study: Study, facts: Mapping[str, object] | None = None) -> str:
    """SHA-256 (hex) of everything in ``study`` that the outputs depend on, plus ``facts``.

    Hashes the CT and SPECT arrays' bytes once (about 0.1 s per 100 MB), their grids and
    units (the SPECT array is already calibrated, so the calibration is in it), the
    calibration note, administration, acquisition time, patient/study attributes copied
    into the outputs, and the source series. ``facts`` holds what the caller used on top:
    options key, time facts actually used, model digest, an earlier series replaced.
    Any change gives another digest, hence other output UIDs (see :func:`derive_uid`).
    """
    digest = hashlib.sha256()
    for name, volume in (("ct", study.ct), ("spect", study.spect)):
        array = np.ascontiguousarray(volume.array)
        header = {
            "name": name,
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "units": volume.units,
            "grid": _grid_facts(volume.grid),
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(array.data)
    header_facts = {
        "calibration": study.calibration_note,
        "administration": dataclasses.asdict(study.administration),
        "acquisition": study.acquisition_datetime,
        "patient": dataclasses.asdict(study.patient),
        "series": [
            {**dataclasses.asdict(ref), "sop_instance_uids": sorted(ref.sop_instance_uids)}
            for ref in (study.ct_series, study.spect_series)
        ],
        "facts": dict(facts or {}),
    }
    digest.update(json.dumps(header_facts, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _grid_facts(grid: Grid) -> dict:
    return {
        "shape": list(grid.shape),
        "spacing_mm": list(grid.spacing_mm),
        "origin_mm": list(grid.origin_mm),
        "axes": np.asarray(grid.axes).round(9).tolist(),
        "frame_of_reference_uid": grid.frame_of_reference_uid,
    }


def series_description(
    base: str, warnings: Sequence[str] = (), replaces: Replaces | None = None
) -> str:
    """``base`` with short markers that a PACS list shows: warnings and corrections (LO, 64).

    The marker must survive, so ``base`` is shortened to make room for it.
    """
    markers = []
    if replaces is not None:
        markers.append("CORRECTED")
    if warnings:
        markers.append(f"{len(warnings)} WARNING" + ("S" if len(warnings) > 1 else ""))
    suffix = f" [{', '.join(markers)}]" if markers else ""
    return base[: 64 - len(suffix)].rstrip() + suffix


def comments_text(
    *,
    provenance: Mapping[str, object] | None,
    warnings: Sequence[str],
    replaces: Replaces | None,
    extra: Sequence[str] = (),
) -> str:
    """Free text (LT, at most 10240 characters) saying how the result was made and its caveats."""
    parts = list(extra)
    if replaces is not None:
        parts.insert(0, replaces.text())
    if provenance:
        parts.append(
            "made with "
            + ", ".join(f"{k}: {v}" for k, v in provenance.items() if v not in (None, ""))
        )
    parts.extend(f"WARNING: {w}" for w in warnings)
    text = "; ".join(parts)
    if len(text) > 10240:  # LT holds at most 10240 characters (PS3.5 6.2)
        text = text[:10200] + " ... (see summary.json)"
    return text


def derivation_text(
    method: str, provenance: Mapping[str, object] | None, options_key: str = ""
) -> str:
    """Derivation Description (ST, at most 1024 characters): method and how it was made."""
    parts = [method]
    if provenance:
        parts.extend(f"{k}: {v}" for k, v in provenance.items() if v not in (None, ""))
    elif options_key:
        parts.append(options_key)
    text = "; ".join(parts)
    return text if len(text) <= 1024 else text[:1020] + " ..."


def ct_frame_of_reference_uid(study: Study) -> str:
    """The CT's frame of reference, which every output must share."""
    from_series = study.ct_series.frame_of_reference_uid
    from_grid = study.ct.grid.frame_of_reference_uid
    if from_series and from_grid and from_series != from_grid:
        raise ExportError(
            f"CT series frame of reference {from_series} differs from the CT volume's {from_grid}"
        )
    uid = from_series or from_grid
    if not uid:
        raise ExportError("the CT has no Frame of Reference UID; outputs cannot be placed on it")
    return uid


def check_on_ct_frame(volume: Volume, study: Study, what: str) -> None:
    """Refuse a volume that is not on the CT's frame of reference, axes and field of view.

    The volume may lie on the CT grid itself or on a coarser output grid built from it
    (``--dose-grid``): same axes and frame of reference, its outer edges within half an
    output voxel of the CT's field of view (see :func:`spectdose.dose_grid.output_grid`).
    """
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise ExportError(f"{what} must be a 3D array, got {array.ndim}D")
    ct_for = ct_frame_of_reference_uid(study)
    if volume.grid.frame_of_reference_uid != ct_for:
        raise ExportError(
            f"{what} is on frame of reference {volume.grid.frame_of_reference_uid!r}, "
            f"not the CT's {ct_for!r}"
        )
    ct_grid = study.ct.grid
    if not volume.grid.same_as(ct_grid, tol_mm=_GRID_TOL_MM):
        if not np.allclose(volume.grid.axes, ct_grid.axes, atol=1e-6):
            raise ExportError(
                f"{what} grid is not oriented like the CT (axes {volume.grid.axes.tolist()})"
            )
        offset = (
            np.asarray(volume.grid.origin_mm) - np.asarray(ct_grid.origin_mm)
        ) @ ct_grid.axes.T
        for a in range(3):
            step, ct_step = volume.grid.spacing_mm[a], ct_grid.spacing_mm[a]
            low, high = offset[a] - step / 2, offset[a] + (volume.grid.shape[a] - 0.5) * step
            ct_low, ct_high = -ct_step / 2, (ct_grid.shape[a] - 0.5) * ct_step
            slack = step / 2 + _GRID_TOL_MM
            if low < ct_low - slack or high > ct_high + slack:
                raise ExportError(
                    f"{what} grid (shape {volume.grid.shape}, spacing {volume.grid.spacing_mm} mm, "
                    f"origin {volume.grid.origin_mm} mm) is not the CT grid and reaches outside the "
                    f"CT field of view (CT shape {ct_grid.shape}, spacing {ct_grid.spacing_mm} mm, "
                    f"origin {ct_grid.origin_mm} mm)"
                )
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ExportError(f"{what} must hold real numbers, got dtype {array.dtype}")
    n_bad = int(np.count_nonzero(~np.isfinite(array)))
    if n_bad:
        raise ExportError(f"{what} has {n_bad} non-finite voxels (NaN or infinity)")
    minimum = float(array.min())
    if minimum < 0:
        raise ExportError(
            f"{what} has negative values (minimum {minimum:g}); dose cannot be negative"
        )


def converted_units(volume: Volume, accepted: dict[str, float], what: str) -> np.ndarray:
    """``volume.array`` as float64 in the target unit, from one of the ``accepted`` units."""
    return np.asarray(volume.array, dtype=np.float64) * _unit_factor(volume, accepted, what)


def _unit_factor(volume: Volume, accepted: dict[str, float], what: str) -> float:
    """The factor from ``volume``'s unit to the target unit (one of the ``accepted`` units)."""
    if volume.units not in accepted:
        raise ExportError(f"{what} has units {volume.units!r}; expected one of {sorted(accepted)}")
    return accepted[volume.units]


def slices_run_against_normal(grid: Grid) -> bool:
    """Whether the grid's slice axis points against the plane normal (row x column).

    DICOM readers stack frames along ``row_dir x col_dir``; such a grid is written in
    reverse slice order so that its frames, too, advance along the normal.
    """
    normal = np.cross(grid.axes[2], grid.axes[1])
    return float(np.dot(normal, grid.axes[0])) < 0


def series_references(study: Study, *, own_study_uid: str) -> tuple[list[Dataset], list[Dataset]]:
    """Common Instance Reference items (PS3.3 C.12.2) for the CT and the NM series.

    Returns ``(ReferencedSeriesSequence items, StudiesContainingOtherReferencedInstances
    items)``: series of the output's own study go in the first, any other in the second.
    """
    same_study: list[Dataset] = []
    by_other_study: dict[str, list[Dataset]] = {}
    for ref in (study.ct_series, study.spect_series):
        item = Dataset()
        item.SeriesInstanceUID = ref.series_instance_uid
        item.ReferencedInstanceSequence = instance_items(ref)
        if ref.study_instance_uid == own_study_uid:
            same_study.append(item)
        else:
            by_other_study.setdefault(ref.study_instance_uid, []).append(item)
    other: list[Dataset] = []
    for study_uid, items in by_other_study.items():
        study_item = Dataset()
        study_item.StudyInstanceUID = study_uid
        study_item.ReferencedSeriesSequence = items
        other.append(study_item)
    return same_study, other


def instance_items(ref: SeriesRef) -> list[Dataset]:
    """One (class, instance) reference item per SOP instance of a source series."""
    if not ref.sop_instance_uids:
        raise ExportError(
            f"source {ref.modality} series {ref.series_instance_uid} lists no instances"
        )
    items = []
    for uid in ref.sop_instance_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    return items


def source_image_items(study: Study) -> list[Dataset]:
    """Source Image Sequence items: every CT and NM instance the result was derived from."""
    items = instance_items(study.ct_series) + instance_items(study.spect_series)
    for item in items:
        item.PurposeOfReferenceCodeSequence = [_source_image_purpose()]
    return items


def _source_image_purpose() -> Dataset:
    # DICOM CID 7202 "Source Image Purposes of Reference", code 121322.
    code = Dataset()
    code.CodeValue = "121322"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Source image for image processing operation"
    return code


def da_tm(when: dt.datetime) -> tuple[str, str]:
    return when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")


def ds(value: float) -> str:
    """A DS string of a geometric value, at most 16 characters, as precise as fits."""
    return pydicom.valuerep.format_number_as_ds(float(value))


def add_patient_and_study(ds_out: Dataset, study: Study) -> None:
    """Patient and General Study modules, copied so the output files into the source study."""
    p = study.patient
    ds_out.PatientName = p.patient_name
    ds_out.PatientID = p.patient_id
    ds_out.PatientBirthDate = p.patient_birth_date
    ds_out.PatientSex = p.patient_sex
    ds_out.StudyInstanceUID = study.ct_series.study_instance_uid
    ds_out.StudyDate = p.study_date
    ds_out.StudyTime = p.study_time
    ds_out.ReferringPhysicianName = p.referring_physician_name
    ds_out.StudyID = p.study_id
    ds_out.AccessionNumber = p.accession_number


def software_version() -> str:
    from spectdose import __version__

    return __version__


# --------------------------------------------------------------------------------------
# Dose Grid Scaling


def dose_grid_scaling_ds(max_dose_gy: float, max_stored: int) -> str:
    """The Dose Grid Scaling as a DS string: as fine as 16 characters allow, never clipping.

    The ideal scaling maps ``max_dose_gy`` onto ``max_stored``. Its decimal string is rounded
    *up* in the last kept digit, then checked against the value a reader will parse, so
    ``round(max_dose_gy / float(result)) <= max_stored`` always holds.

    Parameters
    ----------
    max_dose_gy : largest dose to be stored, Gy (>= 0, finite).
    max_stored : largest pixel value (2**32 - 1 or 2**16 - 1).

    Returns
    -------
    str
        At most 16 characters; ``"1"`` for an all-zero dose.
    """
    if not np.isfinite(max_dose_gy) or max_dose_gy < 0:
        raise ExportError(f"maximum dose must be finite and >= 0 Gy, got {max_dose_gy!r}")
    if max_dose_gy == 0:
        return "1"
    with localcontext() as exact:
        exact.prec, exact.rounding = 60, ROUND_CEILING  # never below the true quotient
        ideal = Decimal(float(max_dose_gy)) / Decimal(max_stored)
    for digits in range(_DS_MAX_CHARS, 0, -1):
        text = _ceil_decimal_string(ideal, digits)
        if len(text) > _DS_MAX_CHARS:
            continue
        # Defend against the parsed float landing a hair below the decimal value.
        while round(max_dose_gy / float(text)) > max_stored:
            text = _ceil_decimal_string(Decimal(text) * (1 + Decimal(10) ** (1 - digits)), digits)
        return text
    raise ExportError(f"no 16-character Dose Grid Scaling for a maximum of {max_dose_gy!r} Gy")


def _ceil_decimal_string(value: Decimal, digits: int) -> str:
    """Shortest of fixed/scientific notation of ``value`` rounded up to ``digits`` figures."""
    quantum = Decimal(1).scaleb(value.adjusted() - digits + 1)
    rounded = value.quantize(quantum, rounding=ROUND_CEILING)
    _sign, mantissa_digits, exponent = rounded.normalize().as_tuple()
    mantissa = "".join(map(str, mantissa_digits))
    fixed = format(rounded.normalize(), "f")
    sci_exp = exponent + len(mantissa) - 1
    sci_mant = mantissa[0] + ("." + mantissa[1:] if len(mantissa) > 1 else "")
    scientific = f"{sci_mant}E{sci_exp}"
    return min((fixed, scientific), key=len)


# --------------------------------------------------------------------------------------
# RT Dose


def build_rtdose(
    dose_gy: Volume,
    study: Study,
    *,
    method: str,
    description: str,
    options_key: str = "",
    content_digest: str = "",
    warnings: Sequence[str] = (),
    provenance: Mapping[str, object] | None = None,
    replaces: Replaces | None = None,
    bits: int = 32,
    series_number: int = 901,
    created_at: dt.datetime | None = None,
) -> Dataset:
    """An RT Dose instance of ``dose_gy`` on the CT frame, referencing the CT and NM series.

    Parameters
    ----------
    dose_gy : absorbed dose, units ``"Gy"`` (or ``"mGy"``, converted), on ``study.ct.grid``
        or an output grid built from it (same axes and frame of reference, see
        :func:`spectdose.dose_grid.output_grid`).
    study : the source study; patient, study and series references are copied from it.
    method : short name of the dose method (e.g. ``"DVK"``), part of the UIDs.
    description : Series Description, e.g. ``"Lu-177 absorbed dose (DVK, Hanscheid STP)"``;
        at most 64 characters; markers for warnings and corrections are added (shortening it).
    options_key : everything else that changes the values (time-integration model,
        kernel, calibration...), part of the UIDs.
    content_digest : :func:`content_digest` of the inputs; part of the UIDs, so a
        recomputation with other input pixels or header facts is a new object.
    warnings : caveats of this result; each is written to Image Comments and their count
        to the Series Description and Dose Comment.
    provenance : how the result was made (method, software, model digest, time model,
        calibration...), written to Derivation Description and Image Comments.
    replaces : the earlier RT Dose series this one corrects; said in the comments and
        marked in the description; part of the UIDs.
    bits : 32 for the product; 16 only for validators that cannot read 32-bit pixels.
    series_number : Series Number of the new series.
    created_at : Instance Creation / Content date and time; defaults to now.

    Returns
    -------
    pydicom.Dataset
        With file meta information, ready for ``dcmwrite``.

    Raises
    ------
    ExportError
        If the dose is not on the CT's frame of reference, axes and field of view, has units
        other than Gy, holds negative or non-finite values, if ``bits`` is not 16 or 32, or if
        the description is empty or longer than 64 characters.
    """
    if bits not in (16, 32):
        raise ExportError(f"bits must be 16 or 32, got {bits!r}")
    if not method:
        raise ExportError("method must name the dose method (it is part of the UIDs)")
    if not description or len(description) > 64:
        raise ExportError(
            f"description must be 1-64 characters (Series Description, LO), got {len(description)}"
        )
    check_on_ct_frame(dose_gy, study, "dose volume")
    to_gy = _unit_factor(dose_gy, {"Gy": 1.0, "mGy": 1e-3}, "dose volume")
    frame_of_reference = ct_frame_of_reference_uid(study)
    grid = dose_gy.grid

    max_stored = 2**bits - 1
    # max(float64(v) * f) == float64(max(v)) * f: scaling by a positive factor keeps the order.
    scaling_text = dose_grid_scaling_ds(float(np.max(dose_gy.array)) * to_gy, max_stored)
    scaling = float(scaling_text)
    # Quantised slab by slab, in float64 as before: a whole clinical volume in float64 is 272 MB per copy.
    stored = np.empty(grid.shape, dtype="<u4" if bits == 32 else "<u2")
    for k in range(grid.shape[0]):
        slab = np.rint(np.asarray(dose_gy.array[k], dtype=np.float64) * to_gy / scaling)
        if slab.max() > max_stored:  # cannot happen by construction of the scaling
            raise ExportError(f"Dose Grid Scaling {scaling_text} would clip the maximum dose")
        stored[k] = slab

    reverse = slices_run_against_normal(grid)
    first_k = grid.shape[0] - 1 if reverse else 0
    if reverse:
        stored = stored[::-1]
    first_position = grid.index_to_lps_mm(np.array([first_k, 0, 0]))
    offsets_mm = np.arange(grid.shape[0]) * grid.spacing_mm[0]

    created_at = created_at or dt.datetime.now()
    created_date, created_time = da_tm(created_at)
    uid_parts = (
        method,
        options_key,
        content_digest,
        replaces.text() if replaces else "",
        f"bits={bits}",
    )
    series_uid = derive_uid("RTDOSE-series", study, *uid_parts)
    sop_uid = derive_uid("RTDOSE-instance", study, *uid_parts)

    out = Dataset()
    out.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common
    out.SOPClassUID = RTDoseStorage
    out.SOPInstanceUID = sop_uid
    out.InstanceCreationDate = created_date
    out.InstanceCreationTime = created_time
    # Patient, General Study
    add_patient_and_study(out, study)
    # RT Series
    out.Modality = "RTDOSE"
    out.SeriesInstanceUID = series_uid
    out.SeriesNumber = series_number
    out.SeriesDate = created_date
    out.SeriesTime = created_time
    out.SeriesDescription = series_description(description, warnings, replaces)
    out.OperatorsName = ""
    # Frame of Reference
    out.FrameOfReferenceUID = frame_of_reference
    out.PositionReferenceIndicator = ""
    # General Equipment
    out.Manufacturer = MANUFACTURER
    out.ManufacturerModelName = MANUFACTURER
    out.SoftwareVersions = software_version()
    # General Image
    out.InstanceNumber = 1
    out.PatientOrientation = ""
    out.ContentDate = created_date
    out.ContentTime = created_time
    out.ImageType = ["DERIVED", "SECONDARY"]
    out.DerivationDescription = derivation_text(method, provenance, options_key)
    # Image Plane
    out.PixelSpacing = [ds(grid.spacing_mm[1]), ds(grid.spacing_mm[2])]
    out.ImageOrientationPatient = [ds(v) for v in (*grid.axes[2], *grid.axes[1])]
    out.ImagePositionPatient = [ds(v) for v in first_position]
    out.SliceThickness = ds(grid.spacing_mm[0])
    # Image Pixel
    out.SamplesPerPixel = 1
    out.PhotometricInterpretation = "MONOCHROME2"
    out.Rows = grid.shape[1]
    out.Columns = grid.shape[2]
    out.BitsAllocated = bits
    out.BitsStored = bits
    out.HighBit = bits - 1
    out.PixelRepresentation = 0
    # Multi-frame
    out.NumberOfFrames = grid.shape[0]
    out.FrameIncrementPointer = GRID_FRAME_OFFSET_VECTOR
    # RT Dose
    out.DoseUnits = DoseUnits.GY.value
    out.DoseType = DoseType.PHYSICAL.value
    out.DoseComment = out.SeriesDescription
    out.ImageComments = comments_text(
        provenance=provenance,
        warnings=warnings,
        replaces=replaces,
        extra=_intake_comments(study, method, options_key, with_time=provenance is None),
    )
    out.DoseSummationType = DOSE_SUMMATION_TYPE.value
    out.PlanOverviewSequence = [_plan_overview_item(study)]
    out.GridFrameOffsetVector = [ds(v) for v in offsets_mm]
    out.DoseGridScaling = scaling_text
    out.TissueHeterogeneityCorrection = "IMAGE"
    # References: each source instance (General Image Source Image Sequence), then per
    # series and study (Common Instance Reference Module, PS3.3 C.12.2).
    out.SourceImageSequence = source_image_items(study)
    same_study, other_studies = series_references(study, own_study_uid=out.StudyInstanceUID)
    if same_study:
        out.ReferencedSeriesSequence = same_study
    if other_studies:
        out.StudiesContainingOtherReferencedInstancesSequence = other_studies
    out.PixelData = np.ascontiguousarray(stored).tobytes()

    out.file_meta = file_meta(RTDoseStorage, sop_uid)
    return out


def _intake_comments(study: Study, method: str, options_key: str, *, with_time: bool) -> list[str]:
    """What a reader needs to interpret the dose: method, options, intake.

    The header's administration time is left out when the provenance states the one used.
    """
    adm = study.administration
    parts = [f"method: {method}"]
    if options_key:
        parts.append(f"options: {options_key}")
    intake = adm.nuclide
    if adm.radiopharmaceutical:
        intake += f" ({adm.radiopharmaceutical})"
    if adm.injected_activity_bq:
        intake += f", {adm.injected_activity_bq / 1e6:.1f} MBq"
    if with_time and adm.administration_datetime is not None:
        intake += f", administered {adm.administration_datetime.isoformat(timespec='minutes')}"
    parts.append(f"administration: {intake}")
    return parts


def _plan_overview_item(study: Study) -> Dataset:
    """The one Plan Overview item that PLAN_OVERVIEW summation goes with (docs/rtdose.md).

    The "plan" is the radionuclide administration, given as one fraction; the images it
    is based on are the CT whose grid the dose lies on.
    """
    item = Dataset()
    item.PlanOverviewIndex = 1
    item.RTPlanLabel = f"{study.administration.nuclide} MRT"[:16]  # SH: 16 characters
    item.TreatmentSite = ""
    item.TreatmentSiteCodeSequence = []
    item.PrescriptionOverviewSequence = []
    item.NumberOfFractionsIncluded = 1
    item.ReferencedImageSequence = instance_items(study.ct_series)
    return item


def write_rtdose(path: str | os.PathLike, dose_gy: Volume, study: Study, **kwargs) -> Path:
    """Build (see :func:`build_rtdose`) and write an RT Dose file; returns its path."""
    dataset = build_rtdose(dose_gy, study, **kwargs)
    path = Path(path)
    dataset.save_as(path, enforce_file_format=True)
    return path


def read_rtdose(path: str | os.PathLike) -> Volume:
    """An RT Dose file as a Volume in Gy, Dose Grid Scaling applied.

    Frames are returned in file order (stacked along row x column direction).

    Raises
    ------
    ExportError
        If the file is not an RT Dose, is not grid-based, has no Dose Grid Scaling, its
        units are not GY, or its frames are not evenly spaced.
    """
    dataset = pydicom.dcmread(path)
    if dataset.get("SOPClassUID") != RTDoseStorage or dataset.get("Modality") != "RTDOSE":
        raise ExportError(
            f"{path} is not an RT Dose (SOP Class {dataset.get('SOPClassUID')}, "
            f"modality {dataset.get('Modality')})"
        )
    if "PixelData" not in dataset:
        raise ExportError(f"{path} holds no dose grid (no Pixel Data)")
    if dataset.get("DoseUnits") != DoseUnits.GY.value:
        raise ExportError(f"{path} has Dose Units {dataset.get('DoseUnits')!r}, expected GY")
    if "DoseGridScaling" not in dataset:
        raise ExportError(f"{path} has pixel data but no Dose Grid Scaling")
    n_frames = int(dataset.get("NumberOfFrames", 1))
    offsets = np.asarray(dataset.GridFrameOffsetVector, dtype=float).reshape(-1)
    if offsets.size != n_frames:
        raise ExportError(f"{path}: {offsets.size} grid frame offsets for {n_frames} frames")
    position = np.asarray(dataset.ImagePositionPatient, dtype=float)
    if n_frames > 1:
        steps = np.diff(offsets)
        if not np.allclose(steps, steps[0], rtol=1e-4) or steps[0] == 0:
            raise ExportError(f"{path}: dose frames are not evenly spaced ({offsets[:4]}...)")
        slice_spacing = float(abs(steps[0]))
    else:
        slice_spacing = float(dataset.get("SliceThickness") or 1.0)
    orientation = np.asarray(dataset.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slice_dir = normal if n_frames == 1 or offsets[1] > offsets[0] else -normal
    # Relative offsets (first value 0) are measured from Image Position (Patient); in an
    # absolute vector (PS3.3 C.8.8.3.2) the first value is that position's z. Either way
    # the first frame lies at Image Position (Patient).
    origin = position
    axes = np.stack([slice_dir, col_dir, row_dir])
    pixel_spacing = [float(v) for v in dataset.PixelSpacing]
    grid = Grid(
        (n_frames, int(dataset.Rows), int(dataset.Columns)),
        (slice_spacing, pixel_spacing[0], pixel_spacing[1]),
        tuple(origin),
        axes,
        dataset.get("FrameOfReferenceUID"),
    )
    stored = dataset.pixel_array.reshape(grid.shape)
    values = stored.astype(np.float64) * float(dataset.DoseGridScaling)
    return Volume(values, grid, "Gy")
