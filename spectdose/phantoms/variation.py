"""Virtual patients that vary what a dose network must not over-fit (data set ``v2``).

The patients of :mod:`spectdose.phantoms.anatomy` differ in anatomy and uptake but share
one protocol: one camera, one reconstruction, one pair of grids, 22-96 h after the
administration. A network trained on them learns that protocol. Here every setting in
which a clinic's study can differ is drawn per patient from its seed
(:func:`draw_settings`: pure, fast, no image made): body size, organ sizes, positions and
surface shapes, the lesions (count, 0.5-200 ml, uptake, necrotic cores), the time point
(4-168 h, with the uptake pattern of that time), the counts, the camera (collimator and
intrinsic resolution), the reconstruction (OSEM iterations and subsets, resolution recovery
on or off) and the SPECT and CT grids. :func:`make_varied_patient` builds the patient with
the same painting code as every other phantom; :func:`generate_varied` simulates and writes
the study and records the settings in ``truth/phantom.json`` under ``"variation"``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from pathlib import Path

import numpy as np

from spectdose.errors import InputError
from spectdose.phantoms.anatomy import (
    _NOMINAL_ADMINISTERED_BQ,
    AnatomyVariation,
    LesionPlan,
    PhantomSize,
    VirtualPatient,
    _build_anatomy,
    _patient_on_grids,
)
from spectdose.phantoms.cycle import Kinetics, kinetics_for_lesions

__all__ = ["V2_RANGES", "PROFILES", "VariedSettings", "draw_settings", "make_varied_patient", "generate_varied", "generate_varied_realisations"]

# Ranges of the per-patient draw (clinical scale). Uniform unless marked log-uniform.
# Body: the reference adult's abdomen is 330 x 230 mm (lateral x AP); 0.80-1.25 and
# 0.75-1.35 give 264-412 x 173-310 mm, the span of adult abdominal diameters on CT (v1:
# 0.88-1.12, 0.85-1.18). Organ volumes: liver x0.75-1.4, spleen x0.5-2.0 (up to moderate
# splenomegaly), kidneys x0.7-1.3 of the reference; each organ also moves by up to
# +-10 mm left-right, +-6 mm antero-posterior (the kidneys lie against the back wall) and
# +-15 mm cranio-caudally (respiratory and positional variation), and its surface
# perturbation is scaled by 0.5-1.8. Lesions: 1-10, volumes log-uniform 0.5-200 ml (the
# issue's range; NET liver metastases from sub-centimetre to several cm), tumour/liver
# uptake at 24 h log-uniform 2-25 (Krenning score 2-4: from about liver to far above spleen),
# necrotic cores in lesions of 5 ml or more with a per-patient probability of 0-0.8, core
# 35-75 % of the radius at 0-25 % of the rim's uptake. Time point log-uniform 4-168 h
# (clinical imaging days 4 h to 7 d); counts log-uniform 2e6-2e7 (the paper: 3e6-2e7).
# Camera: medium-energy collimators of Siemens (SY-ME), GE (Infinia GI-MEGP, 870 DR
# G8-MEGP) and Philips (BrightView PB-MEGP) from the SIMIND database shipped with
# PyTomography; intrinsic FWHM 3.3-4.2 mm at 140 keV (vendor specifications of current NaI
# cameras, 3.5-3.9 mm, with a margin). Together: system FWHM 8.8-11.1 mm at 10 cm at 208 keV.
# Reconstruction: subsets 4, 8 or 16 of 128 views, iterations 2-12 with 16-128 updates
# (iterations x subsets; the paper used 64), resolution recovery on with probability 0.75.
# Grids: SPECT voxels 3.9-4.8 mm (128 x 128 matrices of 499-614 mm; GE 4.42 mm, Siemens
# 4.8 mm, zoomed 3.9 mm), in-plane matrix 96, 112 or 128 (only those holding the body with
# 30 mm to spare), axial field of view 370-400 mm (one bed). CT pixels log-uniform 0.98-3 mm
# in a 500 mm field of view, slices 1.25-5 mm from the thicknesses scanners reconstruct;
# a pair whose grid exceeds 40 million voxels (memory: ~4 GB per worker) is drawn again.
V2_RANGES: dict[str, object] = {
    "body_scale_lateral": (0.80, 1.25),
    "body_scale_ap": (0.75, 1.35),
    "body_scale_craniocaudal": (0.90, 1.10),
    "craniocaudal_shift_mm": (-20.0, 20.0),
    "liver_volume_factor": (0.75, 1.4),
    "spleen_volume_factor": (0.5, 2.0),
    "kidney_volume_factor": (0.7, 1.3),
    "organ_shift_max_mm": (10.0, 6.0, 15.0),
    "shape_amplitude": (0.5, 1.8),
    "lesion_count": (1, 10),
    "lesion_volume_ml": (0.5, 200.0),
    "tumour_to_liver_24h": (2.0, 25.0),
    "necrosis_min_volume_ml": 5.0,
    "necrosis_probability": (0.0, 0.8),
    "necrotic_core_fraction": (0.35, 0.75),
    "necrotic_uptake_fraction": (0.0, 0.25),
    "hours_after_administration": (4.0, 168.0),
    "total_counts": (2e6, 2e7),
    "osem_subsets": (4, 8, 16),
    "osem_iterations": (2, 12),
    "osem_updates": (16, 128),
    "resolution_recovery_probability": 0.75,
    "collimators": ("SY-ME", "GI-MEGP", "G8-MEGP", "PB-MEGP"),
    "intrinsic_fwhm_140kev_mm": (3.3, 4.2),
    "spect_voxel_mm": (3.9, 4.8),
    "spect_matrix": (96, 112, 128),
    "spect_axial_fov_mm": (370.0, 400.0),
    "n_views": 128,
    "ct_pixel_mm": (500.0 / 512.0, 3.0),
    "ct_fov_mm": 500.0,
    "ct_slice_mm": (1.25, 1.5, 2.0, 2.5, 3.0, 3.75, 4.0, 5.0),
    "ct_max_voxels": 40_000_000,
}
_ORGANS_MOVED = ("liver", "spleen", "stomach", "kidney_left", "kidney_right")
# "clinical": the grids and camera drawn above. "tiny": the same draw of anatomy, lesions,
# time, counts and camera on the small phantom's scaled anatomy and coarse fixed grids
# (SPECT 32 x 32 at 9.6 mm, 32 views, 2 x 4 OSEM; CT 64 x 64 at 4.8 mm): seconds per
# patient, for tests and smoke runs of the generator, not for training.
PROFILES = ("clinical", "tiny")
_TINY_SCALE = 48.0 / 81.0


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


@dataclasses.dataclass(frozen=True)
class VariedSettings:
    """Everything drawn for one varied patient (clinical-scale anatomy values)."""

    seed: int
    profile: str
    anatomy: AnatomyVariation
    hours_after_administration: float
    total_counts: float
    n_iters: int
    n_subsets: int
    n_views: int
    resolution_recovery: bool
    collimator: str
    intrinsic_fwhm_140kev_mm: float
    spect_voxel_mm: float
    spect_shape: tuple[int, int, int]  # (z, y, x)
    ct_spacing_mm: tuple[float, float, float]  # (slice, row, column)
    ct_shape: tuple[int, int, int]
    anatomy_scale: float

    def size_spec(self) -> PhantomSize:
        """The patient's own grids and reconstruction, as a :class:`PhantomSize`."""
        return PhantomSize(
            name="varied" if self.profile == "clinical" else f"varied-{self.profile}",
            ct_shape=self.ct_shape,
            ct_spacing_mm=self.ct_spacing_mm,
            spect_shape=self.spect_shape,
            spect_spacing_mm=self.spect_voxel_mm,
            oversample=2,
            n_views=self.n_views,
            n_iters=self.n_iters,
            n_subsets=self.n_subsets,
            anatomy_scale=self.anatomy_scale,
        )

    def to_dict(self) -> dict:
        a = self.anatomy
        return {
            "seed": self.seed,
            "profile": self.profile,
            "body_scale_lateral_ap_craniocaudal": [round(v, 4) for v in a.body_scale],
            "craniocaudal_shift_mm": round(a.craniocaudal_shift_mm, 2),
            "organ_volume_factor": dict(zip(("liver", "spleen", "kidneys"), (round(v, 4) for v in a.organ_volume_factor), strict=True)),
            "organ_shift_mm_xyz": {name: [round(v, 2) for v in xyz] for name, xyz in a.organ_shift_mm},
            "organ_shape_amplitude": round(a.shape_amplitude, 4),
            "lesion_count": len(a.lesions),
            "lesion_plan": [
                {
                    "volume_ml": round(p.volume_ml, 4),
                    "location": p.location,
                    "tumour_to_liver_24h": round(p.tumour_to_liver_24h, 4),
                    "necrotic_core_fraction": None if p.necrotic_core_fraction is None else round(p.necrotic_core_fraction, 4),
                    "necrotic_uptake_fraction": round(p.necrotic_uptake_fraction, 4),
                }
                for p in a.lesions
            ],
            "hours_after_administration": round(self.hours_after_administration, 3),
            "total_counts": self.total_counts,
            "osem_iterations": self.n_iters,
            "osem_subsets": self.n_subsets,
            "n_views": self.n_views,
            "resolution_recovery": self.resolution_recovery,
            "collimator": self.collimator,
            "intrinsic_fwhm_140kev_mm": round(self.intrinsic_fwhm_140kev_mm, 4),
            "spect_voxel_mm": self.spect_voxel_mm,
            "spect_shape_zyx": list(self.spect_shape),
            "ct_spacing_mm_zyx": list(self.ct_spacing_mm),
            "ct_shape_zyx": list(self.ct_shape),
            "anatomy_scale": self.anatomy_scale,
        }


