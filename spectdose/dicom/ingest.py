"""DICOM ingest: a folder or zip of a Lu-177 SPECT/CT study -> :class:`~spectdose.study.Study`.

Files may come in any order and nesting, mixed with non-DICOM files, DICOMDIRs and our own
earlier outputs. We read every header (without pixels), group files into series, pick
the reconstructed SPECT (joining the beds of a multi-bed acquisition) and the axial CT that
goes with it (not a contrast-enhanced one unless allowed), read only their pixels, and
turn values into physical units ourselves: CT into HU (Rescale Slope/Intercept per
slice), SPECT into Bq/ml at acquisition start (Real World Value Mapping, PET-style BQML,
or counts with a camera sensitivity). See docs/ingest.md for every rule and refusal.

Messages and logs name files by their path relative to the input and series by UID,
never by patient attributes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import numbers
import tomllib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from spectdose.constants import LU177_HALF_LIFE_S
from spectdose.dicom import _activity as act
from spectdose.dicom._beds import BedSet, bed_sets, beds_said, join
from spectdose.dicom._files import FileHeader, ds_float, input_files, read_header
from spectdose.dicom._series import (
    Candidate,
    approx_bounds_lps,
    candidate_grid,
    group_series,
    read_pixels,
    stack_geometry,
)
from spectdose.dicom.completeness import CT_SHORT_ASSUMPTION, ct_coverage_problem
from spectdose.errors import CalibrationError, GeometryError, InputError
from spectdose.geometry import Grid, Volume
from spectdose.option_names import option_hint
from spectdose.study import (
    Administration,
    PatientInfo,
    SeriesRef,
    Study,
    _accept_hint,
    resolve_times,
)

# What pydicom and our readers raise on malformed content that the specific checks did not name.
MALFORMED_CONTENT_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, NotImplementedError)

__all__ = [
    "CameraCalibration",
    "load_calibrations",
    "SeriesSummary",
    "Inventory",
    "scan_dicom",
    "load_study",
    "MIN_ACTIVITY_FRACTION_IN_CT",
]

log = logging.getLogger(__name__)


def _hint(field: str) -> str:
    """'--spect-series (CLI) / spect_series (REST)': the option that supplies a fact, for messages."""
    return option_hint(field)


# The SPECT must place at least this fraction of its (positive) activity inside the CT
# volume, or the study is refused: dose needs densities where the activity is.
MIN_ACTIVITY_FRACTION_IN_CT = 0.5
# Below this fraction a warning is recorded (activity outside the CT gets no density).
_WARN_ACTIVITY_FRACTION_IN_CT = 0.95
# Two CT candidates whose coverage of the SPECT differs by less than this are a tie.
_COVERAGE_TIE = 0.05
_CT_PADDING_HU = -1000.0  # voxels flagged by Pixel Padding Value are outside the CT's field: air


# ----------------------------------------------------------------------------- calibration


@dataclasses.dataclass(frozen=True)
class CameraCalibration:
    """A gamma camera's planar/tomographic sensitivity for Lu-177 and which camera it is for.

    Fields left ``None`` match any camera; an entry matches a SPECT when every field it
    sets equals (case-insensitively) the NM header's Manufacturer (0008,0070), Station
    Name (0008,1010), Device Serial Number (0018,1000) or the Calling AE Title the file
    arrived from. The most specific matching entry wins.
    """

    sensitivity_cps_per_mbq: float
    manufacturer: str | None = None
    station_name: str | None = None
    device_serial_number: str | None = None
    calling_ae_title: str | None = None

    def __post_init__(self) -> None:
        s = self.sensitivity_cps_per_mbq
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s <= 0:
            raise CalibrationError(
                f"camera sensitivity must be a positive number of cps/MBq, got {s!r}"
            )

    @property
    def specificity(self) -> int:
        return sum(v is not None for v in self._criteria().values())

    def _criteria(self) -> dict[str, str | None]:
        return {
            "Manufacturer": self.manufacturer,
            "StationName": self.station_name,
            "DeviceSerialNumber": self.device_serial_number,
            "CallingAETitle": self.calling_ae_title,
        }

    def matches(self, header: Dataset, calling_ae_title: str | None = None) -> bool:
        for keyword, wanted in self._criteria().items():
            if wanted is None:
                continue
            have = calling_ae_title if keyword == "CallingAETitle" else header.get(keyword, None)
            if have is None or str(have).strip().casefold() != str(wanted).strip().casefold():
                return False
        return True

    def describe(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self._criteria().items() if v is not None]
        return f"{self.sensitivity_cps_per_mbq:g} cps/MBq ({', '.join(parts) or 'any camera'})"


_CALIBRATION_KEYS = {f.name for f in dataclasses.fields(CameraCalibration)}


def load_calibrations(path: str | Path) -> list[CameraCalibration]:
    """Read camera calibrations from a JSON or TOML file.

    JSON: a list of objects, or ``{"cameras": [...]}``. TOML: ``[[cameras]]`` tables.
    Keys are the :class:`CameraCalibration` field names; ``sensitivity_cps_per_mbq`` is
    required.

    Raises
    ------
    InputError
        unreadable file, unknown keys or a missing sensitivity.
    CalibrationError
        a sensitivity that is not a positive number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"camera calibration file {path.name}: cannot be read ({exc})") from exc
    entries = data.get("cameras", None) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InputError(
            f"camera calibration file {path.name}: expected a list of cameras (or a 'cameras' list)"
        )
    out = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(
                f"camera calibration file {path.name}: entry {n} is not a table/object"
            )
        unknown = set(entry) - _CALIBRATION_KEYS
        if unknown:
            raise InputError(
                f"camera calibration file {path.name}: entry {n} has unknown keys {sorted(unknown)}; "
                f"allowed: {sorted(_CALIBRATION_KEYS)}"
            )
        if "sensitivity_cps_per_mbq" not in entry:
            raise InputError(
                f"camera calibration file {path.name}: entry {n} lacks sensitivity_cps_per_mbq"
            )
        out.append(CameraCalibration(**entry))
    return out


def _match_calibration(
    calibrations: Sequence[CameraCalibration], header: Dataset, calling_ae_title: str | None
) -> CameraCalibration | None:
    matching = [c for c in calibrations if c.matches(header, calling_ae_title)]
    if not matching:
        return None
    best = max(c.specificity for c in matching)
    top = [c for c in matching if c.specificity == best]
    if len({c.sensitivity_cps_per_mbq for c in top}) > 1:
        raise CalibrationError(
            "camera calibrations are ambiguous for this camera: "
            + "; ".join(c.describe() for c in top)
            + ". Make one entry more specific."
        )
    return top[0]


# ----------------------------------------------------------------------------- inventory


@dataclasses.dataclass(frozen=True)
class SeriesSummary:
    """One series (or one multi-frame NM object) found in the input."""

    key: str  # what to pass as --spect-series / --ct-series (spect_series / ct_series) to pick it
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    sop_class_uid: str
    series_description: str
    series_number: int | None
    frame_of_reference_uid: str
    n_files: int
    n_frames: int
    role: str  # "ct" or "spect" when usable as such, "" otherwise
    reason: str  # why it is not usable ("" when it is)
    truncated_files: tuple[str, ...] = ()
    energy_window: str = ""  # e.g. "energy window 1 'Lu177 208keV' 187.2-228.8 keV (centre 208 keV)"


