"""Virtual patients over one therapy cycle: a SPECT/CT study per time point, one administration.

Clinics image a Lu-177 DOTATATE cycle 3-4 times between about 4 h and 7 days, and the
patient lies a little differently on the couch each time. This module takes the virtual
patient of :mod:`spectdose.phantoms.anatomy` (same anatomy, same seed) and, per time point,

* scales every tissue's and lesion's activity by its own kinetics, drawn per patient
  (:func:`draw_kinetics`; uptake-washout for kidneys, liver, spleen and tumours, fast + slow
  washout for red marrow and the remainder);
* moves the patient rigidly (:func:`draw_poses`: shifts of a few cm, rotations of a few
  degrees; the first time point is the reference position);
* samples the anatomy again with :func:`spectdose.phantoms.anatomy.sample_patient`, simulates the SPECT
  with :func:`spectdose.phantoms.spect_sim.simulate_spect` and writes the study with
  :func:`spectdose.phantoms.study_io.write_phantom_study`: no second generator.

The truth of the cycle: the true dose rate of each time point on its own CT grid, the true
cycle absorbed dose on the first time point's CT grid, and landmark points (organ and lesion
centres) in every position. Because painting is linear in the concentrations, the anatomy
painted with each tissue's *time-integrated* concentration is the time-integrated activity
map, and the dose engine applied to it gives the cycle dose exactly (no time sampling).

Public API: :data:`KINETIC_RANGES`, :class:`Kinetics`, :func:`draw_kinetics`,
:func:`draw_poses`, :class:`CyclePatient`, :func:`make_cycle_patient`, :func:`generate_cycle`,
:func:`parse_time_points`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spectdose.constants import LU177_HALF_LIFE_H
from spectdose.errors import InputError
from spectdose.geometry import Volume
from spectdose.phantoms.anatomy import (
    SIZES,
    UPTAKE_24H,
    RigidPose,
    VirtualPatient,
    _patient_on_grids,
    make_virtual_patient,
    sample_patient,
)

__all__ = [
    "KINETIC_RANGES",
    "Kinetics",
    "draw_kinetics",
    "draw_poses",
    "CyclePatient",
    "make_cycle_patient",
    "generate_cycle",
    "parse_time_points",
    "time_point_label",
    "CYCLE_MANIFEST",
]

CYCLE_MANIFEST = "cycle.json"

# ---------------------------------------------------------------------------------------
# Kinetics of 177Lu-DOTATATE per tissue group, drawn per patient. Effective half-lives are
# log-normal across patients (Hou et al., J Nucl Med 63 (2022) 1077, "Effective half-lives
# ... are better described by lognormal than by normal distributions"); medians and ranges
# rounded from published multi-time-point dosimetry of 177Lu-DOTATATE:
#   kidneys  T_eff ~50 h (about 35-80 h): Sandstrom et al., J Nucl Med 54 (2013) 33
#            (kidney and bone-marrow dosimetry in 200 patients); Garske-Roman et al.,
#            Eur J Nucl Med Mol Imaging 45 (2018) 970; Hanscheid et al., J Nucl Med 59
#            (2018) 75 (kidney and tumour effective half-lives behind the single-time-point rule).
#   liver, spleen  T_eff ~70 h (about 45-120 h), same sources.
#   tumours  T_eff 60-150 h (drawn per lesion in spectdose.phantoms.anatomy), Hanscheid et al. 2018.
#   red marrow  follows the blood: a fast phase of a few hours (renal excretion of the
#            unbound peptide) and a slow ~40 h phase, Sandstrom et al. 2013.
#   remainder  (all other tissues) a fast renal-clearance phase (1-3 h) carrying most of the
#            early activity and a slow phase of ~30 h.
# Uptake half-lives (kidneys 1-3 h, liver and spleen 2-6 h, tumours 3-12 h) put the organ
# maxima within the first day, as serial imaging shows (organ activity peaks before ~24 h).
# These are the values of a *virtual* population for testing time integration; they
# were rounded from the cited work, not fitted to it.
# ---------------------------------------------------------------------------------------
KINETIC_RANGES: dict[str, dict[str, tuple[float, ...]]] = {
    # group: t_eff_h (median, log-sigma, lo, hi); t_uptake_h (lo, hi) or fast phase
    "kidney": {"t_eff_h": (50.0, 0.20, 35.0, 80.0), "t_uptake_h": (1.0, 3.0)},
    "liver": {"t_eff_h": (70.0, 0.20, 45.0, 120.0), "t_uptake_h": (2.0, 6.0)},
    "spleen": {"t_eff_h": (70.0, 0.20, 45.0, 120.0), "t_uptake_h": (2.0, 6.0)},
    "tumour": {"t_uptake_h": (3.0, 12.0)},
    "marrow": {
        "t_eff_h": (40.0, 0.25, 20.0, 100.0),
        "fast_fraction": (0.5, 0.8),
        "t_fast_h": (1.0, 4.0),
    },
    "remainder": {
        "t_eff_h": (30.0, 0.25, 15.0, 80.0),
        "fast_fraction": (0.6, 0.85),
        "t_fast_h": (1.0, 3.0),
    },
}
_GROUP_OF_TISSUE = {
    "kidney_cortex": "kidney",
    "kidney_medulla": "kidney",
    "liver": "liver",
    "spleen": "spleen",
    "trabecular_bone": "marrow",
}
# Repositioning between sessions on a SPECT/CT couch: set-up shifts of a few cm and
# rotations of a few degrees (what image registration of serial SPECT/CT corrects; e.g. the
# MRTDosimetry guidance, Tran-Gia et al., EJNMMI Phys 8 (2021) 55). Clinical-size values;
# scaled with the anatomy for the small phantom.
_SHIFT_MM = (20.0, 10.0, 30.0)  # max |shift| along LPS x, y, z
_ROTATION_DEG = (2.0, 2.0, 4.0)  # max |rotation| about LPS x, y, z (z: roll on the couch)


@dataclasses.dataclass(frozen=True)
class Kinetics:
    """One tissue's activity over time, relative to its concentration at 24 h.

    ``g(t) = exp(-ln2 t / t_eff_h) - exp(-ln2 t / t_uptake_h)`` (uptake-washout) when
    ``t_uptake_h`` is set, else ``(1 - f) exp(-ln2 t / t_eff_h) + f exp(-ln2 t / t_fast_h)``
    (fast + slow washout, ``f = fast_fraction``); ``relative(t) = g(t) / g(24 h)``. Half-lives
    are effective (physical decay included).
    """

    t_eff_h: float
    t_uptake_h: float | None = None
    fast_fraction: float = 0.0
    t_fast_h: float | None = None

    def _g(self, t_h):
        t = np.asarray(t_h, dtype=float)
        slow = np.exp(-math.log(2) * t / self.t_eff_h)
        if self.t_uptake_h is not None:
            return slow - np.exp(-math.log(2) * t / self.t_uptake_h)
        fast = np.exp(-math.log(2) * t / self.t_fast_h) if self.t_fast_h else 0.0
        return (1.0 - self.fast_fraction) * slow + self.fast_fraction * fast

    def relative(self, t_h):
        """Concentration at ``t_h`` hours over the concentration at 24 h."""
        return self._g(t_h) / float(self._g(24.0))

    def integral_h(self) -> float:
        """Integral of :meth:`relative` from 0 to infinity (h)."""
        ln2 = math.log(2)
        if self.t_uptake_h is not None:
            area = (self.t_eff_h - self.t_uptake_h) / ln2
        else:
            area = (
                (1.0 - self.fast_fraction) * self.t_eff_h
                + self.fast_fraction * (self.t_fast_h or 0.0)
            ) / ln2
        return area / float(self._g(24.0))

    def to_dict(self) -> dict:
        return {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in dataclasses.asdict(self).items()
        }


def _lognormal(
    rng: np.random.Generator, median: float, sigma: float, lo: float, hi: float
) -> float:
    return float(min(max(median * math.exp(rng.normal(0.0, sigma)), lo), hi))


def draw_kinetics(seed: int, patient: VirtualPatient) -> tuple[dict[str, Kinetics], list[Kinetics]]:
    """Per-patient kinetics: one per tissue of :data:`spectdose.phantoms.anatomy.UPTAKE_24H`, one per lesion.

    Necrotic cores follow their lesion (their concentration is a fraction of it).
    """
    return kinetics_for_lesions(seed, patient.anatomy.lesions)


def kinetics_for_lesions(seed: int, lesions) -> tuple[dict[str, Kinetics], list[Kinetics]]:
    """:func:`draw_kinetics` for the lesions of an anatomy (``t_eff_h`` drawn with them)."""
    rng = np.random.default_rng([int(seed), 12012])
    groups: dict[str, Kinetics] = {}
    for group in ("kidney", "liver", "spleen", "marrow", "remainder"):
        r = KINETIC_RANGES[group]
        t_eff = _lognormal(rng, *r["t_eff_h"])
        if "t_uptake_h" in r:
            groups[group] = Kinetics(t_eff, t_uptake_h=float(rng.uniform(*r["t_uptake_h"])))
        else:
            groups[group] = Kinetics(
                t_eff,
                fast_fraction=float(rng.uniform(*r["fast_fraction"])),
                t_fast_h=float(rng.uniform(*r["t_fast_h"])),
            )
    tissues = {
        t: groups[_GROUP_OF_TISSUE.get(t, "remainder")]
        for t in UPTAKE_24H
        if t not in ("lesion", "necrosis")
    }
    lesions = [
        Kinetics(
            min(les.t_eff_h, 0.98 * LU177_HALF_LIFE_H),
            t_uptake_h=float(rng.uniform(*KINETIC_RANGES["tumour"]["t_uptake_h"])),
        )
        for les in lesions
    ]
    return tissues, lesions


def draw_poses(
    seed: int, n: int, size: str, centre_mm: tuple[float, float, float]
) -> list[RigidPose]:
    """``n`` couch positions: the first is the reference (identity), the others drawn."""
    rng = np.random.default_rng([int(seed), 12013])
    scale = SIZES[size].anatomy_scale
    poses = [RigidPose(centre_mm=centre_mm)]
    for _ in range(1, n):
        rot = tuple(float(rng.uniform(-m, m)) for m in _ROTATION_DEG)
        shift = tuple(float(rng.uniform(-m, m) * scale) for m in _SHIFT_MM)
        poses.append(RigidPose(rot, shift, centre_mm))
    return poses


def time_point_label(hours: float) -> str:
    """Folder name and UID tag of a time point: ``tp004h``, ``tp096h``, ``tp004.5h``."""
    return f"tp{int(hours):03d}h" if float(hours).is_integer() else f"tp{hours:05.1f}h"


def parse_time_points(text: str | Sequence[float]) -> list[float]:
    """``"4,24,96,168"`` -> [4.0, 24.0, 96.0, 168.0]; refuses fewer than 2, duplicates, non-positive."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError as exc:
        raise InputError(
            f"--time-points must be hours separated by commas (e.g. 4,24,96,168), got {text!r}"
        ) from exc
    if len(values) < 2:
        raise InputError(f"--time-points needs at least 2 time points, got {values}")
    if any(not (math.isfinite(v) and 0 < v <= 2000) for v in values):
        raise InputError(
            f"--time-points must lie in (0, 2000] h after administration, got {values}"
        )
    if len({round(v, 3) for v in values}) != len(values):
        raise InputError(f"--time-points holds a duplicate time point: {values}")
    return sorted(values)