def draw_settings(seed: int, profile: str = "clinical") -> VariedSettings:
    """The settings of varied patient ``seed`` (deterministic; no image is made).

    Raises
    ------
    InputError
        Negative seed or unknown profile.
    """
    if int(seed) != seed or seed < 0:
        raise InputError(f"phantom seed must be a non-negative integer, got {seed!r}")
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}: use one of {PROFILES}")
    r = V2_RANGES
    rng = np.random.default_rng([int(seed), 20202])
    body = (rng.uniform(*r["body_scale_lateral"]), rng.uniform(*r["body_scale_ap"]), rng.uniform(*r["body_scale_craniocaudal"]))
    body = tuple(float(v) for v in body)
    dz = float(rng.uniform(*r["craniocaudal_shift_mm"]))
    volume_factors = tuple(float(rng.uniform(*r[k])) for k in ("liver_volume_factor", "spleen_volume_factor", "kidney_volume_factor"))
    shifts = tuple((name, tuple(float(rng.uniform(-m, m)) for m in r["organ_shift_max_mm"])) for name in _ORGANS_MOVED)
    shape_amplitude = float(rng.uniform(*r["shape_amplitude"]))

    lo_n, hi_n = r["lesion_count"]
    n = int(rng.integers(lo_n, hi_n + 1))
    volumes = [_loguniform(rng, *r["lesion_volume_ml"]) for _ in range(n)]
    p_necrosis = float(rng.uniform(*r["necrosis_probability"]))
    largest = int(np.argmax(volumes))
    plan = []
    for k, vol in enumerate(volumes):
        u_liver, u_necrosis = rng.random(), rng.random()
        ratio = _loguniform(rng, *r["tumour_to_liver_24h"])
        core, uptake = float(rng.uniform(*r["necrotic_core_fraction"])), float(rng.uniform(*r["necrotic_uptake_fraction"]))
        # the largest lesion and any over 60 ml go to the liver, the only organ with room for them
        location = "liver" if (k == largest or vol > 60.0 or u_liver < 0.6) else "outside"
        necrotic = vol >= r["necrosis_min_volume_ml"] and u_necrosis < p_necrosis
        plan.append(LesionPlan(vol, location, ratio, core if necrotic else None, uptake if necrotic else 1.0))

    hours = _loguniform(rng, *r["hours_after_administration"])
    counts = float(round(_loguniform(rng, *r["total_counts"]), -3))
    subsets = int(rng.choice(r["osem_subsets"]))
    lo_it = max(r["osem_iterations"][0], math.ceil(r["osem_updates"][0] / subsets))
    hi_it = min(r["osem_iterations"][1], r["osem_updates"][1] // subsets)
    iters = int(rng.integers(lo_it, hi_it + 1))
    rr = bool(rng.random() < r["resolution_recovery_probability"])
    collimator = str(rng.choice(r["collimators"]))
    intrinsic_mm = float(rng.uniform(*r["intrinsic_fwhm_140kev_mm"]))

    voxel = round(float(rng.uniform(*r["spect_voxel_mm"])), 3)
    body_width_mm = 2.0 * (165.0 * body[0] + 12.0)  # reference half-width 165 mm, + surface
    matrices = [m for m in r["spect_matrix"] if m * voxel >= body_width_mm + 30.0]
    matrix = int(matrices[int(rng.integers(len(matrices)))])
    slices = int(round(float(rng.uniform(*r["spect_axial_fov_mm"])) / voxel))
    axial_mm = slices * voxel
    for _attempt in range(1000):
        pixel = round(_loguniform(rng, *r["ct_pixel_mm"]), 4)
        thickness = float(rng.choice(r["ct_slice_mm"]))
        nxy = int(math.ceil(r["ct_fov_mm"] / pixel - 1e-6))
        nz = int(math.ceil(axial_mm / thickness - 1e-6))
        if nz * nxy * nxy <= r["ct_max_voxels"]:
            break
    else:  # pragma: no cover - the cap leaves most of the range open
        raise InputError("no CT grid under the voxel cap")

    views, scale = int(r["n_views"]), 1.0
    spect_shape, ct_spacing, ct_shape = (slices, matrix, matrix), (thickness, pixel, pixel), (nz, nxy, nxy)
    if profile == "tiny":
        scale = _TINY_SCALE
        voxel, views, iters, subsets = 9.6, 32, 2, 4
        spect_shape = (24, 32, 32)
        ct_spacing, ct_shape = (7.2, 4.8, 4.8), (32, 64, 64)
    anatomy = AnatomyVariation(
        body_scale=body,
        craniocaudal_shift_mm=dz,
        organ_volume_factor=volume_factors,
        organ_shift_mm=shifts,
        shape_amplitude=shape_amplitude,
        lesions=tuple(plan),
        min_lesion_ml=r["lesion_volume_ml"][0],
    )
    return VariedSettings(
        seed=int(seed),
        profile=profile,
        anatomy=anatomy,
        hours_after_administration=hours,
        total_counts=counts,
        n_iters=iters,
        n_subsets=subsets,
        n_views=views,
        resolution_recovery=rr,
        collimator=collimator,
        intrinsic_fwhm_140kev_mm=intrinsic_mm,
        spect_voxel_mm=voxel,
        spect_shape=spect_shape,
        ct_spacing_mm=ct_spacing,
        ct_shape=ct_shape,
        anatomy_scale=scale,
    )


def make_varied_patient(settings: VariedSettings) -> tuple[VirtualPatient, dict[str, Kinetics], list[Kinetics]]:
    """The patient of ``settings`` at its time point, with the kinetics that put it there.

    Concentrations at the time point are the 24 h ones times each tissue's and lesion's
    uptake-washout kinetics (:func:`spectdose.phantoms.cycle.kinetics_for_lesions`, drawn
    per patient), so a 4 h patient has rising kidneys and tumours over a high blood and
    remainder background, a 168 h one mostly tumour and slowly clearing organs.
    """
    seed = settings.seed
    spec = settings.size_spec()
    anatomy = _build_anatomy(seed, spec, settings.anatomy)
    tissue_k, lesion_k = kinetics_for_lesions(seed, anatomy.lesions)
    t = settings.hours_after_administration
    conc = {name: c * float(tissue_k[name].relative(t)) for name, c in anatomy.conc_bq_ml.items()}
    lesions = [
        dataclasses.replace(les, conc_bq_ml=les.conc_24h_bq_ml * float(k.relative(t)))
        for les, k in zip(anatomy.lesions, lesion_k, strict=True)
    ]
    anatomy = dataclasses.replace(anatomy, conc_bq_ml=conc, lesions=lesions, hours=float(t))
    # administration as for every phantom (anatomy.make_virtual_patient): 7.4 GBq +-3 %
    rng = np.random.default_rng([int(seed), 2])
    rng.uniform()  # that stream's counts draw; the counts here are the settings'
    injected = _NOMINAL_ADMINISTERED_BQ * rng.uniform(0.97, 1.03)
    admin = dt.datetime(2024, 1, 8, 9, 0, 0) + dt.timedelta(days=int(seed) % 360, minutes=int(rng.integers(0, 240)))
    acq = (admin + dt.timedelta(hours=t)).replace(microsecond=0)
    patient = _patient_on_grids(seed, spec.name, anatomy, settings.total_counts, injected, admin, acq, spec=spec)
    return patient, tissue_k, lesion_k


def generate_varied(
    out_dir: str | Path,
    seed: int,
    profile: str = "clinical",
    *,
    noise_seed: int | None = None,
    device: str | None = None,
    num_threads: int | None = None,
    extra_truth_info: dict | None = None,
) -> dict:
    """Draw, build, simulate and write varied patient ``seed`` (as :func:`spectdose.phantoms.generate`).

    ``truth/phantom.json`` gains ``"variation"``: every drawn setting, the system FWHM at
    10 cm and the kinetics used for the time point. Returns the written paths.
    """
    return generate_varied_realisations(
        {noise_seed: out_dir}, seed, profile, device=device, num_threads=num_threads,
        extra_truth_info={noise_seed: extra_truth_info},
    )[noise_seed]  # fmt: skip


def generate_varied_realisations(
    out_dirs: dict[int | None, str | Path],
    seed: int,
    profile: str = "clinical",
    *,
    device: str | None = None,
    num_threads: int | None = None,
    extra_truth_info: dict[int | None, dict | None] | None = None,
) -> dict[int | None, dict]:
    """Several noise realisations of varied patient ``seed``, one study each: ``out_dirs``
    maps a noise seed (None: the patient's seed) to its folder. The realisations share the
    noise-free projection and the OSEM system matrix (:func:`simulate_spect_realisations`):
    the 15 studies of v2-test (3 per patient) took about 208 CPU-s each, against 310-353
    for a v2 study made alone (models/dblurdosenet.md).
    Returns the written paths per noise seed.
    """
    from spectdose.phantoms.spect_sim import simulate_spect_realisations
    from spectdose.phantoms.study_io import write_phantom_study

    settings = draw_settings(seed, profile)
    patient, tissue_k, lesion_k = make_varied_patient(settings)
    noise_seeds = list(out_dirs)
    spects = simulate_spect_realisations(
        patient,
        [seed if q is None else q for q in noise_seeds],
        device=device,
        n_iters=settings.n_iters,
        n_subsets=settings.n_subsets,
        n_views=settings.n_views,
        num_threads=num_threads,
        collimator=settings.collimator,
        intrinsic_fwhm_140kev_cm=settings.intrinsic_fwhm_140kev_mm / 10.0,
        resolution_recovery=settings.resolution_recovery,
    )
    variation = settings.to_dict()
    variation["system_fwhm_at_100mm_mm"] = round(spects[0].fwhm_mm_at(100.0), 3)
    variation["kinetics"] = {
        "tissues": {name: k.to_dict() for name, k in tissue_k.items()},
        "lesions": {les.name: k.to_dict() for les, k in zip(patient.anatomy.lesions, lesion_k, strict=True)},
        "model": "concentration at 24 h x Kinetics.relative(hours); see spectdose.phantoms.cycle",
    }
    written = {}
    for q, spect in zip(noise_seeds, spects, strict=True):
        info = {"variation": variation, **((extra_truth_info or {}).get(q) or {})}
        written[q] = write_phantom_study(out_dirs[q], patient, spect, extra_truth_info=info)
    return written