@dataclasses.dataclass
class Inventory:
    """What a folder or archive holds, without pixel data: for summaries and for choosing."""

    series: list[SeriesSummary]
    ignored_files: list[tuple[str, str]]
    warnings: list[str]
    # every truncated or damaged DICOM file, whether attributed to a series or not
    damaged_files: list[str] = dataclasses.field(default_factory=list)

    @property
    def ct_candidates(self) -> list[SeriesSummary]:
        return [s for s in self.series if s.role == "ct"]

    @property
    def spect_candidates(self) -> list[SeriesSummary]:
        return [s for s in self.series if s.role == "spect"]

    def describe(self) -> str:
        """Human-readable listing (UIDs and descriptions only, no patient data)."""
        lines = []
        for s in self.series:
            status = f"usable as {s.role.upper()}" if s.role else f"not used: {s.reason}"
            window = f", {s.energy_window}" if s.energy_window else ""
            lines.append(
                f"{s.modality:<6} {s.series_description or '(no description)'!r}: {s.n_files} file(s), "
                f"{s.n_frames} frame(s){window}, key {s.key} -> {status}"
            )
        if self.ignored_files:
            lines.append(f"{len(self.ignored_files)} file(s) ignored")
        return "\n".join(lines)


def _summary(c: Candidate) -> SeriesSummary:
    number = c.first.get("SeriesNumber", None)
    try:
        number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    return SeriesSummary(
        key=c.key,
        study_instance_uid=c.study_uid,
        series_instance_uid=c.series_uid,
        modality=c.modality,
        sop_class_uid=c.sop_class,
        series_description=c.description,
        series_number=number,
        frame_of_reference_uid=c.frame_of_reference_uid,
        n_files=len(c.files),
        n_frames=c.n_frames,
        role=c.role,
        reason=c.reason,
        truncated_files=tuple(f.relpath for f in c.files if f.truncated),
        energy_window=c.window.describe() if c.window is not None else "",
    )


def _scan(items) -> tuple[list[Candidate], list[tuple[str, str]], list[str], list[str]]:
    """Read all headers; return candidates, ignored files, notes and unattributable damaged files."""
    headers: list[FileHeader] = []
    ignored: list[tuple[str, str]] = []
    notes: list[str] = []
    orphans: list[str] = []
    for item in items:
        result = read_header(item)
        if isinstance(result, str):
            ignored.append((item.relpath, result))
            if result.startswith("damaged or truncated DICOM"):
                notes.append(f"{item.relpath}: {result}; ignored")
                orphans.append(item.relpath)
        else:
            headers.append(result)
    for fh in headers:
        if fh.truncated and not fh.header.get("SeriesInstanceUID", None):
            notes.append(
                f"{fh.relpath}: truncated DICOM file ignored (no series information readable)"
            )
            orphans.append(fh.relpath)
    candidates, dropped = group_series(headers)
    ignored.extend(dropped)
    return candidates, ignored, notes, orphans


def scan_dicom(path: str | Path, *, max_zip_bytes: int = 4 * 2**30) -> Inventory:
    """List the series in a folder, zip archive or file, and whether each could be the CT or SPECT.

    Raises :class:`InputError` only for an unusable input path or archive.
    """
    try:
        with input_files(path, max_zip_bytes) as items:
            candidates, ignored, notes, orphans = _scan(items)
        in_series = [f.relpath for c in candidates for f in c.files if f.truncated]
        return Inventory(
            [_summary(c) for c in candidates], ignored, notes, sorted(orphans + in_series)
        )
    except MALFORMED_CONTENT_ERRORS as exc:
        raise InputError(f"malformed DICOM content while scanning ({type(exc).__name__})") from exc


# ----------------------------------------------------------------------------- selection


def _listing(cands: Sequence[Candidate]) -> str:
    return "; ".join(c.label() for c in cands)


def _by_uid(cands: list[Candidate], uid: str, role: str) -> list[Candidate]:
    """The usable candidates a key or Series Instance UID names (several: the windows of one recon)."""
    matches = [c for c in cands if uid in (c.key, c.series_uid)]
    if not matches:
        usable = [c for c in cands if c.role == role]
        raise InputError(
            f"no series or object with UID {uid} in the input; {role.upper()} candidates: {_listing(usable) or 'none'}"
        )
    exact = [c for c in matches if c.key == uid] or matches
    usable = [c for c in exact if c.role == role]
    if not usable:
        raise InputError(
            f"{exact[0].label()} cannot be used as the {role.upper()}: {exact[0].reason or 'it is a ' + exact[0].role.upper()}"
        )
    return usable


def _pick_by_uid(cands: list[Candidate], uid: str, role: str) -> Candidate:
    usable = _by_uid(cands, uid, role)
    if len(usable) > 1:
        raise InputError(
            f"UID {uid} names {len(usable)} {role.upper()} volumes; pass one of their keys instead "
            f"({_hint(role + '_series_uid')}): {_listing(usable)}"
        )
    return usable[0]


def _select_spect(
    cands: list[Candidate], uid: str | None, energy_window_kev: float | None = None, notes: list[str] | None = None
) -> Candidate | BedSet:
    """The SPECT: one candidate, or the beds of one acquisition (never one bed of several)."""
    notes = [] if notes is None else notes
    all_spects = [c for c in cands if c.role == "spect"]
    spects = _by_uid(cands, uid, "spect") if uid else all_spects
    if energy_window_kev is not None and spects:
        chosen = [c for c in spects if c.window is not None and c.window.contains(energy_window_kev)]
        if not chosen:
            raise InputError(
                f"no SPECT candidate has an energy window containing {energy_window_kev:g} keV "
                f"({_hint('energy_window_kev')}); candidates: "
                + "; ".join(f"[{c.key}] {c.label()}" for c in spects)
            )
        spects = chosen
    if uid and len(spects) == 1:
        # a key naming one bed selects every bed of its acquisition
        sets, _ = bed_sets(all_spects)
        for bed_set in sets:
            if any(c is spects[0] for c in bed_set.candidates):
                notes.append(
                    f"{_hint('spect_series_uid')} names one bed of a {len(bed_set.beds)}-bed acquisition; all its beds "
                    "are joined"
                )
                return bed_set
        return spects[0]
    if len(spects) == 1:
        return spects[0]
    if not spects:
        emission = [c for c in cands if c.modality in ("NM", "PT")]
        why = "; ".join(f"{c.label()}: {c.reason}" for c in emission)
        raise InputError(
            "no reconstructed SPECT in the input (need an NM RECON TOMO volume or a PET-style BQML series)"
            + (f". Found instead: {why}" if why else "")
        )
    sets, alone = bed_sets(spects)
    if len(sets) == 1 and not alone:
        return sets[0]
    windows = {c.window.centre_kev for c in spects if c.window is not None}
    by_window = len(windows) > 1 and energy_window_kev is None
    listed = [
        f"beds of one acquisition, joined when any of them is chosen: {bed_set.describe()}"
        for bed_set in sets
    ] + [f"[{c.key}] {c.label()}" for c in alone]
    what = f"{len(sets) + len(alone)} candidate SPECT acquisitions" if sets else f"{len(spects)} candidate SPECT volumes"
    raise InputError(
        f"{what}; choose one with {_hint('spect_series_uid')}"
        + (" (the key of any bed of a multi-bed acquisition selects all its beds)" if sets else "")
        + (f" or by its energy window (photopeak in keV) with {_hint('energy_window_kev')}" if by_window else "")
        + ": "
        + "; ".join(listed)
    )


def _patient_id(c: Candidate) -> str:
    return str(c.first.get("PatientID", "") or "").strip()


