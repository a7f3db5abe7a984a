"""Automatic lesion regions: hot spots in the activity on the CT grid, for a physicist to correct.

Method (stated in every output that carries it, see docs/regions.md):

1. Background ``B0``: the median activity concentration in tissue (density >= 0.1 g/cm3).
2. Seeds: local maxima (over a cube of 2 x ``seed_radius_mm`` + 1 voxel) at least
   ``seed_ratio`` x ``B0``, taken hottest first.
3. For each seed with maximum ``M``, a local background ``B`` is the median over a cube of
   +-``background_radius_mm`` around it; the region is the connected component (26-
   neighbourhood) containing the seed of the voxels at or above ``B + f (M - B)`` with
   ``f`` = 0.40, inside that cube, minus voxels already given to a hotter seed.
   This is the source-to-background adaptive threshold of Nestle et al. (J Nucl Med 2005,
   46:1342), with the 40 % fraction of the fixed-threshold method (Erdi et al., Cancer
   1997, 80:2505).
4. Components smaller than ``min_volume_ml`` (1 ml) are dropped.

Physiological uptake (kidneys, spleen, liver, bladder) is as hot as lesions under a
somatostatin-receptor ligand, so such organs can come out as regions too: the result is a
starting point that is labelled AUTOMATIC, never a diagnosis.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

__all__ = ["LesionMethod", "segment_hot_spots"]


@dataclasses.dataclass(frozen=True)
class LesionMethod:
    """Parameters of the hot-spot segmentation (defaults as in the module docstring)."""

    fraction: float = 0.40
    seed_ratio: float = 4.0
    seed_radius_mm: float = 10.0
    background_radius_mm: float = 30.0
    min_volume_ml: float = 1.0
    max_regions: int = 50

    def describe(self) -> str:
        return (
            f"hot spots: local maxima >= {self.seed_ratio:g} x median tissue activity; region = connected voxels >= "
            f"B + {self.fraction:.0%} (max - B), B = median within +-{self.background_radius_mm:g} mm "
            f"(Nestle 2005, Erdi 1997); components >= {self.min_volume_ml:g} ml"
        )


def segment_hot_spots(
    activity_bq_per_ml: np.ndarray,
    spacing_mm: tuple[float, float, float],
    tissue: np.ndarray,
    method: LesionMethod | None = None,
) -> list[np.ndarray]:
    """Masks of automatic lesion regions, hottest first (see the module docstring).

    Parameters
    ----------
    activity_bq_per_ml : (k, j, i) activity concentration on the CT grid, Bq/ml.
    spacing_mm : voxel spacing (k, j, i), mm.
    tissue : boolean (k, j, i) mask of tissue (density >= 0.1 g/cm3); outside it nothing is segmented.
    method : the parameters; :class:`LesionMethod` defaults when None.

    Returns
    -------
    list of boolean arrays of the grid's shape, disjoint.
    """
    method = method or LesionMethod()
    a = np.where(tissue, activity_bq_per_ml, 0.0).astype(np.float64)
    if not tissue.any() or a.max() <= 0:
        return []
    spacing = np.asarray(spacing_mm, dtype=float)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    background0 = float(np.median(a[tissue]))
    seed_size = np.maximum(1, 2 * np.round(method.seed_radius_mm / spacing).astype(int) + 1)
    peaks = (a == ndimage.maximum_filter(a, size=tuple(seed_size))) & (a >= method.seed_ratio * max(background0, 1e-12))
    seeds = np.argwhere(peaks)
    seeds = seeds[np.argsort(-a[tuple(seeds.T)])]
    half = np.round(method.background_radius_mm / spacing).astype(int)
    taken = np.zeros(a.shape, dtype=bool)
    regions = []
    structure = np.ones((3, 3, 3), dtype=bool)
    for seed in seeds:
        if taken[tuple(seed)] or len(regions) >= method.max_regions:
            continue
        lo = np.maximum(seed - half, 0)
        hi = np.minimum(seed + half + 1, a.shape)
        box = tuple(slice(int(low), int(high)) for low, high in zip(lo, hi, strict=True))
        local = a[box]
        peak = float(a[tuple(seed)])
        background = float(np.median(local[tissue[box]])) if tissue[box].any() else background0
        above = (local >= background + method.fraction * (peak - background)) & ~taken[box] & tissue[box]
        labels, _ = ndimage.label(above, structure=structure)
        label = labels[tuple(seed - lo)]
        if label == 0:
            continue
        component = labels == label
        taken_box = taken[box]
        taken_box |= component  # a seed inside a dropped small component is not tried again
        if component.sum() * voxel_ml < method.min_volume_ml:
            continue
        mask = np.zeros(a.shape, dtype=bool)
        mask[box] = component
        regions.append(mask)
    return regions
