"""Regions of interest on the CT grid (DICOM SEG, RT Structure Set, or automatic) and dose
statistics per region.

A clinic keeps organ and lesion contours as a DICOM Segmentation or an RT Structure Set;
both become boolean masks on the CT grid here, checked against the CT's frame of reference
and field of view. :func:`region_statistics` turns masks and dose into the numbers a
physicist signs off (docs/regions.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.uid import SegmentationStorage

from spectdose.constants import MGY_PER_H_PER_GY_PER_S
from spectdose.errors import GeometryError, InputError
from spectdose.geometry import Grid, Volume, resample_to_grid

__all__ = [
    "FieldOfView",
    "COVERED_MIN_FRACTION",
    "coverage_label",
    "size_note",
    "size_bias",
    "SMALL_REGION_BIAS",
    "Region",
    "RegionSet",
    "load_regions",
    "load_segmentation_masks",
    "region_statistics",
    "cumulative_dvh",
    "V_THRESHOLDS_GY",
    "coverage_text",
    "mask_box",
]

# V(x Gy) reported per region: 2 Gy, the red-marrow limit used in PRRT (EANM dosimetry
# guidance, Sjögreen Gleisner et al., EJNMMI 2022, 49:1778); 23 Gy, the kidney limit taken
# over from external-beam tolerance (Emami et al., IJROBP 1991, 21:109; used in PRRT
# kidney dosimetry, Bodei et al., EJNMMI 2008, 35:1847); 10 and 100 Gy, lesion levels
# around the response threshold reported for Lu-177 DOTATATE (Ilan et al., JNM 2015, 56:177).
V_THRESHOLDS_GY = (2.0, 10.0, 23.0, 100.0)
# At most this many bins in a DVH (bin width rounded up to 1, 2 or 5 x 10^n).
_DVH_MAX_BINS = 500


# A region is "covered" when at least this fraction of its volume lies inside both the CT and
# the SPECT field of view. The part outside holds no activity on the CT grid, so a missing 1 %
# moves a mean dose by about 1 % at most, well inside the quantitative SPECT uncertainty of
# 5-10 % (EANM/MIRD guideline, Dewaraja et al., J Nucl Med 2012, 53:1310); below it the
# region gets no dose statistic unless the partial_region_coverage assumption is accepted.
COVERED_MIN_FRACTION = 0.99
# Below this fraction nothing of the region is taken as seen.
_NOT_COVERED_FRACTION = 0.01

# Measured bias of a region's mean dose (rate) against the truth, by region volume and method:
# (lowest ml, highest ml, method, network, low %, high %, source). ``network`` is the start of
# the SHA-256 of the weights file whose output was measured (the ensemble file where its mean is
# the dose rate, as in a CNN job with --uncertainty, the service's default); a learned method's
# figure holds for those weights only, so another network gets the DVK figure and says so. None
# for methods that learn nothing. low / high: the 10th and 90th percentiles of the signed error
# of the lesion mean dose rate over lesions x noise realisations. Lesions of the virtual
# patients; the SPECT resolution is that of spectdose's phantoms (effective FWHM ~11 mm).
# Made by `python bench/small_region_bias.py models/dblurdosenet-eval-campaign/v2test=v2-test
# models/dblurdosenet-eval-campaign/v2test-ensemble-bd1a5f8c=v2-test
# models/dblurdosenet-eval-campaign/v2test-stint11=v2-test models/dblurdosenet-eval-v2=v2` from:
#   v2-test = models/dblurdosenet-eval-campaign/v2test/metrics.csv: issue 17's fixed test set,
#             patients vp2301-vp2305 x 3 noise realisations (`bench/eval_testset.py`, 2026-12-07);
#             cnn = dblurdosenet.pt of campaign stint 8 (sha256 67725fa0...); the ensemble mean
#             = dblurdosenet_ensemble.pt of stints 7, 8, 10 (bd1a5f8c...), measured in
#             models/dblurdosenet-eval-campaign/v2test-ensemble-bd1a5f8c/ (same 15 studies);
#             cnn = dblurdosenet.pt of campaign stint 11 (71b35f80...) and the ensemble mean =
#             dblurdosenet_ensemble.pt of stints 8, 10, 11 (243f08e4...), measured in
#             models/dblurdosenet-eval-campaign/v2test-stint11/ (same 15 studies, 2026-12-07)
#   v2      = models/dblurdosenet-eval-v2/metrics.csv: v2 test patients vp2201-vp2203 (DVK only)
# and, for DVK below 2 ml, issue 17's cycle run (spectdose phantom cyc --seed 8, 4 time points):
# lesions of 1.0 / 1.9 ml at -51 / -59 %, inside the range.
SMALL_REGION_BIAS: tuple[tuple[float, float, str, str | None, float, float, str], ...] = (
    (0.0, 2.0, "dvk", None, -87.0, -43.0, "v2-test n=9, v2 n=3: mean -63 %; issue 17 cycle 1.0 / 1.9 ml -51 / -59 %"),
    (0.0, 2.0, "dvk-rr", None, -87.0, -36.0, "v2-test n=9: mean -58 %"),
    (0.0, 2.0, "cnn", "67725fa00758", -89.0, -33.0, "v2-test n=9: mean -58 %, campaign stint 8"),
    (0.0, 2.0, "cnn", "bd1a5f8c235e", -89.0, -36.0, "v2-test n=9: mean -58 %, ensemble of campaign stints 7, 8, 10"),
    (0.0, 2.0, "cnn", "71b35f80fe89", -86.0, -32.0, "v2-test n=9: mean -57 %, campaign stint 11"),
    (0.0, 2.0, "cnn", "243f08e43f5d", -87.0, -33.0, "v2-test n=9: mean -57 %, ensemble of campaign stints 8, 10, 11"),
    (2.0, 5.0, "dvk", None, -69.0, -18.0, "v2-test n=18, v2 n=4: mean -51 %"),
    (2.0, 5.0, "dvk-rr", None, -66.0, -38.0, "v2-test n=18: mean -52 %"),
    (2.0, 5.0, "cnn", "67725fa00758", -68.0, -37.0, "v2-test n=18: mean -53 %, campaign stint 8"),
    (2.0, 5.0, "cnn", "bd1a5f8c235e", -66.0, -36.0, "v2-test n=18: mean -52 %, ensemble of campaign stints 7, 8, 10"),
    (2.0, 5.0, "cnn", "71b35f80fe89", -69.0, -37.0, "v2-test n=18: mean -53 %, campaign stint 11"),
    (2.0, 5.0, "cnn", "243f08e43f5d", -70.0, -38.0, "v2-test n=18: mean -54 %, ensemble of campaign stints 8, 10, 11"),
)
# Regions under this volume get a size note: a sphere of 5.6 ml is 22 mm across, two SPECT
# FWHM (~11 mm), the size below which partial-volume loss dominates (Soret et al., J Nucl Med
# 2007, 48:932: recovery falls steeply below 2-3 FWHM).
SMALL_REGION_ML = 5.0


def size_bias(volume_ml: float, method: str, network_sha256: str | None = None) -> dict | None:
    """The measured bias of the mean dose for a region this small (None at or above 5 ml, or
    where no measurement covers it): ``low_pct``, ``high_pct``, ``method`` it was measured
    with (DVK when ``method`` has none for these weights), ``source``, and ``other_network``
    when ``method`` was measured only with other weights than ``network_sha256``."""
    if volume_ml >= SMALL_REGION_ML:
        return None
    rows = [r for r in SMALL_REGION_BIAS if r[0] <= volume_ml < r[1]]
    of_method = [r for r in rows if r[2] == method]
    same = [r for r in of_method if r[3] is None or (network_sha256 or "").startswith(r[3])]
    chosen = same or [r for r in rows if r[2] == "dvk"]
    if not chosen:
        return None
    _, _, measured_with, _, low, high, source = chosen[0]
    return {"low_pct": low, "high_pct": high, "method": measured_with, "source": source,
            "other_network": bool(of_method) and not same}


def size_note(volume_ml: float, method: str, network_sha256: str | None = None) -> str:
    """The measured bias to expect for a region this small with this method and network ("" above 5 ml)."""
    bias = size_bias(volume_ml, method, network_sha256)
    if bias is None:
        return ""
    lo, hi = bias["low_pct"], bias["high_pct"]
    expect = f"{lo:+.0f} %" if lo == hi else f"{lo:+.0f} to {hi:+.0f} %"
    if bias["method"] == method:
        where = f"with {method.upper()}"
    elif bias["other_network"]:
        where = f"not measured for this network ({(network_sha256 or 'unknown')[:12]}); with DVK"
    else:
        where = f"no measurement for {method}; with DVK"
    return (f"{volume_ml:.1f} ml is near the SPECT resolution: expect the mean dose {expect} ({where}; "
            f"measured: {bias['source']}; docs/regions.md)")


def coverage_label(spect_fraction: float, ct_fraction: float) -> str:
    """"covered", "partly covered" or "not covered" from the two fractions of a region's volume."""
    seen = spect_fraction * ct_fraction
    if seen >= COVERED_MIN_FRACTION:
        return "covered"
    if seen < _NOT_COVERED_FRACTION:
        return "not covered"
    return "partly covered"


