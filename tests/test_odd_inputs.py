"""A corpus of odd inputs, end to end through ``pipeline.run``: each gives the baseline dose or a named refusal.

Issue 7 ("no silent wrong dose") and issue 8 item 4 ("refuse what has no dose in it"). Every
case is a small synthetic study written by tests/dicom_factory.py (CT 16 x 20 x 24 at
5 x 2 x 2.5 mm, SPECT 8 x 10 x 12 at 4 mm, 72 h after administration) and asserts one exact
outcome:

* ``Same``: the dose equals the baseline's: maximum and mean in tissue within 1 % (the
  same activity and densities reach the dose calculation; only quantisation of PET-style
  16-bit slices differs). The registration case allows 5 % on the maximum and 2 % on the
  mean: a rigid registration of such small volumes is good to a few mm, not to a voxel.
* ``Scaled``: the dose is the baseline's times a stated factor (a different, stated time),
  and summary.json carries the warnings named.
* ``Refused``: the exception type and a message fragment naming what is wrong and the
  CLI flag / REST field that supplies the missing fact; no RT Dose is written.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from spectdose.dose import time_integration_factor_s
from spectdose.errors import CalibrationError, GeometryError, InputError, SpectdoseError
from spectdose.pipeline import DoseOptions, run

from . import dicom_factory as f

CT_SHAPE = (16, 20, 24)
CT_SPACING = (5.0, 2.0, 2.5)
CT_ORIGIN = (-30.0, -20.0, -40.0)
NM_SHAPE = (8, 10, 12)
NM_SPACING = (4.0, 4.0, 4.0)
NM_FIRST_VOXEL = (-22.0, -18.0, -14.0)
RWVM_SLOPE = 2.5  # Bq/ml per stored value
FRAME_S = 20.0  # time per view written by the factory (ActualFrameDuration 20000 ms)
VOXEL_ML = 0.064
ADMIN = "20240302093000"  # 72 h before the acquisition start 2024-03-05 09:30 (inside 48-168 h)
HOURS = 72.0
LAMBDA_PER_H = math.log(2) / (6.647 * 24)  # Lu-177 (ICRP-107)
WINDOW_113 = ("Lu177 113keV", 101.7, 124.3)  # 20 % windows around the photopeaks
WINDOW_208 = ("Lu177 208keV", 187.2, 228.8)
NOT_PUBLIC = ("spect_series_uid", "ct_series_uid", "allow_normalised", "administration_datetime")


def _counts() -> np.ndarray:
    return f.blob_counts(NM_SHAPE)


def _ct(root: Path, study: f.StudyIds, **kw) -> f.Written:
    kw.setdefault("origin_mm", CT_ORIGIN)
    kw.setdefault("spacing_mm", CT_SPACING)
    hu = kw.pop("hu", None)
    return f.write_ct_series(root / "CT", study, f.smooth_hu(CT_SHAPE) if hu is None else hu, **kw)


def _nm(root: Path, study: f.StudyIds, name: str = "nm.dcm", **kw) -> f.Written:
    kw.setdefault("spacing_mm", NM_SPACING)
    kw.setdefault("first_voxel_mm", NM_FIRST_VOXEL)
    kw.setdefault("rwvm", (RWVM_SLOPE, 0.0))
    kw.setdefault("admin_datetime", ADMIN)
    counts = kw.pop("counts", None)
    return f.write_nm_recon(root / "NM" / name, study, _counts() if counts is None else counts, **kw)


def baseline(root: Path, *, ct: dict | None = None, **nm) -> None:
    study = f.StudyIds()
    _ct(root, study, **(ct or {}))
    _nm(root, study, **nm)


# ----------------------------------------------------------------------------- writers of odd studies


def zipped(root: Path) -> Path:
    src = root / "src"
    baseline(src)
    archive = root / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"export/{p.relative_to(src).as_posix()}")
    return archive


def shuffled_nested(root: Path) -> None:
    """Files renamed at random, without extensions, in nested folders, with junk and a DICOMDIR."""
    src = root.parent / (root.name + "-src")
    baseline(src)
    rng = random.Random(5)
    files = sorted(src.rglob("*.dcm"))
    for n, p in enumerate(rng.sample(files, len(files))):
        dst = root / ("a/b" if n % 3 else "c") / f"IM{rng.randrange(10**6):06d}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, dst)
    (root / "export.log").write_text("scanner export log\n")
    f.write_dicomdir_stub(root / "DICOMDIR")


def ct_slices_in_scrambled_files(root: Path) -> None:
    study = f.StudyIds()
    perm = np.random.default_rng(2).permutation(CT_SHAPE[0])
    _ct(root, study, hu=f.smooth_hu(CT_SHAPE)[perm], slice_offsets_mm=np.arange(CT_SHAPE[0])[perm] * CT_SPACING[0])
    _nm(root, study)


def feet_first_ct(root: Path) -> None:
    """The same voxels written as a feet-first scanner does: slices along -z, rows along -x."""
    study = f.StudyIds()
    hu = f.smooth_hu(CT_SHAPE)[::-1, :, ::-1]
    top = CT_ORIGIN[2] + (CT_SHAPE[0] - 1) * CT_SPACING[0]
    right = CT_ORIGIN[0] + (CT_SHAPE[2] - 1) * CT_SPACING[2]
    _ct(root, study, hu=np.ascontiguousarray(hu), row_dir=(-1.0, 0.0, 0.0), origin_mm=(right, CT_ORIGIN[1], top))
    _nm(root, study)


def nm_negative_spacing(root: Path) -> None:
    """Frames stacked from the top down with a negative Spacing Between Slices (PS3.3 C.8.4.15)."""
    study = f.StudyIds()
    _ct(root, study)
    top = NM_FIRST_VOXEL[2] + (NM_SHAPE[0] - 1) * NM_SPACING[0]
    _nm(root, study, counts=_counts()[::-1].copy(), spacing_sign=-1.0, first_voxel_mm=(*NM_FIRST_VOXEL[:2], top))


def nm_single_frame_stack(root: Path) -> None:
    study = f.StudyIds()
    _ct(root, study)
    f.write_nm_slices(
        root / "NMS", study, _counts(), spacing_mm=NM_SPACING, first_voxel_mm=NM_FIRST_VOXEL,
        rwvm=(RWVM_SLOPE, 0.0), admin_datetime=ADMIN,
    )  # fmt: skip


def pet_style(decay: str) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        study = f.StudyIds()
        _ct(root, study)
        bq = _counts() * RWVM_SLOPE
        if decay == "ADMIN":  # values referred to the administration: higher by the decay over 72 h
            bq = bq * math.exp(LAMBDA_PER_H * HOURS)
        f.write_pt_series(
            root / "PT", study, bq, spacing_mm=NM_SPACING, origin_mm=NM_FIRST_VOXEL, decay_correction=decay,
            admin_datetime=ADMIN,
        )  # fmt: skip

    return write


def nm_units_bqml(root: Path) -> None:
    baseline(root, rwvm=None, units_bqml_slope=RWVM_SLOPE)


def rwvm_kbq(root: Path) -> None:
    baseline(root, rwvm=(RWVM_SLOPE / 1000, 0.0), rwvm_unit="kBq/ml")


def rwvm_shared(root: Path) -> None:
    baseline(root, rwvm_where="shared")


def counts_only(root: Path) -> None:
    baseline(root, rwvm=None)


def duplicates_and_outputs(root: Path) -> None:
    """Second copies of some files, an earlier RT Dose output and a text file in the same folder."""
    study = f.StudyIds()
    ct = _ct(root, study)
    nm = _nm(root, study)
    for p in (*ct.paths[:3], *nm.paths):
        (root / "again").mkdir(exist_ok=True)
        shutil.copy(p, root / "again" / f"copy-{p.name}")
    f.write_rtdose(root / "out" / "rtdose.dcm", study)
    (root / "README.txt").write_text("export\n")


def no_preamble(root: Path) -> None:
    study = f.StudyIds()
    _ct(root, study, preamble=False)
    _nm(root, study, preamble=False)


def time_only(clock: str = "093000") -> Callable[[Path], None]:
    """Radiopharmaceutical Start Time without a date (all a standard NM object may carry)."""

    def write(root: Path) -> None:
        baseline(root, admin_datetime=None, admin_time_only=clock)

    return write


def deidentified(root: Path) -> None:
    """Dates blanked by a de-identification profile; times of day kept."""
    study = f.StudyIds(study_date="", study_time="")
    _ct(root, study)
    _nm(root, study, admin_datetime=None, admin_time_only="093000", acquisition=("", "093000"))


def acquisition_from_series_date(root: Path) -> None:
    """No Acquisition Date/Time: only the series/study date (09:00) is left."""
    baseline(root, acquisition=None)


def admin_datetime(value: str) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        baseline(root, admin_datetime=value)

    return write


def multi_window(root: Path) -> None:
    """One reconstruction holding the 208 keV window (the baseline) and the 113 keV window (twice it)."""
    extra = [(_counts() * 2, *WINDOW_113)]
    baseline(root, energy_window=WINDOW_208, extra_windows=extra)


def per_window_series(root: Path) -> None:
    """One series per window with the same description, as some workstations export them."""
    study = f.StudyIds()
    _ct(root, study)
    _nm(root, study, "w208.dcm", energy_window=WINDOW_208, description="SPECT OSEM")
    _nm(root, study, "w113.dcm", counts=_counts() * 2, energy_window=WINDOW_113, description="SPECT OSEM")


def per_window_series_named_only(root: Path) -> None:
    """Per-window series whose windows have a name but no energy limits."""
    study = f.StudyIds()
    _ct(root, study)
    _nm(root, study, "w208.dcm", energy_window=("EM2 208 keV", None, None), description="SPECT OSEM")
    _nm(root, study, "w113.dcm", counts=_counts() * 2, energy_window=("EM1 113 keV", None, None), description="SPECT OSEM")


def two_recons(root: Path) -> None:
    study = f.StudyIds()
    _ct(root, study)
    _nm(root, study, "ac.dcm", description="SPECT AC")
    _nm(root, study, "nac.dcm", description="SPECT NAC")


def negative_noise(root: Path) -> None:
    """An offset of 40 stored values taken off by the intercept, and 12 background voxels 10 below it."""
    stored = _counts() + 40
    stored[0, :3, :4] = 30
    baseline(root, counts=stored, rwvm=(RWVM_SLOPE, -40 * RWVM_SLOPE))


def all_zero(root: Path) -> None:
    baseline(root, counts=np.zeros(NM_SHAPE, np.uint16))


def ct_slope_zero(root: Path) -> None:
    baseline(root)
    for p in sorted((root / "CT").glob("*.dcm")):
        ds = pydicom.dcmread(p)
        ds.RescaleSlope = "0"
        ds.save_as(p)


def ct_missing_slice(root: Path) -> None:
    offsets = [k * CT_SPACING[0] for k in range(CT_SHAPE[0] + 1) if k != 6]
    study = f.StudyIds()
    _ct(root, study, slice_offsets_mm=offsets)
    _nm(root, study)


def other_frame_of_reference(root: Path) -> None:
    baseline(root, ct={"frame_of_reference_uid": "1.2.826.0.1.3680043.8.498.4242"})


def _set(paths, **attributes) -> None:
    """Rewrite header attributes of written files (pixel data untouched); None deletes one."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


