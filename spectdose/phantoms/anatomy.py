"""Virtual Lu-177 DOTATATE patients: procedural anatomy, true activity, density and CT.

The anatomy is a *continuous* model — ellipsoids, tubes, boxes and level sets of smooth
random fields, defined in "anatomy millimetres" of a reference adult — that can be sampled
on any grid. The truth and the CT image are its samples on the CT grid; the SPECT
simulation (``spect_sim``) samples it again on a finer projection grid, so the projector
never works on the reconstruction grid (no "inverse crime").

Coordinates are DICOM LPS for a head-first-supine patient: +x = patient left,
+y = posterior, +z = superior (head). Arrays are ``(z, y, x)`` = (slice, row, column).

Public API: :class:`VirtualPatient`, :func:`make_virtual_patient`, :func:`sample_anatomy`,
:data:`SIZES`. :func:`spectdose.phantoms.generate` makes a whole study from it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import numpy as np
from scipy import ndimage

from spectdose.density import density_to_hu
from spectdose.errors import InputError
from spectdose.geometry import Grid, Volume

__all__ = [
    "PhantomSize",
    "SIZES",
    "VirtualPatient",
    "SampledAnatomy",
    "make_virtual_patient",
    "sample_anatomy",
    "sample_patient",
    "RigidPose",
    "AnatomyVariation",
    "LesionPlan",
    "study_uids",
    "TISSUES",
    "UPTAKE_24H",
]

# Nominal administered activity per cycle of Lutathera (177Lu-DOTATATE): 7.4 GBq
# (NETTER-1 protocol; Strosberg et al., N Engl J Med 376 (2017) 125).
_NOMINAL_ADMINISTERED_BQ = 7.4e9


@dataclasses.dataclass(frozen=True)
class PhantomSize:
    """Grids and default reconstruction settings of one phantom size.

    ``anatomy_scale`` shrinks the whole reference anatomy (and lesion volumes by its cube) so
    that the axial field of view still holds every organ on the smaller grid.
    """

    name: str
    ct_shape: tuple[int, int, int]
    ct_spacing_mm: tuple[float, float, float]
    spect_shape: tuple[int, int, int]
    spect_spacing_mm: float
    oversample: int
    n_views: int
    n_iters: int
    n_subsets: int
    anatomy_scale: float


# clinical: the paper's grids (CT 512x512x130 at 0.98x0.98x3 mm; SPECT 128x128x81 at
# 4.8 mm, 128 views). Paper OSEM: 4 subsets x 16 iterations = 64 sub-iterations; we use
# 8 subsets x 8 iterations = the same 64 updates at half the CPU cost (cost scales with
# iterations, not with subsets).
# small: same anatomy scaled by 48/81 so the 48-slice SPECT covers the same body region.
SIZES: dict[str, PhantomSize] = {
    "clinical": PhantomSize(
        name="clinical",
        ct_shape=(130, 512, 512),
        ct_spacing_mm=(3.0, 500.0 / 512, 500.0 / 512),
        spect_shape=(81, 128, 128),
        spect_spacing_mm=4.8,
        oversample=2,
        n_views=128,
        n_iters=8,
        n_subsets=8,
        anatomy_scale=1.0,
    ),
    "small": PhantomSize(
        name="small",
        ct_shape=(64, 128, 128),
        ct_spacing_mm=(3.6, 2.4, 2.4),
        spect_shape=(48, 64, 64),
        spect_spacing_mm=4.8,
        oversample=2,
        n_views=64,
        n_iters=6,
        n_subsets=8,
        anatomy_scale=48.0 / 81.0,
    ),
}

# ---------------------------------------------------------------------------------------
# Tissues: mass density and the NIST material whose mass attenuation coefficient applies.
# Densities: ICRU Report 44 (1989) / ICRU Report 46 (1992) tissue compositions (adipose
# 0.95, skeletal muscle 1.05, liver 1.06, blood 1.06, kidney 1.05, spleen 1.06, lung
# (inflated) 0.26, cortical bone 1.92 g/cm^3); ICRP Publication 110 (2009) spongiosa of the
# lumbar vertebrae ~1.18 g/cm^3 (trabecular bone + marrow mixture); intervertebral disc
# ~1.07 (fibrocartilage, ICRU 46 cartilage 1.10 rounded down for hydration). The couch is a
# carbon-fibre/foam sandwich, 0.25 g/cm^3 effective (typical of SPECT/CT pallets).
# Attenuation materials name files of PyTomography's NIST (Hubbell & Seltzer) tables.
# ---------------------------------------------------------------------------------------
TISSUES: dict[str, tuple[int, float, str]] = {
    # name: (code, density g/cm^3, attenuation material)
    "air": (0, 0.0012, "air"),
    "couch": (1, 0.25, "water"),
    "fat": (2, 0.95, "adipose"),
    "muscle": (3, 1.05, "muscle"),
    "soft_tissue": (4, 1.03, "muscle"),
    "blood": (5, 1.06, "muscle"),
    "lung": (6, 0.26, "lungtissue"),
    "liver": (7, 1.06, "muscle"),
    "spleen": (8, 1.06, "muscle"),
    "kidney_cortex": (9, 1.05, "muscle"),
    "kidney_medulla": (10, 1.05, "muscle"),
    "bowel": (11, 1.03, "muscle"),
    "gas": (12, 0.0012, "air"),
    "cortical_bone": (13, 1.92, "bonecortical"),
    "trabecular_bone": (14, 1.18, "spongiosa"),
    "disc": (15, 1.07, "muscle"),
    "csf": (16, 1.01, "water"),
    "stomach_wall": (17, 1.05, "muscle"),
    "stomach_content": (18, 1.01, "water"),
    "heart": (19, 1.05, "muscle"),
    "lesion": (20, 1.04, "muscle"),
    "necrosis": (21, 1.02, "water"),
}
_T = {name: code for name, (code, _, _) in TISSUES.items()}

# ---------------------------------------------------------------------------------------
# Activity concentration 24 h after 7.4 GBq 177Lu-DOTATATE (MBq/ml) and the effective
# half-life (h) that carries it to the acquisition time. Representative values, chosen so
# that the absorbed doses they imply (mono-exponential, dose rate 0.085 Gy/h per MBq/ml,
# local absorption of the ICRP-107 electron energy, 0.1479 MeV per decay, + a little photon
# energy) match published
# dosimetry: kidneys 0.46-0.57 Gy/GBq (Staanum et al., EJNMMI Phys 8 (2021) 78; Clin Nucl
# Med 38 (2013) "Dosimetric analyses of kidneys, liver, spleen, pituitary gland, and
# neuroendocrine tumors ... 177Lu-DOTATATE": kidneys 0.57, liver 0.27, spleen 1.17, NET
# 3.41 mGy/MBq), bone marrow ~0.03 Gy/GBq. E.g. kidneys: 0.5 Gy/GBq x 7.4 GBq = 3.7 Gy
# = C0 x 0.085 x 50 h / ln2 -> C0 = 0.60, C(24 h) = 0.43 MBq/ml (cortex 0.50, medulla
# half of it). Low-uptake tissues follow 68Ga-DOTATATE PET SUV ratios (muscle, fat and
# blood ~1/10 of liver or less). Tumour concentrations are drawn per lesion (see below).
# Texture amplitudes are the relative standard deviations of the multiplicative random
# field (fine ~5 mm + coarse ~20 mm correlation) that makes uptake non-uniform.
# ---------------------------------------------------------------------------------------
UPTAKE_24H: dict[str, tuple[float, float, float, float]] = {
    # tissue: (MBq/ml at 24 h, T_eff h, fine texture, coarse texture)
    "air": (0.0, 30.0, 0.0, 0.0),
    "couch": (0.0, 30.0, 0.0, 0.0),
    "fat": (0.004, 30.0, 0.25, 0.15),
    "muscle": (0.012, 30.0, 0.20, 0.15),
    "soft_tissue": (0.012, 30.0, 0.25, 0.20),
    "blood": (0.010, 30.0, 0.05, 0.05),
    "lung": (0.004, 30.0, 0.20, 0.10),
    "liver": (0.18, 70.0, 0.14, 0.10),
    "spleen": (0.60, 70.0, 0.10, 0.08),
    "kidney_cortex": (0.50, 50.0, 0.08, 0.08),
    "kidney_medulla": (0.25, 50.0, 0.12, 0.08),
    "bowel": (0.020, 30.0, 0.35, 0.25),
    "gas": (0.0, 30.0, 0.0, 0.0),
    "cortical_bone": (0.004, 40.0, 0.10, 0.10),
    "trabecular_bone": (0.030, 40.0, 0.20, 0.15),
    "disc": (0.004, 30.0, 0.10, 0.10),
    "csf": (0.004, 30.0, 0.05, 0.05),
    "stomach_wall": (0.030, 30.0, 0.25, 0.15),
    "stomach_content": (0.002, 30.0, 0.05, 0.05),
    "heart": (0.010, 30.0, 0.08, 0.05),
    # lesions: typical value only; each lesion draws tumour/liver and T_eff (below)
    "lesion": (1.50, 90.0, 0.25, 0.12),
    # necrotic cores: 5-15 % of their lesion's concentration (drawn per lesion)
    "necrosis": (0.10, 90.0, 0.30, 0.10),
}
# Patient-to-patient variation. The liver level varies log-normally (sigma 0.30); kidney
# cortex, spleen and marrow vary as ratios to the liver (log-normal sigma, clipped), which
# keeps the physiological order of 177Lu-DOTATATE uptake (kidney cortex and spleen above
# liver, marrow far below; 68Ga-DOTATATE PET SUV ratios spleen/liver ~2-4, kidney/liver
# ~1.5-3); the low-uptake tissues share one log-normal factor (sigma 0.30).
_LIVER_SPREAD = 0.30
_RATIO_TO_LIVER = {
    # tissue: (log-normal sigma, min ratio, max ratio) at 24 h
    "kidney_cortex": (0.25, 2.0, 5.0),
    "spleen": (0.30, 1.3, 6.0),
    "trabecular_bone": (0.30, 0.05, 0.30),
}
_BACKGROUND_SPREAD = 0.30
# Tumour uptake at 24 h: tumour/liver log-uniform 3-15 (NET lesions; tumour absorbed doses
# of a few Gy/GBq, cf. 3.41 mGy/MBq above), effective half-life 60-150 h.
_TUMOUR_TO_LIVER_24H = (3.0, 15.0)
_TUMOUR_T_EFF_H = (60.0, 150.0)

# The anatomy-millimetre box that random-field lattices cover (z, y, x); beyond it they
# extend as constants.
_BOX_LO = np.array([-205.0, -270.0, -270.0])
_BOX_HI = np.array([205.0, 270.0, 270.0])

# Object ids in the painted object map (labels are made from these).
_OBJ = {
    "couch": 1, "fat": 2, "wall": 3, "cavity": 4, "visceral_fat": 5, "bowel": 6, "gas": 7,
    "paraspinal": 8, "psoas": 9, "aorta": 10, "ivc": 11, "liver": 12, "spleen": 13,
    "stomach": 14, "kidney_left": 15, "kidney_right": 16, "sinus": 17, "lung_left": 18,
    "lung_right": 19, "heart": 20, "disc": 21, "canal": 22, "ribs": 23,
}
_VERTEBRA_OBJ0 = 40  # + index into _VERTEBRAE
_LESION_OBJ0 = 100  # + lesion index (0-based)

# Vertebral levels of the reference anatomy: name, centre z (mm), body height (mm), body
# semi-axes lateral/AP (mm). Lumbar bodies ~27 mm high with ~10 mm discs; thoracic
# smaller (adult vertebral morphometry, e.g. Panjabi et al., Spine 16 (1991) 888 and 17
# (1992) 299, rounded).
_VERTEBRAE = (
    ("L5", -157.0, 27.0, 25.0, 18.0),
    ("L4", -119.0, 28.0, 24.5, 17.5),
    ("L3", -81.0, 28.0, 24.0, 17.0),
    ("L2", -43.0, 27.0, 23.0, 16.5),
    ("L1", -6.0, 26.0, 22.0, 16.0),
    ("T12", 29.0, 24.0, 21.0, 15.5),
    ("T11", 61.0, 23.0, 20.0, 15.0),
    ("T10", 92.0, 22.0, 19.0, 14.5),
    ("T9", 122.0, 21.0, 18.5, 14.0),
    ("T8", 151.0, 21.0, 18.0, 14.0),
    ("T7", 180.0, 21.0, 18.0, 14.0),
)
_LUMBAR_L2_L5 = ("L2", "L3", "L4", "L5")

# Width (10-90 %, anatomy mm) of the activity transition at organ and lesion borders. Real
# uptake does not stop at a mathematical surface: partial voluming of lobules, vessels and
# cortex at the organ rim, infiltrative tumour margins. ~3-4 mm keeps the truth sharper
# than any SPECT (effective recon FWHM ~11 mm here) yet avoids step edges; the paper's
# PET-derived truth was smoother still (PET resolution ~5-7 mm). Labels are the 50 % level.
_EDGE_ORGAN_MM = 3.0
_EDGE_LESION_MM = 4.0


# =======================================================================================
# Public data classes
# =======================================================================================
@dataclasses.dataclass
class VirtualPatient:
    """One virtual patient: truth on the CT grid plus what a camera needs to image it.

    ``activity_bq_per_ml`` is the true activity concentration at the acquisition start.
    ``labels`` are boolean masks on the CT grid (VOIs: ``healthy_liver``, ``kidney_left``,
    ``kidney_right``, ``spleen``, ``lumbar_vertebrae``, ``lesion_1`` ... and more).
    """

    seed: int
    size: str
    hu: Volume
    density_g_cm3: Volume
    activity_bq_per_ml: Volume
    labels: dict[str, np.ndarray]
    lesions: list[dict]
    injected_activity_bq: float
    administration_datetime: dt.datetime
    acquisition_datetime: dt.datetime
    total_counts_target: float
    spect_grid: Grid
    anatomy: _Anatomy
    uptake_bq_per_ml: dict[str, float]
    # Set for one time point of a cycle (spectdose.phantoms.cycle): how the patient lies on
    # the couch relative to the first time point, and a tag that keeps its UIDs apart.
    pose: RigidPose | None = None
    time_point: str | None = None
    # Grids and reconstruction of a patient whose grids are drawn per patient
    # (spectdose.phantoms.variation); None: those of SIZES[size].
    spec: PhantomSize | None = None

    @property
    def size_spec(self) -> PhantomSize:
        return self.spec if self.spec is not None else SIZES[self.size]

    @property
    def hours_after_administration(self) -> float:
        return (self.acquisition_datetime - self.administration_datetime).total_seconds() / 3600.0


@dataclasses.dataclass
class SampledAnatomy:
    """The anatomy sampled on one grid: tissue codes, object ids, truth maps and labels."""

    grid: Grid
    tissue: np.ndarray
    objects: np.ndarray
    activity_bq_per_ml: np.ndarray
    density_g_cm3: np.ndarray
    labels: dict[str, np.ndarray]


# =======================================================================================
# Smooth random fields (texture, shape perturbation, bowel and fat patterns)
# =======================================================================================
class _Field:
    """Gaussian-smoothed white noise on a lattice, unit variance, sampled by trilinear
    interpolation at any anatomy-mm points (so every grid sees the same continuous field)."""

    def __init__(self, rng: np.random.Generator, corr_mm: float, spacing_mm: float) -> None:
        self.spacing_mm = float(spacing_mm)
        shape = tuple(int(math.ceil((hi - lo) / spacing_mm)) + 1 for lo, hi in zip(_BOX_LO, _BOX_HI, strict=True))
        white = rng.standard_normal(shape, dtype=np.float32)
        field = ndimage.gaussian_filter(white, corr_mm / spacing_mm, mode="wrap")
        field -= field.mean()
        field /= field.std()
        self.lattice = field.astype(np.float32)

    def sample(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Field values on the axis-aligned block spanned by 1D coordinates (mm)."""
        out = self.lattice
        for axis, coords in enumerate((z, y, x)):
            pos = (np.asarray(coords, dtype=np.float64) - _BOX_LO[axis]) / self.spacing_mm
            n = out.shape[axis]
            pos = np.clip(pos, 0.0, n - 1.0)
            i0 = np.minimum(np.floor(pos).astype(np.int64), n - 2)
            w = (pos - i0).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = -1
            w = w.reshape(shape)
            out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i0 + 1, axis=axis) * w
        return out.astype(np.float32, copy=False)