def rigid_affine(transform) -> np.ndarray:
    """The 3 x 4 affine (LPS mm) of a rigid or affine SimpleITK transform, exact from four points."""
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    columns = [np.asarray(transform.TransformPoint(tuple(e))) - origin for e in np.eye(3)]
    return np.column_stack([*columns, origin])


@dataclasses.dataclass(frozen=True)
class FieldOfView:
    """The SPECT's reconstructed volume seen from the CT: its grid and the CT -> SPECT point map.

    ``ct_to_spect`` is a 3 x 4 affine (LPS mm) when the SPECT was registered to the CT, None
    when both share a frame of reference.
    """

    spect_grid: Grid
    ct_to_spect: np.ndarray | None = None

    @classmethod
    def from_transform(cls, spect_grid: Grid, transform=None) -> FieldOfView:
        """From a SimpleITK transform that maps CT points to SPECT points (None: same frame)."""
        if transform is None:
            return cls(spect_grid)
        return cls(spect_grid, rigid_affine(transform))

    def inside(self, points_lps_mm: np.ndarray) -> np.ndarray:
        """Whether each (..., 3) CT point lies inside the SPECT volume (voxel edges included)."""
        points = np.asarray(points_lps_mm, dtype=float)
        if self.ct_to_spect is not None:
            points = points @ self.ct_to_spect[:, :3].T + self.ct_to_spect[:, 3]
        index = self.spect_grid.lps_mm_to_index(points)
        upper = np.asarray(self.spect_grid.shape) - 0.5
        return np.all((index >= -0.5) & (index <= upper), axis=-1)

    def fraction_inside(self, mask: np.ndarray, ct_grid: Grid) -> float:
        """Fraction of a mask's CT voxels whose centres lie inside the SPECT volume."""
        where = np.argwhere(mask)
        if not len(where):
            return 0.0
        return float(self.inside(ct_grid.index_to_lps_mm(where)).mean())

    def z_span_mm(self) -> tuple[float, float]:
        """The SPECT volume's extent along the patient axis (LPS z, CT space), mm."""
        corners = self.spect_grid.corners_lps_mm()
        if self.ct_to_spect is not None:
            matrix, shift = self.ct_to_spect[:, :3], self.ct_to_spect[:, 3]
            corners = (corners - shift) @ np.linalg.inv(matrix).T
        return float(corners[:, 2].min()), float(corners[:, 2].max())

    def to_json(self) -> dict:
        g = self.spect_grid
        return {"shape_zyx": list(g.shape), "spacing_mm_zyx": list(g.spacing_mm), "origin_lps_mm": list(g.origin_mm),
                "axes": np.asarray(g.axes).tolist(),
                "ct_to_spect_affine": None if self.ct_to_spect is None else np.asarray(self.ct_to_spect).tolist()}

    @classmethod
    def from_json(cls, data: dict) -> FieldOfView:
        grid = Grid(tuple(data["shape_zyx"]), tuple(data["spacing_mm_zyx"]), tuple(data["origin_lps_mm"]),
                    np.asarray(data["axes"], dtype=float))
        affine = data.get("ct_to_spect_affine")
        return cls(grid, None if affine is None else np.asarray(affine, dtype=float))


