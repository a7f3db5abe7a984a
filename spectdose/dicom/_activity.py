"""From SPECT pixel values and header facts to activity concentration, and the times that go with it.

Private to :mod:`spectdose.dicom.ingest`. SimpleITK and most viewers ignore NM Real World Value
Mapping; here units are read explicitly and every conversion is written in one place:

* Real World Value Mapping (PS3.3 C.7.6.16.2.11) with units Bq/ml: ``c = slope*SV + intercept``
  applied to *stored* values (a per-frame functional group mapping wins over a shared one,
  which wins over the top-level sequence);
* PET-style Units BQML (PS3.3 C.8.9.1.1.3): ``c = RescaleSlope*SV + RescaleIntercept`` per slice;
* counts: ``c [Bq/ml] = v / (S [cps/MBq] * t_view [s]) * 1e6 / V_voxel [ml]``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from spectdose.constants import LU177_HALF_LIFE_S
from spectdose.dicom._files import ds_float
from spectdose.errors import CalibrationError

# RadionuclideTotalDose is MBq in the NM Isotope Module (PS3.3 C.8.4.10.1.7) but Bq in the
# PET Isotope Module (PS3.3 C.8.9.2). No patient receives < 1e5 Bq (0.1 MBq) for imaging
# nor > 1e5 MBq (100 GBq) for therapy, so a value's magnitude tells the unit when a
# vendor writes the other one.
_DOSE_UNIT_THRESHOLD = 1e5

# Real World Value Mapping units accepted as activity concentration, to Bq/ml.
_CONCENTRATION_UNITS = {
    "bq/ml": 1.0,
    "bq/cm3": 1.0,
    "bqml": 1.0,
    "kbq/ml": 1e3,
    "kbq/cm3": 1e3,
    "mbq/ml": 1e6,
    "mbq/cm3": 1e6,
}


@dataclasses.dataclass
class Scaling:
    """How stored values become the SPECT's units: per-slice ``slope*SV + intercept``."""

    slope: np.ndarray  # (slices,)
    intercept: np.ndarray  # (slices,)
    units: str  # "Bq/ml" or "counts"
    note: str


def _normalise_unit(text: str) -> str:
    return text.strip().replace(" ", "").replace("^3", "3").lower()


# Real World Value Mapping units meaning "reconstructed counts" (UCUM annotations and
# common vendor spellings); such a mapping still needs a camera sensitivity.
_COUNT_UNITS = {"{counts}", "counts", "{count}", "count", "cnts", "{cnts}", "{cts}"}


def _rwvm_item(items, where: str, wanted: str) -> tuple[float, float, str] | None:
    """(slope, intercept, note) of the item mapping to ``wanted`` ("Bq/ml" or "counts")."""
    for item in items or []:
        codes = item.get("MeasurementUnitsCodeSequence", None)
        unit = str(codes[0].get("CodeValue", "")) if codes else ""
        label = _normalise_unit(str(item.get("LUTLabel", "")))
        if wanted == "Bq/ml":
            factor = _CONCENTRATION_UNITS.get(_normalise_unit(unit))
            if factor is None and not unit and label == "bqml":
                factor = 1.0
        else:
            factor = 1.0 if _normalise_unit(unit) in _COUNT_UNITS else None
        if factor is None:
            continue
        if "RealWorldValueSlope" not in item:
            raise CalibrationError(
                f"the {wanted} Real World Value Mapping ({where}) is a lookup table, which is not "
                "supported; ask for a linear mapping (Real World Value Slope/Intercept)"
            )
        context = f"Real World Value Mapping ({where})"
        slope = ds_float(item, "RealWorldValueSlope", 1.0, context) * factor
        intercept = ds_float(item, "RealWorldValueIntercept", 0.0, context) * factor
        return slope, intercept, f"{context} in {unit or 'BQML'}"
    return None