@dataclasses.dataclass
class CyclePatient:
    """One virtual patient at every time point of a cycle, with the kinetics behind it."""

    seed: int
    size: str
    time_points_h: list[float]
    patients: list[VirtualPatient]
    poses: list[RigidPose]
    tissue_kinetics: dict[str, Kinetics]
    lesion_kinetics: list[Kinetics]
    # concentration (Bq/ml) at 24 h per tissue, and per lesion
    conc_24h_bq_ml: dict[str, float]
    lesion_conc_24h_bq_ml: list[float]
    landmarks_mm: dict[str, list[float]]  # reference position, LPS mm

    def time_integrated_activity(self) -> Volume:
        """True time-integrated activity concentration (Bq h/ml) on the first CT grid."""
        base = self.patients[0]
        anatomy = _anatomy_scaled(
            base,
            self.conc_24h_bq_ml,
            self.lesion_conc_24h_bq_ml,
            {t: k.integral_h() for t, k in self.tissue_kinetics.items()},
            [k.integral_h() for k in self.lesion_kinetics],
        )
        s = sample_patient(anatomy, base.hu.grid, self.poses[0])  # sampled as every time point is
        return Volume(s.activity_bq_per_ml, base.hu.grid, "Bq h/ml")

    def landmarks_at(self, index: int) -> dict[str, list[float]]:
        pose = self.poses[index]
        return {
            k: [round(float(v), 3) for v in pose.apply(np.asarray(p))]
            for k, p in self.landmarks_mm.items()
        }