def mask_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box of the grid holding every voxel of ``mask`` (empty slices when it has none):
    one pass over the whole grid, then passes over the slab of its slices only."""
    planes = np.flatnonzero(mask.any(axis=(1, 2)))
    if planes.size == 0:
        return (slice(0, 0),) * 3
    slab = mask[planes[0]:planes[-1] + 1]
    rows = np.flatnonzero(slab.any(axis=(0, 2)))
    cols = np.flatnonzero(slab.any(axis=(0, 1)))
    return (slice(int(planes[0]), int(planes[-1]) + 1), slice(int(rows[0]), int(rows[-1]) + 1),
            slice(int(cols[0]), int(cols[-1]) + 1))


@dataclasses.dataclass
class Region:
    """One region: its name, mask on the CT grid and number in its source object.

    ``ct_coverage_fraction``: the fraction of the region as drawn that lies inside the CT (the
    mask holds only that part); ``location``: where an automatic region lies on the CT;
    ``box``: a box of the grid known to hold the whole mask (an automatic region's search box),
    else found on first use (:meth:`bounds`).
    """

    name: str
    mask: np.ndarray
    number: int
    automatic: bool = False
    lesion: bool = False
    ct_coverage_fraction: float = 1.0
    location: str = ""
    # The segment's own Segmented Property Type (value, scheme, meaning) when it came from a SEG.
    property_type: tuple[str, str, str] | None = None
    box: tuple[slice, slice, slice] | None = None
    # The mask ``box`` was found for (a mask assigned later gets its own box).
    _boxed: np.ndarray | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.box is not None:
            self._boxed = self.mask

    def bounds(self) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """(box, the mask in the box, a view): statistics, SEG, contours and pictures work in the
        box, since a clinical CT grid has ~34 M voxels and a lesion a few thousand."""
        if self.box is None or self._boxed is not self.mask:
            self.box, self._boxed = mask_box(self.mask), self.mask
        return self.box, self.mask[self.box]

    @property
    def unreviewed(self) -> bool:
        """An automatic hot spot of spectdose's (named a region in space, not yet said to be anything)."""
        return self.automatic and (self.property_type is None or self.property_type[:2] == ("130488", "DCM"))


@dataclasses.dataclass
class RegionSet:
    """Regions on one CT grid, with where they came from (for references in the outputs)."""

    regions: list[Region]
    source: str  # "SEG", "RTSTRUCT" or "automatic"
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    description: str = ""
    path: Path | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def masks(self) -> dict[str, np.ndarray]:
        return {r.name: r.mask for r in self.regions}


def load_regions(path: str | Path, ct_grid: Grid) -> RegionSet:
    """Regions on ``ct_grid`` from a DICOM SEG or an RT Structure Set file.

    Structures that are empty or lie wholly outside the CT are left out with a warning in
    ``RegionSet.warnings``; a set with no usable region is refused.

    Raises
    ------
    InputError
        Unreadable or corrupt file, neither SEG nor RT Structure Set, or no usable region
        (each empty structure named).
    GeometryError
        Regions on another frame of reference than the CT, contours not in CT slice planes,
        or every region outside the CT.
    """
    import pydicom

    from spectdose.dicom.rtstruct import RTStructureSetStorage

    path = Path(path)
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, EOFError) as exc:
        raise InputError(f"regions file {path.name} is not a readable DICOM file ({type(exc).__name__})") from exc
    sop_class = header.get("SOPClassUID")
    if sop_class == SegmentationStorage:
        return _load_seg(path, ct_grid)
    if sop_class == RTStructureSetStorage:
        return _load_rtstruct(path, ct_grid)
    raise InputError(
        f"regions file {path.name} is neither a DICOM SEG nor an RT Structure Set "
        f"(SOP Class {sop_class}, modality {header.get('Modality')})"
    )