# =======================================================================================
# Shapes: approximate signed distances (mm, negative inside) on a block
# =======================================================================================
def _rotation(rz_deg: float = 0.0, ry_deg: float = 0.0, rx_deg: float = 0.0) -> np.ndarray:
    """Rows are the local axes (x', y', z') expressed in anatomy (x, y, z)."""
    a, b, c = np.deg2rad([rz_deg, ry_deg, rx_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return (rz @ ry @ rx).T


@dataclasses.dataclass(frozen=True)
class _Ellipsoid:
    centre: tuple[float, float, float]  # anatomy x, y, z (mm)
    semi: tuple[float, float, float]  # local semi-axes (mm)
    rot: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))

    def bbox(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) in (z, y, x) order."""
        ext = np.sqrt(((np.asarray(self.rot).T * np.asarray(self.semi)) ** 2).sum(axis=1))  # x,y,z
        c = np.asarray(self.centre)
        return (c - ext - margin)[::-1], (c + ext + margin)[::-1]

    def local(self, Z, Y, X):  # noqa: N803 - coordinate arrays
        c = self.centre
        r = np.asarray(self.rot)
        dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
        return [(r[k, 0] * dx + r[k, 1] * dy + r[k, 2] * dz).astype(np.float32) for k in range(3)]

    def distance(self, Z, Y, X) -> tuple[np.ndarray, np.ndarray]:  # noqa: N803
        """(signed distance approx (f-1)/|grad f|, normalised radius f)."""
        u = self.local(Z, Y, X)
        a = self.semi
        f2 = (u[0] / a[0]) ** 2 + (u[1] / a[1]) ** 2 + (u[2] / a[2]) ** 2
        f = np.sqrt(f2)
        g = np.sqrt((u[0] / a[0] ** 2) ** 2 + (u[1] / a[1] ** 2) ** 2 + (u[2] / a[2] ** 2) ** 2)
        g = np.maximum(g / np.maximum(f, 1e-6), 1e-6)
        return (f - 1.0) / g, f


def _box_distance(Z, Y, X, centre, half) -> np.ndarray:  # noqa: N803
    return np.maximum(
        np.maximum(np.abs(X - centre[0]) - half[0], np.abs(Y - centre[1]) - half[1]),
        np.abs(Z - centre[2]) - half[2],
    ).astype(np.float32)


def _elliptic_cylinder(Z, Y, X, cx, cy, ax, ay, z_lo, z_hi) -> np.ndarray:  # noqa: N803
    dx, dy = (X - cx) / ax, (Y - cy) / ay
    f = np.sqrt(dx**2 + dy**2)
    g = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2) / np.maximum(f, 1e-6)
    d_xy = (f - 1.0) / np.maximum(g, 1e-6)
    d_z = np.maximum(z_lo - Z, Z - z_hi)
    return np.maximum(d_xy, d_z).astype(np.float32)


def _shell(d: np.ndarray, thickness_mm: float) -> np.ndarray:
    """Signed distance of the shell ``-thickness < d < 0`` (negative inside the shell)."""
    return np.maximum(d, -d - thickness_mm)


def _soft(d: np.ndarray, edge_mm: float) -> np.ndarray:
    """Membership 1 inside, 0 outside, 10-90 % over ``edge_mm`` (tanh profile)."""
    return (0.5 * (1.0 - np.tanh(d * (2.197 / max(edge_mm, 1e-3))))).astype(np.float32)


# =======================================================================================
# The anatomy model (parameters only; painting happens in sample_anatomy)
# =======================================================================================
@dataclasses.dataclass
class _Lesion:
    name: str
    location: str
    nominal_volume_ml: float
    ellipsoid: _Ellipsoid
    necrotic_core: _Ellipsoid | None
    necrotic_fraction: float
    conc_bq_ml: float
    texture_shift_mm: tuple[float, float, float]
    shape_offset: float = 0.0  # mean of the shape field over the surface (keeps the volume)
    # What the kinetics of a cycle start from (spectdose.phantoms.cycle): the drawn 24 h
    # concentration and effective half-life behind conc_bq_ml.
    conc_24h_bq_ml: float = 0.0
    t_eff_h: float = 0.0


@dataclasses.dataclass
class _Anatomy:
    """All parameters of one patient, in anatomy mm (reference adult, FOV centre at 0)."""

    scale: float  # physical mm per anatomy mm
    z_table_mm: float  # physical z of anatomy z = 0
    body_a: float
    body_b: float
    body_power: float
    fat_mm: float
    wall_mm: float
    visceral_fat_threshold: float
    s: tuple[float, float, float]
    organs: dict[str, _Ellipsoid]
    kidney_frames: dict[str, _Ellipsoid]
    lesions: list[_Lesion]
    conc_bq_ml: dict[str, float]
    fields: dict[str, _Field]
    hours: float = 24.0  # acquisition time after administration
    dz: float = 0.0  # craniocaudal shift of the organs in the field of view (mm)
    shape_amplitude: float = 1.0  # scales the random-field perturbation of organ surfaces

    def to_anatomy_axes(self, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """1D anatomy-mm coordinates (z, y, x) of an axis-aligned grid's voxel centres."""
        if not np.allclose(grid.axes, np.eye(3)[::-1], atol=1e-6):
            raise InputError("virtual patients are sampled on axis-aligned (z, y, x) grids only")
        o, sp = np.asarray(grid.origin_mm), np.asarray(grid.spacing_mm)
        z = (o[2] + sp[0] * np.arange(grid.shape[0]) - self.z_table_mm) / self.scale
        y = (o[1] + sp[1] * np.arange(grid.shape[1])) / self.scale
        x = (o[0] + sp[2] * np.arange(grid.shape[2])) / self.scale
        return z, y, x

    def to_physical_mm(self, point_xyz: np.ndarray) -> np.ndarray:
        p = np.asarray(point_xyz, dtype=float) * self.scale
        p[2] += self.z_table_mm
        return p