# --- issue 18 item 3: NM values decay-corrected to the administration (Decay Correction ADMIN)
def nm_decay_correction(mode: str, corrected: tuple[str, ...], **nm) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        study = f.StudyIds()
        _ct(root, study)
        factor = math.exp(LAMBDA_PER_H * HOURS) if mode == "ADMIN" else 1.0  # values referred to the administration
        nm_written = _nm(root, study, rwvm=(RWVM_SLOPE * factor, 0.0), **nm)
        _set(nm_written.paths, DecayCorrection=mode, CorrectedImage=list(corrected))

    return write


# --- issue 18 item 2: beds of one acquisition (frames 0-4 and 3-7 of the baseline, 2 slices of overlap)
BED_UIDS = ("1.2.826.0.1.3680043.8.498.18001", "1.2.826.0.1.3680043.8.498.18002")
BED_MINUTES = 20.0  # the second bed starts 20 min after the first


def _beds(root: Path, study: f.StudyIds, *, same_series: bool = False, second_from: int = 3, description: str = "SPECT",
          uids: tuple[str, str] = BED_UIDS, first_only: bool = False) -> None:  # fmt: skip
    counts = _counts()
    _nm(root, study, f"{description}-bed1.dcm", counts=counts[:5].copy(), series_uid=uids[0], description=description)
    if first_only:
        return
    decayed = math.exp(-LAMBDA_PER_H * BED_MINUTES / 60)  # the second bed sees the activity 20 min later
    z = NM_FIRST_VOXEL[2] + second_from * NM_SPACING[0]
    _nm(
        root, study, f"{description}-bed2.dcm", counts=counts[second_from:].copy(), rwvm=(RWVM_SLOPE * decayed, 0.0),
        first_voxel_mm=(*NM_FIRST_VOXEL[:2], z), acquisition=("20240305", "095000"),
        series_uid=uids[0] if same_series else uids[1], description=description,
    )  # fmt: skip