def _coverage(ct: Candidate, spect_grid: Grid) -> float:
    """Fraction of the SPECT field of view inside the CT's bounding box (from headers)."""
    box = approx_bounds_lps(ct)
    if box is None:
        return 0.0
    axes = [np.linspace(0, n - 1, min(n, 9)) for n in spect_grid.shape]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    pts = spect_grid.index_to_lps_mm(idx)
    inside = np.all((pts >= box[0] - 1e-3) & (pts <= box[1] + 1e-3), axis=1)
    return float(inside.mean())


# Refused by default: densities from a contrast-enhanced CT (iodine raises HU where it is).
CONTRAST_CT_ASSUMPTION = "contrast_ct_density"
# What a contrast CT does to the dose, as measured in issue 18: the virtual patient (phantom ph8,
# seed 8) with a contrast-enhanced CT gave every region's dose 6 to 7 % lower.
CONTRAST_CT_EFFECT = "on the virtual patient every region's dose came out 6 to 7 % lower (issue 18)"
# Contrast/Bolus Agent values that say no agent was given.
_NO_AGENT = {"", "NONE", "NO", "N/A", "NA", "NIL", "-", "NOT APPLIED", "NO CONTRAST", "WITHOUT"}


def _contrast_agent(c: Candidate) -> str:
    """The Contrast/Bolus Agent (0018,0010) or its code's meaning when any slice names one; "" otherwise."""
    for fh in c.files:
        ds = fh.header
        agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
        codes = ds.get("ContrastBolusAgentSequence", None)
        if agent.upper() in _NO_AGENT and codes:
            agent = str(codes[0].get("CodeMeaning", "") or codes[0].get("CodeValue", "") or "contrast agent").strip()
        if agent.upper() not in _NO_AGENT:
            return agent[:64]
    return ""


def _check_contrast(ct: Candidate, accepted: Sequence[str], notes: list[str]) -> None:
    """A contrast-enhanced CT gives densities only when allowed, and then with its expected effect."""
    agent = _contrast_agent(ct)
    if not agent:
        return
    name = CONTRAST_CT_ASSUMPTION
    why = (
        f"the CT ({ct.label()}) is contrast-enhanced (Contrast/Bolus Agent {agent!r}): the agent raises the HU where it "
        f"is, so the densities from this CT are too high and the doses too low ({CONTRAST_CT_EFFECT})"
    )
    if name not in accepted:
        raise InputError(
            f"{why}. Send the non-contrast (low-dose) CT of the SPECT/CT, which is preferred automatically, or choose "
            f"it with {_hint('ct_series_uid')}; or allow densities from the contrast CT with {_accept_hint(name)}"
        )
    notes.append(f"ASSUMED ({name}): {why}")


def _select_ct(
    cands: list[Candidate], spect: Candidate, spect_grid: Grid, uid: str | None, notes: list[str]
) -> Candidate:
    if uid:
        return _pick_by_uid(cands, uid, "ct")
    cts = [c for c in cands if c.role == "ct"]
    contrast = [c for c in cts if _contrast_agent(c)]
    plain = [c for c in cts if not any(c is x for x in contrast)]

    def same_for(group: list[Candidate]) -> bool:
        return any(c.frame_of_reference_uid and c.frame_of_reference_uid == spect.frame_of_reference_uid for c in group)

    if plain and contrast and (same_for(plain) or not same_for(contrast)):
        notes.append(
            f"contrast-enhanced CT series not used for density: {_listing(contrast)}; the non-contrast CT is preferred"
        )
        cands = [c for c in cands if not any(c is x for x in contrast)]
    cts = [c for c in cands if c.role == "ct"]
    if not cts:
        dropped = [c for c in cands if c.modality == "CT"]
        why = "; ".join(f"{c.label()}: {c.reason}" for c in dropped)
        raise InputError(
            "no usable axial CT series in the input" + (f". Found instead: {why}" if why else "")
        )
    pool = [c for c in cts if c.study_uid == spect.study_uid]
    if not pool:
        pid = _patient_id(spect)
        pool = [
            c
            for c in cts
            if pid
            and _patient_id(c) == pid
            and c.frame_of_reference_uid
            and c.frame_of_reference_uid == spect.frame_of_reference_uid
        ]
        if not pool:
            raise InputError(
                "mismatched studies: no CT in the SPECT's study (StudyInstanceUID "
                f"{spect.study_uid}); the CT series present belong to other studies "
                "without the same patient and frame of reference: " + _listing(cts)
            )
    if len(pool) == 1:
        return pool[0]
    same_for = [
        c
        for c in pool
        if c.frame_of_reference_uid and c.frame_of_reference_uid == spect.frame_of_reference_uid
    ]
    if len(same_for) == 1:
        notes.append(
            f"several CT series; chose the one sharing the SPECT's frame of reference: {same_for[0].label()}"
        )
        return same_for[0]
    pool = same_for or pool
    ranked = sorted(((_coverage(c, spect_grid), c) for c in pool), key=lambda t: -t[0])
    if ranked[0][0] - ranked[1][0] > _COVERAGE_TIE:
        best = ranked[0][1]
        notes.append(
            f"several CT series; chose the one covering most of the SPECT ({ranked[0][0]:.0%}): {best.label()}"
        )
        return best
    raise InputError(
        f"{len(pool)} candidate CT series cover the SPECT equally; choose one with {_hint('ct_series_uid')}: "
        + "; ".join(f"[{c.key}] {c.label()}" for c in pool)
    )


def _check_match(ct: Candidate, spect: Candidate, notes: list[str]) -> None:
    """Refuse a CT and SPECT of different patients, or of different studies not sharing a frame of reference."""
    pid_ct, pid_sp = _patient_id(ct), _patient_id(spect)
    if pid_ct and pid_sp and pid_ct != pid_sp:
        raise InputError(
            f"mismatched studies: the CT ({ct.series_uid}) and the SPECT ({spect.series_uid}) have different "
            "Patient IDs"
        )
    same_for = (
        bool(ct.frame_of_reference_uid)
        and ct.frame_of_reference_uid == spect.frame_of_reference_uid
    )
    if ct.study_uid != spect.study_uid:
        if not (pid_ct and pid_sp and same_for):
            raise InputError(
                f"mismatched studies: the CT is from study {ct.study_uid} and the SPECT from study "
                f"{spect.study_uid}; accepted only with the same Patient ID and Frame of Reference UID"
            )
        notes.append(
            "CT and SPECT come from different studies of the same patient sharing a frame of reference"
        )
    if not same_for:
        notes.append(
            "CT and SPECT have different (or missing) Frame of Reference UIDs: their positions are not "
            "comparable until they are registered"
        )


# ----------------------------------------------------------------------------- volumes


def _ref(c: Candidate, order: Sequence[int], bed_set: BedSet | None = None) -> SeriesRef:
    """The source series; for joined beds, the first bed's series and the instances of all beds."""
    ds = c.first
    number = _summary(c).series_number
    beds = [(b.cand, b.order) for b in bed_set.beds] if bed_set is not None else [(c, order)]
    return SeriesRef(
        study_instance_uid=c.study_uid,
        series_instance_uid=c.series_uid,
        modality=c.modality,
        sop_class_uid=c.sop_class,
        sop_instance_uids=tuple(
            str(bed.files[i].header.get("SOPInstanceUID", "")) for bed, bed_order in beds for i in bed_order
        ),
        series_description=c.description,
        series_number=number,
        frame_of_reference_uid=c.frame_of_reference_uid or None,
        manufacturer=str(ds.get("Manufacturer", "") or ""),
        station_name=str(ds.get("StationName", "") or ""),
    )


