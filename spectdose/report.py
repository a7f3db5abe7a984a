"""The one-page PDF report of a result, and the slice pictures of the gateway's results page.

A physicist signs off numbers and pictures: the region table, the DVHs and the dose over the
CT. One renderer (:func:`render_slice`) draws the CT with the dose as a colour wash, isodose
lines and region outlines, for the report's three key images and for the results page, so
the two never show different things. The page reads the volumes from ``view.npz``
(:class:`ViewVolumes`), written next to the RT Dose, so it needs neither the input CT (which
the service purges) nor a full-resolution dose in memory. matplotlib only, no network.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import textwrap
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from spectdose.geometry import Volume, block_mean
from spectdose.regions import V_THRESHOLDS_GY, RegionSet

__all__ = [
    "ViewVolumes",
    "PLANES",
    "render_slice",
    "key_point",
    "default_window",
    "default_isodose_levels",
    "isodose_colours",
    "region_colours",
    "plot_dvh",
    "table_rows",
    "region_notes",
    "headline_lines",
    "ORIENTATION",
    "TEXT_RC",
    "report_pdf_bytes",
    "identifiers_from_study",
    "identifiers_from_header",
    "VIEW_FILE",
]

VIEW_FILE = "view.npz"
PLANES = ("axial", "coronal", "sagittal")
# The view volumes keep at most this many voxels along an axis (a 512 x 512 CT is averaged
# 2 x 2 in-plane): enough for a screen, and a clinical view file stays a few MB.
VIEW_MAX_VOXELS = 256
# Soft-tissue CT window, level 40 HU / width 400 HU: the usual abdominal window
# (e.g. Hofer, CT Teaching Manual, 4th ed., Thieme 2010, window settings table).
CT_WINDOW_HU = (-160.0, 240.0)
# Isodose lines of an absorbed dose: the dose levels regions.py reports V(x Gy) for (2 Gy red
# marrow, 10 and 100 Gy lesion levels, 23 Gy kidney; sources cited at V_THRESHOLDS_GY).
# A dose-rate-only result (no time integration) gets lines at fractions of its maximum instead.
ISODOSE_FRACTIONS_OF_MAX = (0.2, 0.5, 0.8)
# The wash starts at this fraction of the maximum: below it the CT shows through unchanged.
WASH_FLOOR_FRACTION = 0.05
_ISODOSE_RGB = ((0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 255), (255, 255, 255), (255, 128, 0))
# Region outlines: matplotlib's tab10 qualitative palette without its dose-like red, then the
# light halves of tab20 (without its light red), then Okabe-Ito's colour-blind-safe set
# (Okabe & Ito, "Color Universal Design", 2002): 24 distinct colours before any is computed.
_REGION_RGB = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194),
               (127, 127, 127), (188, 189, 34), (23, 190, 207), (255, 187, 120),
               (174, 199, 232), (152, 223, 138), (197, 176, 213), (196, 156, 148), (247, 182, 210),
               (199, 199, 199), (219, 219, 141), (158, 218, 229),
               (0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (240, 228, 66))
# Orientation letters at the (top, bottom, left, right) edges of a slice of the view (see
# _to_canonical): radiological convention, the patient's right on the viewer's left, head up.
ORIENTATION = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
# The maxima marked on the report's key images (matplotlib marker codes) and their symbols in the legend.
MARKER_STYLES = {"voxel maximum": "x", "maximum in soft tissue": "o"}
_MARKER_SYMBOL = {"x": "×", "o": "circle"}
# Header and label text (patient names, SEG labels) is drawn as literal text: no mathtext, no TeX.
TEXT_RC = {"pdf.fonttype": 42, "font.family": "DejaVu Sans", "text.parse_math": False, "text.usetex": False}
# Pictures are drawn so the largest extent of the view is this many pixels.
DISPLAY_PX = 512


# --------------------------------------------------------------------------------- view volumes


def _to_canonical(array: np.ndarray, axes: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int], tuple[bool, ...]]:
    """``array`` turned so that its axes run superior->inferior, anterior->posterior, right->left.

    Then an axial slice shows anterior at the top and the patient's right on the left (the
    radiological convention), and coronal/sagittal slices show the head at the top. Axes are
    matched to the nearest patient axis, so an oblique CT is shown as the nearest straight one.
    """
    # Target directions in LPS: towards inferior (-S), posterior (+P), left (+L).
    target = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    dots = np.asarray(axes, dtype=float) @ target.T  # dots[k, t]: array axis k along target t
    perm = tuple(int(np.argmax(np.abs(dots[:, t]))) for t in range(3))
    if sorted(perm) != [0, 1, 2]:
        perm = (0, 1, 2)
    out = np.transpose(array, perm)
    flips = tuple(bool(dots[perm[t], t] < 0) for t in range(3))
    for t, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=t)
    return out, perm, flips


def _mask_on_view(mask: np.ndarray, factors: Sequence[int], shape: tuple[int, ...],
                  offset: Sequence[int] = (0, 0, 0), full_shape: Sequence[int] | None = None) -> np.ndarray:
    """A mask averaged onto the view grid (a view voxel is in when half of it is), block-averaging
    only the box around the mask: a clinical CT has ~80 M voxels, a region a few thousand.

    ``mask`` may be a box of the (canonical) grid of ``full_shape`` starting at ``offset``."""
    full_shape = tuple(full_shape or mask.shape)
    out = np.zeros(shape, dtype=bool)
    box = []
    for axis, f in enumerate(factors):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) + int(offset[axis])
        if hit.size == 0:
            return out
        box.append(slice(hit[0] // f * f, min(full_shape[axis], (hit[-1] // f + 1) * f)))
    # The block-aligned box around the mask, filled from the mask's own box.
    aligned = np.zeros(tuple(b.stop - b.start for b in box), dtype=mask.dtype)
    src, dst = [], []
    for axis, b in enumerate(box):
        lo, hi = max(b.start, int(offset[axis])), min(b.stop, int(offset[axis]) + mask.shape[axis])
        src.append(slice(lo - int(offset[axis]), hi - int(offset[axis])))
        dst.append(slice(lo - b.start, hi - b.start))
    aligned[tuple(dst)] = mask[tuple(src)]
    part = block_mean(aligned, factors) >= 0.5
    start = [b.start // f for b, f in zip(box, factors, strict=True)]
    out[tuple(slice(s0, s0 + n) for s0, n in zip(start, part.shape, strict=True))] = part
    return out


def _canonical_box(local: np.ndarray, box: Sequence[slice], shape: Sequence[int], axes: np.ndarray
                   ) -> tuple[np.ndarray, list[int]]:
    """A box of the grid (``local`` at ``box``) turned as :func:`_to_canonical` turns the whole grid,
    and where it starts on the turned grid."""
    turned, perm, flips = _to_canonical(local, axes)
    offset = []
    for t in range(3):
        b, n = box[perm[t]], shape[perm[t]]
        offset.append(n - b.stop if flips[t] else b.start)
    return turned, offset


@dataclasses.dataclass
class ViewVolumes:
    """CT, dose and region masks on one reduced grid, turned for display (see :func:`_to_canonical`).

    ``dose`` is absorbed dose in Gy, or the dose rate (mGy/h, or mGy/h/MBq for a normalised
    SPECT) when the result has no absorbed dose; ``dose_unit`` says which.
    """

    ct_hu: np.ndarray
    dose: np.ndarray
    dose_unit: str
    spacing_mm: tuple[float, float, float]
    region_names: list[str]
    region_masks: np.ndarray  # (n_regions, z, y, x) bool
    region_lesion: list[bool]
    # Named points (the maxima) as view indices (z, y, x); empty for views written before them.
    markers: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_volumes(cls, ct_hu: Volume, dose: Volume, regions: RegionSet | None = None,
                     points_lps_mm: Mapping[str, Sequence[float]] | None = None) -> ViewVolumes:
        """From the CT and the dose on the CT grid (as in :func:`spectdose.pipeline.run`);
        ``points_lps_mm`` are named patient positions to mark (the maxima)."""
        if ct_hu.grid.shape != dose.grid.shape:
            raise ValueError("the dose must be on the CT grid to build the view volumes")
        factors = [max(1, math.ceil(n / VIEW_MAX_VOXELS)) for n in ct_hu.grid.shape]
        ct, perm, _ = _to_canonical(ct_hu.array, ct_hu.grid.axes)
        f = [factors[k] for k in perm]
        spacing = tuple(float(ct_hu.grid.spacing_mm[k] * factors[k]) for k in perm)
        ct_view = np.clip(np.rint(block_mean(ct, f)), -32768, 32767).astype(np.int16)
        dose_view = block_mean(_to_canonical(dose.array, dose.grid.axes)[0], f)
        names, masks, lesion = [], [], []
        for r in regions.regions if regions is not None else []:
            box, local = r.bounds()
            canonical, offset = _canonical_box(local.view(np.uint8), box, ct_hu.grid.shape, ct_hu.grid.axes)
            mask = _mask_on_view(canonical, f, ct_view.shape, offset, [ct_hu.grid.shape[k] for k in perm])
            names.append(r.name)
            masks.append(mask)
            lesion.append(bool(r.lesion))
        stack = np.stack(masks) if masks else np.zeros((0, *ct_view.shape), dtype=bool)
        _, _, flips = _to_canonical(np.zeros((1, 1, 1)), ct_hu.grid.axes)
        markers = {}
        for name, lps in (points_lps_mm or {}).items():
            index = np.rint(ct_hu.grid.lps_mm_to_index(np.asarray(lps, dtype=float))).astype(int)
            view_index = []
            for t in range(3):
                i = int(np.clip(index[perm[t]], 0, ct_hu.grid.shape[perm[t]] - 1))
                i = ct_hu.grid.shape[perm[t]] - 1 - i if flips[t] else i
                view_index.append(int(min(i // f[t], ct_view.shape[t] - 1)))
            markers[str(name)] = tuple(view_index)
        return cls(ct_view, dose_view.astype(np.float32), dose.units, spacing, names, stack, lesion, markers)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        arrays = dict(
            ct_hu=self.ct_hu, dose=self.dose, dose_unit=np.array(self.dose_unit),
            spacing_mm=np.array(self.spacing_mm), region_names=np.array(self.region_names, dtype=str),
            region_masks=np.packbits(self.region_masks, axis=-1), region_lesion=np.array(self.region_lesion, bool),
            markers=np.array(json.dumps(self.markers)),
        )
        # np.savez_compressed's layout (np.load reads it), at zlib level 1: on a clinical study level 6
        # took 3.3 s of the report for a few % smaller file (issue 20: regions + report time).
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            for name, value in arrays.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ViewVolumes:
        with np.load(Path(path), allow_pickle=False) as z:
            ct = z["ct_hu"]
            packed = z["region_masks"]
            masks = np.unpackbits(packed, axis=-1, count=ct.shape[2]).astype(bool) if packed.size else \
                np.zeros((0, *ct.shape), dtype=bool)
            markers = {k: tuple(v) for k, v in json.loads(str(z["markers"])).items()} if "markers" in z else {}
            return cls(ct, z["dose"], str(z["dose_unit"]), tuple(float(s) for s in z["spacing_mm"]),
                       [str(n) for n in z["region_names"]], masks, [bool(b) for b in z["region_lesion"]], markers)

    @property
    def absorbed(self) -> bool:
        return self.dose_unit == "Gy"

    def n_slices(self, plane: str) -> int:
        return self.ct_hu.shape[PLANES.index(plane)]

    def pixel_mm(self) -> float:
        """Display pixel size: the largest extent of the view spans :data:`DISPLAY_PX` pixels."""
        return max(n * s for n, s in zip(self.ct_hu.shape, self.spacing_mm, strict=True)) / DISPLAY_PX


def default_window(view: ViewVolumes) -> tuple[float, float]:
    """Colour-wash window: from :data:`WASH_FLOOR_FRACTION` of the maximum to the maximum."""
    top = float(view.dose.max()) if view.dose.size else 0.0
    top = top if top > 0 else 1.0
    return WASH_FLOOR_FRACTION * top, top


def default_isodose_levels(view: ViewVolumes) -> list[float]:
    """The isodose levels drawn by default (see :data:`V_THRESHOLDS_GY`), those below the maximum."""
    top = float(view.dose.max()) if view.dose.size else 0.0
    if view.absorbed:
        return [x for x in V_THRESHOLDS_GY if x < top]
    return [float(f"{f * top:.3g}") for f in ISODOSE_FRACTIONS_OF_MAX] if top > 0 else []


def isodose_colours(levels: Sequence[float]) -> list[tuple[int, int, int]]:
    return [_ISODOSE_RGB[i % len(_ISODOSE_RGB)] for i in range(len(levels))]


def region_colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct colours: the palette above, then golden-angle hues (never a repeat)."""
    import colorsys

    colours = list(_REGION_RGB[:n])
    seen = set(colours)
    k = 0
    while len(colours) < n:
        hue = (0.1 + 0.618033988749895 * k) % 1.0
        value = (0.95, 0.75, 0.55)[(k // 7) % 3]
        rgb = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.75, value))
        k += 1
        if rgb not in seen and not (rgb[0] > 200 and rgb[1] < 80 and rgb[2] < 80):  # no dose-like red
            seen.add(rgb)
            colours.append(rgb)
    return colours


