"""Spherical VOIs in a uniform region, for ensemble noise as the paper measures it.

Li et al. (Med Phys 49 (2022) 1216, sec. 2.6) take ensemble noise "in a uniform background
VOI". The whole healthy liver is not one: at its rim and around its lesions SPECT blur mixes
in the activity outside, and each method's edge blur changes the variance there differently.
Spheres set well inside it, away from every edge and lesion, see the uniform parenchyma only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt

from spectdose.errors import InputError

__all__ = ["SphereVois", "place_spheres", "SPHERE_COUNT", "SPHERE_RADIUS_MM", "SPHERE_MARGIN_MM"]

# Three spheres per patient: the paper averages noise over a few background VOIs; three fit
# in most adult livers at the radius and margin below (issue 17).
SPHERE_COUNT = 3
# 10 mm radius (4.2 ml): big enough for a stable variance (~1,470 CT voxels at 0.98 x 0.98 x
# 3 mm, ~150 at v2's coarsest 2.9 x 2.9 x 3.75 mm), small enough that three fit in adult livers
# (v2 test patients 2201/2202: centres 24-34 mm deep). The small phantoms' livers (anatomy
# shrunk by 48/81, deepest point 15-19 mm) hold none.
SPHERE_RADIUS_MM = 10.0
# Clearance beyond the radius to anything outside the region: about one SPECT FWHM (the
# phantoms' effective reconstructed FWHM is ~11 mm, spectdose/phantoms/anatomy.py), so
# edge blur and spill-in from lesions and neighbouring organs stay out of the spheres.
SPHERE_MARGIN_MM = 10.0


@dataclasses.dataclass(frozen=True)
class SphereVois:
    """Spheres placed by :func:`place_spheres`.

    ``labels`` has the region's shape: 0 outside every sphere, ``k`` inside sphere ``k``
    (1-based, in the order placed). ``centres_vox`` are voxel indices (slice, row, column);
    ``depth_mm`` is each centre's distance to the nearest voxel outside the region, and
    ``max_depth_mm`` the largest such distance in the whole region (what limits the fit).
    """

    labels: np.ndarray
    centres_vox: tuple[tuple[int, int, int], ...]
    depth_mm: tuple[float, ...]
    radius_mm: float
    margin_mm: float
    requested: int
    max_depth_mm: float

    @property
    def count(self) -> int:
        return len(self.centres_vox)

    @property
    def union(self) -> np.ndarray:
        """Boolean mask of all spheres together."""
        return self.labels > 0

    def masks(self) -> list[np.ndarray]:
        """One boolean mask per sphere, in the order placed."""
        return [self.labels == k for k in range(1, self.count + 1)]

    def shortfall(self) -> str | None:
        """Why fewer spheres than requested were placed, or None when all fit."""
        if self.count >= self.requested:
            return None
        need = self.radius_mm + self.margin_mm
        return (
            f"{self.count} of {self.requested} spheres of {self.radius_mm:g} mm radius fit with {self.margin_mm:g} mm "
            f"clearance (centre >= {need:g} mm from the region's edge; its deepest point is {self.max_depth_mm:.1f} mm)"
        )


def place_spheres(
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    n: int = SPHERE_COUNT,
    radius_mm: float = SPHERE_RADIUS_MM,
    margin_mm: float = SPHERE_MARGIN_MM,
) -> SphereVois:
    """Up to ``n`` non-overlapping spheres deep inside ``mask``, greedily at the distance maximum.

    Parameters
    ----------
    mask : (Z, Y, X) bool array
        The uniform region (e.g. the healthy liver: liver minus lesions). Voxels beyond the
        array count as outside it.
    spacing_mm : (3,) float
        Voxel spacing (slice, row, column) in mm.
    n, radius_mm, margin_mm
        Number of spheres, their radius (mm), and the clearance (mm) each sphere keeps from
        anything outside ``mask``: a centre lies at least ``radius_mm + margin_mm`` from the
        nearest outside voxel.

    Returns
    -------
    SphereVois
        The spheres; fewer than ``n`` (possibly none) when the region is too small, with
        :meth:`SphereVois.shortfall` saying why.

    Raises
    ------
    InputError
        ``mask`` not 3-D, spacing not three positive numbers, ``n`` outside 1-255, ``radius_mm`` <= 0
        or ``margin_mm`` < 0.

    Notes
    -----
    The first centre is the voxel deepest in the region (Euclidean distance transform in mm);
    each next one is the deepest voxel that keeps the clearance and lies more than
    ``2 * radius_mm`` from every earlier centre, so spheres never overlap. Ties go to the first
    voxel in C order: the same mask always gives the same spheres. A sphere holds the voxels
    whose centres lie within ``radius_mm`` of its centre.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise InputError(
            f"the region for noise spheres must be a 3-D mask, got {mask.ndim} dimensions"
        )
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise InputError(f"spacing_mm must be three positive numbers (mm), got {tuple(spacing_mm)}")
    if int(n) != n or not 1 <= n <= 255:  # labels are uint8
        raise InputError(f"number of spheres must be an integer in 1-255, got {n!r}")
    if not radius_mm > 0 or not margin_mm >= 0:
        raise InputError(
            f"sphere radius must be > 0 and margin >= 0 mm, got {radius_mm!r} and {margin_mm!r}"
        )
    labels = np.zeros(mask.shape, dtype=np.uint8)
    if not mask.any():
        return SphereVois(labels, (), (), float(radius_mm), float(margin_mm), int(n), 0.0)
    # Work in the region's bounding box, padded by one outside voxel on each side so that
    # the array's border counts as outside (the distance transform only sees zeros).
    occupied = [
        np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)
    ]
    lo = [int(o[0]) for o in occupied]
    hi = [int(o[-1]) + 1 for o in occupied]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sub = np.pad(mask[box], 1)
    depth = distance_transform_edt(sub, sampling=spacing)
    max_depth = float(depth.max())
    candidates = depth >= radius_mm + margin_mm
    coords = np.ogrid[tuple(slice(0, s) for s in sub.shape)]
    sub_labels = np.zeros(sub.shape, dtype=np.uint8)
    centres, depths = [], []
    while len(centres) < n and candidates.any():
        c = np.unravel_index(int(np.argmax(np.where(candidates, depth, -1.0))), sub.shape)
        d2 = sum(((coords[a] - c[a]) * spacing[a]) ** 2 for a in range(3))
        sub_labels[(d2 <= radius_mm**2) & sub] = len(centres) + 1
        candidates &= d2 > (2.0 * radius_mm) ** 2
        centres.append(tuple(int(c[a]) - 1 + lo[a] for a in range(3)))
        depths.append(float(depth[c]))
    labels[box] = sub_labels[1:-1, 1:-1, 1:-1]
    return SphereVois(
        labels, tuple(centres), tuple(depths), float(radius_mm), float(margin_mm), int(n), max_depth
    )