def two_beds(same_series: bool = False, second_from: int = 3) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        study = f.StudyIds()
        _ct(root, study)
        _beds(root, study, same_series=same_series, second_from=second_from)

    return write


def two_spects_far_apart(root: Path) -> None:
    """Slices 0-2 and 6-7 of the baseline as two series: 3 slices apart, two SPECTs of different regions."""
    study = f.StudyIds()
    _ct(root, study)
    counts = _counts()
    _nm(root, study, "upper.dcm", counts=counts[:3].copy(), description="SPECT upper")
    z = NM_FIRST_VOXEL[2] + 6 * NM_SPACING[0]
    _nm(root, study, "lower.dcm", counts=counts[6:].copy(), first_voxel_mm=(*NM_FIRST_VOXEL[:2], z), description="SPECT lower")


def two_beds_ac_and_nac(root: Path) -> None:
    study = f.StudyIds()
    _ct(root, study)
    _beds(root, study, description="SPECT AC")
    _beds(root, study, description="SPECT NAC", uids=("1.2.826.0.1.3680043.8.498.18003", "1.2.826.0.1.3680043.8.498.18004"))


def one_of_two_beds(root: Path) -> None:
    study = f.StudyIds()
    _ct(root, study)
    _beds(root, study, description="SPECT bed 1 of 2", first_only=True)


