"""Beds of one SPECT acquisition: telling them apart from other SPECTs, and joining them into one volume.

Private to :mod:`spectdose.dicom.ingest`. A multi-bed SPECT covers the body in several table
positions; workstations export each bed's reconstruction as its own series, or as several
objects in one series. Taking one bed alone gives a dose for what the SPECT never saw (issue 18:
liver x0.009 with a bed missing), so beds are recognised and joined, never offered as a choice.

Beds of one acquisition share the frame of reference, orientation, pixel grid in-plane (spacing,
matrix, position), slice spacing and energy window, lie at different positions along the slice
axis on one lattice of slices, and were acquired within :data:`MAX_BED_SPREAD_H` of each other.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

import numpy as np

from spectdose.dicom import _activity as act
from spectdose.dicom._series import Candidate, candidate_grid
from spectdose.errors import GeometryError, InputError
from spectdose.geometry import Grid

# Beds of one acquisition follow each other within minutes (typically 15-30 min a bed); SPECTs
# more than this apart are different acquisitions (time points), not beds.
MAX_BED_SPREAD_H = 3.0
# Slice positions of two beds must lie on one lattice to within this fraction of the spacing.
_LATTICE_TOLERANCE = 0.05
# In-plane geometry (pixel spacing, slice spacing) must agree to this relative tolerance.
_SPACING_RTOL = 1e-3

# Volumes further apart than this fraction of the shorter one's length (and than 2 slices) are two
# SPECTs of different body regions (a choice for the user), not beds of one acquisition with slices
# missing between them.
_MAX_GAP_FRACTION = 0.2


class _NotBeds(Exception):
    """Volumes of one setup that are too far apart to be beds of one acquisition."""


# "bed 1 of 2", "Bed 1/2", "BED1 OF 3": a description saying how many beds the acquisition had.
_BED_OF_N = re.compile(r"\bbed\s*#?\s*(\d+)\s*(?:of|/)\s*(\d+)", re.IGNORECASE)


@dataclasses.dataclass
class Bed:
    """One bed: its candidate, file order and grid (axis 0 along the common slice direction)."""

    cand: Candidate
    order: list[int]
    grid: Grid
    flipped: bool  # frames stored against the common slice direction (array to be reversed)
    notes: list[str]


def _placed(cand: Candidate) -> Bed | None:
    try:
        order, grid, notes = candidate_grid(cand)
    except (InputError, GeometryError):
        return None
    return Bed(cand, order, grid, False, notes)


def _acquired(cand: Candidate) -> dt.datetime | None:
    value, source = act.acquisition_start([f.header for f in cand.files], "", [])
    return value if source == "acquisition" else None


def _setup_key(bed: Bed) -> tuple:
    """What beds of one acquisition share (rounded so that equal headers give equal keys)."""
    g, c = bed.grid, bed.cand
    axis = g.axes[0] * np.sign(g.axes[0][np.argmax(np.abs(g.axes[0]))])  # direction up to sign
    inplane = np.asarray(g.origin_mm) - (np.asarray(g.origin_mm) @ axis) * axis
    window = None if c.window is None or c.window.centre_kev is None else round(c.window.centre_kev, 1)
    return (
        c.study_uid,
        c.frame_of_reference_uid,
        c.kind,
        window,
        tuple(np.round(axis, 3)),
        tuple(np.round(g.axes[1], 3)),
        tuple(np.round(g.axes[2], 3)),
        g.shape[1:],
        tuple(round(v, 2) for v in g.spacing_mm),
        tuple(np.round(inplane / max(g.spacing_mm[1:]) * 2).astype(int)),  # to half a pixel
    )


def _aligned(beds: list[Bed]) -> list[Bed]:
    """The beds with axis 0 pointing the same way as the first bed's (reversed grids flipped)."""
    ref = beds[0].grid.axes[0]
    out = []
    for b in beds:
        g = b.grid
        if float(g.axes[0] @ ref) < 0:
            axes = g.axes.copy()
            axes[0] = -axes[0]
            origin = np.asarray(g.origin_mm) + (g.shape[0] - 1) * g.spacing_mm[0] * g.axes[0]
            g = dataclasses.replace(g, axes=axes, origin_mm=tuple(origin))
            b = dataclasses.replace(b, grid=g, flipped=True)
        out.append(b)
    return sorted(out, key=lambda b: float(np.asarray(b.grid.origin_mm) @ ref))


@dataclasses.dataclass
class BedSet:
    """Two or more beds of one acquisition, in order along the slice axis, and where they start."""

    beds: list[Bed]
    offsets: list[int]  # first slice of each bed in the joined grid
    grid: Grid  # the joined grid

    @property
    def candidates(self) -> list[Candidate]:
        return [b.cand for b in self.beds]

    def describe(self) -> str:
        ref = self.grid.axes[0]
        spans = []
        for b in self.beds:
            start = float(np.asarray(b.grid.origin_mm) @ ref)
            end = start + (b.grid.shape[0] - 1) * b.grid.spacing_mm[0]
            spans.append(f"{b.cand.label()} at {start:.1f} to {end:.1f} mm")
        return "; ".join(spans)