def key_point(view: ViewVolumes) -> tuple[int, int, int]:
    """Where the key images cut: the hottest voxel of the region with the highest mean dose
    (the whole volume's hottest voxel when there are no regions)."""
    best, where = -np.inf, None
    for mask in view.region_masks:
        if mask.any():
            mean = float(view.dose[mask].mean())
            if mean > best:
                best, where = mean, mask
    dose = np.where(where, view.dose, -np.inf) if where is not None else view.dose
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(dose)), dose.shape))


# --------------------------------------------------------------------------------- rendering


def _slice(array: np.ndarray, plane: str, index: int) -> np.ndarray:
    if plane == "axial":
        return array[..., index, :, :]
    if plane == "coronal":
        return array[..., :, index, :]
    if plane == "sagittal":
        return array[..., :, :, index]
    raise ValueError(f"unknown plane {plane!r}; use one of {PLANES}")


def _plane_spacing(view: ViewVolumes, plane: str) -> tuple[float, float]:
    z, y, x = view.spacing_mm
    return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[plane]


def _outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel rim of a 2D mask (pixels inside with a 4-neighbour outside)."""
    padded = np.pad(mask, 1, mode="constant")
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def render_slice(
    view: ViewVolumes,
    plane: str,
    index: int,
    *,
    opacity: float = 0.5,
    window: tuple[float, float] | None = None,
    isodose_levels: Sequence[float] | None = None,
    regions: bool = True,
    pixel_mm: float | None = None,
) -> np.ndarray:
    """One slice as RGB (uint8, rows x columns x 3) at square display pixels.

    The CT in a soft-tissue window; the dose as a jet colour wash of ``opacity`` between the
    ``window`` limits (transparent below the lower one); isodose lines at ``isodose_levels``
    (colours from :func:`isodose_colours`); region outlines (:func:`region_colours`).
    """
    from matplotlib import colormaps
    from scipy.ndimage import map_coordinates

    n = view.n_slices(plane)
    if not 0 <= index < n:
        raise ValueError(f"{plane} slice {index} is outside 0..{n - 1}")
    window = window or default_window(view)
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"the dose window needs its upper limit above the lower one, got {lo}..{hi}")
    levels = default_isodose_levels(view) if isodose_levels is None else list(isodose_levels)
    pixel_mm = pixel_mm or view.pixel_mm()
    row_mm, col_mm = _plane_spacing(view, plane)
    ct2d = _slice(view.ct_hu, plane, index).astype(np.float32)
    dose2d = _slice(view.dose, plane, index)
    rows = max(1, round(ct2d.shape[0] * row_mm / pixel_mm))
    cols = max(1, round(ct2d.shape[1] * col_mm / pixel_mm))
    # Display pixel centres in slice-voxel coordinates (voxel centres at integer positions).
    r = (np.arange(rows) + 0.5) * ct2d.shape[0] / rows - 0.5
    c = (np.arange(cols) + 0.5) * ct2d.shape[1] / cols - 0.5
    rr, cc = np.meshgrid(r, c, indexing="ij")
    coords = np.stack([rr, cc])
    ct = map_coordinates(ct2d, coords, order=1, mode="nearest")
    dose = map_coordinates(dose2d.astype(np.float32), coords, order=1, mode="nearest")
    grey = np.clip((ct - CT_WINDOW_HU[0]) / (CT_WINDOW_HU[1] - CT_WINDOW_HU[0]), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    wash = colormaps["jet"](np.clip((dose - lo) / (hi - lo), 0.0, 1.0))[..., :3]
    alpha = (float(np.clip(opacity, 0.0, 1.0)) * (dose >= lo))[..., None]
    rgb = rgb * (1.0 - alpha) + wash * alpha
    out = np.round(rgb * 255.0).astype(np.uint8)
    for level, colour in zip(levels, isodose_colours(levels), strict=True):
        out[_outline(dose >= level)] = colour
    if regions and len(view.region_masks):
        nearest = (np.clip(np.round(rr), 0, ct2d.shape[0] - 1).astype(int), np.clip(np.round(cc), 0, ct2d.shape[1] - 1).astype(int))
        masks2d = _slice(view.region_masks, plane, index)
        for mask, colour in zip(masks2d, region_colours(len(masks2d)), strict=True):
            if mask.any():
                out[_outline(mask[nearest])] = colour
    return out


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB array as PNG (matplotlib's writer: no other imaging library needed)."""
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, rgb, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------- DVH and table