def projections_of_two_beds(bed_text: bool) -> Callable[[Path], None]:
    """The baseline recon with the raw projections of two beds beside it (named "bed k of 2", or not)."""

    def write(root: Path) -> None:
        study = f.StudyIds()
        _ct(root, study)
        _nm(root, study)
        for k in (1, 2):
            f.write_nm_projections(root / "RAW" / f"bed{k}.dcm", study, description=f"TOMO bed {k} of 2" if bed_text else "TOMO")

    return write


def pet_style_two_beds(root: Path, *, one_series: bool = False) -> None:
    """Two overlapping PET-style beds (slices 0-4 and 3-7 of the baseline), as two series or as one."""
    study = f.StudyIds()
    _ct(root, study)
    bq = _counts() * RWVM_SLOPE
    first = f.write_pt_series(root / "PT1", study, bq[:5], spacing_mm=NM_SPACING, origin_mm=NM_FIRST_VOXEL, admin_datetime=ADMIN)
    z = NM_FIRST_VOXEL[2] + 3 * NM_SPACING[0]
    second = f.write_pt_series(
        root / "PT2", study, bq[3:], spacing_mm=NM_SPACING, origin_mm=(*NM_FIRST_VOXEL[:2], z), admin_datetime=ADMIN
    )
    if one_series:
        _set(second.paths, SeriesInstanceUID=first.series_uid)


# --- issue 18 item 4: header geometry facts that contradict each other
def nm_header(**attributes) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        study = f.StudyIds()
        _ct(root, study)
        _set(_nm(root, study).paths, **attributes)

    return write


def ct_header(**attributes) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        study = f.StudyIds()
        _set(_ct(root, study).paths, **attributes)
        _nm(root, study)

    return write


def pet_style_spacing_contradicts_positions(root: Path) -> None:
    pet_style("START")(root)
    _set(sorted((root / "PT").glob("*.dcm")), SpacingBetweenSlices="4.8")


# --- issue 18 item 5: contrast CT
def contrast_ct_only(root: Path) -> None:
    ct_header(ContrastBolusAgent="Iohexol 350")(root)


CONTRAST_CT_UID = "1.2.826.0.1.3680043.8.498.18010"


def contrast_and_plain_ct(root: Path) -> None:
    """The plain CT (the baseline's) and a contrast CT of the same frame of reference, 100 HU higher in tissue."""
    study = f.StudyIds()
    _ct(root, study, description="CT low dose")
    hu = f.smooth_hu(CT_SHAPE)
    enhanced = _ct(
        root / "contrast", study, hu=np.where(hu > -500, hu + 100, hu), description="CT venous", series_uid=CONTRAST_CT_UID
    )
    _set(enhanced.paths, ContrastBolusAgent="Iohexol 350")
    _nm(root, study)


# ----------------------------------------------------------------------------- the corpus


@dataclasses.dataclass(frozen=True)
class Same:
    max_rtol: float = 0.01
    mean_rtol: float = 0.01
    warning: str | None = None  # a fragment every result of the case must carry


@dataclasses.dataclass(frozen=True)
class Scaled:
    factor: float
    warnings: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Refused:
    error: type[SpectdoseError]
    match: str  # regular expression searched in the message


@dataclasses.dataclass(frozen=True)
class Case:
    write: Callable[[Path], Path | None]
    options: dict
    outcome: Same | Scaled | Refused


def _hanscheid_ratio(hours: float) -> float:
    return time_integration_factor_s("hanscheid", hours, allow_outside_model_range=True) / time_integration_factor_s(
        "hanscheid", HOURS
    )


ADMIN_DT = dt.datetime(2024, 3, 2, 9, 30)
ACQ_DT = dt.datetime(2024, 3, 5, 9, 30)
ACCEPT_DATE = ("administration_date_from_acquisition",)
ACCEPT_RANGE = ("time_outside_model_range",)
TIME_HINT = r"--hours-after-administration \(CLI\) / hours_after_administration \(REST\)"

