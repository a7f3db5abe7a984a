"""Where the maximum lies, and the maxima a physicist quotes.

The hottest voxel of a SPECT-based dose map is often not a dose anyone should quote: SPECT
spill-over puts activity into lung or gas next to a hot organ, and the dose kernel's 1.04/rho
scaling then multiplies it (issue 18: 27 Gy in a lung voxel, rho 0.26, at the spleen). So the
summary, the report and the page say where each maximum lies (region, tissue class, density),
label a maximum in low-density tissue at a soft-tissue interface as such, and head with the
maximum in soft tissue (a stated density threshold) and the regions' D2.

All figures are taken on the grid of the dose delivered (the RT Dose), so the summary's
maximum is the RT Dose's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from spectdose.constants import LOW_DENSITY_CUTOFF_G_CM3
from spectdose.dose_grid import average_onto_grid
from spectdose.geometry import Volume

__all__ = [
    "SOFT_TISSUE_MIN_DENSITY_G_CM3",
    "BONE_MIN_DENSITY_G_CM3",
    "INTERFACE_RADIUS_MM",
    "tissue_class",
    "locate",
    "maxima_summary",
    "describe",
]

# Tissue classes by mass density (labels only; the dose itself uses the full density map).
# Adipose tissue is 0.95 g/cm3 and soft tissues 1.00-1.06 g/cm3, inflated lung 0.26 g/cm3
# (ICRU Report 44, 1989, tissue compositions; ICRP Publication 89, 2002, lung): 0.9 g/cm3 keeps
# fat and every soft tissue above the threshold and lung below it.
SOFT_TISSUE_MIN_DENSITY_G_CM3 = 0.9
# Spongiosa of the ICRP 110 reference adult is 1.18 g/cm3 and cortical bone 1.92 g/cm3
# (ICRP Publication 110, 2009, table A.1), soft tissue at most 1.06: above 1.2 g/cm3 is bone.
BONE_MIN_DENSITY_G_CM3 = 1.2
# A low-density maximum within this distance of soft tissue is called an interface maximum:
# about the spatial resolution (FWHM) of a Lu-177 SPECT with a medium-energy collimator,
# 10-15 mm (Ljungberg et al., MIRD Pamphlet 26, J Nucl Med 57 (2016) 151), over which
# activity spills out of an organ.
INTERFACE_RADIUS_MM = 10.0


def tissue_class(density_g_cm3: float) -> str:
    """``air``, ``lung/low-density``, ``soft tissue`` or ``bone`` (thresholds above)."""
    if density_g_cm3 < LOW_DENSITY_CUTOFF_G_CM3:
        return "air"
    if density_g_cm3 < SOFT_TISSUE_MIN_DENSITY_G_CM3:
        return "lung/low-density"
    if density_g_cm3 < BONE_MIN_DENSITY_G_CM3:
        return "soft tissue"
    return "bone"


def _regions_at(regions, index: Sequence[int]) -> list[tuple[str, int]]:
    """(name, voxel count) of the regions holding a CT voxel, the most specific (smallest) first."""
    if regions is None:
        return []
    out = []
    for r in regions.regions:
        box, local = r.bounds()
        if all(b.start <= i < b.stop for b, i in zip(box, index, strict=True)) and \
                local[tuple(i - b.start for b, i in zip(box, index, strict=True))]:
            out.append((r.name, int(np.count_nonzero(local))))
    return sorted(out, key=lambda x: x[1])


def _nearest_soft_tissue(density_ct: Volume, index: Sequence[int]) -> tuple[float, tuple[int, int, int]] | None:
    """Distance (mm) and CT index of the nearest soft-tissue-or-denser voxel within :data:`INTERFACE_RADIUS_MM`."""
    grid = density_ct.grid
    spacing = np.asarray(grid.spacing_mm)
    reach = np.ceil(INTERFACE_RADIUS_MM / spacing).astype(int)
    lo = np.maximum(np.asarray(index) - reach, 0)
    hi = np.minimum(np.asarray(index) + reach + 1, grid.shape)
    box = density_ct.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    hits = np.argwhere(box >= SOFT_TISSUE_MIN_DENSITY_G_CM3)
    if hits.size == 0:
        return None
    distance = np.sqrt((((hits + lo - np.asarray(index)) * spacing) ** 2).sum(axis=1))
    k = int(np.argmin(distance))
    if distance[k] > INTERFACE_RADIUS_MM:
        return None
    return float(distance[k]), tuple(int(v) for v in hits[k] + lo)


def locate(dose: Volume, density_out: np.ndarray, density_ct: Volume, regions, where: np.ndarray | None = None) -> dict | None:
    """The hottest voxel of ``dose`` (within ``where``): value, position, tissue, regions, interface.

    ``density_out`` is the density on the dose's grid (volume-weighted mean over each voxel);
    regions and the interface are looked up on the CT grid at the voxel's centre.
    """
    values = dose.array if where is None else np.where(where, dose.array, -np.inf)
    if values.size == 0:
        return None
    flat = int(np.argmax(values))
    # A finite maximum means there is a finite value: the whole grid is searched for one only when not.
    if not np.isfinite(values.flat[flat]) and not np.isfinite(values).any():
        return None
    index = np.unravel_index(flat, values.shape)
    lps = dose.grid.index_to_lps_mm(np.asarray(index))
    ct_index = tuple(int(v) for v in np.clip(np.rint(density_ct.grid.lps_mm_to_index(lps)), 0,
                                             np.asarray(density_ct.grid.shape) - 1))
    rho = float(density_out[index])
    tissue = tissue_class(rho)
    inside = _regions_at(regions, ct_index)
    out = {
        "value": float(dose.array[index]),
        "unit": dose.units,
        "index_zyx": [int(i) for i in index],
        "lps_mm": [round(float(v), 1) for v in lps],
        "density_g_cm3": round(rho, 3),
        "tissue": tissue,
        "region": inside[0][0] if inside else None,
        "regions": [name for name, _ in inside],
        "interface": None,
    }
    if tissue in ("air", "lung/low-density"):
        near = _nearest_soft_tissue(density_ct, ct_index)
        if near is not None:
            neighbours = _regions_at(regions, near[1])
            # The region it borders: the most specific one that does not hold the maximum itself.
            other = next((name for name, _ in neighbours if name not in out["regions"]), None)
            out["interface"] = {"distance_mm": round(near[0], 1), "soft_tissue_region": other}
    return out


def describe(loc: dict | None, *, digits: int = 3) -> str:
    """One line a physicist reads: value, tissue and density, region, interface and what it means."""
    if loc is None:
        return "n/a"
    text = (f"{loc['value']:.{digits}g} {loc['unit']} in {loc['tissue']} (density {loc['density_g_cm3']:.2f} g/cm3)"
            + (f", region {loc['region']}" if loc.get("region") else ", outside every region")
            + f", at LPS ({', '.join(f'{v:.0f}' for v in loc['lps_mm'])}) mm")
    iface = loc.get("interface")
    if iface:
        text += (f"; at the interface with soft tissue{' of ' + iface['soft_tissue_region'] if iface.get('soft_tissue_region') else ''}"
                 f" ({iface['distance_mm']:.0f} mm away): SPECT spill-over into low-density tissue, not a dose to quote")
    elif loc["tissue"] in ("air", "lung/low-density"):
        text += "; in low-density tissue: check before quoting"
    return text


def maxima_summary(dose: Volume, density_ct: Volume, regions, *, grid_name: str) -> dict:
    """The summary's ``maxima`` block for ``dose`` on the delivered grid (Gy or mGy/h).

    ``density_ct`` is the mass density on the CT grid; ``regions`` the region set on the CT grid or None.
    """
    density_out = average_onto_grid(density_ct, dose.grid).array
    soft = density_out >= SOFT_TISSUE_MIN_DENSITY_G_CM3
    overall = locate(dose, density_out, density_ct, regions)
    if overall is not None and soft[tuple(overall["index_zyx"])]:
        # The first hottest voxel of the grid is in soft tissue, so it is the first hottest there too.
        in_soft = copy.deepcopy(overall)
    else:
        in_soft = locate(dose, density_out, density_ct, regions, where=soft) if soft.any() else None
    return {
        "grid": grid_name,
        "unit": dose.units,
        "max": overall["value"] if overall else 0.0,
        "max_location": overall,
        "max_location_text": describe(overall),
        "max_in_soft_tissue": in_soft["value"] if in_soft else None,
        "max_in_soft_tissue_location": in_soft,
        "max_in_soft_tissue_text": describe(in_soft),
        "soft_tissue_min_density_g_cm3": SOFT_TISSUE_MIN_DENSITY_G_CM3,
        "interface_radius_mm": INTERFACE_RADIUS_MM,
    }