def _dvh_curve(row: Mapping, absorbed: bool) -> tuple[np.ndarray, np.ndarray] | None:
    dvh = row.get("dvh_gy") if absorbed else row.get("dvh_dose_rate_mgy_per_h")
    if not dvh or not dvh.get("volume_ml"):
        return None
    volume = np.asarray(dvh["volume_ml"], dtype=float)
    total = volume[0] if volume[0] > 0 else 1.0
    return np.arange(len(volume)) * float(dvh["bin_width"]), 100.0 * volume / total


_LINESTYLES = ("-", "--", "-.", ":")


def plot_dvh(ax, rows: Sequence[Mapping], *, absorbed: bool, fontsize: float = 7,
             colours: Sequence[tuple[int, int, int]] | None = None) -> None:
    """Cumulative DVHs (volume % receiving at least the dose) of the summary's region rows.

    ``colours`` are the rows' colours in the report (:func:`region_colours` of the whole list);
    a region without a dose statistic (not covered by the SPECT) is named in the legend, not drawn.
    """
    colours = list(colours) if colours is not None else region_colours(len(rows))
    for n, (row, colour) in enumerate(zip(rows, colours, strict=True)):
        curve = _dvh_curve(row, absorbed)
        label = str(row["region"])
        if curve is None:
            ax.plot([], [], color=np.asarray(colour) / 255.0, lw=1.2, ls=":", label=f"{label} (no DVH: {_coverage_text(row)})")
            continue
        ax.step(curve[0], curve[1], where="post", color=np.asarray(colour) / 255.0, lw=1.2,
                ls=_LINESTYLES[(n // 10) % len(_LINESTYLES)], label=label)
    ax.set_xlabel("absorbed dose (Gy)" if absorbed else "dose rate (mGy/h)", fontsize=fontsize)
    ax.set_ylabel("volume (%)", fontsize=fontsize)
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=fontsize)
    if rows:
        ax.legend(fontsize=fontsize - 1, loc="upper right", frameon=False)
    else:
        ax.text(0.5, 0.5, "no regions", ha="center", va="center", transform=ax.transAxes, fontsize=fontsize)


def _coverage_text(row: Mapping) -> str:
    """What the regions helper says about a region's field-of-view coverage ("" when it says nothing)."""
    coverage = row.get("coverage")
    if not coverage:
        return ""
    fraction = row.get("spect_coverage_fraction")
    if coverage != "covered" and isinstance(fraction, int | float):
        return f"{coverage} ({100 * fraction:.0f} % in SPECT)"
    return str(coverage)


def region_notes(row: Mapping) -> str:
    """Automatic or not, anatomical location and size note of a region (fields absent: nothing)."""
    parts = []
    if row.get("automatic"):
        parts.append("automatic")
    for key in ("location", "size_note"):
        if row.get(key):
            parts.append(str(row[key]))
    return "; ".join(parts)


def table_rows(rows: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    """The region table as text: Gy columns for an absorbed dose, mGy/h otherwise.

    A region without a dose statistic (not covered by the SPECT) shows "-" and its coverage;
    the uncertainty, coverage and notes columns appear when some region has them.
    """
    def f(value, digits=3):
        return "-" if not isinstance(value, int | float) else f"{value:.{digits}g}"

    absorbed = any("mean_gy" in r for r in rows)
    sigma = any(isinstance(r.get("uncertainty_gy" if absorbed else "uncertainty_dose_rate_mgy_per_h"), int | float)
                for r in rows)
    coverage = any(r.get("coverage") for r in rows)
    notes = any(region_notes(r) for r in rows)
    header = ["region", "volume (ml)"] + (["coverage"] if coverage else [])
    if absorbed:
        header += ["mean (Gy)"] + (["1 sigma (Gy)"] if sigma else []) + [
            "D2 (Gy)", "D50 (Gy)", "D98 (Gy)", "max (Gy)", "mean (mGy/h)"]
    else:
        header += ["mean (mGy/h)"] + (["1 sigma (mGy/h)"] if sigma else []) + ["median (mGy/h)", "max (mGy/h)"]
    header += ["notes"] if notes else []
    body = []
    for r in rows:
        cells = [str(r["region"]), f"{r['volume_ml']:.1f}"] + ([_coverage_text(r) or "-"] if coverage else [])
        if absorbed:
            cells += [f(r.get("mean_gy"))] + ([f(r.get("uncertainty_gy"), 2)] if sigma else []) + [
                f(r.get("d2_gy")), f(r.get("d50_gy")), f(r.get("d98_gy")), f(r.get("max_gy")),
                f(r.get("mean_dose_rate_mgy_per_h"))]
        else:
            cells += [f(r.get("mean_dose_rate_mgy_per_h"))] + (
                [f(r.get("uncertainty_dose_rate_mgy_per_h"), 2)] if sigma else []) + [
                f(r.get("median_dose_rate_mgy_per_h")), f(r.get("max_dose_rate_mgy_per_h"))]
        if notes:
            note = region_notes(r)
            cells.append(note)
        body.append(cells)
    return header, body


def headline_lines(summary: Mapping) -> list[str]:
    """The figures a physicist quotes, each stated as what it is, and where the maximum lies."""
    m = summary.get("maxima") or {}
    lines = []
    if m:
        what = "absorbed dose" if m.get("unit") == "Gy" else "dose rate"
        lines.append(f"Maximum {what} in soft tissue (density >= {m.get('soft_tissue_min_density_g_cm3', 0.9):g} g/cm3): "
                     f"{m.get('max_in_soft_tissue_text') or 'n/a'}")
        lines.append(f"Voxel maximum on the {m.get('grid') or '-'} grid of the delivered "
                     f"{'RT Dose' if m.get('unit') == 'Gy' else 'dose-rate map'}: {m.get('max_location_text') or 'n/a'}")
    rows = [r for r in summary.get("regions") or [] if isinstance(r.get("d2_gy"), int | float)]
    if rows:
        top = max(rows, key=lambda r: r["d2_gy"])
        lines.append(f"Highest region D2 (minimum dose to the hottest 2 % of the region): {top['region']} "
                     f"{top['d2_gy']:.3g} Gy")
    return lines


# --------------------------------------------------------------------------------- identifiers


def identifiers_from_study(study) -> dict:
    """Patient, study and administration facts of a :class:`spectdose.study.Study` for the report."""
    p, a = study.patient, study.administration
    return {
        "patient_name": str(p.patient_name).replace("^", " ").strip(),
        "patient_id": p.patient_id,
        "patient_birth_date": p.patient_birth_date,
        "patient_sex": p.patient_sex,
        "study_date": p.study_date,
        "study_time": p.study_time,
        "accession_number": p.accession_number,
        "study_id": p.study_id,
        "study_instance_uid": study.ct_series.study_instance_uid,
        "radiopharmaceutical": a.radiopharmaceutical,
        "nuclide": a.nuclide,
        "injected_activity_mbq": a.injected_activity_bq / 1e6 if a.injected_activity_bq else None,
    }


def identifiers_from_header(header) -> dict:
    """The same facts from an output's DICOM header (what the results page has at hand)."""
    def get(keyword):
        return str(header.get(keyword, "") or "")

    return {
        "patient_name": get("PatientName").replace("^", " ").strip(),
        "patient_id": get("PatientID"),
        "patient_birth_date": get("PatientBirthDate"),
        "patient_sex": get("PatientSex"),
        "study_date": get("StudyDate"),
        "study_time": get("StudyTime"),
        "accession_number": get("AccessionNumber"),
        "study_id": get("StudyID"),
        "study_instance_uid": get("StudyInstanceUID"),
    }


def _date(text: str) -> str:
    text = (text or "").strip()
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) >= 8 and text[:8].isdigit() else text


def _wrap(text: str, width: int = 118) -> list[str]:
    return textwrap.wrap(text, width=width, break_long_words=True) or [""]


def report_lines(identifiers: Mapping, summary: Mapping) -> dict[str, list[str]]:
    """The report's text blocks: who and what, the administration, the method and its provenance."""
    i, prov, t = identifiers, summary.get("provenance") or {}, summary.get("time") or {}
    activity = i.get("injected_activity_mbq") or (summary.get("activity") or {}).get("injected_activity_mbq")
    hours = t.get("hours_since_administration")
    regions_source = summary.get("regions_source") or {}
    uncertainty = summary.get("uncertainty") or {}
    who = [
        f"Patient: {i.get('patient_name') or '(no name)'}    ID: {i.get('patient_id') or '(none)'}    "
        f"Birth date: {_date(i.get('patient_birth_date', '')) or '-'}    Sex: {i.get('patient_sex') or '-'}",
        f"Study date: {_date(i.get('study_date', '')) or '-'}    Accession: {i.get('accession_number') or '-'}    "
        f"Study ID: {i.get('study_id') or '-'}",
        f"Study Instance UID: {i.get('study_instance_uid') or '-'}",
    ]
    administration = _wrap(
        f"Administration: {i.get('radiopharmaceutical') or i.get('nuclide') or 'Lu-177'}, "
        f"{f'{activity:.0f} MBq' if activity else 'activity not in the header'}, "
        f"at {t.get('administration') or 'unknown'}; imaged {t.get('acquisition') or 'unknown'}"
        + (f" ({hours:.1f} h after administration)" if isinstance(hours, int | float) else "")
    )
    half_life = t.get("model_half_life_h")
    method = [
        *_wrap(f"Method: {prov.get('method') or summary.get('method', '').upper()}; time model: "
               f"{prov.get('time_model') or 'n/a'}"
               + (f"; half-life used {half_life:.4g} h ({t.get('half_life_note') or t.get('model')})"
                  if isinstance(half_life, int | float) else "")
               + f"; density: {prov.get('density_curve') or '-'}; dose grid: {prov.get('dose_grid') or '-'}"),
        *_wrap(f"Calibration: {prov.get('calibration') or (summary.get('activity') or {}).get('calibration') or '-'}"),
        *_wrap("Uncertainty: " + (f"1 sigma from {uncertainty.get('method')}; {uncertainty.get('absorbed_dose') or ''}"
                                  if uncertainty else "none estimated by this method (the table has no sigma column)")),
        *_wrap(f"Software: {prov.get('software') or '-'}; model: {(prov.get('model_sha256') or 'none')[:16]}; "
               f"inputs: {prov.get('inputs_sha256') or '-'}"),
        *_wrap("Regions: " + (
            f"{regions_source.get('kind')} {regions_source.get('method') or ''}".strip() if regions_source else "none")
            + (" (automatic: review before use)" if regions_source.get("kind") == "automatic" else "")),
    ]
    warnings = [f"WARNING: {w}" for w in summary.get("warnings") or []]
    warnings += [f"REGIONS: {w}" for w in summary.get("region_warnings") or []]
    return {"who": who, "administration": administration, "method": method, "warnings": warnings,
            "headline": [x for line in headline_lines(summary) for x in _wrap(line, 125)]}


# --------------------------------------------------------------------------------- the PDF


_A4_IN = (8.27, 11.69)
_DVH_PER_PANEL = 8  # curves per DVH panel: more are not told apart
_TABLE_FONT_PT = 6.2
_TABLE_TOP, _TABLE_BOTTOM = 0.93, 0.08  # figure fractions of a table page
_TABLE_MAX_NOTE_LINES = 3
_DVH_PANELS_PER_PAGE = 6


def _chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[k:k + size]) for k in range(0, len(items), size)] or [[]]