def _read_ct(ct: Candidate, order: list[int], grid: Grid) -> Volume:
    # Filled slice by slice: a list of slices and their np.stack would hold the CT twice (issue 20).
    volume = np.empty(grid.shape, dtype=np.float32)
    for k, i in enumerate(order):
        fh = ct.files[i]
        stored, ds = read_pixels(fh)
        slope = ds_float(ds, "RescaleSlope", 1.0, fh.relpath)
        intercept = ds_float(ds, "RescaleIntercept", 0.0, fh.relpath)
        if slope == 0:
            raise InputError(f"{fh.relpath}: RescaleSlope is 0")
        hu = stored[0].astype(np.float64) * slope + intercept
        padding = ds.get("PixelPaddingValue", None)
        if padding is not None:
            hu[stored[0] == padding] = _CT_PADDING_HU
        if hu.shape != volume.shape[1:]:
            raise InputError(f"{fh.relpath}: {hu.shape[0]} x {hu.shape[1]} pixels, the other CT slices "
                             f"{volume.shape[1]} x {volume.shape[2]}")
        volume[k] = hu
    return Volume(volume, grid, "HU")


def _read_spect_values(
    spect: Candidate, order: list[int], notes: list[str], accepted: Sequence[str] = ()
) -> tuple[np.ndarray, act.Scaling, list[Dataset]]:
    """SPECT values after the header's own scaling (Bq/ml, or counts), slices in grid order."""
    if spect.kind == "nm-multiframe":
        stored, ds = read_pixels(spect.files[0])
        scaling = act.nm_scaling(ds, stored.shape[0], notes)
        if spect.frames is not None:  # one energy window of a multi-window reconstruction
            frames = list(spect.frames)
            stored = stored[frames]
            scaling = dataclasses.replace(scaling, slope=scaling.slope[frames], intercept=scaling.intercept[frames])
        datasets = [ds]
    else:
        frames, datasets = [], []
        for i in order:
            stored_i, ds = read_pixels(spect.files[i])
            frames.append(stored_i[0])
            datasets.append(ds)
        stored = np.stack(frames)
        if spect.kind == "pt-stack":
            scaling = act.pt_scaling(datasets)
        else:
            per_slice = [act.nm_scaling(ds, 1, notes) for ds in datasets]
            if len({s.units for s in per_slice}) > 1:
                raise CalibrationError(
                    f"{spect.label()}: slices disagree on units ({sorted({s.units for s in per_slice})})"
                )
            scaling = act.Scaling(
                np.concatenate([s.slope for s in per_slice]),
                np.concatenate([s.intercept for s in per_slice]),
                per_slice[0].units,
                per_slice[0].note,
            )
    _check_scaling(stored, scaling, spect.label(), accepted, notes)
    values = (
        stored.astype(np.float64) * scaling.slope[:, None, None] + scaling.intercept[:, None, None]
    )
    return values, scaling, datasets


# Negative values are reconstruction noise (FBP, or OSEM with scatter subtraction, around zero
# in the background) while their summed magnitude stays below this fraction of the positive
# total: such noise is roughly symmetric about zero in cold regions, so its negative half is
# a few % of a body's activity at most (OSEM without subtraction gives none). Beyond it the
# values do not describe activity (a wrong intercept, an offset, a subtracted image) and are
# refused rather than clipped: clipping would silently change the total activity.
NEGATIVE_NOISE_FRACTION = 0.05


# The assumption that lets a SPECT without activity (a blank or QA acquisition) through as an
# all-zero dose; refused by default so that a broken export never becomes a silent 0 Gy RT Dose.
NO_ACTIVITY_ASSUMPTION = "no_activity_gives_zero_dose"


def _no_activity(what: str, why: str, accepted: Sequence[str], notes: list[str]) -> None:
    """Refuse a SPECT without activity, naming the flag that allows it; or note that it was allowed."""
    name = NO_ACTIVITY_ASSUMPTION
    if name not in accepted:
        raise InputError(
            f"{what}: {why}: the SPECT holds no activity, so there is no dose; if that is expected (a blank or "
            f"QA acquisition), allow an all-zero dose with {_accept_hint(name)}"
        )
    notes.append(f"ASSUMED ({name}): {what}: {why}; accepted as no activity by {name}: the dose is zero everywhere")


def _check_scaling(
    stored: np.ndarray, scaling: act.Scaling, what: str, accepted: Sequence[str], notes: list[str]
) -> None:
    """Refuse a SPECT whose header scaling or pixels cannot hold any activity (never a silent 0 Gy dose).

    All-zero pixels pass only when :data:`NO_ACTIVITY_ASSUMPTION` is accepted (then a note);
    a slope of 0 never does: it is a broken header, not an image without activity.
    """
    zero = np.flatnonzero(scaling.slope == 0)
    if zero.size:
        where = "every slice" if zero.size == scaling.slope.size else f"{zero.size} of {scaling.slope.size} slices"
        raise InputError(
            f"{what}: the value scaling ({scaling.note}) has slope 0 in {where}: stored values map to a constant, "
            "so the SPECT holds no activity there; the header's Real World Value / Rescale Slope is wrong"
        )
    if not np.any(stored):
        if np.any(scaling.intercept):
            raise InputError(
                f"{what}: the pixel data are all zero but the value scaling ({scaling.note}) adds a non-zero "
                "intercept, so the values are a constant: neither an image of activity nor an image without it; "
                "the header's Real World Value / Rescale Intercept is wrong"
            )
        _no_activity(what, "the pixel data are all zero", accepted, notes)


def _check_activity(values: np.ndarray, what: str, notes: list[str], accepted: Sequence[str]) -> None:
    """Refuse no positive activity (unless accepted, see :func:`_no_activity`) or negative values
    beyond noise; note the noise that will be clipped."""
    finite = np.isfinite(values)
    if not finite.all():
        raise InputError(f"{what}: {int((~finite).sum())} voxel(s) are not finite numbers (NaN or infinite)")
    positive = float(values[values > 0].sum(dtype=np.float64))
    negative = float(-values[values < 0].sum(dtype=np.float64))
    if positive <= 0 and negative > 0:
        # Negative values without any positive one are beyond any noise: a wrong intercept or an
        # offset, not an image without activity, so never taken as one (clipping would hide it).
        raise InputError(
            f"{what}: no voxel holds positive activity (minimum {values.min():.4g}, maximum {values.max():.4g} "
            f"after the header's scaling) and {int((values < 0).sum())} voxel(s) are negative: negative values "
            "beyond noise, not an image without activity. Check the Real World Value / Rescale Intercept"
        )
    if positive <= 0:
        if not any(n.startswith(f"ASSUMED ({NO_ACTIVITY_ASSUMPTION})") for n in notes):  # not noted for the pixels
            _no_activity(what, "every voxel is zero after the header's scaling", accepted, notes)
        return
    if negative > NEGATIVE_NOISE_FRACTION * positive:
        share = float((values < 0).mean())
        raise InputError(
            f"{what}: negative values beyond noise: {share:.0%} of the voxels are negative and they sum to "
            f"{negative / positive:.0%} of the positive activity (noise stays below {NEGATIVE_NOISE_FRACTION:.0%}); "
            f"minimum {values.min():.4g}. Check the Real World Value / Rescale Intercept; clipping them would "
            "change the activity"
        )
    if negative > 0:
        notes.append(
            f"{what}: {int((values < 0).sum())} negative voxel(s) summing to {negative / positive:.2%} of the "
            "positive activity (reconstruction noise) are set to 0"
        )


