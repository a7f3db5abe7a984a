"""RT Structure Sets (PS3.3 A.19): contours to masks on a CT grid, and masks to contours.

Why our own rasteriser rather than a library (docs/regions.md compares them): rt-utils
assigns contours to slices only through the optional Contour Image Sequence and rounds
vertices to whole pixels before filling; dicompyler-core computes DVHs on the dose grid
for axial, head-first geometry, not masks; highdicom does not read RT Structure Sets;
plastimatch is a separate executable. Here every contour point is mapped through the CT
:class:`~spectdose.geometry.Grid` (LPS, any orientation, feet-first or oblique stacks), and
each planar contour is filled by an even-odd scanline at the voxel centres of the CT slice
it lies in (points on the contour count as inside, several contours on one slice combine
by exclusive or, so holes work).

Writing goes the other way: one closed contour per connected outline of a mask on each
slice, traced by marching squares (contourpy, matplotlib's contouring engine) at the 0.5
level between voxel centres, so every voxel centre lies clearly inside or outside and any
reader's point-in-polygon test gives back the same voxels.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    RTStructureSetStorage,
    SegmentationStorage,
)

from spectdose.dicom._derived import file_meta
from spectdose.errors import GeometryError, InputError
from spectdose.geometry import Grid

__all__ = [
    "Structure",
    "read_rtstruct",
    "contours_to_mask",
    "mask_to_contours",
    "build_rtstruct",
]

# RT Referenced Study Sequence items name the study with this SOP Class (PS3.3 C.8.8.5.4,
# the retired Detached Study Management SOP Class that RT objects keep using).
_STUDY_MANAGEMENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
# A contour whose points spread over more than this fraction of a slice spacing along the
# slice normal does not lie in a CT slice plane (contour coordinates are usually written
# with 0.01 mm precision, far below any slice spacing).
_PLANE_TOLERANCE_SLICES = 0.1
# Contours further than this from the nearest CT slice centre are reported (and still put
# on that slice, the rule plastimatch and most planning systems follow).
_BETWEEN_SLICES = 0.25


@dataclasses.dataclass
class Structure:
    """One ROI of a structure set: its number, name and closed planar contours (LPS mm)."""

    number: int
    name: str
    frame_of_reference_uid: str
    contours_lps_mm: list[np.ndarray]
    interpreted_type: str = ""
    skipped_types: tuple[str, ...] = ()


def read_rtstruct(path: str | Path) -> tuple[Dataset, list[Structure]]:
    """The RT Structure Set's dataset and its structures (closed planar contours only).

    Raises
    ------
    InputError
        If the file is not a readable DICOM file, not an RT Structure Set, or is corrupt
        (missing sequences, contour data whose length disagrees with its point count or
        is not a multiple of 3, non-numeric coordinates).
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, EOFError) as exc:
        raise InputError(f"{path.name} is not a readable DICOM file ({type(exc).__name__})") from exc
    if ds.get("SOPClassUID") != RTStructureSetStorage:
        raise InputError(
            f"{path.name} is not an RT Structure Set (SOP Class {ds.get('SOPClassUID')}, modality {ds.get('Modality')})"
        )
    try:
        rois = {int(item.ROINumber): item for item in ds.StructureSetROISequence}
        contour_items = list(ds.get("ROIContourSequence", []))
    except (AttributeError, ValueError, TypeError) as exc:
        raise InputError(f"corrupt RT Structure Set {path.name}: Structure Set ROI Sequence unreadable ({exc})") from exc
    if not rois:
        raise InputError(f"corrupt RT Structure Set {path.name}: no ROI in the Structure Set ROI Sequence")
    types = {}
    for obs in ds.get("RTROIObservationsSequence", []):
        types[int(obs.get("ReferencedROINumber", -1))] = str(obs.get("RTROIInterpretedType", "") or "")
    structures = []
    for item in contour_items:
        try:
            number = int(item.ReferencedROINumber)
        except (AttributeError, ValueError, TypeError) as exc:
            raise InputError(f"corrupt RT Structure Set {path.name}: an ROI Contour item has no Referenced ROI Number") from exc
        if number not in rois:
            raise InputError(f"corrupt RT Structure Set {path.name}: contours for ROI {number}, which is not defined")
        roi = rois[number]
        name = str(roi.get("ROIName", "") or f"ROI {number}")
        contours, skipped = [], []
        for n, contour in enumerate(item.get("ContourSequence", []), start=1):
            kind = str(contour.get("ContourGeometricType", ""))
            if kind != "CLOSED_PLANAR":
                skipped.append(kind or "untyped")
                continue
            try:
                data = np.asarray([float(v) for v in contour.ContourData], dtype=float)
            except (AttributeError, ValueError, TypeError) as exc:
                raise InputError(f"corrupt RT Structure Set {path.name}: ROI '{name}' contour {n} has no numeric Contour Data") from exc
            declared = contour.get("NumberOfContourPoints")
            if data.size % 3 or (declared is not None and int(declared) * 3 != data.size) or not np.isfinite(data).all():
                raise InputError(
                    f"corrupt RT Structure Set {path.name}: ROI '{name}' contour {n} has {data.size} coordinates "
                    f"for {declared} points"
                )
            if data.size >= 9:  # a closed contour needs three points
                contours.append(data.reshape(-1, 3))
        structures.append(
            Structure(
                number=number,
                name=name,
                frame_of_reference_uid=str(roi.get("ReferencedFrameOfReferenceUID", "") or ""),
                contours_lps_mm=contours,
                interpreted_type=types.get(number, ""),
                skipped_types=tuple(sorted(set(skipped))),
            )
        )
    # ROIs without an ROI Contour item are kept as empty structures, so they are reported.
    seen = {s.number for s in structures}
    for number, roi in rois.items():
        if number not in seen:
            structures.append(
                Structure(number, str(roi.get("ROIName", "") or f"ROI {number}"),
                          str(roi.get("ReferencedFrameOfReferenceUID", "") or ""), [], types.get(number, ""))
            )
    return ds, structures