@dataclasses.dataclass(frozen=True)
class LesionPlan:
    """One lesion of a varied patient, decided before placement (clinical-scale volume)."""

    volume_ml: float
    location: str  # "liver" or "outside"
    tumour_to_liver_24h: float
    necrotic_core_fraction: float | None = None  # core semi-axes / lesion's; None: no core
    necrotic_uptake_fraction: float = 1.0  # core concentration / rim's


@dataclasses.dataclass(frozen=True)
class AnatomyVariation:
    """Anatomy parameters set from outside instead of drawn from the seed's default ranges
    (:mod:`spectdose.phantoms.variation`, data set v2). Everything else (random fields,
    rotations, uptake levels, lesion orientation and texture) is still drawn from the seed.
    """

    body_scale: tuple[float, float, float]  # lateral, AP, craniocaudal
    craniocaudal_shift_mm: float  # of all organs in the field of view
    organ_volume_factor: tuple[float, float, float]  # liver, spleen, kidneys
    organ_shift_mm: tuple[tuple[str, tuple[float, float, float]], ...]  # organ -> (x, y, z)
    shape_amplitude: float
    lesions: tuple[LesionPlan, ...]
    min_lesion_ml: float = 0.5  # a lesion that finds no room shrinks down to this


def _shifted(e: _Ellipsoid, shift_xyz) -> _Ellipsoid:
    return dataclasses.replace(e, centre=tuple(float(c + d) for c, d in zip(e.centre, shift_xyz, strict=True)))


def _build_anatomy(seed: int, spec: PhantomSize, variation: AnatomyVariation | None = None) -> _Anatomy:
    """Draw every parameter of the patient from ``seed`` (independent of the size).

    ``variation`` replaces the body scales, organ sizes and positions, surface roughness
    and the lesion plan; the random stream is drawn as without it, so a patient without a
    variation is exactly the one it always was. With a variation the concentrations are
    those at 24 h (``hours`` 24): the caller applies the kinetics of its time point.
    """
    rng = np.random.default_rng([int(seed), 17701])
    sx, sy, sz = rng.uniform(0.88, 1.12), rng.uniform(0.85, 1.18), rng.uniform(0.94, 1.06)
    dz = rng.uniform(-12.0, 12.0)  # craniocaudal placement of the anatomy in the FOV
    if variation is not None:
        (sx, sy, sz), dz = variation.body_scale, variation.craniocaudal_shift_mm
    s = (sx, sy, sz)

    def at(x, y, z):
        return (x * sx, y * sy, z * sz + dz)

    def semi(a, b, c, vol_factor=1.0):
        f = vol_factor ** (1.0 / 3.0)
        return (a * sx * f, b * sy * f, c * sz * f)

    liver_f = rng.uniform(0.85, 1.2)
    spleen_f = rng.uniform(0.6, 1.6)
    kid_f = rng.uniform(0.8, 1.2)
    if variation is not None:
        liver_f, spleen_f, kid_f = variation.organ_volume_factor
    organs = {
        "liver_right": _Ellipsoid(at(-62, -5, 55), semi(76, 74, 68, liver_f), _rotation(rng.uniform(-8, 8))),
        "liver_left": _Ellipsoid(at(10, -55, 82), semi(60, 28, 34, liver_f), _rotation(-15 + rng.uniform(-8, 8))),
        "spleen": _Ellipsoid(at(85, 38, 60), semi(24, 46, 46, spleen_f), _rotation(35 + rng.uniform(-10, 10))),
        "stomach": _Ellipsoid(at(55, -12, 100), semi(40, 30, 45), _rotation(20)),
        "heart": _Ellipsoid(at(15, -35, 192), semi(65, 55, 52)),
    }
    kidney_frames = {
        # upper poles medial and posterior, hilum facing antero-medially
        "kidney_left": _Ellipsoid(at(70, 55, -25), semi(28, 24, 55, kid_f), _rotation(25, 12, 8)),
        "kidney_right": _Ellipsoid(at(-70, 55, -40), semi(28, 24, 55, kid_f), _rotation(-25, -12, 8)),
    }
    if variation is not None:
        shifts = dict(variation.organ_shift_mm)
        for name in ("liver_right", "liver_left", "spleen", "stomach"):
            organs[name] = _shifted(organs[name], shifts.get("liver" if name.startswith("liver") else name, (0.0, 0.0, 0.0)))
        for name in kidney_frames:
            kidney_frames[name] = _shifted(kidney_frames[name], shifts.get(name, (0.0, 0.0, 0.0)))
    # fields first in a fixed order so that the stream stays size-independent
    fields = {
        "tex_fine": _Field(rng, 5.0, 2.5),
        "tex_coarse": _Field(rng, 20.0, 5.0),
        "shape": _Field(rng, 12.0, 4.0),
        "viscera": _Field(rng, 7.0, 3.0),
        "gas": _Field(rng, 5.0, 2.5),
    }
    hours = rng.uniform(22.0, 96.0)
    if variation is not None:
        hours = 24.0  # concentrations at 24 h; the caller applies the time point's kinetics
    conc_24h = {}
    liver_24h = UPTAKE_24H["liver"][0] * math.exp(rng.normal(0.0, _LIVER_SPREAD))
    bg = math.exp(rng.normal(0.0, _BACKGROUND_SPREAD))
    for tissue, (c24, _, _, _) in UPTAKE_24H.items():
        if tissue in ("lesion", "necrosis"):
            continue  # drawn per lesion
        if tissue == "liver":
            conc_24h[tissue] = liver_24h
        elif tissue in _RATIO_TO_LIVER:
            sigma, lo, hi = _RATIO_TO_LIVER[tissue]
            ratio = c24 / UPTAKE_24H["liver"][0] * math.exp(rng.normal(0.0, sigma))
            conc_24h[tissue] = liver_24h * min(max(ratio, lo), hi)
        else:
            conc_24h[tissue] = c24 * bg
    conc_24h["kidney_medulla"] = conc_24h["kidney_cortex"] * UPTAKE_24H["kidney_medulla"][0] / UPTAKE_24H["kidney_cortex"][0]
    conc = {t: c * 1e6 * 2.0 ** (-(hours - 24.0) / UPTAKE_24H[t][1]) for t, c in conc_24h.items()}
    anatomy = _Anatomy(
        scale=spec.anatomy_scale,
        z_table_mm=round(float(rng.uniform(-600.0, -150.0)), 1),
        body_a=165.0 * sx,
        body_b=115.0 * sy,
        body_power=rng.uniform(2.2, 2.8),
        fat_mm=rng.uniform(12.0, 35.0),
        wall_mm=rng.uniform(7.0, 12.0),
        visceral_fat_threshold=rng.uniform(0.3, 1.1),
        s=s,
        organs=organs,
        kidney_frames=kidney_frames,
        lesions=[],
        conc_bq_ml=conc,
        fields=fields,
        hours=hours,
        dz=dz,
        shape_amplitude=1.0 if variation is None else float(variation.shape_amplitude),
    )
    anatomy.lesions = _place_lesions(rng, anatomy, hours, liver_24h, variation)
    return anatomy