def _activity_fraction_inside(values: np.ndarray, grid: Grid, ct_grid: Grid) -> float:
    positive = np.clip(values, 0, None)
    total = positive.sum()
    if total <= 0:
        return 0.0
    idx = np.argwhere(positive > 0)
    ct_idx = ct_grid.lps_mm_to_index(grid.index_to_lps_mm(idx))
    inside = np.all((ct_idx >= -0.5) & (ct_idx <= np.asarray(ct_grid.shape) - 0.5), axis=1)
    return float(positive[tuple(idx[inside].T)].sum() / total)


def _reversed_stack(grid: Grid) -> Grid:
    axes = grid.axes.copy()
    axes[0] = -axes[0]
    return dataclasses.replace(grid, axes=axes)


def _check_overlap(
    values: np.ndarray, spect: Candidate, grid: Grid, ct_grid: Grid, notes: list[str],
    ct: Candidate, spects: Sequence[Candidate], accepted: Sequence[str],
) -> None:
    """The SPECT's activity lies in the CT: refused when mostly outside (a wrong pairing, a mirrored
    stack), or when the CT is cut short of the SPECT (:func:`_check_ct_whole`)."""
    if not np.any(values > 0):  # no activity, allowed by NO_ACTIVITY_ASSUMPTION and noted there
        return
    fraction = _activity_fraction_inside(values, grid, ct_grid)
    if fraction > 0:  # a SPECT wholly elsewhere is a wrong pairing, said below, not a CT cut short
        _check_ct_whole(ct, spects, accepted, notes)
    if fraction < MIN_ACTIVITY_FRACTION_IN_CT:
        hint = ""
        if (
            spect.kind == "nm-multiframe"
            and _activity_fraction_inside(values, _reversed_stack(grid), ct_grid)
            >= MIN_ACTIVITY_FRACTION_IN_CT
        ):
            hint = (
                " It would overlap if its frames were stacked the other way: the vendor may not follow the "
                "DICOM sign convention of Spacing Between Slices."
            )
        raise GeometryError(
            f"the SPECT lies outside the CT: only {fraction:.0%} of its activity falls inside the CT volume "
            f"(at least {MIN_ACTIVITY_FRACTION_IN_CT:.0%} is required).{hint}"
        )
    if fraction < _WARN_ACTIVITY_FRACTION_IN_CT:
        notes.append(
            f"{1 - fraction:.1%} of the SPECT activity lies outside the CT volume (no density there)"
        )


def _to_activity(
    values: np.ndarray,
    scaling: act.Scaling,
    spect: Candidate,
    datasets: list[Dataset],
    grid: Grid,
    *,
    calibrations: Sequence[CameraCalibration],
    sensitivity_cps_per_mbq: float | None,
    calling_ae_title: str | None,
    allow_normalised: bool,
    decay_factor: float,
    notes: list[str],
) -> tuple[np.ndarray, str, str]:
    """Values in Bq/ml (or MBq-normalised), their units and a calibration note."""
    header = datasets[0]
    what = spect.label()
    if scaling.units == "Bq/ml":
        note = scaling.note
        if decay_factor != 1.0:
            note += f"; x {decay_factor:.6f} to refer decay-corrected values to acquisition start"
        return values * decay_factor, "Bq/ml", note
    # counts
    problem = ""
    source = ""
    sensitivity = None
    if sensitivity_cps_per_mbq is not None:
        sensitivity = CameraCalibration(float(sensitivity_cps_per_mbq)).sensitivity_cps_per_mbq
        source = "given with the request"
    else:
        match = _match_calibration(calibrations, header, calling_ae_title)
        if match is not None:
            sensitivity, source = (
                match.sensitivity_cps_per_mbq,
                f"calibration entry {match.describe()}",
            )
    camera = ", ".join(
        f"{k} {str(header.get(k, '') or '')!r}"
        for k in ("Manufacturer", "StationName", "DeviceSerialNumber")
    )
    if sensitivity is None:
        problem = (
            f"{what} holds counts (no Bq/ml Real World Value Mapping) and no camera sensitivity applies: supply "
            f"the camera sensitivity in cps/MBq ({_hint('sensitivity_cps_per_mbq')}), or a calibration entry matching this camera ({camera}"
            + (f", calling AE title {calling_ae_title!r}" if calling_ae_title else "")
            + ")"
        )
    view_s = act.frame_duration_s(header)
    if not problem and view_s is None:
        problem = (
            f"{what} holds counts but has no time per view (RotationInformationSequence > ActualFrameDuration), "
            "needed to turn counts into activity"
        )
    if not problem:
        factor = 1e6 / (sensitivity * view_s * grid.voxel_volume_ml)
        note = (
            f"{scaling.note}: Bq/ml = value / ({sensitivity:g} cps/MBq x {view_s:g} s per view) x 1e6 / "
            f"{grid.voxel_volume_ml:.6g} ml per voxel; sensitivity {source}"
        )
        if decay_factor != 1.0:
            note += f"; x {decay_factor:.6f} to refer decay-corrected values to acquisition start"
        return values * (factor * decay_factor), "Bq/ml", note
    if not allow_normalised:
        raise CalibrationError(problem + f"; or ask for MBq-normalised output ({_hint('allow_normalised')})")
    total = float(np.clip(values, 0, None).sum())
    if not total > 0:
        raise InputError(f"{what}: the SPECT holds no positive counts; nothing to normalise")
    notes.append(
        "no usable activity calibration; the SPECT is normalised to 1 MBq in the field of view"
    )
    note = (
        f"{scaling.note}, normalised: values x 1e6 / (sum of positive values x voxel volume in ml), so the "
        "field of view holds 1 MBq "
        f"(reason: {problem})"
    )
    return values * (1e6 / (total * grid.voxel_volume_ml)), "MBq-normalised", note


def _check_nuclide(rp: act.Radiopharmaceutical, what: str, accepted: Sequence[str], notes: list[str]) -> None:
    """Lu-177 read from the header, or assumed only when allowed; another nuclide is refused."""
    if rp.nuclide == "Lu-177":
        return
    if rp.nuclide:
        raise InputError(
            f"{what}: the radionuclide is {rp.nuclide!r} ({rp.nuclide_source}); spectdose computes Lu-177 dose only "
            "(its kernels and half-life are Lu-177's)"
        )
    name = "radionuclide_lu177_assumed"
    if name not in accepted:
        raise InputError(
            f"{what}: the header does not say which radionuclide was imaged (no Radionuclide Code Sequence, "
            "radiopharmaceutical name or half-life); spectdose computes Lu-177 dose only: if it is Lu-177, allow "
            f"that with --accept {name} (CLI) / accept={name} (REST)"
        )
    notes.append(f"ASSUMED ({name}): the header does not name the radionuclide; Lu-177 assumed")