CASES: dict[str, Case] = {
    # --- handled before issue 7 (its list of what went right), kept right
    "zip-archive": Case(zipped, {}, Same()),
    "shuffled-nested-files-without-extensions": Case(shuffled_nested, {}, Same()),
    "ct-slices-in-scrambled-files": Case(ct_slices_in_scrambled_files, {}, Same()),
    "feet-first-ct": Case(feet_first_ct, {}, Same()),
    "nm-negative-spacing-between-slices": Case(nm_negative_spacing, {}, Same()),
    "nm-single-frame-stack": Case(nm_single_frame_stack, {}, Same()),
    "pet-style-bqml-decay-start": Case(pet_style("START"), {}, Same()),
    "pet-style-bqml-decay-admin": Case(pet_style("ADMIN"), {}, Same()),
    "pet-style-bqml-decay-none": Case(pet_style("NONE"), {}, Same()),
    "nm-units-bqml-rescale": Case(nm_units_bqml, {}, Same()),
    "rwvm-in-kbq-per-ml": Case(rwvm_kbq, {}, Same()),
    "rwvm-in-shared-functional-group": Case(rwvm_shared, {}, Same()),
    "counts-with-camera-sensitivity": Case(
        counts_only, {"sensitivity_cps_per_mbq": 1e6 / (RWVM_SLOPE * FRAME_S * VOXEL_ML)}, Same()
    ),
    "duplicate-copies-and-earlier-outputs": Case(duplicates_and_outputs, {}, Same()),
    "files-without-preamble": Case(no_preamble, {}, Same()),
    "other-frame-of-reference-registered": Case(
        other_frame_of_reference, {}, Same(max_rtol=0.05, mean_rtol=0.02, warning="rigidly registered")
    ),
    "ct-missing-slice": Case(ct_missing_slice, {}, Refused(GeometryError, r"slices missing.*1 slice")),
    "ct-rescale-slope-zero": Case(ct_slope_zero, {}, Refused(InputError, "RescaleSlope is 0")),
    "counts-without-calibration": Case(
        counts_only,
        {},
        Refused(
            CalibrationError,
            r"--sensitivity-cps-per-mbq \(CLI\) / sensitivity_cps_per_mbq \(REST\).*--normalised \(CLI\) / normalised \(REST\)",
        ),
    ),
    # --- issue 7 item 1: a time without a date is never completed by a guess
    "administration-time-without-date": Case(
        time_only(),
        {},
        Refused(
            InputError,
            r"administration time \(09:30, Radiopharmaceutical Start Time\) but no date.*"
            r"--administration-time \(CLI\) / administration_time \(REST\).*administration_date_from_acquisition",
        ),
    ),
    "administration-time-without-date-and-date-time-given": Case(
        time_only(), {"administration_datetime": ADMIN_DT}, Same()
    ),
    "administration-time-without-date-and-hours-given": Case(
        time_only(), {"hours_after_administration": HOURS}, Same()
    ),
    "administration-time-without-date-accepted": Case(
        time_only(),
        {"accepted_assumptions": ACCEPT_DATE + ACCEPT_RANGE},
        # taken on the day before the acquisition at 09:30: 24 h, outside the model's range (also accepted)
        Scaled(_hanscheid_ratio(24.0), ("ASSUMED (administration_date_from_acquisition)", "ASSUMED (time_outside_model_range)")),
    ),
    "administration-time-without-date-accepted-but-then-out-of-range": Case(
        time_only("081500"), {"accepted_assumptions": ACCEPT_DATE}, Refused(InputError, r"validated for about 48-168 h.*1\.2 h")
    ),
    "administration-after-acquisition": Case(
        admin_datetime("20240305120000"), {}, Refused(InputError, r"administration \(2024-03-05T12:00:00, in the header\) is not before")
    ),
    "administration-given-with-a-utc-offset": Case(
        time_only(), {"administration_datetime": dt.datetime.fromisoformat("2024-03-02T09:30+01:00")}, Same()
    ),
    "administration-given-after-acquisition": Case(
        admin_datetime(ADMIN), {"administration_datetime": dt.datetime(2024, 3, 6)}, Refused(InputError, "given.*is not before")
    ),
    # --- dates from elsewhere
    "acquisition-date-only-from-series": Case(
        acquisition_from_series_date, {}, Refused(InputError, r"no Acquisition Date/Time.*acquisition_time_from_series_or_study")
    ),
    "acquisition-date-from-series-accepted": Case(
        acquisition_from_series_date,
        {"accepted_assumptions": ("acquisition_time_from_series_or_study",)},
        Scaled(71.5 / 72.0, ("ASSUMED (acquisition_time_from_series_or_study)",)),  # series time 09:00
    ),
    # --- issue 7 item 3: de-identified studies
    "deidentified-blank-dates": Case(
        deidentified,
        {},
        Refused(InputError, r"acquisition date is unknown.*--acquisition-time \(CLI\) / acquisition_time \(REST\).*" + TIME_HINT),
    ),
    "deidentified-with-administration-time-only": Case(
        deidentified, {"administration_datetime": ADMIN_DT}, Refused(InputError, r"acquisition date is unknown.*--acquisition-time")
    ),
    "deidentified-with-both-date-times": Case(
        deidentified, {"administration_datetime": ADMIN_DT, "acquisition_datetime": ACQ_DT}, Same()
    ),
    "deidentified-with-hours": Case(deidentified, {"hours_after_administration": HOURS}, Same()),
    # --- the time model's range (Hanscheid et al. 2018: about 48-168 h)
    "hanscheid-at-23-h": Case(
        admin_datetime("20240304103000"), {}, Refused(InputError, r"validated for about 48-168 h.*23\.0 h.*time_outside_model_range")
    ),
    "hanscheid-at-200-h": Case(
        admin_datetime("20240226013000"), {}, Refused(InputError, r"48-168 h.*200\.0 h.*--accept time_outside_model_range")
    ),
    "hanscheid-at-23-h-accepted": Case(
        admin_datetime("20240304103000"),
        {"accepted_assumptions": ACCEPT_RANGE},
        Scaled(_hanscheid_ratio(23.0), ("ASSUMED (time_outside_model_range)",)),
    ),
    "physical-model-at-23-h": Case(
        admin_datetime("20240304103000"),
        {"time_model": "physical"},
        Scaled(time_integration_factor_s("physical", 23.0) / time_integration_factor_s("hanscheid", HOURS), ()),
    ),
    # --- the radionuclide: read from the header, never assumed silently
    "radionuclide-other-than-lu177": Case(
        lambda r: baseline(r, radionuclide=("^90^Yttrium", "230400")),
        {},
        Refused(InputError, r"radionuclide is '\^90\^Yttrium' \(Radionuclide Code Sequence\); spectdose computes Lu-177"),
    ),
    "radionuclide-not-named": Case(
        lambda r: baseline(r, radionuclide=None), {}, Refused(InputError, r"does not say which radionuclide.*--accept radionuclide_lu177_assumed")
    ),
    "radionuclide-not-named-accepted": Case(
        lambda r: baseline(r, radionuclide=None),
        {"accepted_assumptions": ("radionuclide_lu177_assumed",)},
        Same(warning="ASSUMED (radionuclide_lu177_assumed)"),
    ),
    # --- issue 8 item 4: nothing to compute a dose from
    "rwvm-slope-zero": Case(lambda r: baseline(r, rwvm=(0.0, 5.0)), {}, Refused(InputError, "slope 0 in every slice")),
    "nm-bqml-rescale-slope-zero": Case(
        lambda r: baseline(r, rwvm=None, units_bqml_slope=0.0), {}, Refused(InputError, "NM Units BQML.*slope 0")
    ),
    "all-zero-pixels": Case(all_zero, {}, Refused(InputError, "pixel data are all zero")),
    "no-positive-activity": Case(
        lambda r: baseline(r, rwvm=(RWVM_SLOPE, -1e5)), {}, Refused(InputError, "no voxel holds positive activity")
    ),
    "negative-intercept-beyond-noise": Case(
        lambda r: baseline(r, rwvm=(RWVM_SLOPE, -1000.0)), {}, Refused(InputError, r"negative values beyond noise.*Intercept")
    ),
    "negative-noise-clipped-with-a-warning": Case(negative_noise, {}, Same(warning="negative voxel(s)")),
    # --- issue 7 item 6: energy windows; messages name flags and fields
    "multi-window-recon-without-choice": Case(
        multi_window,
        {},
        Refused(
            InputError,
            r"2 candidate SPECT volumes.*--energy-window \(CLI\) / energy_window \(REST\).*"
            r"/window-1\].*187\.2-228\.8 keV \(centre 208 keV\).*/window-2\].*101\.7-124\.3 keV \(centre 113 keV\)",
        ),
    ),
    "multi-window-recon-208-kev": Case(multi_window, {"energy_window_kev": 208.0}, Same()),
    "multi-window-recon-113-kev": Case(multi_window, {"energy_window_kev": 113.0}, Scaled(2.0, ())),
    "per-window-series-without-choice": Case(
        per_window_series,
        {},
        Refused(InputError, r"'SPECT OSEM'.*centre 208 keV.*'SPECT OSEM'.*centre 113 keV|'SPECT OSEM'.*centre 113 keV.*'SPECT OSEM'.*centre 208 keV"),
    ),
    "per-window-series-208-kev": Case(per_window_series, {"energy_window_kev": 208.0}, Same()),
    "per-window-series-named-only-208-kev": Case(per_window_series_named_only, {"energy_window_kev": 208.0}, Same()),
    "per-window-series-named-only-without-choice": Case(
        per_window_series_named_only, {}, Refused(InputError, r"no energy limits in the header; its name says (208|113) keV")
    ),
    "energy-window-not-in-the-study": Case(
        multi_window, {"energy_window_kev": 300.0}, Refused(InputError, r"no SPECT candidate has an energy window containing 300 keV")
    ),
    "two-recons-same-window": Case(
        two_recons, {}, Refused(InputError, r"2 candidate SPECT volumes; choose one with --spect-series \(CLI\) / spect_series \(REST\)")
    ),
    # --- issue 18 item 3: NM decay correction read from Decay Correction, warnings say what the header says
    "nm-decay-correction-admin-without-decy": Case(
        nm_decay_correction("ADMIN", ("ATTN", "SCAT")), {},
        Same(warning="decay-corrected to the administration (Decay Correction (0054,1102) ADMIN, Corrected Image without DECY)"),
    ),  # fmt: skip
    "nm-decay-correction-admin-with-decy": Case(
        nm_decay_correction("ADMIN", ("ATTN", "SCAT", "DECY")), {},
        Same(warning="decay-corrected to the administration (Decay Correction (0054,1102) ADMIN, Corrected Image lists DECY)"),
    ),  # fmt: skip
    "nm-decay-correction-admin-without-administration-date": Case(
        nm_decay_correction("ADMIN", ("DECY",), admin_datetime=None, admin_time_only="093000"), {},
        Refused(InputError, r"time since administration unknown.*but no date.*--administration-time"),
    ),  # fmt: skip
    "nm-decay-correction-start": Case(nm_decay_correction("START", ("ATTN", "DECY")), {}, Same()),
    "nm-decay-correction-none": Case(nm_decay_correction("NONE", ("ATTN",)), {}, Same()),
    # --- issue 18 item 2: beds of one acquisition are joined (each referred to the first bed's start), never one picked
    "two-beds-as-two-series": Case(two_beds(), {}, Same(warning="joined from 2 beds of one acquisition")),
    "two-beds-in-one-series": Case(two_beds(same_series=True), {}, Same(warning="joined from 2 beds of one acquisition")),
    "two-beds-one-named-with-spect-series": Case(
        two_beds(), {"spect_series_uid": BED_UIDS[1]}, Same(warning="names one bed of a 2-bed acquisition")
    ),
    "two-beds-with-a-gap": Case(
        two_beds(second_from=6), {}, Refused(GeometryError, r"are beds of one acquisition, but they leave a gap of 1 slice")
    ),
    "two-spects-far-apart-are-a-choice": Case(
        two_spects_far_apart, {}, Refused(InputError, r"2 candidate SPECT volumes; choose one with --spect-series.*'SPECT upper'")
    ),
    "two-beds-each-with-ac-and-nac": Case(
        two_beds_ac_and_nac, {},
        Refused(InputError, r"2 candidate SPECT acquisitions; choose one with --spect-series.*selects all its beds.*"
                            r"beds of one acquisition, joined when any of them is chosen: .*'SPECT (N?AC)'.*'SPECT (N?AC)'"),
    ),  # fmt: skip
    "only-one-of-two-beds-arrived": Case(
        one_of_two_beds, {}, Refused(InputError, r"bed 1 of 2 .*send all beds.*--accept spect_beds_missing")
    ),
    "projections-of-two-beds-beside-one-recon": Case(
        projections_of_two_beds(False), {}, Same(warning="2 raw projection acquisitions (NM TOMO) of this study")
    ),
    "projections-say-bed-2-of-2-beside-one-recon": Case(
        projections_of_two_beds(True), {},
        Refused(InputError, r"another NM object of this study .*'TOMO bed 1 of 2'.* says the acquisition had 2 beds, but only 1 of the 2 beds is"),
    ),  # fmt: skip
    "nm-frames-fewer-than-number-of-slices": Case(
        nm_header(NumberOfSlices=16), {}, Refused(InputError, r"8 frames but Number of Slices \(0054,0081\) 16 .*frames missing")
    ),
    "pet-style-two-beds-as-two-series": Case(pet_style_two_beds, {}, Same(warning="joined from 2 beds of one acquisition")),
    "pet-style-two-beds-in-one-series": Case(
        lambda r: pet_style_two_beds(r, one_series=True), {}, Refused(GeometryError, r"two slices at the same position.*Overlapping beds of one SPECT")
    ),
    # --- issue 18 item 4: geometry facts of the header that contradict each other
    "spect-pixel-spacing-contradicts-reconstruction-diameter": Case(
        nm_header(ReconstructionDiameter="57.6"), {},
        Refused(GeometryError, r"SPECT header contradicts itself: Pixel Spacing \(0028,0030\) gives 4 mm.*Reconstruction "
                               r"Diameter \(0018,1100\) 57\.6 mm / Columns 12 = 4\.8 mm.*--accept pixel_spacing_trusted"),
    ),  # fmt: skip
    "spect-pixel-spacing-contradiction-accepted": Case(
        nm_header(ReconstructionDiameter="57.6"), {"accepted_assumptions": ("pixel_spacing_trusted",)},
        Same(warning="ASSUMED (pixel_spacing_trusted)"),
    ),  # fmt: skip
    "spect-reconstruction-diameter-agrees": Case(nm_header(ReconstructionDiameter="48"), {}, Same()),
    "spect-spacing-between-slices-contradicts-slice-thickness": Case(
        nm_header(SliceThickness="4.8", PixelSpacing=["4.0", "4.0"]), {},
        Refused(GeometryError, r"Spacing Between Slices \(0018,0088\) gives 4 mm between slices.*Slice Thickness "
                               r"\(0018,0050\) is 4\.8 mm.*--accept slice_spacing_trusted"),
    ),  # fmt: skip
    "spect-slice-spacing-contradiction-accepted": Case(
        nm_header(SliceThickness="4.8"), {"accepted_assumptions": ("slice_spacing_trusted",)},
        Same(warning="ASSUMED (slice_spacing_trusted)"),
    ),  # fmt: skip
    "pet-style-spacing-between-slices-contradicts-positions": Case(
        pet_style_spacing_contradicts_positions, {},
        Refused(GeometryError, r"slice positions \(Image Position \(Patient\)\) are 4 mm apart.*Spacing Between Slices "
                               r"\(0018,0088\) is 4\.8 mm.*--accept slice_spacing_trusted"),
    ),  # fmt: skip
    "ct-pixel-spacing-contradicts-reconstruction-diameter": Case(
        ct_header(ReconstructionDiameter="72"), {},
        Refused(GeometryError, r"CT header contradicts itself: Pixel Spacing.*2\.5 mm.*Reconstruction Diameter.*72 mm / "
                               r"Columns 24 = 3 mm.*pixel_spacing_trusted"),
    ),  # fmt: skip
    # --- issue 18 item 5: a contrast CT gives densities only when told, with the effect stated
    "contrast-ct-only": Case(
        contrast_ct_only, {},
        Refused(InputError, r"contrast-enhanced \(Contrast/Bolus Agent 'Iohexol 350'\).*6 to 7 % lower.*"
                            r"--accept contrast_ct_density \(CLI\) / accept=contrast_ct_density \(REST\)"),
    ),  # fmt: skip
    "contrast-ct-only-accepted": Case(
        contrast_ct_only, {"accepted_assumptions": ("contrast_ct_density",)}, Same(warning="ASSUMED (contrast_ct_density)")
    ),
    "contrast-and-plain-ct": Case(contrast_and_plain_ct, {}, Same(warning="the non-contrast CT is preferred")),
    "contrast-ct-named-with-ct-series": Case(
        contrast_and_plain_ct, {"ct_series_uid": CONTRAST_CT_UID}, Refused(InputError, r"'CT venous'.*--accept contrast_ct_density")
    ),
}