def report_pdf_bytes(view: ViewVolumes, summary: Mapping, identifiers: Mapping) -> bytes:
    """The A4 report a physicist signs: identifiers, administration, method, time model and
    half-life, the headline figures and where the maximum lies, three key images with
    orientation letters, every region's DVH, the region table (uncertainty, coverage, notes)
    and the reviewer's name, date and signature fields; further pages when the regions need them.

    Header and label text is drawn literally (:data:`TEXT_RC`). Deterministic for identical
    inputs (no creation date in the file), so the Encapsulated PDF made from it keeps its
    content-derived UIDs on a rerun.
    """
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    rows = list(summary.get("regions") or [])
    colours = region_colours(len(rows))
    absorbed = view.absorbed
    lines = report_lines(identifiers, summary)
    header, body = table_rows(rows)
    dvh_groups = [list(range(k, min(k + _DVH_PER_PANEL, len(rows)))) for k in range(0, len(rows), _DVH_PER_PANEL)]
    first_dvh, later_dvh = dvh_groups[:2], dvh_groups[2:]
    pdf_header, cells, widths, row_heights = _pdf_table(header, body)
    table_pages = _table_pages(row_heights)
    dvh_pages = _chunks(later_dvh, _DVH_PANELS_PER_PAGE) if later_dvh else []
    n_pages = 1 + len(table_pages) + len(dvh_pages)
    who_line = (f"{identifiers.get('patient_name') or '(no name)'} · ID {identifiers.get('patient_id') or '-'} · "
                f"study {_date(identifiers.get('study_date', '')) or '-'}")

    def footer(fig, page: int) -> None:
        fig.text(0.05, 0.02, "Computed by software: to be reviewed and signed by a medical physicist before clinical "
                 "use. Full numbers: regions.csv, dvh.csv, summary.json, RT Dose, SR.", fontsize=6, color="#444444")
        fig.text(0.95, 0.02, f"page {page} of {n_pages}", fontsize=6.5, ha="right", color="#444444")

    buf = io.BytesIO()
    with matplotlib.rc_context(TEXT_RC), PdfPages(buf, metadata={"CreationDate": None, "Creator": "spectdose",
                                                                 "Producer": "spectdose"}) as pdf:
        fig = Figure(figsize=_A4_IN)
        fig.text(0.05, 0.965, "Lu-177 SPECT/CT dosimetry", fontsize=14, weight="bold")
        fig.text(0.95, 0.967, (summary.get("provenance") or {}).get("software") or "spectdose", fontsize=8, ha="right")
        y = 0.945
        for block in ("who", "administration", "method"):
            for line in lines[block]:
                fig.text(0.05, y, line, fontsize=7.2)
                y -= 0.0135
            y -= 0.004
        for line in lines["headline"]:
            fig.text(0.05, y, line, fontsize=7.2, weight="bold")
            y -= 0.0135
        y -= 0.004

        # Three key images through the hottest region, with orientation letters.
        point = key_point(view)
        window = default_window(view)
        levels = default_isodose_levels(view)
        pixel_mm = view.pixel_mm()
        top = y - 0.005
        height = 0.25
        for n, plane in enumerate(PLANES):
            index = point[n]
            ax = fig.add_axes((0.05 + n * 0.29, top - height, 0.27, height))
            image = render_slice(view, plane, index, opacity=0.5, window=window, isodose_levels=levels,
                                 pixel_mm=pixel_mm)
            ax.imshow(image, interpolation="nearest")
            ax.autoscale(False)
            for name, marker in MARKER_STYLES.items():
                where = view.markers.get(name)
                if where is not None:
                    rc = [where[a] for a in range(3) if a != n]  # in-plane (row, column) of the view
                    n_rows, n_cols = _slice(view.ct_hu, plane, index).shape
                    ax.plot((rc[1] + 0.5) * image.shape[1] / n_cols - 0.5, (rc[0] + 0.5) * image.shape[0] / n_rows - 0.5,
                            marker=marker, ms=7, mew=1.3, mfc="none", color="white", ls="none")
            ax.set_title(f"{plane} {index + 1}/{view.n_slices(plane)}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            letter = dict(fontsize=7, color="white", weight="bold", transform=ax.transAxes,
                          bbox=dict(facecolor="black", alpha=0.6, pad=0.8, linewidth=0))
            t_, b_, l_, r_ = ORIENTATION[plane]
            ax.text(0.5, 0.985, t_, ha="center", va="top", **letter)
            ax.text(0.5, 0.015, b_, ha="center", va="bottom", **letter)
            ax.text(0.015, 0.5, l_, ha="left", va="center", **letter)
            ax.text(0.985, 0.5, r_, ha="right", va="center", **letter)
        cax = fig.add_axes((0.93, top - height + 0.03, 0.012, height - 0.06))
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(Normalize(*window), colormaps["jet"]), cax=cax)
        bar.set_label(view.dose_unit, fontsize=7)
        bar.ax.tick_params(labelsize=6)
        iso_text = "Isodose lines: " + (", ".join(
            f"{level:g} {view.dose_unit} ({_colour_name(c)})" for level, c in zip(levels, isodose_colours(levels), strict=True))
            or "none below the maximum") + f"; colour wash from {window[0]:.3g} {view.dose_unit}; images cut through " \
            + ("the hottest voxel of the region with the highest mean dose" if len(view.region_masks) else "the hottest voxel") \
            + "; patient's right on the viewer's left (A anterior, P posterior, R right, L left, S superior, I inferior)" \
            + ("; marked in white: " + ", ".join(f"{name} ({_MARKER_SYMBOL[m]})" for name, m in MARKER_STYLES.items()
                                                 if name in view.markers)
               + ", where they project onto each slice" if view.markers else "")
        y = top - height - 0.018
        for line in _wrap(iso_text, 130):
            fig.text(0.05, y, line, fontsize=6.5)
            y -= 0.012

        # DVHs of the first 16 regions (the rest on later pages); the table on the next page.
        dvh_top = y - 0.01
        dvh_height = 0.20
        if not first_dvh:
            ax = fig.add_axes((0.08, dvh_top - dvh_height - 0.02, 0.38, dvh_height))
            plot_dvh(ax, [], absorbed=absorbed)
            ax.set_title("Cumulative DVH", fontsize=8)
            ax.text(0.5, 0.35, summary.get("regions_error") or "no regions reported", ha="center", fontsize=7,
                    transform=ax.transAxes, wrap=True)
        for n, group in enumerate(first_dvh):
            ax = fig.add_axes((0.08 + n * 0.47, dvh_top - dvh_height - 0.02, 0.38, dvh_height))
            plot_dvh(ax, [rows[k] for k in group], absorbed=absorbed, colours=[colours[k] for k in group])
            ax.set_title(f"Cumulative DVH ({group[0] + 1}-{group[-1] + 1} of {len(rows)})", fontsize=8)
        y = dvh_top - dvh_height - 0.075
        if table_pages:
            fig.text(0.05, y, f"Region table ({len(rows)} regions): page 2" + (f"-{1 + len(table_pages)}"
                     if len(table_pages) > 1 else "") + (f"; further DVHs: page {2 + len(table_pages)}"
                     + (f"-{n_pages}" if len(dvh_pages) > 1 else "") if dvh_pages else ""), fontsize=7)
            y -= 0.015

        # Warnings, the reviewer's fields and the footer.
        warn = [x for w in lines["warnings"] for x in _wrap(w, 135)]
        room = max(0, int((y - 0.115) / 0.0115))
        if len(warn) > room:
            warn = warn[:max(0, room - 1)] + [f"... {len(warn) - max(0, room - 1)} more warning lines in summary.txt"]
        for line in warn:
            fig.text(0.05, y, line, fontsize=6.2, color="#a00000")
            y -= 0.0115
        _reviewer_fields(fig, 0.045)
        footer(fig, 1)
        pdf.savefig(_without_ligatures(fig))

        page = 1
        for chunk in table_pages:
            page += 1
            fig = Figure(figsize=_A4_IN)
            fig.text(0.05, 0.965, f"Regions ({chunk[0] + 1}-{chunk[-1] + 1} of {len(rows)})", fontsize=11, weight="bold")
            fig.text(0.95, 0.967, who_line, fontsize=7, ha="right")
            height = _HEADER_ROW_H + sum(row_heights[k] for k in chunk)
            tax = fig.add_axes((0.04, _TABLE_TOP - height, 0.92, height))
            tax.axis("off")
            table = tax.table(cellText=[cells[k] for k in chunk], colLabels=pdf_header, cellLoc="right",
                              colLoc="center", bbox=(0, 0, 1, 1))
            table.auto_set_font_size(False)
            table.set_fontsize(_TABLE_FONT_PT)
            for (r, c), cell in table.get_celld().items():
                cell.set_linewidth(0.3)
                cell.set_width(widths[c])
                cell.set_height((_HEADER_ROW_H if r == 0 else row_heights[chunk[r - 1]]) / height)
                if c == 0 and r > 0:
                    cell.get_text().set_ha("left")
                    cell.get_text().set_color(np.asarray(colours[chunk[r - 1]]) / 255.0)
                if header[c] == "notes" and r > 0:
                    cell.get_text().set_ha("left")
            fig.text(0.05, _TABLE_TOP - height - 0.02,
                     "- : no dose statistic (region not covered by the SPECT, or no value). Region names in their "
                     "DVH colours. D2/D50/D98: minimum dose to the hottest 2/50/98 % of the region.", fontsize=6.2)
            footer(fig, page)
            pdf.savefig(_without_ligatures(fig))
        for panels in dvh_pages:
            page += 1
            fig = Figure(figsize=_A4_IN)
            fig.text(0.05, 0.965, "Cumulative DVHs (continued)", fontsize=11, weight="bold")
            fig.text(0.95, 0.967, who_line, fontsize=7, ha="right")
            for n, group in enumerate(panels):
                col, line_no = n % 2, n // 2
                ax = fig.add_axes((0.08 + col * 0.47, 0.66 - line_no * 0.3, 0.38, 0.24))
                plot_dvh(ax, [rows[k] for k in group], absorbed=absorbed, colours=[colours[k] for k in group])
                ax.set_title(f"Cumulative DVH ({group[0] + 1}-{group[-1] + 1} of {len(rows)})", fontsize=8)
            footer(fig, page)
            pdf.savefig(_without_ligatures(fig))
    return buf.getvalue()