def _join_beds(
    bed_set: BedSet,
    read: list[tuple[Candidate, np.ndarray, act.Scaling, list[Dataset]]],
    rp: act.Radiopharmaceutical,
    reference: dt.datetime | None,
    hours_to_reference: float | None,
    allow_normalised: bool,
    notes: list[str],
    time_options: dict,
    convert: dict,
) -> tuple[np.ndarray, str, str]:
    """Each bed in Bq/ml referred to one time (the earliest bed's acquisition start), then joined.

    A bed acquired dt after the reference shows the activity decayed by exp(-ln2 dt / T½)
    (physical decay of Lu-177, ICRP-107 half-life; biological clearance over the minutes between
    beds is not known and not corrected); its values are divided by that factor.
    """
    arrays, bed_notes = [], []
    for n, (bed, values, scaling, datasets) in enumerate(read, start=1):
        what = f"SPECT bed {n} ({bed.label()})"
        bed_start, source = act.acquisition_start(datasets, what, [])
        offset_s = 0.0
        if reference is not None and bed_start is not None and source == "acquisition":
            offset_s = (bed_start - reference).total_seconds()
        elif len(read) > 1:
            notes.append(
                f"{what}: no Acquisition Date/Time of its own; taken as acquired at the reference time "
                f"(Lu-177 decays {1 - math.exp(-math.log(2) * 1800 / LU177_HALF_LIFE_S):.2%} in 30 min)"
            )
        elapsed_s = None if hours_to_reference is None else hours_to_reference * 3600.0 + offset_s
        decay = act.decay_factor(datasets, rp, elapsed_s, what, notes, bed.modality)
        _check_activity(values, what, notes, time_options["accepted"])
        try:
            array, units, note = _to_activity(
                values, scaling, bed, datasets, bed_set.beds[n - 1].grid,
                allow_normalised=False, decay_factor=decay, notes=notes, **convert,
            )  # fmt: skip
        except CalibrationError as exc:
            if not allow_normalised:
                raise
            raise CalibrationError(
                f"{exc}; MBq-normalised output ({_hint('allow_normalised')}) is not offered for beds of one acquisition: "
                "each bed needs the calibration to be joined"
            ) from exc
        to_reference = math.exp(math.log(2) * offset_s / LU177_HALF_LIFE_S)
        arrays.append(array * to_reference)
        bed_notes.append(
            f"bed {n} acquired {offset_s / 60:+.1f} min from the reference, x {to_reference:.5f}"
        )
    joined = join(arrays, bed_set)
    overlaps = [
        a_off + a.grid.shape[0] - b_off
        for a, b, a_off, b_off in zip(bed_set.beds, bed_set.beds[1:], bed_set.offsets, bed_set.offsets[1:], strict=False)
    ]
    ref_text = reference.isoformat() if reference is not None else "unknown"
    notes.append(
        f"SPECT joined from {len(read)} beds of one acquisition ({bed_set.describe()}); overlaps of "
        f"{', '.join(str(o) for o in overlaps)} slice(s) blended with linear weights; each bed's activity referred "
        f"to the first bed's acquisition start ({ref_text}) by Lu-177 physical decay: {'; '.join(bed_notes)}"
    )
    return joined, "Bq/ml", f"{note} (each of {len(read)} beds), joined"


def _patient(ds: Dataset) -> PatientInfo:
    def s(keyword: str) -> str:
        return str(ds.get(keyword, "") or "")

    return PatientInfo(
        patient_name=s("PatientName"),
        patient_id=s("PatientID"),
        patient_birth_date=s("PatientBirthDate"),
        patient_sex=s("PatientSex"),
        study_date=s("StudyDate"),
        study_time=s("StudyTime"),
        study_id=s("StudyID"),
        accession_number=s("AccessionNumber"),
        referring_physician_name=s("ReferringPhysicianName"),
    )


# Refused by default: a SPECT whose header says it is one bed of several, the others absent.
MISSING_BEDS_ASSUMPTION = "spect_beds_missing"


# Header geometry facts must agree: a Pixel Spacing of 4.0 mm where Reconstruction Diameter /
# Columns says 4.8 mm gave a kidney dose x0.004 (issue 18). Reconstruction Diameter is written
# to a few digits (e.g. 614 mm for 128 x 4.7952 mm): 2 % allows that rounding.
_PIXEL_SPACING_RTOL = 0.02
# Spacing Between Slices, Slice Thickness and slice positions of a reconstruction agree to scanner
# rounding (slices of a SPECT reconstruction are contiguous: thickness = spacing).
_SLICE_SPACING_RTOL = 0.01
PIXEL_SPACING_ASSUMPTION = "pixel_spacing_trusted"
SLICE_SPACING_ASSUMPTION = "slice_spacing_trusted"


def _header_float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword, None)
    try:
        out = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) and out != 0 else None


def _contradiction(
    role: str, says: str, other: str, name: str, used: str, accepted: Sequence[str], notes: list[str]
) -> None:
    """Refuse two header facts that contradict each other, naming both and the option that settles it."""
    if name in accepted:
        notes.append(f"ASSUMED ({name}): the {role} {says} contradicts {other}; {used} is used as the header's geometry")
        return
    raise GeometryError(
        f"the {role} header contradicts itself: {says}, but {other}. Every distance, volume and dose depends on "
        f"which is right: if {used} is, allow it with {_accept_hint(name)}; otherwise correct the header and resend"
    )


def _check_geometry_facts(
    role: str, cands: Sequence[Candidate], grid: Grid, accepted: Sequence[str], notes: list[str]
) -> None:
    """Cross-check the geometry the grid was built from against the header's other statements of it."""
    ds = cands[0].first
    columns = _header_float(ds, "Columns")
    diameter = _header_float(ds, "ReconstructionDiameter")
    column_mm = grid.spacing_mm[2]
    if diameter and columns and abs(diameter / columns / column_mm - 1) > _PIXEL_SPACING_RTOL:
        _contradiction(
            role,
            f"Pixel Spacing (0028,0030) gives {column_mm:g} mm between columns",
            f"Reconstruction Diameter (0018,1100) {diameter:g} mm / Columns {columns:g} = {diameter / columns:.4g} mm",
            PIXEL_SPACING_ASSUMPTION,
            "Pixel Spacing",
            accepted,
            notes,
        )
    if role == "CT":
        return
    slice_mm = grid.spacing_mm[0]
    multiframe = cands[0].kind == "nm-multiframe"
    source = "Spacing Between Slices (0018,0088)" if multiframe else "the slice positions (Image Position (Patient))"
    sbs = _header_float(ds, "SpacingBetweenSlices")
    if not multiframe and sbs and abs(abs(sbs) / slice_mm - 1) > _SLICE_SPACING_RTOL:
        _contradiction(
            role,
            f"{source} are {slice_mm:g} mm apart",
            f"Spacing Between Slices (0018,0088) is {abs(sbs):g} mm",
            SLICE_SPACING_ASSUMPTION,
            "the slice positions",
            accepted,
            notes,
        )
    thickness = _header_float(ds, "SliceThickness")
    if thickness and (sbs or not multiframe) and abs(thickness / slice_mm - 1) > _SLICE_SPACING_RTOL:
        inplane = (
            f" (and Pixel Spacing {column_mm:g} mm agrees with the thickness)"
            if abs(column_mm / thickness - 1) <= _SLICE_SPACING_RTOL
            else ""
        )
        _contradiction(
            role,
            f"{source} gives {slice_mm:g} mm between slices",
            f"Slice Thickness (0018,0050) is {thickness:g} mm{inplane}; the slices of a SPECT reconstruction are "
            "contiguous",
            SLICE_SPACING_ASSUMPTION,
            "Spacing Between Slices" if multiframe else "the slice positions",
            accepted,
            notes,
        )


# The assumptions ingest refuses unless allowed by name (--accept / accept / SPECTDOSE_ACCEPT);
# spectdose.pipeline.ASSUMPTIONS lists them with the others.
INGEST_ASSUMPTIONS: dict[str, str] = {
    MISSING_BEDS_ASSUMPTION: "a SPECT whose header says it is bed k of n is used although fewer than n beds arrived "
    "(regions outside its span get no activity)",
    PIXEL_SPACING_ASSUMPTION: "Pixel Spacing is used where Reconstruction Diameter / Columns contradicts it",
    SLICE_SPACING_ASSUMPTION: "a SPECT's Spacing Between Slices (or slice positions) is used where Slice Thickness "
    "or Spacing Between Slices contradicts it",
    CT_SHORT_ASSUMPTION: "a CT that does not reach both ends of the SPECT's axial extent (or holds fewer slices than "
    "its header counts) is used: the SPECT's activity beyond it has no dose",
    CONTRAST_CT_ASSUMPTION: "a contrast-enhanced CT (Contrast/Bolus Agent) gives the densities when no non-contrast "
    "CT is there: doses come out lower (every region 6 to 7 per cent lower on the virtual patient, issue 18)",
}