def _surface_mean(field: _Field, ell: _Ellipsoid, shift) -> float:
    """Mean of ``field`` over the ellipsoid's surface (Fibonacci points), so that the
    boundary perturbation of a lesion leaves its volume near the nominal one."""
    n = 256
    i = np.arange(n) + 0.5
    cos_t = 1.0 - 2.0 * i / n
    sin_t = np.sqrt(1.0 - cos_t**2)
    phi = np.pi * (1.0 + 5.0**0.5) * i
    local = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], axis=1) * np.asarray(ell.semi)
    pts = np.asarray(ell.centre) + local @ np.asarray(ell.rot) + np.asarray(shift)  # x, y, z
    vals = [float(field.sample(np.array([p[2]]), np.array([p[1]]), np.array([p[0]]))[0, 0, 0]) for p in pts]
    return float(np.mean(vals))


def _place_lesions(
    rng: np.random.Generator, anatomy: _Anatomy, hours: float, liver_24h_mbq_ml: float, variation: AnatomyVariation | None = None
) -> list[_Lesion]:
    """Draw 3-7 lesions of 2-180 ml (clinical scale) in and outside the liver, or place the
    lesions of ``variation.lesions`` (volumes, locations, uptake and necrosis given)."""
    plan = None if variation is None else variation.lesions
    min_ml = 2.5 if variation is None else float(variation.min_lesion_ml)
    if plan is None:
        n = int(rng.integers(3, 8))
        volumes = np.exp(rng.uniform(np.log(2.5), np.log(150.0), size=n))
        volumes[0] = rng.uniform(2.5, 8.0)  # always one small lesion
        volumes[1] = rng.uniform(60.0, 150.0)  # and one large one
        locations = ["liver" if rng.random() < 0.6 else "outside" for _ in range(n)]
        locations[0], locations[1], locations[2] = "outside", "liver", "liver"
        if n > 3:
            locations[3] = "outside"
    else:
        n = len(plan)
        volumes = np.array([p.volume_ml for p in plan], dtype=float)
        locations = [p.location for p in plan]
    # coarse sample of the lesion-free anatomy to find room (4 mm, anatomy mm)
    step = 4.0
    coarse = Grid(
        shape=(101, 121, 121),
        spacing_mm=(step * anatomy.scale,) * 3,
        origin_mm=(-240.0 * anatomy.scale, -240.0 * anatomy.scale, anatomy.z_table_mm - 200.0 * anatomy.scale),
    )
    sample = sample_anatomy(anatomy, coarse, with_activity=False)
    obj = sample.objects
    z, y, x = anatomy.to_anatomy_axes(coarse)
    liver_room = ndimage.distance_transform_edt(obj == _OBJ["liver"], sampling=step)
    soft = np.isin(obj, [_OBJ["cavity"], _OBJ["visceral_fat"], _OBJ["bowel"]])
    zz = z[:, None, None]
    soft &= (zz > -170.0) & (zz < 70.0)
    outside_room = ndimage.distance_transform_edt(soft, sampling=step)
    taken = np.zeros(obj.shape, dtype=bool)
    lesions: list[_Lesion] = []
    order = np.argsort(-volumes)  # place the big ones first
    placed: dict[int, _Lesion] = {}
    for idx in order:
        vol = float(volumes[idx])
        loc = locations[idx]
        for _attempt in range(12):
            r = (3.0 * vol * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
            room = liver_room if loc == "liver" else outside_room
            need = (0.75 * r + 4.0) if loc == "liver" else (r + 8.0)
            cand = np.argwhere((room >= need) & ~taken)
            if len(cand):
                break
            vol = max(min_ml, vol * 0.75)
        else:  # pragma: no cover - the reference anatomy always has room for 2.5 ml
            raise InputError(f"virtual patient: no room for a {loc} lesion of {vol:.1f} ml")
        k, j, i = cand[int(rng.integers(len(cand)))]
        centre = (float(x[i]), float(y[j]), float(z[k]))
        aspect = rng.uniform(0.8, 1.25, size=3)
        aspect /= np.prod(aspect) ** (1.0 / 3.0)
        ell = _Ellipsoid(centre, tuple(r * aspect), _rotation(*rng.uniform(0, 180, size=3)))
        if plan is None:
            necrotic = vol >= 15.0 and (rng.random() < 0.6 or idx == 1)
        else:
            necrotic = plan[idx].necrotic_core_fraction is not None
        core = None
        nec_frac = 1.0
        if necrotic:
            cf = rng.uniform(0.45, 0.7)
            off = rng.normal(0.0, 0.1 * r, size=3)
            if plan is not None:
                cf = plan[idx].necrotic_core_fraction
            core = _Ellipsoid(tuple(np.asarray(centre) + off), tuple(r * aspect * cf), ell.rot)
            nec_frac = rng.uniform(0.05, 0.15) if plan is None else plan[idx].necrotic_uptake_fraction
        shift = tuple(rng.uniform(-40.0, 40.0, size=3))
        c24 = liver_24h_mbq_ml * math.exp(rng.uniform(*np.log(_TUMOUR_TO_LIVER_24H)))
        if plan is not None:
            c24 = liver_24h_mbq_ml * plan[idx].tumour_to_liver_24h
        t_eff = rng.uniform(*_TUMOUR_T_EFF_H)
        placed[int(idx)] = _Lesion(
            name="",
            location=loc,
            nominal_volume_ml=vol,
            ellipsoid=ell,
            necrotic_core=core,
            necrotic_fraction=nec_frac,
            conc_bq_ml=c24 * 1e6 * 2.0 ** (-(hours - 24.0) / t_eff),
            texture_shift_mm=shift,
            shape_offset=_surface_mean(anatomy.fields["shape"], ell, shift),
            conc_24h_bq_ml=c24 * 1e6,
            t_eff_h=float(t_eff),
        )
        # block the lesion and a margin for the next ones
        dist = np.sqrt((x[None, None, :] - centre[0]) ** 2 + (y[None, :, None] - centre[1]) ** 2 + (zz - centre[2]) ** 2)
        taken |= dist < (1.25 * r + 20.0)
    for idx in range(n):
        placed[idx].name = f"lesion_{idx + 1}"
        lesions.append(placed[idx])
    return lesions


# =======================================================================================
# Painting the anatomy on a grid
# =======================================================================================
class _Canvas:
    def __init__(self, anatomy: _Anatomy, grid: Grid, with_activity: bool) -> None:
        self.a = anatomy
        self.z, self.y, self.x = anatomy.to_anatomy_axes(grid)
        self.shape = grid.shape
        self.objects = np.zeros(self.shape, dtype=np.uint8)
        self.tissue = np.zeros(self.shape, dtype=np.uint8)
        self.activity = np.zeros(self.shape, dtype=np.float32) if with_activity else None
        self.d_cavity: np.ndarray | None = None  # signed distance to the body cavity (mm)
        self._cache: dict[tuple, np.ndarray] = {}

    def block(self, lo_zyx, hi_zyx):
        """Slices and broadcast coordinate arrays of the part of the grid in a box."""
        sl = []
        for coords, lo, hi in zip((self.z, self.y, self.x), lo_zyx, hi_zyx, strict=True):
            i0 = int(np.searchsorted(coords, lo, side="left"))
            i1 = int(np.searchsorted(coords, hi, side="right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        sl = tuple(sl)
        Z = self.z[sl[0]].astype(np.float32)[:, None, None]  # noqa: N806
        Y = self.y[sl[1]].astype(np.float32)[None, :, None]  # noqa: N806
        X = self.x[sl[2]].astype(np.float32)[None, None, :]  # noqa: N806
        return sl, Z, Y, X

    def full(self):
        return self.block((-np.inf,) * 3, (np.inf,) * 3)

    def field(self, name: str, sl, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
        """A random field on block ``sl`` (cached: several tissues reuse the same block)."""
        key = (name, tuple((s.start, s.stop) for s in sl), tuple(shift))
        if key not in self._cache:
            zc, yc, xc = self.z[sl[0]], self.y[sl[1]], self.x[sl[2]]
            self._cache[key] = self.a.fields[name].sample(zc + shift[2], yc + shift[1], xc + shift[0])
        return self._cache[key]

    def texture(self, sl, tissue: str, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
        """Multiplicative uptake texture, mean ~1, for ``tissue`` on block ``sl``."""
        _, _, a_fine, a_coarse = UPTAKE_24H[tissue]
        t = 1.0 + a_fine * self.field("tex_fine", sl, shift)
        t += a_coarse * self.field("tex_coarse", sl)
        return np.clip(t, 0.15, 3.0)

    def inside_cavity(self, sl, d: np.ndarray, margin_mm: float = 2.0) -> np.ndarray:
        """Clip an organ to the body cavity (organs never poke into the wall or fat)."""
        return np.maximum(d, self.d_cavity[sl] + margin_mm)

    def paint(self, sl, d, obj: int | None, tissue: str, conc=None, edge_mm: float = 1.5) -> None:
        hard = d < 0.0
        if obj is not None:
            self.objects[sl][hard] = obj
        self.tissue[sl][hard] = _T[tissue]
        if self.activity is not None:
            if conc is None:
                conc = self.a.conc_bq_ml[tissue] * self.texture(sl, tissue)
            m = _soft(d, edge_mm)
            act = self.activity[sl]
            act += m * (conc - act)


def _paint_body(c: _Canvas) -> None:
    a = c.a
    sl, Z, Y, X = c.full()  # noqa: N806
    p = a.body_power
    ax, ay = np.abs(X) / a.body_a, np.abs(Y) / a.body_b
    f = (ax**p + ay**p) ** (1.0 / p)
    rho = np.sqrt(X**2 + Y**2)
    d_body = (rho * (1.0 - 1.0 / np.maximum(f, 1e-6)) - 3.0 * c.field("shape", sl)).astype(np.float32)
    # couch: a flat carbon-fibre pallet under the back (it does not scale with the patient)
    d_couch = _box_distance(Z, Y, X, (0.0, a.body_b + 14.0 / a.scale, 0.0), (220.0 / a.scale, 10.0 / a.scale, 1e6))
    c.paint(sl, d_couch, _OBJ["couch"], "couch", conc=0.0, edge_mm=0.5)
    c.paint(sl, d_body, _OBJ["fat"], "fat", edge_mm=1.0)
    # subcutaneous fat thinner posteriorly; abdominal/thoracic wall muscle inside it
    d_wall = d_body + a.fat_mm * np.where(Y > 0, 0.6, 1.0).astype(np.float32)
    c.paint(sl, d_wall, _OBJ["wall"], "muscle", edge_mm=1.0)
    d_cav = d_wall + a.wall_mm
    c.d_cavity = d_cav
    # cavity: soft tissue with visceral fat patches; bowel loops (with gas) low and anterior
    vis = c.field("viscera", sl)
    c.paint(sl, d_cav, _OBJ["cavity"], "soft_tissue", edge_mm=1.0)
    c.paint(sl, np.maximum(d_cav, (a.visceral_fat_threshold - vis) * 4.0), _OBJ["visceral_fat"], "fat", edge_mm=1.0)
    bowel_region = np.maximum(np.maximum(Z - (10.0 + a.dz), Y - 30.0 * a.s[1]), d_cav + 5.0)
    c.paint(sl, np.maximum(bowel_region, (np.abs(vis) - 0.6) * 4.0), _OBJ["bowel"], "bowel", edge_mm=1.0)
    d_gas = np.maximum(bowel_region + 3.0, (1.7 - c.field("gas", sl)) * 3.0)
    c.paint(sl, d_gas, _OBJ["gas"], "gas", conc=0.0, edge_mm=0.8)


def _paint_muscles_vessels(c: _Canvas) -> None:
    a = c.a
    sx, sy, _ = a.s
    ys = 40.0 * sy  # vertebral body centre (AP)
    for side in (-1.0, 1.0):
        cx, cy = side * 38.0 * sx, ys + 52.0 * sy
        b = c.block((-np.inf, cy - 40, cx - 45), (np.inf, cy + 40, cx + 45))
        if b:
            sl, Z, Y, X = b  # noqa: N806
            d = _elliptic_cylinder(Z, Y, X, cx, cy, 26.0 * sx, 20.0 * sy, -1e6, 1e6)
            c.paint(sl, d, _OBJ["paraspinal"], "muscle", edge_mm=1.0)
        # psoas: grows caudally from L1
        b = c.block((-np.inf, ys - 60, side * 38 * sx - 60), (20.0 + a.dz, ys + 40, side * 38 * sx + 60))
        if b:
            sl, Z, Y, X = b  # noqa: N806
            t = np.clip((10.0 + a.dz - Z) / 160.0, 0.0, 1.0)
            cxz = side * (30.0 + 22.0 * t) * sx
            axz, ayz = (8.0 + 18.0 * t) * sx, (8.0 + 12.0 * t) * sy
            f = np.sqrt(((X - cxz) / axz) ** 2 + ((Y - (ys - 5.0 * sy)) / ayz) ** 2)
            d = np.maximum((f - 1.0) * np.minimum(axz, ayz), Z - (10.0 + a.dz))
            c.paint(sl, d.astype(np.float32), _OBJ["psoas"], "muscle", edge_mm=1.0)
    for name, cx, cy, r in (("aorta", 15.0, 8.0, 11.0), ("ivc", -25.0, 12.0, 12.0)):
        cx, cy = cx * sx, cy * sy
        b = c.block((-np.inf, cy - r - 5, cx - r - 5), (np.inf, cy + r + 5, cx + r + 5))
        if b:
            sl, Z, Y, X = b  # noqa: N806
            d = _elliptic_cylinder(Z, Y, X, cx, cy, r, r, -1e6, 1e6)
            c.paint(sl, d, _OBJ[name], "blood", edge_mm=1.0)


def _paint_organs(c: _Canvas) -> None:
    a = c.a
    # liver = union of two lobes with a perturbed surface
    lobes = (a.organs["liver_right"], a.organs["liver_left"])
    margin = 10.0 + 2.5 * _EDGE_ORGAN_MM  # surface perturbation + soft edge
    lo = np.minimum(lobes[0].bbox(margin)[0], lobes[1].bbox(margin)[0])
    hi = np.maximum(lobes[0].bbox(margin)[1], lobes[1].bbox(margin)[1])
    b = c.block(lo, hi)
    if b:
        sl, Z, Y, X = b  # noqa: N806
        d = np.minimum(lobes[0].distance(Z, Y, X)[0], lobes[1].distance(Z, Y, X)[0])
        d = c.inside_cavity(sl, d - 4.0 * a.shape_amplitude * c.field("shape", sl, (0.0, 0.0, 50.0)))
        c.paint(sl, d, _OBJ["liver"], "liver", edge_mm=_EDGE_ORGAN_MM)
    e = a.organs["spleen"]
    b = c.block(*e.bbox(6.0 + 2.5 * _EDGE_ORGAN_MM))
    if b:
        sl, Z, Y, X = b  # noqa: N806
        d = c.inside_cavity(sl, e.distance(Z, Y, X)[0] - 3.0 * a.shape_amplitude * c.field("shape", sl, (0.0, 60.0, 0.0)))
        c.paint(sl, d, _OBJ["spleen"], "spleen", edge_mm=_EDGE_ORGAN_MM)
    e = a.organs["stomach"]
    b = c.block(*e.bbox(4.0))
    if b:
        sl, Z, Y, X = b  # noqa: N806
        d = c.inside_cavity(sl, e.distance(Z, Y, X)[0])
        c.paint(sl, d, _OBJ["stomach"], "stomach_wall", edge_mm=1.0)
        c.paint(sl, d + 4.0, _OBJ["stomach"], "stomach_content", edge_mm=1.0)
        # gas cap in the upper part of the lumen
        d_gas = np.maximum(d + 4.0, (e.centre[2] + 0.45 * e.semi[2]) - Z)
        c.paint(sl, d_gas, _OBJ["stomach"], "gas", conc=0.0, edge_mm=0.8)
    for name, e in a.kidney_frames.items():
        b = c.block(*e.bbox(2.5 * _EDGE_ORGAN_MM))
        if not b:
            continue
        sl, Z, Y, X = b  # noqa: N806
        d, f = e.distance(Z, Y, X)
        d = c.inside_cavity(sl, d - 1.5 * a.shape_amplitude * c.field("shape", sl, (80.0, 0.0, 0.0)), 0.0)
        c.paint(sl, d, _OBJ[name], "kidney_cortex", edge_mm=_EDGE_ORGAN_MM)
        # medulla: pyramids between 40 % and 78 % of the normalised radius, separated by
        # cortical columns (lobulation in the angle around the long axis)
        u = e.local(Z, Y, X)
        phi = np.arctan2(u[1] / e.semi[1], u[2] / e.semi[2])
        lobes_f = np.cos(4.0 * phi) + 0.5 * np.cos(2.0 * phi + 1.0)
        d_med = np.maximum(np.maximum((f - 0.78) * 20.0, (0.40 - f) * 20.0), (-0.2 - lobes_f) * 6.0)
        c.paint(sl, np.maximum(d_med, d + 2.0), _OBJ[name], "kidney_medulla", edge_mm=_EDGE_ORGAN_MM)
        # renal sinus (fat): the centre plus a channel opening medially at the hilum
        medial = -1.0 if e.centre[0] > 0 else 1.0  # local x' ~ anatomy x
        d_channel = np.maximum(
            np.maximum((f - 1.05) * 25.0, -medial * u[0]),
            np.maximum(np.abs(u[2]) - 0.3 * e.semi[2], np.abs(u[1]) - 0.35 * e.semi[1]),
        )
        d_sinus = np.minimum((f - 0.40) * 25.0, d_channel)
        c.paint(sl, d_sinus, _OBJ["sinus"], "fat", edge_mm=_EDGE_ORGAN_MM)


def _paint_thorax(c: _Canvas) -> None:
    a = c.a
    sx, sy, sz = a.s
    ra, rb = a.body_a - a.fat_mm - 14.0, a.body_b - a.fat_mm - 10.0  # rib cage
    x_med, x_lat = 30.0 * sx, ra - 5.0
    y_ant, y_post = -0.55 * rb, rb - 4.0
    ax, ay = 0.5 * (x_lat - x_med), 0.5 * (y_post - y_ant)
    cy = 0.5 * (y_ant + y_post)
    for side, name, z_top in ((1.0, "lung_left", 108.0), (-1.0, "lung_right", 118.0)):
        cx = side * 0.5 * (x_med + x_lat)
        z_top = z_top * sz + a.dz
        b = c.block((z_top - 70.0, cy - ay - 5, cx - ax - 5), (np.inf, cy + ay + 5, cx + ax + 5))
        if not b:
            continue
        sl, Z, Y, X = b  # noqa: N806
        q = ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2
        d_xy = (np.sqrt(q) - 1.0) * min(ax, ay)
        d_dome = (z_top - 65.0 * np.minimum(q, 1.0)) - Z
        d = np.maximum(d_xy, d_dome) - 2.0 * c.field("shape", sl, (-60.0, 0.0, 0.0))
        c.paint(sl, c.inside_cavity(sl, d.astype(np.float32)), _OBJ[name], "lung", edge_mm=1.0)
    e = a.organs["heart"]
    b = c.block(*e.bbox(2.5 * _EDGE_ORGAN_MM))
    if b:
        sl, Z, Y, X = b  # noqa: N806
        c.paint(sl, c.inside_cavity(sl, e.distance(Z, Y, X)[0]), _OBJ["heart"], "heart", edge_mm=_EDGE_ORGAN_MM)


def _paint_spine(c: _Canvas) -> None:
    a = c.a
    sx, sy, sz = a.s
    ys = 40.0 * sy
    cortical_mm = 1.8
    for idx, (_name, zc, h, ax, ay) in enumerate(_VERTEBRAE):
        zc = zc * sz + a.dz
        h = h * sz
        ax, ay = ax * sx, ay * sy
        vb = c.block((zc - 0.5 * h - 20.0, ys - ay - 3, -80.0 * sx), (zc + 0.5 * h + 20.0, ys + 90.0 * sy, 80.0 * sx))
        if not vb:
            continue
        sl, Z, Y, X = vb  # noqa: N806
        # the disc column around this level; the bodies (painted next) override it
        d_disc = _elliptic_cylinder(Z, Y, X, 0.0, ys, ax, ay, zc - 0.5 * h - 14.0, zc + 0.5 * h + 14.0)
        c.paint(sl, d_disc, _OBJ["disc"], "disc", edge_mm=1.0)
        d_body = _elliptic_cylinder(Z, Y, X, 0.0, ys, ax, ay, zc - 0.5 * h, zc + 0.5 * h)
        # posterior elements: arch around the canal, spinous and transverse processes
        cy = ys + ay + 10.0 * sy
        rho = np.sqrt((X / sx) ** 2 + ((Y - cy) / sy) ** 2)
        d_arch = np.maximum(np.maximum(rho - 16.0, 9.0 - rho), np.abs(Z - zc) - 0.35 * h)
        d_spin = _box_distance(Z, Y, X, (0.0, cy + 24.0 * sy, zc - 0.1 * h), (4.0 * sx, 13.0 * sy, 0.3 * h))
        d_trans = _box_distance(Z, Y, X, (0.0, cy + 2.0 * sy, zc), (36.0 * sx, 5.0 * sy, 0.2 * h))
        d_vert = np.minimum(d_body, np.minimum(np.minimum(d_arch, d_spin), d_trans)).astype(np.float32)
        obj = _VERTEBRA_OBJ0 + idx
        c.paint(sl, d_vert, obj, "trabecular_bone", edge_mm=0.6)
        c.paint(sl, _shell(d_vert, cortical_mm), obj, "cortical_bone", edge_mm=0.5)
        d_canal = np.maximum(rho - 9.0, np.abs(Z - zc) - 0.5 * h - 6.0)
        c.paint(sl, d_canal.astype(np.float32), _OBJ["canal"], "csf", edge_mm=0.8)


def _paint_ribs(c: _Canvas) -> None:
    a = c.a
    sz = a.s[2]
    ra, rb = a.body_a - a.fat_mm - 14.0, a.body_b - a.fat_mm - 10.0
    for _name, zc, *_ in _VERTEBRAE[5:]:  # T12 and up carry ribs
        z_post = zc * sz + a.dz
        b = c.block((z_post - 95.0, -rb - 12.0, -ra - 12.0), (z_post + 12.0, rb + 12.0, ra + 12.0))
        if not b:
            continue
        sl, Z, Y, X = b  # noqa: N806
        phi = np.arctan2(np.abs(X), Y)  # 0 posterior, pi anterior
        rho = np.sqrt(X**2 + Y**2)
        rho_e = 1.0 / np.sqrt((np.sin(phi) / ra) ** 2 + (np.cos(phi) / rb) ** 2)
        z_rib = z_post - 45.0 * (1.0 - np.cos(phi))
        reach = 1.55 if zc < 40 else 2.25  # floating ribs are short
        dr, dzr = (rho - rho_e) / 4.0, (Z - z_rib) / 6.5
        d = (np.sqrt(dr**2 + dzr**2) - 1.0) * 4.0
        d = np.maximum(np.maximum(d, (phi - reach) * 60.0), (0.35 - phi) * 60.0).astype(np.float32)
        c.paint(sl, d, _OBJ["ribs"], "trabecular_bone", edge_mm=0.6)
        c.paint(sl, _shell(d, 1.5), _OBJ["ribs"], "cortical_bone", edge_mm=0.5)


def _paint_lesions(c: _Canvas) -> None:
    a = c.a
    for k, les in enumerate(a.lesions):
        e = les.ellipsoid
        r = float(np.mean(e.semi))
        b = c.block(*e.bbox(0.25 * r + 2.5 * _EDGE_LESION_MM))
        if not b:
            continue
        sl, Z, Y, X = b  # noqa: N806
        sh = les.texture_shift_mm
        d, f = e.distance(Z, Y, X)
        d = d - 0.12 * r * (c.field("shape", sl, sh) - les.shape_offset)
        conc = None
        if c.activity is not None:
            # heterogeneous uptake plus a mild rim-to-centre gradient
            conc = les.conc_bq_ml * c.texture(sl, "lesion", sh) * (1.0 + 0.15 * (np.clip(f, 0, 1) - 0.5))
        c.paint(sl, d, _LESION_OBJ0 + k, "lesion", conc=conc, edge_mm=_EDGE_LESION_MM)
        if les.necrotic_core is not None:
            dn = les.necrotic_core.distance(Z, Y, X)[0] - 0.06 * r * c.field("shape", sl, tuple(-v for v in sh))
            dn = np.maximum(dn, d + 2.0)
            conc_n = None
            if c.activity is not None:
                conc_n = les.conc_bq_ml * les.necrotic_fraction * c.texture(sl, "necrosis", sh)
            c.paint(sl, dn, _LESION_OBJ0 + k, "necrosis", conc=conc_n, edge_mm=_EDGE_LESION_MM)


def sample_anatomy(anatomy: _Anatomy, grid: Grid, *, with_activity: bool = True) -> SampledAnatomy:
    """Sample the continuous anatomy on ``grid`` (axis-aligned, LPS mm).

    Returns tissue codes (:data:`TISSUES`), object ids, the true activity concentration in
    Bq/ml at the acquisition start (soft organ edges, textured uptake), the true mass
    density in g/cm^3 and boolean labels.
    """
    c = _Canvas(anatomy, grid, with_activity)
    _paint_body(c)
    _paint_muscles_vessels(c)
    _paint_organs(c)
    _paint_thorax(c)
    _paint_spine(c)
    _paint_ribs(c)
    _paint_lesions(c)
    density_lut = np.zeros(256, dtype=np.float32)
    for code, rho, _ in TISSUES.values():
        density_lut[code] = rho
    density = density_lut[c.tissue]
    if with_activity:
        # a faint density texture in soft tissues (+-0.4 %) so the CT is not piecewise flat
        bony = np.isin(c.tissue, [_T["air"], _T["gas"], _T["couch"], _T["cortical_bone"], _T["trabecular_bone"]])
        density *= np.where(bony, 1.0, 1.0 + 0.004 * c.field("tex_coarse", c.full()[0])).astype(np.float32)
    activity = c.activity if c.activity is not None else np.zeros(grid.shape, dtype=np.float32)
    np.maximum(activity, 0.0, out=activity)
    if with_activity and TRUTH_RESOLUTION_FWHM_MM > 0:
        # the small phantom is the clinical anatomy shrunk, so its truth resolution shrinks too
        activity = _pet_like(activity, grid, c.tissue, TRUTH_RESOLUTION_FWHM_MM * anatomy.scale)
    liver_lesions = [k for k, les in enumerate(anatomy.lesions) if les.location == "liver"]
    return SampledAnatomy(
        grid=grid,
        tissue=c.tissue,
        objects=c.objects,
        activity_bq_per_ml=activity,
        density_g_cm3=density.astype(np.float32, copy=False),
        labels=_labels(c.objects, c.tissue, len(anatomy.lesions), liver_lesions),
    )


# Grids up to this many voxels are painted at half the spacing before a pose is applied.
_POSE_OVERSAMPLE_MAX_VOXELS = 4_000_000


@dataclasses.dataclass(frozen=True)
class RigidPose:
    """Where the patient lies on the couch relative to a reference position (rigid motion).

    Maps a point ``p`` (LPS mm) of the reference position to ``R (p - c) + c + t``: rotations
    ``rotation_deg`` about the LPS x, y and z axes through ``centre_mm`` (applied as SimpleITK's
    Euler3DTransform applies them), then ``translation_mm``.
    """

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def is_identity(self) -> bool:
        return not any(self.rotation_deg) and not any(self.translation_mm)

    def to_sitk(self):
        """The SimpleITK transform reference position -> this position."""
        import SimpleITK as sitk

        t = sitk.Euler3DTransform()
        t.SetCenter([float(v) for v in self.centre_mm])
        t.SetRotation(*[math.radians(float(a)) for a in self.rotation_deg])
        t.SetTranslation([float(v) for v in self.translation_mm])
        return t

    def apply(self, points_lps_mm: np.ndarray) -> np.ndarray:
        """Points ``(..., 3)`` of the reference position, where they are in this one."""
        t = self.to_sitk()
        pts = np.asarray(points_lps_mm, dtype=float)
        flat = pts.reshape(-1, 3)
        return np.array([t.TransformPoint([float(v) for v in q]) for q in flat]).reshape(pts.shape)

    def to_dict(self) -> dict:
        return {
            "rotation_deg_about_lps_xyz": [round(float(v), 4) for v in self.rotation_deg],
            "translation_mm_lps": [round(float(v), 4) for v in self.translation_mm],
            "centre_mm_lps": [round(float(v), 4) for v in self.centre_mm],
        }


def sample_patient(
    anatomy: _Anatomy, grid: Grid, pose: RigidPose | None = None, *, with_activity: bool = True, oversample: bool = True
) -> SampledAnatomy:
    """The anatomy sampled on ``grid`` with the patient moved by ``pose`` (None: not moved).

    Without a pose this is :func:`sample_anatomy` itself. With one (the identity included,
    so that every time point of a cycle is sampled the same way), the anatomy is painted on
    an axis-aligned grid around the moved field of view, at half the spacing for small
    grids, then carried onto ``grid`` (SimpleITK): activity by cubic B-spline interpolation
    (it blurs less than linear; overshoots clipped at 0), density by linear interpolation
    (piecewise constant: no ringing at bone and lung edges), tissue codes and object ids by
    nearest neighbour, labels recomputed from those. The couch moves with the patient (it is part of the anatomy model).
    ``oversample=False`` paints at ``grid``'s own spacing (the SPECT projector's grid is
    already finer than the camera resolves).
    """
    if pose is None:
        return sample_anatomy(anatomy, grid, with_activity=with_activity)
    from spectdose.geometry import resample_to_grid

    forward = pose.to_sitk()
    inverse = forward.GetInverse()  # this position -> reference position: where to sample
    corners = np.array([inverse.TransformPoint([float(v) for v in c]) for c in grid.corners_lps_mm()])
    # Painting on a finer grid keeps the interpolation onto ``grid`` from blurring the truth
    # (linear interpolation at half-voxel offsets acts as a blur of ~0.5 voxel); affordable
    # for small grids, and clinical voxels are fine enough without it.
    factor = 2 if oversample and np.prod(grid.shape) <= _POSE_OVERSAMPLE_MAX_VOXELS else 1
    spacing_xyz = np.asarray(grid.spacing_mm[::-1]) / factor
    lo = corners.min(axis=0) - 2.0 * spacing_xyz
    hi = corners.max(axis=0) + 2.0 * spacing_xyz
    shape_xyz = np.ceil((hi - lo) / spacing_xyz).astype(int) + 1
    aux = Grid(tuple(int(n) for n in shape_xyz[::-1]), tuple(spacing_xyz[::-1]), tuple(lo),
               frame_of_reference_uid=grid.frame_of_reference_uid)
    s = sample_anatomy(anatomy, aux, with_activity=with_activity)

    def carry(array: np.ndarray, interpolation: str, fill: float) -> np.ndarray:
        # resample_to_grid wants the map target -> source: this position -> reference position
        vol = Volume(array, aux, "")
        return resample_to_grid(vol, grid, interpolation=interpolation, fill_value=fill, transform=inverse).array

    tissue = carry(s.tissue, "nearest", float(_T["air"])).astype(np.uint8)
    objects = carry(s.objects, "nearest", 0.0).astype(np.uint8)
    density = np.clip(carry(s.density_g_cm3, "linear", TISSUES["air"][1]), 0.0, None).astype(np.float32)
    activity = np.clip(carry(s.activity_bq_per_ml, "bspline", 0.0), 0.0, None).astype(np.float32)
    liver_lesions = [k for k, les in enumerate(anatomy.lesions) if les.location == "liver"]
    return SampledAnatomy(
        grid=grid,
        tissue=tissue,
        objects=objects,
        activity_bq_per_ml=activity,
        density_g_cm3=density,
        labels=_labels(objects, tissue, len(anatomy.lesions), liver_lesions),
    )


# The paper's true activity came from Ga-68 DOTATATE PET (Li et al. 2022, sec. 2.3), whose
# resolution (about 5-7 mm FWHM for clinical PET/CT, e.g. NEMA NU 2 figures of current
# scanners) is part of the truth every method was measured against. Our procedural truth is
# sharper than that; left so, DVK-on-SPECT errors came out far above the paper's (kidneys
# 18 % vs 3-5 %, see docs/phantom.md), so the truth is given a PET-like resolution. Activity
# stays inside the body.
TRUTH_RESOLUTION_FWHM_MM = 6.0


def _pet_like(activity: np.ndarray, grid: Grid, tissue: np.ndarray, fwhm_mm: float) -> np.ndarray:
    sigma_vox = [fwhm_mm / 2.3548 / s for s in grid.spacing_mm]
    smooth = ndimage.gaussian_filter(activity, sigma_vox, mode="nearest", truncate=3.0)
    outside = np.isin(tissue, [_T["air"], _T["couch"]])
    smooth[outside] = 0.0
    return smooth.astype(np.float32, copy=False)


def _labels(obj: np.ndarray, tissue: np.ndarray, n_lesions: int, liver_lesions: list[int]) -> dict[str, np.ndarray]:
    names = [v[0] for v in _VERTEBRAE]
    vert_ids = [_VERTEBRA_OBJ0 + i for i in range(len(_VERTEBRAE))]
    lumbar_ids = [_VERTEBRA_OBJ0 + names.index(n) for n in _LUMBAR_L2_L5]
    kidneys = np.isin(obj, [_OBJ["kidney_left"], _OBJ["kidney_right"]])
    spine = np.isin(obj, vert_ids)
    healthy_liver = obj == _OBJ["liver"]
    labels = {
        "body": (obj != 0) & (obj != _OBJ["couch"]),
        "lungs": np.isin(obj, [_OBJ["lung_left"], _OBJ["lung_right"]]),
        # the liver contour includes the lesions inside it; healthy liver excludes them
        "liver": healthy_liver | np.isin(obj, [_LESION_OBJ0 + k for k in liver_lesions]),
        "healthy_liver": healthy_liver,
        "spleen": obj == _OBJ["spleen"],
        "kidney_left": obj == _OBJ["kidney_left"],
        "kidney_right": obj == _OBJ["kidney_right"],
        "kidney_cortex": kidneys & (tissue == _T["kidney_cortex"]),
        "kidney_medulla": kidneys & (tissue == _T["kidney_medulla"]),
        "spine": spine,
        "spine_cortical": spine & (tissue == _T["cortical_bone"]),
        "spine_trabecular": spine & (tissue == _T["trabecular_bone"]),
        "lumbar_vertebrae": np.isin(obj, lumbar_ids),
        "ribs": obj == _OBJ["ribs"],
        "heart": obj == _OBJ["heart"],
        "stomach": obj == _OBJ["stomach"],
        "aorta": obj == _OBJ["aorta"],
        "bowel": np.isin(obj, [_OBJ["bowel"], _OBJ["gas"]]),
        "lesions": obj >= _LESION_OBJ0,
        "necrosis": (obj >= _LESION_OBJ0) & (tissue == _T["necrosis"]),
    }
    for name in _LUMBAR_L2_L5:
        labels[f"vertebra_{name}"] = obj == (_VERTEBRA_OBJ0 + names.index(name))
    for k in range(n_lesions):
        labels[f"lesion_{k + 1}"] = obj == (_LESION_OBJ0 + k)
    return labels


# =======================================================================================
# The patient on its CT grid
# =======================================================================================
def _grids(spec: PhantomSize, z_table_mm: float, frame_uid: str | None) -> tuple[Grid, Grid]:
    """CT and SPECT grids, both centred on the isocentre (x = y = 0) and on z_table."""
    def centred(shape, spacing):
        return tuple(-(n - 1) / 2.0 * s for n, s in zip(shape, spacing, strict=True))

    ct_c = centred(spec.ct_shape, spec.ct_spacing_mm)  # (z, y, x)
    ct = Grid(spec.ct_shape, spec.ct_spacing_mm, (ct_c[2], ct_c[1], ct_c[0] + z_table_mm), frame_of_reference_uid=frame_uid)
    sp = (spec.spect_spacing_mm,) * 3
    sp_c = centred(spec.spect_shape, sp)
    spect = Grid(spec.spect_shape, sp, (sp_c[2], sp_c[1], sp_c[0] + z_table_mm), frame_of_reference_uid=frame_uid)
    return ct, spect


def study_uids(seed: int, size: str, time_point: str | None = None) -> dict[str, str]:
    """Deterministic DICOM UIDs per (seed, size): rerunning a phantom gives the same study.

    ``time_point`` (e.g. ``"tp024h"``) gives each study of a cycle its own UIDs.
    """
    from pydicom.uid import generate_uid

    tag = [] if time_point is None else [str(time_point)]

    def uid(what: str) -> str:
        return str(generate_uid(entropy_srcs=["spectdose-phantom", str(int(seed)), size, *tag, what]))

    names = ("study", "frame_of_reference", "ct_series", "nm_series", "nm_instance", "seg_series", "seg_instance")
    return {name: uid(name) for name in names}


def make_virtual_patient(seed: int, size: str = "small", *, total_counts: float | None = None) -> VirtualPatient:
    """Build the virtual patient ``seed`` on the grids of ``size`` ("small" or "clinical").

    Pure and deterministic per seed: the same seed gives the same patient (the small size
    is the clinical anatomy scaled by ``SIZES['small'].anatomy_scale``). ``total_counts``
    (3-20 million in the paper) overrides the per-seed draw of the SPECT's total counts.

    Raises
    ------
    InputError
        Unknown size, negative seed, or total counts outside 1e5-1e9.
    """
    if size not in SIZES:
        raise InputError(f"unknown phantom size {size!r}: use one of {sorted(SIZES)}")
    if int(seed) != seed or seed < 0:
        raise InputError(f"phantom seed must be a non-negative integer, got {seed!r}")
    if total_counts is not None and not (1e5 <= float(total_counts) <= 1e9):
        raise InputError(f"total_counts must lie in 1e5-1e9 (paper: 3e6-2e7), got {total_counts!r}")
    spec = SIZES[size]
    anatomy = _build_anatomy(int(seed), spec)
    rng = np.random.default_rng([int(seed), 2])
    counts = float(round(math.exp(rng.uniform(math.log(3e6), math.log(20e6))), -3))
    if total_counts is not None:
        counts = float(total_counts)
    injected = _NOMINAL_ADMINISTERED_BQ * rng.uniform(0.97, 1.03)
    admin = dt.datetime(2024, 1, 8, 9, 0, 0) + dt.timedelta(days=int(seed) % 360, minutes=int(rng.integers(0, 240)))
    admin = admin.replace(microsecond=0)
    acq = (admin + dt.timedelta(hours=anatomy.hours)).replace(microsecond=0)
    return _patient_on_grids(int(seed), size, anatomy, counts, injected, admin, acq)


def _patient_on_grids(
    seed: int,
    size: str,
    anatomy: _Anatomy,
    counts: float,
    injected: float,
    admin: dt.datetime,
    acq: dt.datetime,
    *,
    pose: RigidPose | None = None,
    time_point: str | None = None,
    ct_noise_key: tuple[int, ...] = (),
    spec: PhantomSize | None = None,
) -> VirtualPatient:
    """The patient's truth and CT on its grids (moved by ``pose``; UIDs tagged by ``time_point``).

    ``spec`` gives grids of the patient's own (data set v2); default ``SIZES[size]``.
    """
    own_spec = spec
    spec = SIZES[size] if spec is None else spec
    frame_uid = study_uids(seed, size, time_point)["frame_of_reference"]
    ct_grid, spect_grid = _grids(spec, anatomy.z_table_mm, frame_uid)
    s = sample_patient(anatomy, ct_grid, pose)
    hu = _ct_numbers(s, np.random.default_rng([int(seed), 3, spec.ct_shape[1], *ct_noise_key]))
    lesions = []
    vox_ml = ct_grid.voxel_volume_ml
    for k, les in enumerate(anatomy.lesions):
        mask = s.labels[f"lesion_{k + 1}"]
        nec = mask & (s.tissue == _T["necrosis"])
        lesions.append(
            {
                "name": les.name,
                "volume_ml": float(mask.sum() * vox_ml),
                "nominal_volume_ml": float(les.nominal_volume_ml * spec.anatomy_scale**3),
                "location": les.location,
                "necrotic": les.necrotic_core is not None,
                "necrotic_volume_ml": float(nec.sum() * vox_ml),
                "centre_mm": [round(float(v), 2) for v in _posed(pose, anatomy.to_physical_mm(les.ellipsoid.centre))],
                "semi_axes_mm": [round(float(v) * spec.anatomy_scale, 2) for v in les.ellipsoid.semi],
                "concentration_bq_per_ml": float(les.conc_bq_ml),
            }
        )
    labels = dict(s.labels)
    return VirtualPatient(
        seed=int(seed),
        size=size,
        hu=Volume(hu, ct_grid, "HU"),
        density_g_cm3=Volume(s.density_g_cm3, ct_grid, "g/cm3"),
        activity_bq_per_ml=Volume(s.activity_bq_per_ml, ct_grid, "Bq/ml"),
        labels=labels,
        lesions=lesions,
        injected_activity_bq=float(round(injected, -5)),
        administration_datetime=admin,
        acquisition_datetime=acq,
        total_counts_target=counts,
        spect_grid=spect_grid,
        anatomy=anatomy,
        uptake_bq_per_ml={k: float(v) for k, v in anatomy.conc_bq_ml.items()},
        pose=pose,
        time_point=time_point,
        spec=own_spec,
    )


def _posed(pose: RigidPose | None, point_lps_mm: np.ndarray) -> np.ndarray:
    return point_lps_mm if pose is None or pose.is_identity else pose.apply(point_lps_mm)


# CT image noise: ~12 HU (low-dose SPECT/CT CT), with a short correlation length as a
# filtered-back-projection CT has. Sigma of the smoothing in voxels.
_CT_NOISE_HU = 12.0
_CT_NOISE_CORR_VOXELS = 0.7


def _ct_numbers(s: SampledAnatomy, rng: np.random.Generator) -> np.ndarray:
    """CT numbers whose Schneider density matches the truth density, plus CT noise."""
    hu = density_to_hu(s.density_g_cm3)
    noise = rng.standard_normal(s.grid.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, _CT_NOISE_CORR_VOXELS, _CT_NOISE_CORR_VOXELS))
    noise *= _CT_NOISE_HU / max(float(noise.std()), 1e-6)
    hu = hu + np.where(s.tissue == _T["air"], 0.2, 1.0).astype(np.float32) * noise
    return np.clip(np.rint(hu), -1024, 3071).astype(np.float32)
