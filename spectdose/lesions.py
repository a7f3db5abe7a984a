"""Automatic regions: focal hot spots in the activity on the CT grid, for a physicist to review.

They are candidates, never a diagnosis: every output labels them "unreviewed, automatic" with
their anatomical location, and the SR does not code them as neoplasms (docs/regions.md).

Candidates (unchanged since issue 11):

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

Physiological uptake left out (issue 18; rules on the SPECT and the CT, no patient-specific
tuning; each reason is kept with the hot spot):

* **Low uptake** (bowel, blood pool, noise): a hot spot whose peak is below ``organ_ratio``
  (0.5) x the liver level (:func:`organ_reference`: the level of the organ holding most of
  the soft-tissue activity). Krenning grade >= 2 (uptake at least the liver's) is what makes
  a NET lesion SSTR-positive; half of it leaves room for small lesions' partial-volume loss.
* **Organ background** (liver texture, the inside of any uptaking organ): a hot spot must
  stand out from what surrounds it. Its peak over the 75th percentile of the tissue in a
  shell 5-20 mm outside it must be >= ``contrast_min`` (2). This is the Krenning scale's
  line between "as the liver" and "above the liver" for NET lesions (Krenning et al., Ann
  N Y Acad Sci 1994, 733:416; grade 3 = uptake above the liver); the 75th percentile keeps
  the organ's level when the hot spot sits at the organ's edge next to fat.
* **Bone marrow** (vertebrae, pelvis): a hot spot mostly in bone (CT density >= 1.1 g/cm3)
  whose peak is below ``bone_ratio`` (3) x the marrow reference (90th percentile of the
  activity in bone voxels) is marrow uptake; focal bone metastases of NET are far above
  marrow (marrow/liver ~0.05-0.3 under Lu-177 DOTATATE, tumour/liver 3-15: see
  spectdose.phantoms.anatomy for the sources).
* **Not focal** (a texture or noise peak on an organ's plateau, e.g. the liver): the region's
  mean below ``focality_min`` (0.55) x its peak. A blurred focal source thresholded at 40 %
  has a mean of ~0.6-0.7 of its peak; a peak on a plateau drags a wide region whose mean is
  the plateau.
* **Kidneys and spleen**: the organs with the highest physiological uptake of
  somatostatin-receptor ligands. A soft-tissue hot spot whose centre lies in the renal
  fossae (15-65 % of the body's half-width from the spine's midline, behind the front of the
  vertebral bodies) or the splenic bed (left, 40-90 % out, behind the body's coronal
  midplane) is taken as an organ unless it stands alone
  in fat (peak >= ``isolated_contrast``, 25, x its surroundings). A lesion there that is not
  isolated is missed by the automatic regions (docs/regions.md). The spine comes from the CT
  (bone near the midline, in the body's posterior part).

The rules' numbers were chosen on virtual patients (small seeds 3, 5, 8, 11; clinical seed
21) and checked on others (docs/regions.md has the precision and recall).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from spectdose.constants import LOW_DENSITY_CUTOFF_G_CM3

__all__ = ["LesionMethod", "HotSpot", "BodyFrame", "find_hot_spots", "segment_hot_spots", "classify_location",
           "body_frame", "LOW_DENSITY"]

LOW_DENSITY = LOW_DENSITY_CUTOFF_G_CM3
# CT density classes (g/cm3) for a region's location: lung below 0.6 (inflated lung ~0.26),
# fat 0.6-0.985 (adipose ~0.95), soft tissue 0.985-1.1 (water 1.0, organs 1.03-1.06), bone from
# 1.1 (trabecular ~1.18, cortical ~1.92); ICRU 46 / ICRP 110 tissue densities.
_DENSITY_CLASSES = ((0.6, "lung"), (0.985, "fat"), (1.1, "soft tissue"), (np.inf, "bone"))
_BODY_DENSITY = 0.6  # body outline (without lungs) for the body frame


@dataclasses.dataclass(frozen=True)
class LesionMethod:
    """Parameters of the hot-spot segmentation and of the physiological-uptake rules (module docstring)."""

    fraction: float = 0.40
    seed_ratio: float = 4.0
    seed_radius_mm: float = 10.0
    background_radius_mm: float = 30.0
    min_volume_ml: float = 1.0
    max_regions: int = 50
    contrast_min: float = 2.0
    focality_min: float = 0.55
    bone_ratio: float = 3.0
    isolated_contrast: float = 25.0
    organ_ratio: float = 0.5
    exclude_physiological: bool = True

    def describe(self) -> str:
        text = (
            f"hot spots: local maxima >= {self.seed_ratio:g} x median tissue activity; region = connected voxels >= "
            f"B + {self.fraction:.0%} (max - B), B = median within +-{self.background_radius_mm:g} mm "
            f"(Nestle 2005, Erdi 1997); components >= {self.min_volume_ml:g} ml"
        )
        if self.exclude_physiological:
            text += (f"; left out: peak < {self.contrast_min:g} x surroundings, marrow-level bone uptake, "
                     "kidney and spleen regions")
        return text


@dataclasses.dataclass
class BodyFrame:
    """Where the body and its spine are in LPS (mm), from the CT: the frame for locations."""

    centre_x: float
    centre_y: float
    half_width_mm: float
    depth_mm: float
    spine_x: float | None
    spine_y: float | None
    spine_front_y: float | None  # the front (anterior edge) of the vertebral bodies

    @property
    def midline_x(self) -> float:
        return self.spine_x if self.spine_x is not None else self.centre_x


@dataclasses.dataclass
class HotSpot:
    """One candidate: where it is (a component in a box of the grid), its size, uptake contrast,
    location and, when left out, why. Kept box-local: a clinical grid holds ~34 M voxels, and
    hundreds of full-size candidate masks would not fit in memory."""

    box: tuple[slice, slice, slice]
    component: np.ndarray
    shape: tuple[int, int, int]
    volume_ml: float
    peak_bq_per_ml: float
    contrast: float
    location: str
    excluded: str | None = None  # why it was left out (None: kept)
    rule: str | None = None  # which rule left it out, in a word or two

    @property
    def mask(self) -> np.ndarray:
        """The full-size boolean mask (made on each call)."""
        out = np.zeros(self.shape, dtype=bool)
        out[self.box] = self.component
        return out


def body_frame(density_g_cm3: np.ndarray, grid) -> BodyFrame | None:
    """Body centre, width and depth, and the spine's midline, from the CT densities (LPS mm)."""
    step = np.maximum(1, np.round(4.0 / np.asarray(grid.spacing_mm)).astype(int))
    sub = density_g_cm3[::step[0], ::step[1], ::step[2]]
    body = sub >= _BODY_DENSITY
    if body.sum() < 10:
        return None
    index = np.argwhere(body) * step
    lps = grid.index_to_lps_mm(index)
    x, y = lps[:, 0], lps[:, 1]
    x_lo, x_hi = np.percentile(x, [2, 98])
    y_lo, y_hi = np.percentile(y, [2, 98])
    frame = BodyFrame(float((x_lo + x_hi) / 2), float((y_lo + y_hi) / 2), float((x_hi - x_lo) / 2),
                      float(y_hi - y_lo), None, None, None)
    bone = sub[tuple((index // step).T)] >= _DENSITY_CLASSES[2][0]
    near = bone & (np.abs(x - frame.centre_x) < 0.15 * frame.half_width_mm) & (y > frame.centre_y - 0.05 * frame.depth_mm)
    if near.sum() >= 5:
        frame.spine_x = float(np.median(x[near]))
        frame.spine_y = float(np.median(y[near]))
        frame.spine_front_y = float(np.percentile(y[near], 5))
    return frame


def _density_class(density: np.ndarray) -> tuple[str, dict[str, float]]:
    shares, lo = {}, -np.inf
    for hi, name in _DENSITY_CLASSES:
        shares[name] = float(((density >= lo) & (density < hi)).mean()) if density.size else 0.0
        lo = hi
    return max(shares, key=shares.get), shares


def _place(centre_lps: np.ndarray, frame: BodyFrame | None) -> tuple[str, str | None]:
    """(position words, organ zone or None) of a centre in the body frame."""
    if frame is None:
        return "", None
    dx = (float(centre_lps[0]) - frame.midline_x) / frame.half_width_mm  # + = patient left (LPS)
    side = "midline" if abs(dx) < 0.15 else ("left" if dx > 0 else "right")
    ap = "posterior" if centre_lps[1] > frame.centre_y else "anterior"
    zone = None
    front = frame.spine_front_y if frame.spine_front_y is not None else frame.centre_y
    # Renal fossae on both sides: 15-65 % of the half-width out, behind the front of the
    # vertebral bodies. The splenic bed on the left: 40-90 % out (to the lateral body wall),
    # behind the body's coronal midplane (the spleen reaches further forward than the kidneys).
    if 0.15 <= abs(dx) <= 0.65 and centre_lps[1] >= front:
        zone = "kidney or spleen region" if dx > 0 else "kidney region"
    elif 0.40 <= dx <= 0.90 and centre_lps[1] >= frame.centre_y:
        zone = "kidney or spleen region"
    return f"{side} {ap}", zone


def classify_location(mask: np.ndarray, density_g_cm3: np.ndarray, grid, frame: BodyFrame | None = None,
                      offset_kji: np.ndarray | None = None) -> str:
    """Where a region lies on the CT: density class of most of its voxels, side, depth, zone, z.

    e.g. "soft tissue, left posterior (kidney region), z -40 mm". Zones are the places of
    the organs with physiological uptake (kidneys, spleen) in the body frame of the CT.
    ``mask`` and ``density_g_cm3`` may be a box of the grid starting at ``offset_kji``.
    """
    if frame is None:
        frame = body_frame(density_g_cm3, grid)
    cls, shares = _density_class(density_g_cm3[mask])
    centre = grid.index_to_lps_mm(np.argwhere(mask).mean(axis=0) + (0 if offset_kji is None else offset_kji))
    words, zone = _place(centre, frame)
    text = f"{cls} {shares[cls]:.0%}"
    if words:
        text += f", {words}" + (f" ({zone})" if zone else "")
    return text + f", z {centre[2]:.0f} mm"


def organ_reference(activity_bq_per_ml: np.ndarray, density_g_cm3: np.ndarray, background_bq_per_ml: float) -> float:
    """The activity level of the organ that holds most of the soft-tissue activity (the liver
    under SSTR ligands): the mode of the activity-weighted histogram of log activity (3-voxel
    mean) over soft-tissue voxels at >= 3 x the median tissue activity. 0 when there are none."""
    soft = (density_g_cm3 >= _DENSITY_CLASSES[1][0]) & (density_g_cm3 < _DENSITY_CLASSES[2][0])
    smooth = ndimage.uniform_filter(activity_bq_per_ml.astype(np.float32, copy=False), 3)
    values = smooth[soft & (smooth >= 3.0 * background_bq_per_ml) & (smooth > 0)].astype(np.float64)
    if values.size < 100:
        return 0.0
    counts, edges = np.histogram(np.log(values), bins=100, weights=values)
    peak = int(np.argmax(ndimage.gaussian_filter1d(counts, 2)))
    return float(np.exp((edges[peak] + edges[peak + 1]) / 2))


def _median(values: np.ndarray, *, overwrite: bool = False) -> float:
    """``np.median(values.astype(np.float64))`` without the float64 copy: float32 -> float64 is exact
    and keeps the order, so the middle value(s) are found in the values' own precision and averaged
    in float64 as np.median does (NaN when any value is NaN, as np.median). ``overwrite``: a
    temporary (a boolean index's copy) is partitioned in place instead of copied again."""
    n = values.size
    if n == 0:
        return float("nan")
    k = n // 2
    kth = sorted({k - 1 if n % 2 == 0 else k, k, n - 1})
    part = values.reshape(-1) if overwrite else np.partition(values.reshape(-1), kth)
    if overwrite:
        part.partition(kth)
    if np.isnan(part[-1]):
        return float("nan")
    return float(part[k]) if n % 2 else (float(part[k - 1]) + float(part[k])) / 2.0


def _seed_peaks(a: np.ndarray, hot: np.ndarray, seed_size: np.ndarray) -> np.ndarray:
    """Indices (C order) of the hot voxels that equal the maximum of their ``seed_size`` cube (clipped
    to the grid), as ``(a == maximum_filter(a, seed_size)) & hot`` finds them.

    A clinical study has ~10^6 hot voxels but ~10^2 local maxima: only a voxel at least as high as
    its face neighbours (which lie in its cube) can be one, so those few are found first, axis by
    axis, and their cubes searched, instead of filtering the whole box of the hot voxels."""
    values = a.reshape(-1)
    flat = np.flatnonzero(hot)
    half = seed_size // 2
    stride = 1
    for axis in (2, 1, 0):
        n = a.shape[axis]
        for step in (-1, 1) if half[axis] > 0 else ():  # a cube one voxel thick holds no neighbour on this axis
            coord = (flat // stride) % n
            inside = (coord + step >= 0) & (coord + step < n)
            neighbour = np.where(inside, flat + step * stride, flat)
            flat = flat[values[neighbour] <= values[flat]]
        stride *= n
    shape = np.array(a.shape)
    peaks = []
    for index in np.stack(np.unravel_index(flat, a.shape), axis=1):
        lo = np.maximum(index - half, 0)
        hi = np.minimum(index + half + 1, shape)
        if a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].max() <= a[tuple(index)]:
            peaks.append(index)
    return np.array(peaks, dtype=np.intp).reshape(-1, 3)


def _shell_background(a: np.ndarray, tissue: np.ndarray, box: tuple[slice, ...], component: np.ndarray,
                      spacing: np.ndarray) -> float:
    """75th percentile of the tissue activity 5-20 mm outside a component (0 when there is none)."""
    pad = np.ceil(20.0 / spacing).astype(int) + 1
    where = np.argwhere(component) + np.array([b.start for b in box])
    lo = np.maximum(where.min(axis=0) - pad, 0)
    hi = np.minimum(where.max(axis=0) + pad + 1, a.shape)
    outer = tuple(slice(int(low), int(high)) for low, high in zip(lo, hi, strict=True))
    inside = np.zeros(tuple(hi - lo), dtype=bool)
    inside[tuple(where.T - lo[:, None])] = True
    distance = ndimage.distance_transform_edt(~inside, sampling=spacing)
    shell = (distance > 5.0) & (distance <= 20.0) & tissue[outer]
    return float(np.percentile(a[outer][shell].astype(np.float64), 75)) if shell.any() else 0.0


def _candidates(a: np.ndarray, tissue: np.ndarray, spacing: np.ndarray,
                method: LesionMethod, background0: float | None = None) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """(box, component in the box) of each candidate, hottest seed first.

    ``a`` may be float32: thresholds and medians are taken in float64 (as on a float64 copy).
    ``background0``: the median tissue activity, when the caller has it."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if background0 is None:
        background0 = _median(a[tissue], overwrite=True)
    seed_size = np.maximum(1, 2 * np.round(method.seed_radius_mm / spacing).astype(int) + 1)
    seed_min = np.float64(method.seed_ratio * max(background0, 1e-12))  # a float64 scalar: compared in float64
    # Seeds are local maxima among the hot voxels, hottest first.
    seeds = _seed_peaks(a, a >= seed_min, seed_size)
    seeds = seeds[np.argsort(-a[tuple(seeds.T)].astype(np.float64))]
    half = np.round(method.background_radius_mm / spacing).astype(int)
    taken = np.zeros(a.shape, dtype=bool)
    regions = []
    structure = np.ones((3, 3, 3), dtype=bool)
    for seed in seeds:
        if taken[tuple(seed)] or len(regions) >= 4 * method.max_regions:
            continue
        lo = np.maximum(seed - half, 0)
        hi = np.minimum(seed + half + 1, a.shape)
        box = tuple(slice(int(low), int(high)) for low, high in zip(lo, hi, strict=True))
        local, local_tissue = a[box], tissue[box]
        peak = float(a[tuple(seed)])
        background = _median(local[local_tissue], overwrite=True) if local_tissue.any() else background0
        # The threshold is a float64 scalar: float32 voxels are compared with it in float64.
        threshold = np.float64(background + method.fraction * (peak - background))
        above = (local >= threshold) & ~taken[box] & local_tissue
        labels, _ = ndimage.label(above, structure=structure)
        label = labels[tuple(seed - lo)]
        if label == 0:
            continue
        component = labels == label
        taken_box = taken[box]
        taken_box |= component  # a seed inside a dropped small component is not tried again
        if component.sum() * voxel_ml < method.min_volume_ml:
            continue
        regions.append((box, component))
    return regions


def _tissue_box(tissue: np.ndarray, margin: np.ndarray) -> tuple[slice, slice, slice]:
    """The box of the grid holding every tissue voxel, widened by ``margin`` voxels (clipped to the
    grid). Outside tissue the activity is set to 0, so the hot-spot search is the same in it as on
    the whole grid; a clinical CT is mostly air around the body."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(tissue.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = (int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, 0)
        box.append(slice(max(0, lo - int(margin[axis])), min(tissue.shape[axis], hi + int(margin[axis]))))
    return tuple(box)


def _search_margin(spacing: np.ndarray, method: LesionMethod) -> np.ndarray:
    """Voxels of air kept around the tissue box: the seed filter's half-width and the 3-voxel
    smoothing of :func:`organ_reference` then see the same neighbourhood as on the whole grid."""
    return np.maximum(1, np.round(method.seed_radius_mm / spacing).astype(int)) + 1


def find_hot_spots(
    activity_bq_per_ml: np.ndarray,
    grid,
    density_g_cm3: np.ndarray,
    method: LesionMethod | None = None,
    *,
    measure_all: bool = False,
) -> list[HotSpot]:
    """Every candidate hot spot, hottest first, with its location and (when left out) the reason.

    The search runs in the box around the tissue (:func:`_tissue_box`), in the activity's
    precision (float32 stays float32; statistics are taken in float64); each hot spot's box is
    on the whole grid. A hot spot left out as low uptake (the first rule) has its surroundings
    measured only with ``measure_all`` (an evaluation's table): else its ``contrast`` is NaN,
    which no rule reads (most candidates of a clinical study end there)."""
    method = method or LesionMethod()
    full_tissue = density_g_cm3 >= LOW_DENSITY
    if not full_tissue.any():
        return []
    spacing = np.asarray(grid.spacing_mm, dtype=float)
    crop = _tissue_box(full_tissue, _search_margin(spacing, method))
    offset = np.array([b.start for b in crop])
    tissue = full_tissue[crop]
    density = density_g_cm3[crop]
    activity = activity_bq_per_ml[crop]
    dtype = np.float32 if activity.dtype == np.float32 else np.float64
    a = np.where(tissue, activity, dtype(0)).astype(dtype, copy=False)
    if a.max() <= 0:
        return []
    frame = body_frame(density_g_cm3, grid)
    bone = density >= _DENSITY_CLASSES[2][0]
    marrow_reference = float(np.percentile(a[bone].astype(np.float64), 90)) if bone.any() else 0.0
    background0 = _median(a[tissue], overwrite=True)
    organ_level = organ_reference(a, density, background0)
    out = []
    for box, component in _candidates(a, tissue, spacing, method, background0):
        values = a[box][component].astype(np.float64)
        peak = float(values.max())
        low_uptake = method.exclude_physiological and peak < method.organ_ratio * organ_level
        if low_uptake and not measure_all:
            contrast = float("nan")
        else:
            background = _shell_background(a, tissue, box, component, spacing)
            contrast = peak / background if background > 0 else float("inf")
        cls, shares = _density_class(density[box][component])
        full_box = tuple(slice(b.start + int(o), b.stop + int(o)) for b, o in zip(box, offset, strict=True))
        corner = np.array([b.start for b in full_box])
        centre = grid.index_to_lps_mm(np.argwhere(component).mean(axis=0) + corner)
        _, zone = _place(centre, frame)
        spot = HotSpot(full_box, component, activity_bq_per_ml.shape, float(component.sum()) * grid.voxel_volume_ml,
                       peak, contrast, classify_location(component, density[box], grid, frame, corner))
        if method.exclude_physiological:
            focality = float(values.mean()) / peak
            if low_uptake:
                spot.rule = "low uptake"
                spot.excluded = f"peak {peak / organ_level:.2f} x the liver level (uptake below the liver's)"
            elif contrast < method.contrast_min:
                spot.rule = "organ background"
                spot.excluded = f"peak only {contrast:.1f} x its surroundings (organ background)"
            elif focality < method.focality_min:
                spot.rule = "not focal"
                spot.excluded = f"not focal: mean {focality:.2f} x its peak (a peak on an organ's plateau)"
            elif shares["bone"] >= 0.3 and peak < method.bone_ratio * marrow_reference:
                spot.rule = "marrow"
                spot.excluded = f"in bone at {peak / marrow_reference:.1f} x the marrow reference (marrow uptake)"
            elif zone is not None and cls == "soft tissue" and contrast < method.isolated_contrast:
                spot.rule = zone
                spot.excluded = f"in the {zone} (physiological uptake)"
        out.append(spot)
    kept = [s for s in out if s.excluded is None]
    for s in kept[method.max_regions:]:
        s.rule, s.excluded = "limit", f"beyond the first {method.max_regions} regions"
    return out


def segment_hot_spots(
    activity_bq_per_ml: np.ndarray,
    spacing_mm: tuple[float, float, float],
    tissue: np.ndarray,
    method: LesionMethod | None = None,
    *,
    density_g_cm3: np.ndarray | None = None,
    grid=None,
) -> list[np.ndarray]:
    """Masks of the automatic regions kept, hottest first (see the module docstring).

    Without ``density_g_cm3`` and ``grid`` no physiological-uptake rule can be applied and
    every candidate is returned.
    """
    method = method or LesionMethod()
    if density_g_cm3 is None or grid is None:
        a = np.where(tissue, activity_bq_per_ml, 0.0).astype(np.float64)
        if not tissue.any() or a.max() <= 0:
            return []
        out = []
        for box, component in _candidates(a, tissue, np.asarray(spacing_mm, float), method)[: method.max_regions]:
            mask = np.zeros(a.shape, dtype=bool)
            mask[box] = component
            out.append(mask)
        return out
    return [s.mask for s in find_hot_spots(activity_bq_per_ml, grid, density_g_cm3, method) if s.excluded is None]