def _check_beds_said(
    spects: list[Candidate], candidates: Sequence[Candidate], accepted: Sequence[str], notes: list[str]
) -> None:
    """Evidence in the study that the acquisition had more beds than the SPECT used.

    Refused (unless accepted): the SPECT's, or another NM object's of its study and frame of
    reference, Series Description / Image Comments saying "bed k of n" with fewer than n beds here.
    A warning: more raw projection acquisitions (NM TOMO objects of the study and frame of
    reference) than beds reconstructed.
    """
    first = spects[0]
    related = [
        c for c in candidates
        if c.modality == "NM" and c.study_uid == first.study_uid
        and c.frame_of_reference_uid == first.frame_of_reference_uid
    ]  # fmt: skip
    said = [(c, b) for c in [*spects, *related] if (b := beds_said(c)) is not None]
    n = max((b[1] for _, b in said), default=0)
    if n > len(spects):
        ours = sorted({b[0] for c, b in said if any(c is x for x in spects)})
        where = (
            f"the SPECT's Series Description / Image Comments say it is bed {', '.join(map(str, ours))} of {n} of one "
            "acquisition"
            if ours
            else f"another NM object of this study ({said[0][0].label()}) says the acquisition had {n} beds"
        )
        why = (
            f"{where}, but only {len(spects)} of the {n} beds "
            f"{'is' if len(spects) == 1 else 'are'} in the input: the dose would cover only part of what was acquired "
            "(regions in the missing beds would get a dose from no activity)"
        )
        name = MISSING_BEDS_ASSUMPTION
        if name not in accepted:
            raise InputError(
                f"{why}; send all beds (they are joined into one volume), or, if the missing beds are not wanted, allow "
                f"this with {_accept_hint(name)}"
            )
        notes.append(f"ASSUMED ({name}): {why}")
    projections = [c for c in related if c.kind == "nm-multiframe" and "projections" in c.reason]
    if len(projections) > len(spects):
        notes.append(
            f"the input holds {len(projections)} raw projection acquisitions (NM TOMO) of this study but the SPECT has "
            f"{len(spects)} reconstructed bed(s): if the projections are beds of one acquisition, the reconstructions "
            "of the others did not arrive and the SPECT covers only part of what was acquired"
        )


def _select(
    candidates: list[Candidate],
    spect_series_uid: str | None,
    ct_series_uid: str | None,
    notes: list[str],
    energy_window_kev: float | None = None,
    accepted: Sequence[str] = (),
) -> tuple[Candidate, list[int], Grid, Candidate, list[int], Grid, BedSet | None]:
    """Pick the SPECT (one volume or the beds of one acquisition) and the CT, check they belong
    together, and place both (headers only)."""
    chosen = _select_spect(candidates, spect_series_uid, energy_window_kev, notes)
    bed_set = chosen if isinstance(chosen, BedSet) else None
    spects = bed_set.candidates if bed_set is not None else [chosen]
    spect = spects[0]
    for c in spects:
        for fh in c.files:
            if fh.truncated:
                raise InputError(
                    f"{fh.relpath}: truncated DICOM file ({fh.truncated}); it belongs to the SPECT"
                )
    _check_beds_said(spects, candidates, accepted, notes)
    if bed_set is None:
        spect_order, spect_grid, geo_notes = candidate_grid(spect)
        notes.extend(geo_notes)
    else:
        spect_order, spect_grid = bed_set.beds[0].order, bed_set.grid
        for bed in bed_set.beds:
            notes.extend(bed.notes)
    for c, grid in ([(b.cand, b.grid) for b in bed_set.beds] if bed_set is not None else [(spect, spect_grid)]):
        _check_geometry_facts("SPECT", [c], grid, accepted, notes)
    ct = _select_ct(candidates, spect, spect_grid, ct_series_uid, notes)
    for fh in ct.files:
        if fh.truncated:
            raise InputError(
                f"{fh.relpath}: truncated DICOM file ({fh.truncated}); it belongs to the CT"
            )
    _check_match(ct, spect, notes)
    _check_contrast(ct, accepted, notes)
    ct_order, ct_grid = stack_geometry(ct.files, ct.label())
    _check_geometry_facts("CT", [ct], ct_grid, accepted, notes)
    return spect, spect_order, spect_grid, ct, ct_order, ct_grid, bed_set


def _check_ct_whole(ct: Candidate, spects: Sequence[Candidate], accepted: Sequence[str], notes: list[str]) -> None:
    """The CT reaches both ends of the SPECT (and holds the slices its header counts), as the service requires.

    A CT cut at one end (an interrupted transfer, a folder copied in part) leaves the SPECT's activity
    beyond it without density: that part of the patient has no dose, and only a warning said so.
    """
    why = ct_coverage_problem([fh.header for c in (ct, *spects) for fh in c.files])
    if why is None:
        return
    name = CT_SHORT_ASSUMPTION
    if name not in accepted:
        raise InputError(
            f"incomplete study: {why}. Send the whole CT (or choose another with {_hint('ct_series_uid')}); or compute "
            f"over the part the CT covers, with no dose beyond it, with {_accept_hint(name)}"
        )
    notes.append(f"ASSUMED ({name}): {why}; the SPECT's activity beyond the CT has no dose")