def _anatomy_scaled(
    base: VirtualPatient,
    conc_24h: dict[str, float],
    lesion_24h: list[float],
    factor: dict[str, float],
    lesion_factor: list[float],
):
    """The base anatomy with every concentration set to conc_24h x factor."""
    anatomy = base.anatomy
    conc = {t: conc_24h[t] * factor[t] for t in anatomy.conc_bq_ml}
    lesions = [
        dataclasses.replace(les, conc_bq_ml=c * f)
        for les, c, f in zip(anatomy.lesions, lesion_24h, lesion_factor, strict=True)
    ]
    return dataclasses.replace(anatomy, conc_bq_ml=conc, lesions=lesions)


def _landmarks(patient: VirtualPatient) -> dict[str, list[float]]:
    """Organ, lesion and vertebral-body centres (LPS mm, reference position) inside the CT."""
    a = patient.anatomy
    points = {name: e.centre for name, e in a.kidney_frames.items()}
    points.update(
        {
            name: e.centre
            for name, e in a.organs.items()
            if name in ("liver_right", "liver_left", "spleen")
        }
    )
    points.update({les.name: les.ellipsoid.centre for les in a.lesions})
    sx, sy, sz = a.s
    for name, zc, *_ in (("L1", -6.0), ("L3", -81.0), ("T11", 61.0)):
        points[f"vertebra_{name}"] = (0.0, 40.0 * sy, zc * sz + a.dz)
    grid = patient.hu.grid
    out = {}
    for name, p in points.items():
        mm = a.to_physical_mm(np.asarray(p, dtype=float))
        idx = grid.lps_mm_to_index(mm)
        if np.all(idx >= 2) and np.all(idx <= np.asarray(grid.shape) - 3):
            out[name] = [round(float(v), 3) for v in mm]
    return out