def contours_to_mask(contours_lps_mm: Sequence[np.ndarray], grid: Grid, *, name: str = "structure") -> tuple[np.ndarray, dict]:
    """Boolean mask on ``grid`` of closed planar contours (LPS mm), filled at voxel centres.

    Each contour goes to the CT slice whose plane it lies in (nearest slice centre); its
    polygon is filled by an even-odd scanline in that slice, voxel centres on the contour
    included; contours on the same slice combine by exclusive or (holes).

    Returns
    -------
    (mask, info)
        ``mask`` of shape ``grid.shape``; ``info`` counts contours placed, outside the grid,
        and between slices.

    Raises
    ------
    GeometryError
        If a contour does not lie in a plane parallel to the CT slices.
    """
    mask = np.zeros(grid.shape, dtype=bool)
    info = {"contours": len(contours_lps_mm), "outside_grid": 0, "between_slices": 0}
    nk, nj, ni = grid.shape
    outlines = []
    for points in contours_lps_mm:
        idx = grid.lps_mm_to_index(points)  # (n, 3): k, j, i
        k = idx[:, 0]
        if np.ptp(k) > _PLANE_TOLERANCE_SLICES:
            raise GeometryError(
                f"structure '{name}': a contour spreads over {np.ptp(k) * grid.spacing_mm[0]:.2f} mm across the CT "
                "slices; only contours in planes parallel to the CT slices can be filled"
            )
        k_mean = float(k.mean())
        slice_k = int(np.rint(k_mean))
        if abs(k_mean - slice_k) > _BETWEEN_SLICES:
            info["between_slices"] += 1
        # Points written at voxel centres come back a hair off after LPS round trips; snap them
        # (within 1/1000 voxel) so that "on the contour" is decided exactly.
        j, i = (np.where(np.abs(v - np.rint(v)) < 1e-3, np.rint(v), v) for v in (idx[:, 1], idx[:, 2]))
        if not (0 <= slice_k < nk) or j.max() < -0.5 or j.min() > nj - 0.5 or i.max() < -0.5 or i.min() > ni - 0.5:
            info["outside_grid"] += 1
            continue
        interior, outline = _fill_polygon(i, j, (nj, ni))
        mask[slice_k] ^= interior
        outlines.append((slice_k, outline))
    # Centres on any contour, an outer one or a hole's, are inside: a contour drawn through
    # voxel centres (as rt-utils and some planning systems write them) outlines the voxels it
    # passes, whichever side the region lies on.
    for slice_k, outline in outlines:
        mask[slice_k] |= outline
    return mask, info