def load_study(
    path: str | Path,
    *,
    calibrations: Sequence[CameraCalibration] = (),
    sensitivity_cps_per_mbq: float | None = None,
    calling_ae_title: str | None = None,
    allow_normalised: bool = False,
    spect_series_uid: str | None = None,
    ct_series_uid: str | None = None,
    energy_window_kev: float | None = None,
    administration_datetime: dt.datetime | None = None,
    acquisition_datetime: dt.datetime | None = None,
    hours_after_administration: float | None = None,
    accepted_assumptions: Sequence[str] = (),
    max_zip_bytes: int = 4 * 2**30,
    single_study: bool = True,
) -> Study:
    """Read a SPECT/CT study from a folder, a zip archive or a single file.

    Parameters
    ----------
    path
        Folder (searched recursively), zip archive, or file.
    calibrations
        Camera sensitivities (cps/MBq); the most specific entry matching the NM header
        (and ``calling_ae_title``) is used when the SPECT holds counts.
    sensitivity_cps_per_mbq
        A sensitivity that overrides ``calibrations``.
    calling_ae_title
        The AE title the study was received from (DICOM node), for calibration matching.
    allow_normalised
        When no activity calibration applies, return a SPECT normalised to 1 MBq in the
        field of view (units ``"MBq-normalised"``) instead of refusing.
    spect_series_uid, ct_series_uid
        Choose among several candidates (a Series Instance UID, or the key listed by
        :func:`scan_dicom` for one of several multi-frame NM objects in one series, or
        for one energy window of a multi-window reconstruction).
    energy_window_kev
        Choose the SPECT whose energy window contains this energy (e.g. 208 keV) among
        several (several windows in one reconstruction, or one series per window).
    administration_datetime, acquisition_datetime, hours_after_administration, accepted_assumptions
        The user's time facts (see :func:`spectdose.study.resolve_times`); here they are
        needed only for PET-style values decay-corrected to the administration.
    max_zip_bytes
        Largest total uncompressed size accepted from a zip archive.
    single_study
        False for a time point of a cycle: messages then leave out the one-study remedies
        (``--hours-after-administration``, ``--acquisition-time``) that a cycle refuses.

    Returns
    -------
    Study
        CT in HU (float32) on the CT grid; SPECT in Bq/ml at the acquisition start
        (float32) on its own grid, or MBq-normalised. Beds of one multi-bed acquisition
        are joined into one volume referred to the first bed's acquisition start.

    Raises
    ------
    InputError
        No CT, no SPECT, several candidates, truncated or undecodable files in the
        series needed, mismatched studies or patients, unsafe or oversized archives; a
        SPECT with no activity in it (slope 0, all-zero pixels, no positive value, or
        negative values beyond noise: see ``NEGATIVE_NOISE_FRACTION``).
    GeometryError
        Uneven CT spacing or missing slices, gantry tilt, mixed orientations, a SPECT
        whose activity lies mostly outside the CT, beds that cannot be joined, or header
        geometry facts that contradict each other (unless the assumption is accepted).
    CalibrationError
        Counts without a camera sensitivity or time per view (unless
        ``allow_normalised``), unsupported value mappings, ambiguous calibrations.
    """
    try:
        return _load(
            path,
            calibrations=calibrations,
            sensitivity_cps_per_mbq=sensitivity_cps_per_mbq,
            calling_ae_title=calling_ae_title,
            allow_normalised=allow_normalised,
            spect_series_uid=spect_series_uid,
            ct_series_uid=ct_series_uid,
            energy_window_kev=energy_window_kev,
            time_options={
                "administration_datetime": administration_datetime,
                "acquisition_given": acquisition_datetime,
                "hours_after_administration": hours_after_administration,
                "accepted": tuple(accepted_assumptions),
                "single_study": single_study,
            },
            max_zip_bytes=max_zip_bytes,
        )
    except MALFORMED_CONTENT_ERRORS as exc:
        # A safety net: specific checks above name the attribute; anything that still slips
        # through is malformed DICOM content, reported without echoing header values.
        raise InputError(
            f"malformed DICOM content in the CT or SPECT ({type(exc).__name__}); check the files with a "
            "DICOM validator (e.g. dciodvfy)"
        ) from exc


def _load(
    path: str | Path,
    *,
    calibrations: Sequence[CameraCalibration],
    sensitivity_cps_per_mbq: float | None,
    calling_ae_title: str | None,
    allow_normalised: bool,
    spect_series_uid: str | None,
    ct_series_uid: str | None,
    energy_window_kev: float | None,
    time_options: dict,
    max_zip_bytes: int,
) -> Study:
    notes: list[str] = []
    with input_files(path, max_zip_bytes) as items:
        candidates, ignored, scan_notes, orphans = _scan(items)
        notes.extend(scan_notes)
        if not candidates and not orphans:
            shown = "; ".join(f"{f}: {r}" for f, r in ignored[:3]) + (" ..." if len(ignored) > 3 else "")
            raise InputError(
                f"no DICOM images in the input ({len(ignored)} file(s) looked at"
                + (f", all ignored: {shown})" if ignored else ")")
            )
        try:
            spect, spect_order, spect_grid, ct, ct_order, ct_grid, bed_set = _select(
                candidates, spect_series_uid, ct_series_uid, notes, energy_window_kev, time_options["accepted"]
            )
        except (InputError, GeometryError) as exc:
            if not orphans:
                raise
            listed = ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else "")
            raise type(exc)(
                f"{exc} (damaged or truncated file(s) {listed} could not be attributed to any series and may belong here)"
            ) from exc
        used = [ct, *(bed_set.candidates if bed_set is not None else [spect])]
        for c in candidates:
            if any(c is u for u in used):
                continue
            reason = (
                f"not used: {c.reason}"
                if c.reason
                else f"not selected ({c.role.upper()} candidate)"
            )
            for fh in c.files:
                if fh.truncated:
                    notes.append(
                        f"{fh.relpath}: truncated DICOM file ignored (not part of the CT or SPECT used)"
                    )
                ignored.append(
                    (fh.relpath, reason + (f"; truncated: {fh.truncated}" if fh.truncated else ""))
                )
        if bed_set is None:
            read = [(spect, *_read_spect_values(spect, spect_order, notes, time_options["accepted"]))]
        else:
            read = [
                (b.cand, *_read_spect_values(b.cand, b.order, notes, time_options["accepted"])) for b in bed_set.beds
            ]
        ct_volume = _read_ct(ct, ct_order, ct_grid)

    what = "SPECT"
    datasets = [ds for _, _, _, bed_datasets in read for ds in bed_datasets]
    header = datasets[0]
    acquisition, acquisition_source = act.acquisition_start(datasets, what, notes)
    rp = act.radiopharmaceutical(header, spect.modality, acquisition, what, notes)
    _check_nuclide(rp, spect.label(), time_options["accepted"], notes)
    administration = Administration(
        nuclide=rp.nuclide or "Lu-177",
        injected_activity_bq=rp.injected_activity_bq,
        administration_datetime=rp.administration,
        radiopharmaceutical=rp.agent,
        start_time_only=rp.start_time_only,
    )
    hours_to_acquisition = None
    if any(act.decay_correction(bed_datasets[0])[0] == "ADMIN" for _, _, _, bed_datasets in read):
        # values referred to the administration (NM or PET-style): the elapsed time is needed now, from facts only
        times = resolve_times(administration, acquisition, acquisition_source, **time_options)
        hours_to_acquisition = times.hours
        notes.extend(times.warnings)
    convert = {
        "calibrations": calibrations,
        "sensitivity_cps_per_mbq": sensitivity_cps_per_mbq,
        "calling_ae_title": calling_ae_title,
    }
    if bed_set is None:
        _, values, scaling, datasets = read[0]
        elapsed_s = None if hours_to_acquisition is None else hours_to_acquisition * 3600.0
        decay = act.decay_factor(datasets, rp, elapsed_s, what, notes, spect.modality)
        _check_activity(values, spect.label(), notes, time_options["accepted"])
        if spect.frame_of_reference_uid and spect.frame_of_reference_uid == ct.frame_of_reference_uid:
            _check_overlap(values, spect, spect_grid, ct_grid, notes, ct, [spect], time_options["accepted"])
        array, units, calibration_note = _to_activity(
            values, scaling, spect, datasets, spect_grid,
            allow_normalised=allow_normalised, decay_factor=decay, notes=notes, **convert,
        )  # fmt: skip
    else:
        array, units, calibration_note = _join_beds(
            bed_set, read, rp, acquisition, hours_to_acquisition, allow_normalised, notes, time_options, convert
        )
        if spect.frame_of_reference_uid and spect.frame_of_reference_uid == ct.frame_of_reference_uid:
            _check_overlap(array, spect, spect_grid, ct_grid, notes, ct, bed_set.candidates, time_options["accepted"])
        header = datasets[0]
    for note in notes:
        log.info("ingest: %s", note)
    return Study(
        ct=ct_volume,
        spect=Volume(array.astype(np.float32), spect_grid, units),
        ct_series=_ref(ct, ct_order),
        spect_series=_ref(spect, spect_order, bed_set),
        patient=_patient(header),
        administration=administration,
        acquisition_datetime=acquisition,
        calibration_note=calibration_note,
        warnings=notes,
        ignored_files=ignored,
        acquisition_datetime_source=acquisition_source,
    )