# ----------------------------------------------------------------------------- running it


def _run(tmp: Path, case: Case, kernel_cache_dir: Path):
    root = tmp / "study"
    root.mkdir()
    written = case.write(root)
    study_path = written if isinstance(written, Path) else root
    options = DoseOptions(kernel_cache_dir=kernel_cache_dir, **case.options)
    return run(study_path, tmp / "out", options)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, kernel_cache_dir) -> dict:
    """The baseline study's dose, computed once for the whole corpus."""
    tmp = tmp_path_factory.mktemp("baseline")
    result = _run(tmp, Case(baseline, {}, Same()), kernel_cache_dir)
    assert result.study.warnings == []  # nothing odd at ingest
    assert not [w for w in result.summary["warnings"] if "ASSUMED" in w]
    assert result.summary["time"]["hours_since_administration"] == pytest.approx(HOURS)
    return result.summary["dose"]


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_odd_input(name, reference, tmp_path, kernel_cache_dir):
    case = CASES[name]
    outcome = case.outcome
    if isinstance(outcome, Refused):
        with pytest.raises(outcome.error) as err:
            _run(tmp_path, case, kernel_cache_dir)
        message = str(err.value)
        assert type(err.value) is outcome.error, message
        assert re.search(outcome.match, message), message
        for python_name in NOT_PUBLIC:
            assert python_name not in message, message
        assert not (tmp_path / "out" / "rtdose.dcm").exists()
        return
    result = _run(tmp_path, case, kernel_cache_dir)
    dose = result.summary["dose"]
    saved = json.loads(result.outputs["summary_json"].read_text())
    if isinstance(outcome, Same):
        assert dose["max_gy"] == pytest.approx(reference["max_gy"], rel=outcome.max_rtol)
        assert dose["mean_in_tissue_gy"] == pytest.approx(reference["mean_in_tissue_gy"], rel=outcome.mean_rtol)
        if outcome.warning:
            assert any(outcome.warning in w for w in saved["warnings"]), saved["warnings"]
        if not outcome.warning or "ASSUMED" not in outcome.warning:
            assert not [w for w in saved["warnings"] if "ASSUMED" in w], saved["warnings"]
    else:
        assert dose["max_gy"] == pytest.approx(reference["max_gy"] * outcome.factor, rel=0.01)
        assert dose["mean_in_tissue_gy"] == pytest.approx(reference["mean_in_tissue_gy"] * outcome.factor, rel=0.01)
        for fragment in outcome.warnings:
            assert any(fragment in w for w in saved["warnings"]), saved["warnings"]
            assert fragment in result.outputs["summary_txt"].read_text()