def make_cycle_patient(
    seed: int, size: str = "small", time_points_h: Sequence[float] = (4, 24, 96, 168)
) -> CyclePatient:
    """The virtual patient ``seed`` at each time point (hours after the one administration).

    Raises
    ------
    InputError
        Bad seed or size, or time points that :func:`parse_time_points` refuses.
    """
    hours = parse_time_points(list(time_points_h))
    base = make_virtual_patient(seed, size)
    a = base.anatomy
    conc_24h = {
        t: c * 2.0 ** ((a.hours - 24.0) / UPTAKE_24H[t][1]) for t, c in a.conc_bq_ml.items()
    }
    lesion_24h = [les.conc_24h_bq_ml for les in a.lesions]
    tissue_k, lesion_k = draw_kinetics(seed, base)
    centre = (0.0, 0.0, float(a.z_table_mm))
    poses = draw_poses(seed, len(hours), size, centre)
    # The first session's counts are the patient's drawn counts; later sessions are
    # acquired for the same time, so their counts follow the activity in the field of view.
    patients: list[VirtualPatient] = []
    for k, (t, pose) in enumerate(zip(hours, poses, strict=True)):
        anatomy = _anatomy_scaled(
            base,
            conc_24h,
            lesion_24h,
            {n: float(kin.relative(t)) for n, kin in tissue_k.items()},
            [float(kin.relative(t)) for kin in lesion_k],
        )
        anatomy = dataclasses.replace(anatomy, hours=float(t))
        acq = (base.administration_datetime + dt.timedelta(hours=float(t))).replace(microsecond=0)
        patient = _patient_on_grids(
            int(seed),
            size,
            anatomy,
            base.total_counts_target,
            base.injected_activity_bq,
            base.administration_datetime,
            acq,
            pose=pose,
            time_point=time_point_label(t),
            ct_noise_key=(k + 1,),
        )
        patients.append(patient)
    total0 = float(patients[0].activity_bq_per_ml.array.sum())
    for patient in patients[1:]:
        ratio = float(patient.activity_bq_per_ml.array.sum()) / total0 if total0 > 0 else 1.0
        patient.total_counts_target = float(round(max(1e5, base.total_counts_target * ratio), -3))
    return CyclePatient(
        seed=int(seed),
        size=size,
        time_points_h=hours,
        patients=patients,
        poses=poses,
        tissue_kinetics=tissue_k,
        lesion_kinetics=lesion_k,
        conc_24h_bq_ml=conc_24h,
        lesion_conc_24h_bq_ml=lesion_24h,
        landmarks_mm=_landmarks(patients[0]),
    )