def _rwvm_scaling(ds: Dataset, n_frames: int, wanted: str) -> Scaling | None:
    """A per-frame functional group mapping wins over a shared one, which wins over the top level."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    if per_frame and len(per_frame) == n_frames:
        found = [
            _rwvm_item(f.get("RealWorldValueMappingSequence", None), "per-frame", wanted)
            for f in per_frame
        ]
        if all(found):
            slopes = np.array([f[0] for f in found])
            intercepts = np.array([f[1] for f in found])
            return Scaling(slopes, intercepts, wanted, found[0][2])
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    found = None
    if shared:
        found = _rwvm_item(
            shared[0].get("RealWorldValueMappingSequence", None), "shared functional group", wanted
        )
    found = found or _rwvm_item(
        ds.get("RealWorldValueMappingSequence", None), "image level", wanted
    )
    if found:
        return Scaling(np.full(n_frames, found[0]), np.full(n_frames, found[1]), wanted, found[2])
    return None


def nm_scaling(ds: Dataset, n_frames: int, notes: list[str]) -> Scaling:
    """Scaling for one NM object (multi-frame, or one slice of a single-frame stack).

    In order: a Bq/ml Real World Value Mapping; NM Units BQML with Rescale Slope; a
    counts Real World Value Mapping; else the stored values (with Rescale Slope/Intercept
    if present) are counts.
    """
    found = _rwvm_scaling(ds, n_frames, "Bq/ml")
    if found:
        return found
    slope = ds_float(ds, "RescaleSlope", 1.0, "SPECT")
    intercept = ds_float(ds, "RescaleIntercept", 0.0, "SPECT")
    if str(ds.get("Units", "") or "").upper() == "BQML":
        note = "NM Units BQML with Rescale Slope"
        return Scaling(np.full(n_frames, slope), np.full(n_frames, intercept), "Bq/ml", note)
    found = _rwvm_scaling(ds, n_frames, "counts")
    if found:
        return found
    if ds.get("RealWorldValueMappingSequence", None):
        units = [
            str(i.MeasurementUnitsCodeSequence[0].get("CodeValue", "?"))
            for i in ds.RealWorldValueMappingSequence
            if i.get("MeasurementUnitsCodeSequence")
        ]
        notes.append(
            f"Real World Value Mapping in units {units} is neither activity concentration nor counts; "
            "stored values taken as counts"
        )
    note = (
        "counts"
        if (slope, intercept) == (1.0, 0.0)
        else f"counts (Rescale Slope {slope:g}, Intercept {intercept:g})"
    )
    return Scaling(np.full(n_frames, slope), np.full(n_frames, intercept), "counts", note)


def pt_scaling(headers: list[Dataset]) -> Scaling:
    """Per-slice rescale of a PET-style BQML series (PS3.3 C.8.9.4.1: Rescale Slope may vary by slice)."""
    slope = np.array([ds_float(h, "RescaleSlope", 1.0, "SPECT") for h in headers])
    intercept = np.array([ds_float(h, "RescaleIntercept", 0.0, "SPECT") for h in headers])
    return Scaling(slope, intercept, "Bq/ml", "PET-style Units BQML with per-slice Rescale Slope")


def frame_duration_s(ds: Dataset) -> float | None:
    """Time per projection view (s): RotationInformationSequence[0].ActualFrameDuration (ms)."""
    rot = ds.get("RotationInformationSequence", None)
    source = rot[0] if rot else ds
    value = source.get("ActualFrameDuration", None)
    if value in (None, ""):
        value = ds.get("ActualFrameDuration", None)
    try:
        ms = float(value)
    except (TypeError, ValueError):
        return None
    return ms / 1000.0 if ms > 0 else None


# ----------------------------------------------------------------------------- times


def _naive(value: dt.datetime, reference_tz: dt.tzinfo | None) -> dt.datetime:
    if value.tzinfo is not None and reference_tz is not None:
        value = value.astimezone(reference_tz)
    return value.replace(tzinfo=None)


def parse_dt(value) -> dt.datetime | None:
    """A DICOM DT as a datetime (aware when the value carries a UTC offset)."""
    if value in (None, ""):
        return None
    try:
        parsed = DT(str(value).strip())
    except (ValueError, TypeError, OverflowError):
        return None
    return dt.datetime(
        parsed.year,
        parsed.month,
        parsed.day,
        parsed.hour,
        parsed.minute,
        parsed.second,
        parsed.microsecond,
        tzinfo=parsed.tzinfo,
    )


def parse_da_tm(date, time) -> dt.datetime | None:
    if date in (None, "") or time in (None, ""):
        return None
    try:
        d, t = DA(str(date).strip()), TM(str(time).strip())
    except (ValueError, TypeError, OverflowError):
        return None
    if d is None or t is None:
        return None
    return dt.datetime.combine(d, dt.time(t.hour, t.minute, t.second, t.microsecond))


def acquisition_start(
    headers: list[Dataset], what: str, notes: list[str]
) -> tuple[dt.datetime | None, str]:
    """Earliest acquisition start over the SPECT's files (local time, timezone-naive) and its source.

    The source is "acquisition" (Acquisition DateTime, or Acquisition Date + Time), or
    "series" / "study" when only those dates are there: a reconstruction's series is often
    written hours after the acquisition, so the pipeline uses those only when allowed.
    """
    found: list[dt.datetime] = []
    for ds in headers:
        value = parse_dt(ds.get("AcquisitionDateTime", None)) or parse_da_tm(
            ds.get("AcquisitionDate", None), ds.get("AcquisitionTime", None)
        )
        if value is not None:
            found.append(value)
    if found:
        tz = next((v.tzinfo for v in found if v.tzinfo is not None), None)
        return min(_naive(v, tz) for v in found), "acquisition"
    ds = headers[0]
    for label, (d, t) in (
        ("series", ("SeriesDate", "SeriesTime")),
        ("study", ("StudyDate", "StudyTime")),
    ):
        value = parse_da_tm(ds.get(d, None), ds.get(t, None))
        if value is not None:
            notes.append(
                f"{what}: no acquisition date/time; only the {label} date/time ({value.isoformat()}) is known"
            )
            return value, label
    notes.append(f"{what}: no acquisition date in the header (de-identified?)")
    return None, ""


@dataclasses.dataclass
class Radiopharmaceutical:
    nuclide: str
    half_life_s: float
    injected_activity_bq: float | None
    administration: dt.datetime | None
    agent: str
    # Radiopharmaceutical Start Time when the header has no date for it: never completed by a guess here.
    start_time_only: dt.time | None = None
    nuclide_source: str = ""  # where the nuclide was read; "" when the header does not say


def _is_lu177(text: str) -> bool:
    text = text.replace("^", "").replace(" ", "").replace("-", "").lower()
    return "177" in text and ("lu" in text or "lutetium" in text)


def _nuclide(item: Dataset, what: str) -> tuple[str, str]:
    """(nuclide, where it was read) from one Radiopharmaceutical item; ("", "") when it says nothing.

    Read from the Radionuclide Code Sequence, else the radiopharmaceutical's name or code
    (e.g. "Lu-177 DOTATATE"), else a half-life within 2 % of Lu-177's (ICRP-107).
    """
    codes = item.get("RadionuclideCodeSequence", None)
    meaning = str(codes[0].get("CodeMeaning", "") or "").strip() if codes else ""
    if meaning:
        return ("Lu-177" if _is_lu177(meaning) else meaning), "Radionuclide Code Sequence"
    agent_codes = item.get("RadiopharmaceuticalCodeSequence", None)
    names = [str(item.get("Radiopharmaceutical", "") or "")]
    names += [str(c.get("CodeMeaning", "") or "") for c in (agent_codes or [])]
    if any(_is_lu177(n) for n in names):
        return "Lu-177", "radiopharmaceutical name"
    if item.get("RadionuclideHalfLife", None) not in (None, ""):
        half_life_s = ds_float(item, "RadionuclideHalfLife", 0.0, what)
        if abs(half_life_s / LU177_HALF_LIFE_S - 1) <= 0.02:
            return "Lu-177", "Radionuclide Half Life"
        if half_life_s > 0:
            return f"a nuclide with half-life {half_life_s / 3600:.4g} h", "Radionuclide Half Life"
    return "", ""


def radiopharmaceutical(
    ds: Dataset, modality: str, acquisition: dt.datetime | None, what: str, notes: list[str]
) -> Radiopharmaceutical:
    """Nuclide, half-life, administered activity and time from the first Radiopharmaceutical item."""
    seq = ds.get("RadiopharmaceuticalInformationSequence", None)
    if not seq:
        notes.append(f"{what}: no Radiopharmaceutical Information (radionuclide and administration unknown)")
        return Radiopharmaceutical("", float("nan"), None, None, "")
    if len(seq) > 1:
        notes.append(f"{what}: {len(seq)} radiopharmaceutical items; the first is used")
    item = seq[0]
    nuclide, nuclide_source = _nuclide(item, what)
    half_life_s = LU177_HALF_LIFE_S if nuclide == "Lu-177" else float("nan")
    raw_half_life = item.get("RadionuclideHalfLife", None)
    if raw_half_life not in (None, ""):
        header_half_life = ds_float(item, "RadionuclideHalfLife", LU177_HALF_LIFE_S, what)
        if nuclide == "Lu-177" and abs(header_half_life / LU177_HALF_LIFE_S - 1) > 0.02:
            notes.append(
                f"{what}: header half-life {header_half_life:.0f} s differs from Lu-177's "
                f"{LU177_HALF_LIFE_S:.0f} s (ICRP-107); the ICRP value is used"
            )
        elif nuclide != "Lu-177" and header_half_life > 0:
            half_life_s = header_half_life

    activity_bq = None
    raw = item.get("RadionuclideTotalDose", None)
    if raw not in (None, ""):
        value = ds_float(item, "RadionuclideTotalDose", 0.0, what)
        standard_mbq = modality == "NM"  # PS3.3: NM in MBq, PET in Bq
        if value <= 0:
            notes.append(
                f"{what}: Radionuclide Total Dose is {value:g}; administered activity unknown"
            )
        elif value < _DOSE_UNIT_THRESHOLD:
            activity_bq = value * 1e6
            if not standard_mbq:
                notes.append(
                    f"{what}: PET-style Radionuclide Total Dose {value:g} is too small for Bq; read as MBq"
                )
        else:
            activity_bq = value
            if standard_mbq:
                notes.append(
                    f"{what}: NM Radionuclide Total Dose {value:g} is too large for MBq; read as Bq"
                )
    else:
        notes.append(f"{what}: no Radionuclide Total Dose (administered activity unknown)")

    tz = acquisition.tzinfo if acquisition is not None else None
    admin = parse_dt(item.get("RadiopharmaceuticalStartDateTime", None))
    start_time_only = None
    if admin is not None:
        admin = _naive(admin, tz)
    else:
        raw_time = item.get("RadiopharmaceuticalStartTime", None)
        try:
            parsed = TM(str(raw_time).strip()) if raw_time not in (None, "") else None
        except (ValueError, TypeError, OverflowError):
            parsed = None
        if parsed is not None:
            start_time_only = dt.time(parsed.hour, parsed.minute, parsed.second, parsed.microsecond)
            notes.append(
                f"{what}: administration has a time ({start_time_only.isoformat(timespec='minutes')}) but no date "
                "(Radiopharmaceutical Start Time only)"
            )
        else:
            notes.append(f"{what}: no administration date/time (Radiopharmaceutical Start DateTime)")
    agent = str(item.get("Radiopharmaceutical", "") or "")
    codes = item.get("RadiopharmaceuticalCodeSequence", None)
    if not agent and codes:
        agent = str(codes[0].get("CodeMeaning", "") or "")
    return Radiopharmaceutical(nuclide, half_life_s, activity_bq, admin, agent, start_time_only, nuclide_source)


def decay_correction(ds: Dataset) -> tuple[str, bool]:
    """(Decay Correction (0054,1102) value upper-cased or "", whether Corrected Image (0028,0051) lists DECY)."""
    mode = str(ds.get("DecayCorrection", "") or "").strip().upper()
    corrected = [str(v).strip().upper() for v in (ds.get("CorrectedImage", []) or [])]
    return mode, "DECY" in corrected


def decay_factor(
    headers: list[Dataset],
    rp: Radiopharmaceutical,
    elapsed_s: float | None,
    what: str,
    notes: list[str],
    modality: str = "PT",
) -> float:
    """Factor taking SPECT values (NM or PET-style) to the acquisition start, read from Decay Correction.

    PS3.3 C.8.9.1.1 (Decay Correction 0054,1102; NM objects carry it too): START — values are
    decay-corrected to the acquisition start already (factor 1). ADMIN — corrected to the
    administration time: multiply by exp(-ln2 * dt / T½), dt = administration to acquisition
    start. NONE — not corrected; for Lu-177 the decay during a SPECT acquisition (< 0.5 % in an
    hour, T½ = 6.6 d) is neglected and the values are taken as at the acquisition start. The
    Decay Correction value decides; Corrected Image (DECY or not) only adds a warning when it
    disagrees, so every warning says what the header says. ``elapsed_s`` is needed for ADMIN only;
    the caller resolves it from the header or the user's time options.
    """
    ds = headers[0]
    mode, decy = decay_correction(ds)
    kind = "PET-style" if modality == "PT" else "NM"
    said = f"Decay Correction (0054,1102) {mode or '(absent)'}, Corrected Image {'lists' if decy else 'without'} DECY"
    if mode == "ADMIN":
        if elapsed_s is None or not math.isfinite(rp.half_life_s):
            raise CalibrationError(
                f"{what}: values are decay-corrected to the administration time (Decay Correction ADMIN) but the "
                "time since administration or the half-life is missing, so they cannot be referred to "
                "the acquisition start"
            )
        factor = math.exp(-math.log(2) * elapsed_s / rp.half_life_s)
        notes.append(
            f"{what}: {kind} values are decay-corrected to the administration ({said}); multiplied by "
            f"{factor:.4f} (decay over {elapsed_s / 3600:.1f} h) to refer them to the acquisition start"
            + ("" if decy else "; Corrected Image does not list DECY, the Decay Correction value is followed")
        )
        return factor
    if mode == "START":
        if not decy:
            notes.append(
                f"{what}: {said}; values taken as at the acquisition start"
            )
        return 1.0
    if mode == "NONE":
        if decy:
            notes.append(
                f"{what}: {said} (they disagree); values taken as at the acquisition start, as NONE says"
            )
        return 1.0
    if mode == "":
        if modality == "PT" or decy:
            notes.append(
                f"{what}: {kind} values with {said}: the header does not state the reference time of the values; "
                "taken as at the acquisition start"
            )
        return 1.0
    raise CalibrationError(
        f"{what}: unknown Decay Correction {mode[:16]!r} (PS3.3 defines NONE, START, ADMIN): the time the values "
        "refer to is unknown"
    )