def _check_frame(uid: str, ct_grid: Grid, what: str) -> None:
    if ct_grid.frame_of_reference_uid and uid != ct_grid.frame_of_reference_uid:
        raise GeometryError(
            f"{what} is on frame of reference {uid or '(none)'}, not the CT's {ct_grid.frame_of_reference_uid}: "
            "regions must be drawn on the study's CT (or registered to it) before they are sent"
        )


def _usable(candidates: list[tuple[Region, str | None]], what: str) -> list[Region]:
    """Regions without a problem; refuses the set when none is left, naming each problem."""
    kept = [r for r, problem in candidates if problem is None]
    if not kept:
        problems = "; ".join(problem for _, problem in candidates if problem) or "it holds no region"
        error = GeometryError if all("outside the CT" in (p or "") for _, p in candidates) and candidates else InputError
        raise error(f"{what}: no usable region ({problems})")
    numbers: dict[str, list[int]] = {}
    for r in kept:
        numbers.setdefault(r.name, []).append(r.number)
    shared = {name: n for name, n in numbers.items() if len(n) > 1}
    if shared:  # regions are reported, plotted and referenced by label: two under one label would merge
        name, n = next(iter(shared.items()))
        raise InputError(f"{what}: {len(n)} regions ({', '.join(map(str, n))}) share the label {name!r}; each region "
                         "needs a label of its own: rename them, or merge them into one region")
    return kept