def _fill_polygon(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres strictly inside one closed polygon (x = column, y = row index), and those on it.

    Even-odd scanline; each row is scanned with edges taken half-open at their lower and at
    their upper end, so a row through a vertex or along a horizontal edge still finds the
    centres on the outline.
    """
    ny, nx = shape
    out = np.zeros(shape, dtype=bool)
    on = np.zeros(shape, dtype=bool)
    x0, y0 = x, y
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    rows = np.arange(max(0, int(np.ceil(y.min()))), min(ny - 1, int(np.floor(y.max()))) + 1)
    if rows.size == 0:
        return out, on
    cols = np.arange(nx)
    slanted = y0 != y1
    x0, y0, x1, y1 = x0[slanted], y0[slanted], x1[slanted], y1[slanted]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    for row in rows:
        for upper in (False, True):
            hit = ((lo < row) & (row <= hi)) if upper else ((lo <= row) & (row < hi))
            if not hit.any():
                continue
            xs = np.sort(x0[hit] + (row - y0[hit]) * (x1[hit] - x0[hit]) / (y1[hit] - y0[hit]))
            count = np.searchsorted(xs, cols, side="right")
            edge = np.isin(cols, xs)
            on[row] |= edge
            out[row] |= (count % 2 == 1) & ~edge
    # Horizontal edges lying on a row of centres: their pixels are on the outline.
    flat = ~slanted
    for xa, xb, yy in zip(x[flat], np.roll(x, -1)[flat], y[flat], strict=True):
        if float(yy).is_integer() and 0 <= yy < ny:
            a, b = sorted((xa, xb))
            on[int(yy), (cols >= a) & (cols <= b)] = True
    return out & ~on, on


def mask_to_contours(mask: np.ndarray, grid: Grid, box: tuple[slice, slice, slice] | None = None
                     ) -> list[tuple[int, np.ndarray]]:
    """Closed contours (slice index, (n, 3) LPS mm) outlining a mask slice by slice.

    Marching squares at the 0.5 level (contourpy) on the mask padded by one voxel, so each
    outline runs between voxel centres and closes at the grid's edge. ``box``: a box of the grid
    holding the whole mask; the contours are traced in it (the same outlines, shifted back).
    """
    import contourpy

    box = box or tuple(slice(0, n) for n in mask.shape)
    local = mask[box]
    k0, j0, i0 = (float(b.start) for b in box)
    out = []
    for k in np.flatnonzero(local.any(axis=(1, 2))):
        padded = np.pad(local[k].astype(np.float64), 1)
        generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
        for line in generator.lines(0.5):
            ij = np.asarray(line, dtype=float) - 1.0  # (n, 2) as (x=i, y=j), padding removed
            if len(ij) > 1 and np.allclose(ij[0], ij[-1]):
                ij = ij[:-1]  # DICOM closed contours do not repeat the first point
            if len(ij) < 3:
                continue
            kji = np.column_stack([np.full(len(ij), float(k) + k0), ij[:, 1] + j0, ij[:, 0] + i0])
            out.append((int(k + k0), grid.index_to_lps_mm(kji)))
    return out


_CONTOUR_DATA = pydicom.tag.Tag("ContourData")


def _decimal_strings(tag, values: np.ndarray) -> RawDataElement:
    """A DS element of ``values`` at 0.001 mm as the bytes a file holds (explicit VR little endian):
    what ``[f"{v:.3f}" for v in values]`` writes, without pydicom checking each of the ~10^4
    numbers of a clinical structure set as a decimal string (always valid here); read back on access."""
    text = "\\".join(f"{v:.3f}" for v in values).encode("ascii")
    if len(text) % 2:
        text += b" "  # DS values are padded to an even length with a space (PS3.5 6.2)
    return RawDataElement(tag, "DS", len(text), text, 0, False, True)


def build_rtstruct(
    masks: Mapping[str, np.ndarray],
    grid: Grid,
    header: Dataset,
    *,
    ct_series_uid: str,
    ct_instance_uids: Sequence[str],
    sop_instance_uid: str,
    series_instance_uid: str,
    label: str,
    source_segments: Mapping[str, tuple[str, int]] | None = None,
    automatic: bool = False,
    interpreted_types: Mapping[str, str] | None = None,
    series_number: int = 903,
    software_version: str = "",
    created_at: dt.datetime | None = None,
    boxes: Mapping[str, tuple[slice, slice, slice]] | None = None,
) -> Dataset:
    """An RT Structure Set of ``masks`` (on ``grid``) in the patient and study of ``header``.

    ``ct_instance_uids`` are the CT's SOP Instance UIDs in the order of ``grid``'s slices
    when ``grid`` is the CT grid (each contour then names its CT image), otherwise any
    order (the series is referenced without per-contour images). ``source_segments`` maps a
    region name to the (SEG SOP Instance UID, segment number) it was traced from, written
    as the ROI's Definition Source Sequence (PS3.3 C.8.8.5). ``boxes`` maps a region name to a
    box of the grid holding its whole mask, where its contours are traced (:func:`mask_to_contours`).

    Raises
    ------
    GeometryError
        If ``grid`` has no frame of reference, or a mask does not match its shape.
    """
    if not grid.frame_of_reference_uid:
        raise GeometryError("an RT Structure Set needs the grid's Frame of Reference UID")
    created_at = created_at or dt.datetime.now()
    date, time = created_at.strftime("%Y%m%d"), created_at.strftime("%H%M%S")
    per_slice_images = len(ct_instance_uids) == grid.shape[0]
    ct_class = CTImageStorage  # CT Image Storage

    def image_ref(uid: str) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = ct_class
        item.ReferencedSOPInstanceUID = uid
        return item

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, keyword, header.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = label[:64]
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = grid.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "spectdose"
    ds.ManufacturerModelName = "spectdose"
    ds.SoftwareVersions = software_version or "unknown"
    ds.InstanceNumber = 1
    ds.StructureSetLabel = label[:16]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    series_item = Dataset()
    series_item.SeriesInstanceUID = ct_series_uid
    series_item.ContourImageSequence = [image_ref(uid) for uid in ct_instance_uids]
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = _STUDY_MANAGEMENT_SOP_CLASS
    study_item.ReferencedSOPInstanceUID = header.StudyInstanceUID
    study_item.RTReferencedSeriesSequence = [series_item]
    for_item = Dataset()
    for_item.FrameOfReferenceUID = grid.frame_of_reference_uid
    for_item.RTReferencedStudySequence = [study_item]
    ds.ReferencedFrameOfReferenceSequence = [for_item]
    rois, contour_items, observations = [], [], []
    palette = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                        [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]])
    for number, (name, mask) in enumerate(masks.items(), start=1):
        if mask.shape != grid.shape:
            raise GeometryError(f"region '{name}': mask shape {mask.shape} is not the grid's {grid.shape}")
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = grid.frame_of_reference_uid
        roi.ROIName = name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC" if automatic else "SEMIAUTOMATIC"
        if source_segments and name in source_segments:
            seg_uid, segment_number = source_segments[name]
            src = Dataset()
            src.ReferencedSOPClassUID = SegmentationStorage
            src.ReferencedSOPInstanceUID = seg_uid
            src.ReferencedSegmentNumber = int(segment_number)
            roi.DefinitionSourceSequence = [src]
        rois.append(roi)
        contours = []
        for k, points in mask_to_contours(mask, grid, (boxes or {}).get(name)):
            contour = Dataset()
            if per_slice_images:
                contour.ContourImageSequence = [image_ref(ct_instance_uids[k])]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour[_CONTOUR_DATA] = _decimal_strings(_CONTOUR_DATA, points.ravel())
            contours.append(contour)
        item = Dataset()
        item.ROIDisplayColor = [int(c) for c in palette[(number - 1) % len(palette)]]
        item.ReferencedROINumber = number
        if contours:
            item.ContourSequence = contours
        contour_items.append(item)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = (interpreted_types or {}).get(name, "")
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contour_items
    ds.RTROIObservationsSequence = observations
    ds.file_meta = file_meta(RTStructureSetStorage, sop_instance_uid)
    return ds