def _true_dose_rate(
    patient: VirtualPatient, engine: str, cache_dir: Path | None, device: str | None
) -> Volume:
    """The true dose rate (Gy/s) on the patient's CT grid from the true activity."""
    if engine == "reference":
        from spectdose.reference import reference_dose_rate

        rate, _ = reference_dose_rate(
            patient.activity_bq_per_ml, patient.density_g_cm3, cache_dir=cache_dir, device=device
        )
        return rate
    from spectdose.dose import dvk_dose_rate
    from spectdose.kernels import get_kernel

    grid = patient.hu.grid
    kernel = get_kernel(grid.spacing_mm, medium="soft", cache_dir=cache_dir)
    rate = dvk_dose_rate(
        patient.activity_bq_per_ml.array,
        patient.density_g_cm3.array,
        kernel.total_mgy_per_mbq_s,
        grid.voxel_volume_ml,
        device=device,
    )
    return Volume(rate, grid, "Gy/s")


_ENGINES = {
    "reference": "multi-medium kernel superposition on the true activity (spectdose.reference)",
    "dvk": "soft-tissue DVK on the true activity (spectdose.dose.dvk_dose_rate)",
}


def cycle_truth(
    cycle: CyclePatient,
    *,
    engine: str = "reference",
    cache_dir: Path | None = None,
    device: str | None = None,
) -> dict:
    """True dose rate per time point (Gy/s, own CT grid) and true cycle dose (Gy, first CT grid).

    The cycle dose is the engine applied to the time-integrated activity (linear in activity),
    so it is exact for the drawn kinetics.
    """
    if engine not in _ENGINES:
        raise InputError(f"unknown truth engine {engine!r}: use one of {sorted(_ENGINES)}")
    rates = [_true_dose_rate(p, engine, cache_dir, device) for p in cycle.patients]
    tia = cycle.time_integrated_activity()
    base = cycle.patients[0]
    tia_as_bq = Volume(tia.array * np.float32(3600.0), tia.grid, "Bq/ml")  # Bq s/ml as if Bq/ml
    dose = _true_dose_rate(
        dataclasses.replace(base, activity_bq_per_ml=tia_as_bq), engine, cache_dir, device
    )
    return {
        "dose_rates_gy_per_s": rates,
        "cycle_dose_gy": Volume(dose.array, dose.grid, "Gy"),
        "tia_bq_h_per_ml": tia,
        "engine": _ENGINES[engine],
    }