def _load_seg(path: Path, ct_grid: Grid) -> RegionSet:
    import highdicom as hd
    import pydicom

    try:
        seg = hd.seg.segread(path)
    except (OSError, ValueError, AttributeError, KeyError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"{path.name} is not a readable DICOM Segmentation ({type(exc).__name__}: {exc})") from exc
    _check_frame(str(seg.get("FrameOfReferenceUID", "")), ct_grid, f"segmentation {path.name}")
    try:
        vol = seg.get_volume()
    except (RuntimeError, ValueError) as exc:
        raise GeometryError(f"segmentation {path.name} does not form a regular volume: {exc}") from exc
    grid = Grid(vol.array.shape[:3], tuple(vol.spacing), tuple(vol.position), np.asarray(vol.direction).T)
    candidates = []
    for index, number in enumerate(seg.segment_numbers):
        description = seg.get_segment_description(number)
        label = str(description.SegmentLabel)
        planes = np.ascontiguousarray(vol.array[..., index] > 0).astype(np.uint8)
        automatic = str(description.get("SegmentAlgorithmType", "")) == "AUTOMATIC"
        note = str(description.get("SegmentDescription", ""))
        region = Region(label, np.zeros(ct_grid.shape, bool), int(number), automatic=automatic,
                        lesion=label.lower().startswith("lesion"),
                        location=note.split("; ", 1)[1] if automatic and "; " in note else "",
                        property_type=_property_type(description))
        if not planes.any():
            candidates.append((region, f"segment {number} '{label}' is empty"))
            continue
        region.mask = resample_to_grid(Volume(planes, grid, "label"), ct_grid, interpolation="nearest").array > 0
        region.ct_coverage_fraction = _fraction_in_ct(np.argwhere(planes), grid, ct_grid)
        candidates.append((region, None if region.mask.any() else f"segment {number} '{label}' lies outside the CT"))
    out = RegionSet(_usable(candidates, f"segmentation {path.name}"), "SEG", SegmentationStorage,
                    str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID), str(seg.get("SeriesDescription", "")), path)
    out.warnings = [f"regions: {p}; left out" for _, p in candidates if p]
    return out


def _property_type(description) -> tuple[str, str, str] | None:
    items = description.get("SegmentedPropertyTypeCodeSequence") or []
    if not items:
        return None
    code = items[0]
    return str(code.get("CodeValue", "")), str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeMeaning", ""))