# HarfBuzz's default features include standard ligatures (matplotlib >= 3.11 lays text out with
# libraqm): "ff" in "effective" became one glyph that matplotlib embeds from a second subset of
# DejaVu Sans (another ~0.2 s of font subsetting, issue 20) under a character code that is not its
# text. Without them every glyph is one character, drawn under its own code point.
_NO_LIGATURES = ("-liga",)


def _without_ligatures(fig):
    """``fig`` with standard ligatures turned off in all its text (see :data:`_NO_LIGATURES`)."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        text.set_fontfeatures(_NO_LIGATURES)
    return fig


_LINE_H = _TABLE_FONT_PT * 1.25 / (_A4_IN[1] * 72)  # one text line, figure fraction
_HEADER_ROW_H = 2 * _LINE_H + 0.006


def _pdf_table(header: list[str], body: list[list[str]]):
    """Header on two lines (name, unit), column widths from the text, notes wrapped in their column.

    Returns (header, cells, widths as axes fractions, row heights as figure fractions).
    """
    import textwrap as tw

    pdf_header = [h.replace(" (", "\n(") for h in header]
    # DejaVu Sans averages about 0.56 em a character; the table spans 0.92 of the page width.
    char = _TABLE_FONT_PT * 0.56 / (0.92 * _A4_IN[0] * 72)
    notes = header.index("notes") if "notes" in header else None
    widths = []
    for c, h in enumerate(pdf_header):
        longest = max([len(x) for x in h.split("\n")] + [len(row[c]) for row in body if c != notes] or [4])
        widths.append((longest + 2) * char)
    if notes is not None:
        widths[notes] = max(1.0 - sum(w for c, w in enumerate(widths) if c != notes), 24 * char)
    total = sum(widths)
    widths = [w / total for w in widths] if total > 1.0 else widths
    cells, heights = [], []
    for row in body:
        row = list(row)
        lines = 1
        if notes is not None:
            wrapped = tw.wrap(row[notes], max(16, int(widths[notes] / char) - 2)) or [""]
            if len(wrapped) > _TABLE_MAX_NOTE_LINES:
                wrapped = wrapped[:_TABLE_MAX_NOTE_LINES]
                wrapped[-1] = wrapped[-1][:-1] + "…"
            row[notes], lines = "\n".join(wrapped), len(wrapped)
        cells.append(row)
        heights.append(lines * _LINE_H + 0.006)
    return pdf_header, cells, widths, heights


def _table_pages(row_heights: list[float]) -> list[list[int]]:
    """Rows split into pages by the height they take."""
    room = _TABLE_TOP - _TABLE_BOTTOM - _HEADER_ROW_H - 0.03
    pages, current, used = [], [], 0.0
    for k, h in enumerate(row_heights):
        if current and used + h > room:
            pages.append(current)
            current, used = [], 0.0
        current.append(k)
        used += h
    return pages + ([current] if current else [])


def _reviewer_fields(fig, y: float) -> None:
    """Name, date and signature lines for the reviewing physicist."""
    fig.text(0.05, y + 0.028, "Reviewed and approved by the medical physicist:", fontsize=7.5, weight="bold")
    for x0, width, label in ((0.05, 0.33, "Name"), (0.41, 0.17, "Date"), (0.61, 0.34, "Signature")):
        fig.add_artist(_line(fig, x0, x0 + width, y))
        fig.text(x0, y - 0.011, label, fontsize=6.5, color="#444444")


def _line(fig, x0: float, x1: float, y: float):
    from matplotlib.lines import Line2D

    return Line2D([x0, x1], [y, y], transform=fig.transFigure, color="black", lw=0.6)


def _colour_name(rgb: tuple[int, int, int]) -> str:
    names = {(0, 255, 255): "cyan", (0, 255, 0): "green", (255, 255, 0): "yellow", (255, 0, 255): "magenta",
             (255, 255, 255): "white", (255, 128, 0): "orange"}
    return names.get(tuple(rgb), "#" + "".join(f"{v:02x}" for v in rgb))