def generate_cycle(
    out_dir: str | Path,
    seed: int,
    size: str = "small",
    time_points_h: Sequence[float] = (4, 24, 96, 168),
    *,
    truth_engine: str = "reference",
    kernel_cache_dir: Path | None = None,
    device: str | None = None,
    n_iters: int | None = None,
    n_subsets: int | None = None,
    n_views: int | None = None,
    num_threads: int | None = None,
    simulate: bool = True,
    camera: str = "simulated",
    seg: str = "first",
) -> dict:
    """Write one SPECT/CT study per time point under ``out_dir`` plus the cycle's truth.

    Layout: ``out_dir/tp004h/{dicom,truth}`` ... (each as :func:`spectdose.phantoms.generate`
    writes, its ``truth.npz`` adding ``dose_rate_gy_per_s`` and its ``phantom.json`` the pose
    and landmarks), ``out_dir/truth/cycle_truth.npz`` (``cycle_dose_gy``,
    ``tia_bq_h_per_ml``, labels, grid of the first time point) and ``out_dir/cycle.json``.
    ``simulate=False`` skips the SPECT (truth only: for tests of integration alone);
    ``camera="ideal"`` writes the truth averaged onto the SPECT grid instead of a simulated
    SPECT (:func:`spectdose.phantoms.spect_sim.ideal_spect`; seconds instead of minutes). ``seg``:
    write the DICOM SEG of the VOIs for the "first" time point only (the reference the
    regions are given on) or for "all".

    Raises
    ------
    InputError
        Bad seed, size, time points or truth engine.
    """
    from spectdose.phantoms.spect_sim import ideal_spect, simulate_spect
    from spectdose.phantoms.study_io import write_phantom_study

    if camera not in ("simulated", "ideal"):
        raise InputError(f"camera must be 'simulated' or 'ideal', got {camera!r}")
    if seg not in ("first", "all"):
        raise InputError(f"seg must be 'first' or 'all', got {seg!r}")
    out = Path(out_dir)
    cycle = make_cycle_patient(seed, size, time_points_h)
    truth = cycle_truth(cycle, engine=truth_engine, cache_dir=kernel_cache_dir, device=device)
    entries = []
    for k, (patient, rate) in enumerate(
        zip(cycle.patients, truth["dose_rates_gy_per_s"], strict=True)
    ):
        label = patient.time_point
        extra_arrays = {"dose_rate_gy_per_s": rate.array.astype(np.float32)}
        extra_info = {
            "cycle": {
                "index": k,
                "hours_after_administration": cycle.time_points_h[k],
                "landmarks_mm": cycle.landmarks_at(k),
                "truth_dose_rate_engine": truth["engine"],
            },
        }
        entry = {
            "label": label,
            "hours_after_administration": cycle.time_points_h[k],
            "acquisition_datetime": patient.acquisition_datetime.isoformat(),
            "pose": cycle.poses[k].to_dict(),
            "landmarks_mm": cycle.landmarks_at(k),
        }
        if simulate:
            if camera == "ideal":
                spect = ideal_spect(patient, n_views=n_views)
            else:
                spect = simulate_spect(
                    patient,
                    device=device,
                    n_iters=n_iters,
                    n_subsets=n_subsets,
                    n_views=n_views,
                    num_threads=num_threads,
                    seed=patient.seed * 1000 + k + 1,
                )
            paths = write_phantom_study(
                out / label,
                patient,
                spect,
                extra_truth_arrays=extra_arrays,
                extra_truth_info=extra_info,
                write_seg=(k == 0 or seg == "all"),
            )
            entry["study_instance_uid"] = json.loads(Path(paths["json"]).read_text())["dicom"][
                "uids"
            ]["study"]
            entry["dicom_dir"] = f"{label}/dicom"
        else:
            (out / label / "truth").mkdir(parents=True, exist_ok=True)
            np.savez_compressed(
                out / label / "truth" / "truth.npz",
                hu=np.rint(patient.hu.array).astype(np.int16),
                spacing_mm=np.asarray(patient.hu.grid.spacing_mm),
                origin_mm=np.asarray(patient.hu.grid.origin_mm),
                axes=np.asarray(patient.hu.grid.axes),
                **extra_arrays,
            )
        entries.append(entry)

    base = cycle.patients[0]
    grid = base.hu.grid
    (out / "truth").mkdir(parents=True, exist_ok=True)
    arrays = {
        "cycle_dose_gy": truth["cycle_dose_gy"].array.astype(np.float32),
        "tia_bq_h_per_ml": truth["tia_bq_h_per_ml"].array.astype(np.float32),
        "spacing_mm": np.asarray(grid.spacing_mm),
        "origin_mm": np.asarray(grid.origin_mm),
        "axes": np.asarray(grid.axes),
    }
    arrays.update({f"label_{n}": m for n, m in base.labels.items()})
    np.savez_compressed(out / "truth" / "cycle_truth.npz", **arrays)
    dose = truth["cycle_dose_gy"].array
    manifest = {
        "seed": cycle.seed,
        "size": size,
        "administration_datetime": base.administration_datetime.isoformat(),
        "injected_activity_bq": base.injected_activity_bq,
        "time_points": entries,
        "reference_time_point": entries[0]["label"],
        "kinetics": {
            "tissues": {t: k.to_dict() for t, k in cycle.tissue_kinetics.items()},
            "lesions": {
                les.name: k.to_dict()
                for les, k in zip(base.anatomy.lesions, cycle.lesion_kinetics, strict=True)
            },
            "model": "Kinetics.relative(t) x concentration at 24 h; see spectdose.phantoms.cycle",
        },
        "landmarks_mm_reference": cycle.landmarks_mm,
        "truth": {
            "dose_rate_engine": truth["engine"],
            "cycle_dose_gy_mean": {
                n: float(dose[m].mean()) for n, m in base.labels.items() if m.any()
            },
            "voi_volumes_ml": {
                n: float(m.sum() * grid.voxel_volume_ml) for n, m in base.labels.items()
            },
            "files": {
                "cycle": "truth/cycle_truth.npz",
                "per_time_point": "<label>/truth/truth.npz",
            },
        },
        "simulated": bool(simulate),
        "camera": camera if simulate else None,
    }
    (out / CYCLE_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {
        "out_dir": out,
        "manifest": out / CYCLE_MANIFEST,
        "studies": [out / e["label"] for e in entries],
        "cycle": cycle,
    }