def _chain(beds: list[Bed]) -> BedSet:
    """Join ordered beds on one slice lattice; GeometryError for a gap or slices off the lattice."""
    beds = _aligned(beds)
    ref = beds[0].grid
    spacing = ref.spacing_mm[0]
    axis = ref.axes[0]
    starts = [float(np.asarray(b.grid.origin_mm) @ axis) for b in beds]
    labels = " and ".join(b.cand.label() for b in beds)
    offsets = []
    for s in starts:
        k = (s - starts[0]) / spacing
        if abs(k - round(k)) > _LATTICE_TOLERANCE:
            raise GeometryError(
                f"{labels} are beds of one acquisition, but their slices do not lie on one grid (a bed starts "
                f"{(k - round(k)) * spacing:+.2f} mm off the other's slice positions): they cannot be joined "
                "without resampling; join the beds at the workstation (one volume) and resend"
            )
        offsets.append(int(round(k)))
    for a, b, oa, ob in zip(beds, beds[1:], offsets, offsets[1:], strict=False):
        gap = ob - (oa + a.grid.shape[0])
        if gap > max(2, _MAX_GAP_FRACTION * min(a.grid.shape[0], b.grid.shape[0])):
            raise _NotBeds  # far apart: two SPECTs of different regions, not beds side by side
        if gap > 0:
            end = starts[0] + (oa + a.grid.shape[0] - 1) * spacing
            raise GeometryError(
                f"{labels} are beds of one acquisition, but they leave a gap of {gap} slice(s) ({gap * spacing:.1f} mm) "
                f"after {end:.1f} mm along the slice axis: the activity there was not imaged, so no dose can be "
                "given for it; resend the beds with their overlap (or one joined volume)"
            )
        if ob + b.grid.shape[0] <= oa + a.grid.shape[0]:
            raise GeometryError(
                f"{labels}: one lies inside the other along the slice axis; they are not beds of one acquisition "
                "side by side"
            )
    n = max(o + b.grid.shape[0] for o, b in zip(offsets, beds, strict=True))
    grid = dataclasses.replace(ref, shape=(n, *ref.shape[1:]))
    return BedSet(beds, offsets, grid)


def bed_sets(cands: list[Candidate]) -> tuple[list[BedSet], list[Candidate]]:
    """Split usable SPECT candidates into acquisitions of several beds and volumes standing alone.

    Candidates with the same setup (:func:`_setup_key`) acquired within :data:`MAX_BED_SPREAD_H`
    at distinct positions along the slice axis are beds of one acquisition; when two share a
    position (an AC and a NAC reconstruction of each bed), they are told apart by series
    description. Beds that cannot be joined (a gap, slices off one lattice) raise GeometryError
    naming them as beds of one acquisition.
    """
    placed: dict[int, Bed] = {}
    clusters: dict[tuple, list[Bed]] = {}
    alone: list[Candidate] = []
    for c in cands:
        bed = _placed(c)
        if bed is None or not c.frame_of_reference_uid:
            alone.append(c)
            continue
        placed[id(c)] = bed
        clusters.setdefault(_setup_key(bed), []).append(bed)
    sets: list[BedSet] = []
    for members in clusters.values():
        groups = [members]
        if len(_distinct_positions(members)) < len(members):  # e.g. AC and NAC of each bed
            by_desc: dict[str, list[Bed]] = {}
            for b in members:
                by_desc.setdefault(b.cand.description, []).append(b)
            groups = list(by_desc.values())
        for group in groups:
            times = [_acquired(b.cand) for b in group]
            known = [t for t in times if t is not None]
            if (
                len(group) < 2
                or len(_distinct_positions(group)) < len(group)
                or (known and (max(known) - min(known)).total_seconds() > MAX_BED_SPREAD_H * 3600)
            ):
                alone.extend(b.cand for b in group)
                continue
            try:
                sets.append(_chain(group))
            except _NotBeds:
                alone.extend(b.cand for b in group)
    position = {id(c): i for i, c in enumerate(cands)}
    alone.sort(key=lambda c: position[id(c)])
    return sets, alone


def _distinct_positions(beds: list[Bed]) -> set[int]:
    """Slice-axis positions, in half slices, of the beds' first slices (aligned to the first bed)."""
    aligned = _aligned(beds)
    axis = aligned[0].grid.axes[0]
    spacing = aligned[0].grid.spacing_mm[0]
    return {int(round(float(np.asarray(b.grid.origin_mm) @ axis) / spacing * 2)) for b in aligned}


def beds_said(cand: Candidate) -> tuple[int, int] | None:
    """(bed, of n) when the series description or image comments say "bed k of n"; None otherwise."""
    for keyword in ("SeriesDescription", "ImageComments"):
        found = _BED_OF_N.search(str(cand.first.get(keyword, "") or ""))
        if found:
            k, n = int(found.group(1)), int(found.group(2))
            if 1 <= k <= n and n > 1:
                return k, n
    return None


def join(arrays: list[np.ndarray], bed_set: BedSet) -> np.ndarray:
    """One volume from the beds' activity arrays (same units, same time), overlaps weighted.

    In an overlap the beds are blended with linear weights that fall from 1 to 0 across it (a
    bed's edge slices, at the end of its axial field of view, have the lowest sensitivity and
    the most noise), so the joined volume is continuous and each bed counts most where it saw best.
    """
    n = bed_set.grid.shape[0]
    total = np.zeros((n, *bed_set.grid.shape[1:]), np.float64)
    weight = np.zeros(n, np.float64)
    offsets, beds = bed_set.offsets, bed_set.beds
    for k, (bed, arr, off) in enumerate(zip(beds, arrays, offsets, strict=True)):
        values = arr[::-1] if bed.flipped else arr
        m = values.shape[0]
        before = offsets[k - 1] + beds[k - 1].grid.shape[0] - off if k > 0 else 0
        after = off + m - offsets[k + 1] if k + 1 < len(beds) else 0
        i = np.arange(m, dtype=np.float64)
        w = np.minimum.reduce([np.ones(m), (i + 1) / (max(before, 0) + 1), (m - i) / (max(after, 0) + 1)])
        total[off : off + m] += w[:, None, None] * values
        weight[off : off + m] += w
    return total / weight[:, None, None]