def _load_rtstruct(path: Path, ct_grid: Grid) -> RegionSet:
    from spectdose.dicom.rtstruct import RTStructureSetStorage, contours_to_mask, read_rtstruct

    ds, structures = read_rtstruct(path)
    what = f"RT Structure Set {path.name}"
    frames = {s.frame_of_reference_uid for s in structures if s.frame_of_reference_uid}
    for uid in frames or {str(ds.get("FrameOfReferenceUID", ""))}:
        _check_frame(uid, ct_grid, what)
    candidates, notes = [], []
    for s in structures:
        region = Region(s.name, np.zeros(ct_grid.shape, bool), s.number,
                        lesion=s.interpreted_type in ("GTV", "CTV", "PTV") or s.name.lower().startswith("lesion"))
        if not s.contours_lps_mm:
            kinds = f" (only {', '.join(s.skipped_types)} contours)" if s.skipped_types else ""
            candidates.append((region, f"structure {s.number} '{s.name}' is empty{kinds}"))
            continue
        region.mask, info = contours_to_mask(s.contours_lps_mm, ct_grid, name=s.name)
        if not region.mask.any():
            candidates.append((region, f"structure {s.number} '{s.name}' lies outside the CT"))
            continue
        region.ct_coverage_fraction = _contours_fraction_in_ct(s.contours_lps_mm, ct_grid, region.mask, s.name)
        if info["outside_grid"]:
            notes.append(f"regions: {info['outside_grid']} of {info['contours']} contours of '{s.name}' lie outside "
                         f"the CT ({region.ct_coverage_fraction:.2f} of its volume inside)")
        if info["between_slices"]:
            notes.append(f"regions: {info['between_slices']} contours of '{s.name}' lie between CT slices and were "
                         "put on the nearest slice")
        candidates.append((region, None))
    out = RegionSet(_usable(candidates, what), "RTSTRUCT", RTStructureSetStorage, str(ds.SOPInstanceUID),
                    str(ds.get("SeriesInstanceUID", "")), str(ds.get("StructureSetLabel", "")), path)
    out.warnings = [f"regions: {p}; left out" for _, p in candidates if p] + notes
    return out


def _fraction_in_ct(index_kji: np.ndarray, grid: Grid, ct_grid: Grid) -> float:
    """Fraction of voxels (indices on ``grid``) whose centres lie inside the CT volume."""
    if not len(index_kji):
        return 0.0
    on_ct = ct_grid.lps_mm_to_index(grid.index_to_lps_mm(index_kji))
    upper = np.asarray(ct_grid.shape) - 0.5
    return float(np.all((on_ct >= -0.5) & (on_ct <= upper), axis=1).mean())


def _contours_fraction_in_ct(contours: list[np.ndarray], ct_grid: Grid, mask_on_ct: np.ndarray, name: str) -> float:
    """Fraction of a structure's filled volume inside the CT: its contours are filled on the CT grid
    extended to hold them all (same axes and spacing), and the part on the CT is counted."""
    from spectdose.dicom.rtstruct import contours_to_mask

    index = ct_grid.lps_mm_to_index(np.concatenate(contours))
    shape = np.asarray(ct_grid.shape)
    lo = np.minimum(np.floor(index.min(axis=0)).astype(int) - 1, 0)
    hi = np.maximum(np.ceil(index.max(axis=0)).astype(int) + 2, shape)
    if np.all(lo == 0) and np.all(hi == shape):
        return 1.0
    if np.prod(hi - lo) > 4 * np.prod(shape):  # far outside: count contours instead of filling a huge grid
        outside = np.any((index < -0.5) | (index > shape - 0.5), axis=1).mean()
        return float(1.0 - outside)
    extended = Grid(tuple(hi - lo), ct_grid.spacing_mm, tuple(ct_grid.index_to_lps_mm(lo.astype(float))), ct_grid.axes,
                    ct_grid.frame_of_reference_uid)
    full, _ = contours_to_mask(contours, extended, name=name)
    total = int(full.sum())
    return float(mask_on_ct.sum()) / total if total else 0.0


def load_segmentation_masks(path: str | Path, ct_grid: Grid) -> dict[str, np.ndarray]:
    """Boolean masks on ``ct_grid``, one per region label, from a DICOM SEG or RT Structure Set."""
    return load_regions(path, ct_grid).masks


def _nice_step(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^n that is >= ``value`` (> 0)."""
    exponent = np.floor(np.log10(value))
    for m in (1.0, 2.0, 5.0, 10.0):
        if m * 10**exponent >= value * (1 - 1e-12):
            return float(m * 10**exponent)
    return float(10 ** (exponent + 1))


def cumulative_dvh(values: np.ndarray, voxel_volume_ml: float, *, ordered: bool = False) -> dict:
    """Cumulative DVH of the values in one region: volume (ml) receiving at least each bin's lower edge.

    Bins start at 0 and have a width of 1, 2 or 5 x 10^n, at most 500 bins up to the
    maximum; ``volume_ml[0]`` is the whole region. ``ordered``: ``values`` are sorted already.
    """
    top = float(values.max()) if values.size else 0.0
    width = _nice_step(top / _DVH_MAX_BINS) if top > 0 else 1.0
    n_bins = max(1, int(np.ceil(top / width)) + 1)
    edges = np.arange(n_bins) * width
    counts = np.searchsorted(values if ordered else np.sort(values), edges, side="left")
    volume_ml = (values.size - counts) * voxel_volume_ml
    return {"bin_width": width, "volume_ml": [round(float(v), 4) for v in volume_ml]}


_DOSE_KEYS = ("mean_gy", "median_gy", "min_gy", "max_gy", "d2_gy", "d50_gy", "d98_gy", "v_gy", "uncertainty_gy")
_RATE_KEYS = ("mean_dose_rate_mgy_per_h", "median_dose_rate_mgy_per_h", "min_dose_rate_mgy_per_h",
              "max_dose_rate_mgy_per_h", "uncertainty_dose_rate_mgy_per_h")


def region_statistics(
    dose_gy: np.ndarray | None,
    dose_rate_gy_per_s: np.ndarray,
    masks: dict[str, np.ndarray],
    voxel_volume_ml: float,
    *,
    v_thresholds_gy: Sequence[float] = V_THRESHOLDS_GY,
    with_dvh: bool = True,
    dose_rate_sigma_gy_per_s: np.ndarray | None = None,
    dose_sigma_gy: np.ndarray | None = None,
    regions: Sequence[Region] | None = None,
    ct_grid: Grid | None = None,
    field_of_view: FieldOfView | None = None,
    accept_partial: bool = False,
    method: str = "dvk",
    network_sha256: str | None = None,
) -> list[dict]:
    """Per region: volume, coverage, size note; dose rate (mean, DVH); absorbed dose (mean,
    median, min, max, D2/D50/D98, V(x Gy), DVH) when a dose is given.

    Coverage: ``spect_coverage_fraction`` is the fraction of the region's voxels on the CT
    that lie inside the SPECT volume (``field_of_view``; 1.0 when none is given),
    ``ct_coverage_fraction`` the fraction of the region as drawn that lies on the CT
    (``Region.ct_coverage_fraction``); ``coverage`` is "covered" when their product is
    >= COVERED_MIN_FRACTION, else "partly covered" or "not covered". A region that is not
    covered gets every dose and dose-rate statistic as None (the activity outside the SPECT
    was never measured); with ``accept_partial`` a partly covered region gets the statistics
    of its part inside the SPECT, still labelled "partly covered".

    Dx is the minimum dose to the hottest x % of the region (so D98 is near the minimum),
    from linear interpolation between voxel values. V(x Gy) is the volume (ml and % of the
    region) receiving at least x Gy. With a voxel 1-sigma (the CNN ensemble) the region's is
    the mean of its voxels' sigmas: errors left by SPECT blur are correlated over about a
    centimetre, so this is the conservative bound (independent errors would give sigma/sqrt(n));
    without one ``uncertainty_gy`` and ``uncertainty_dose_rate_mgy_per_h`` are None.
    ``method`` and ``network_sha256`` (the weights that made the dose rate) choose the size
    note's measured bias.
    """
    by_name = {r.name: r for r in regions or ()}
    rows = []
    for label, mask in masks.items():
        region = by_name.get(label)
        # Everything is taken in the region's box: its voxels come in the same (C) order as on the grid.
        box, local = region.bounds() if region is not None and region.mask is mask else (mask_box(mask), None)
        local = mask[box] if local is None else local
        voxels = int(np.count_nonzero(local))
        volume_ml = float(voxels) * voxel_volume_ml
        ct_fraction = region.ct_coverage_fraction if region is not None else 1.0
        if field_of_view is not None and ct_grid is not None:
            inside = np.zeros_like(local)
            where = np.argwhere(local)
            corner = np.array([b.start for b in box])
            inside[tuple(where[field_of_view.inside(ct_grid.index_to_lps_mm(where + corner))].T)] = True
            spect_fraction = float(np.count_nonzero(inside)) / max(1, voxels)
        else:
            inside, spect_fraction = local, 1.0
        coverage = coverage_label(spect_fraction, ct_fraction)
        row = {
            "region": label,
            "volume_ml": round(volume_ml, 3),
            "voxels": voxels,
            "spect_coverage_fraction": round(spect_fraction, 4),
            "ct_coverage_fraction": round(ct_fraction, 4),
            "coverage": coverage,
            "automatic": region.unreviewed if region is not None else False,
            "location": region.location if region is not None else "",
            "size_note": size_note(volume_ml / max(ct_fraction, 1e-6), method, network_sha256),
            "size_bias_pct": (None if (bias := size_bias(volume_ml / max(ct_fraction, 1e-6), method, network_sha256)) is None
                              else [bias["low_pct"], bias["high_pct"]]),
        }
        measured = coverage == "covered" or (coverage == "partly covered" and accept_partial)
        if coverage == "partly covered" and accept_partial:
            row["statistics_cover"] = "the part inside the SPECT field of view"
        if not measured:
            row.update(dict.fromkeys(_RATE_KEYS))
            if dose_gy is not None:
                row.update(dict.fromkeys(_DOSE_KEYS))
            if with_dvh:
                row["dvh_dose_rate_mgy_per_h"] = None
                if dose_gy is not None:
                    row["dvh_gy"] = None
            rows.append(row)
            continue
        rate_mgy_per_h = dose_rate_gy_per_s[box][inside].astype(np.float64) * MGY_PER_H_PER_GY_PER_S
        row.update({
            "mean_dose_rate_mgy_per_h": float(rate_mgy_per_h.mean()),
            "median_dose_rate_mgy_per_h": float(np.median(rate_mgy_per_h)),
            "min_dose_rate_mgy_per_h": float(rate_mgy_per_h.min()),
            "max_dose_rate_mgy_per_h": float(rate_mgy_per_h.max()),
            "uncertainty_dose_rate_mgy_per_h": (
                float(dose_rate_sigma_gy_per_s[box][inside].astype(np.float64).mean()) * MGY_PER_H_PER_GY_PER_S
                if dose_rate_sigma_gy_per_s is not None else None
            ),
        })
        if dose_gy is not None:
            d = dose_gy[box][inside].astype(np.float64)
            ordered = np.sort(d)  # once for the median, the Dx, the V(x Gy) and the DVH
            at_least = ordered.size - np.searchsorted(ordered, np.asarray(v_thresholds_gy, dtype=float), side="left")
            row.update(
                mean_gy=float(d.mean()),
                median_gy=float(np.median(ordered)),
                min_gy=float(d.min()),
                max_gy=float(d.max()),
                d2_gy=float(np.percentile(ordered, 98)),
                d50_gy=float(np.percentile(ordered, 50)),
                d98_gy=float(np.percentile(ordered, 2)),
                v_gy={f"{x:g}": {"ml": round(float(n) * voxel_volume_ml, 3), "pct": round(100.0 * (float(n) / d.size), 2)}
                      for x, n in zip(v_thresholds_gy, at_least, strict=True)},
                uncertainty_gy=(float(dose_sigma_gy[box][inside].astype(np.float64).mean())
                                if dose_sigma_gy is not None else None),
            )
        if with_dvh:
            row["dvh_dose_rate_mgy_per_h"] = cumulative_dvh(rate_mgy_per_h, voxel_volume_ml)
            if dose_gy is not None:
                row["dvh_gy"] = cumulative_dvh(ordered, voxel_volume_ml, ordered=True)
        rows.append(row)
    return rows


def coverage_text(row: dict) -> str:
    """One line on a region's coverage for warnings and reports ("" when covered)."""
    if row.get("coverage", "covered") == "covered":
        return ""
    seen = row["spect_coverage_fraction"] * row["ct_coverage_fraction"]
    parts = []
    if row["spect_coverage_fraction"] < 1.0:
        parts.append(f"{row['spect_coverage_fraction']:.2f} of it inside the SPECT field of view")
    if row["ct_coverage_fraction"] < 1.0:
        parts.append(f"{row['ct_coverage_fraction']:.2f} inside the CT")
    what = ("statistics of the part inside only" if row.get("statistics_cover")
            else "no dose statistic (the SPECT did not see all of it)")
    label = row["coverage"] if row["coverage"] == "not covered" else f"partly covered {seen:.2f}"
    assumed = "ASSUMED (partial_region_coverage): " if row.get("statistics_cover") else ""
    return f"{assumed}region '{row['region']}' {label} ({', '.join(parts)}): {what}"
