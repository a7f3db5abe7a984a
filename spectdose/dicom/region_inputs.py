"""Region sets among a study's files: DICOM SEG and RT Structure Set headers, and the CT they are drawn on.

Ingest lists these objects as "not an input" (the dose does not depend on them); a caller
that wants a study's own contours picks them out here, from headers only (no pixels, no
contours read), and checks that they were drawn on the CT of a result before it asks
:func:`spectdose.regions.load_regions` for the masks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom
from pydicom.uid import RTStructureSetStorage, SegmentationStorage

from spectdose.errors import InputError

__all__ = ["RegionInput", "REGION_SOP_CLASSES", "read_region_input", "find_region_inputs", "not_on_ct"]

# SOP Class -> the short name used in file names and messages (PS3.4 B.5).
REGION_SOP_CLASSES = {str(SegmentationStorage): "SEG", str(RTStructureSetStorage): "RTSTRUCT"}


@dataclasses.dataclass(frozen=True)
class RegionInput:
    """What a region set's header says about itself and where it was drawn."""

    path: Path
    kind: str  # "SEG" or "RTSTRUCT"
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uids: tuple[str, ...]
    referenced_series_uids: tuple[str, ...]
    content_datetime: str  # Content Date + Time as written (YYYYMMDDHHMMSS...), "" if absent


def _rtstruct_references(ds) -> tuple[set[str], set[str]]:
    frames, series = set(), set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        if frame.get("FrameOfReferenceUID"):
            frames.add(str(frame.FrameOfReferenceUID))
        for study in frame.get("RTReferencedStudySequence", []) or []:
            for s in study.get("RTReferencedSeriesSequence", []) or []:
                if s.get("SeriesInstanceUID"):
                    series.add(str(s.SeriesInstanceUID))
    for roi in ds.get("StructureSetROISequence", []) or []:
        if roi.get("ReferencedFrameOfReferenceUID"):
            frames.add(str(roi.ReferencedFrameOfReferenceUID))
    return frames, series


def read_region_input(path: str | Path) -> RegionInput | None:
    """The header of a SEG or RT Structure Set file; None for any other DICOM object.

    Raises :class:`InputError` when ``path`` is not a readable DICOM file.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, EOFError, AttributeError, KeyError) as exc:
        raise InputError(f"{path.name} is not a readable DICOM file ({type(exc).__name__})") from exc
    sop_class = str(ds.get("SOPClassUID", ""))
    kind = REGION_SOP_CLASSES.get(sop_class)
    if kind is None:
        return None
    try:
        if kind == "SEG":
            frames = {str(ds.FrameOfReferenceUID)} if ds.get("FrameOfReferenceUID") else set()
            series = {str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", []) or []
                      if s.get("SeriesInstanceUID")}
        else:
            frames, series = _rtstruct_references(ds)
    except (AttributeError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{kind} {path.name}: its references cannot be read ({type(exc).__name__}: {exc})") from exc
    return RegionInput(
        path=path, kind=kind, sop_class_uid=sop_class, sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")), series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        frame_of_reference_uids=tuple(sorted(frames)), referenced_series_uids=tuple(sorted(series)),
        content_datetime=f"{ds.get('ContentDate', '') or ''}{ds.get('ContentTime', '') or ''}",
    )


def find_region_inputs(folder: str | Path) -> list[RegionInput]:
    """Every SEG and RT Structure Set under ``folder``, the newest (Content Date/Time) first.

    Files that are not readable DICOM are skipped: ingest reports them.
    """
    found = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            item = read_region_input(path)
        except InputError:
            continue
        if item is not None:
            found.append(item)
    return sorted(found, key=lambda r: (r.content_datetime, r.sop_instance_uid), reverse=True)


def not_on_ct(region: RegionInput, *, ct_series_uid: str | None, ct_frame_of_reference_uid: str | None) -> str | None:
    """Why ``region`` was not drawn on this CT (another frame of reference), or None if it was.

    The frame of reference decides (PS3.3 C.7.4.1: one frame, one patient coordinate system);
    a set that names no frame counts when it references the CT series itself.
    """
    if region.frame_of_reference_uids:
        if ct_frame_of_reference_uid and ct_frame_of_reference_uid in region.frame_of_reference_uids:
            return None
        return (f"{region.kind} {region.sop_instance_uid} is on frame of reference "
                f"{', '.join(region.frame_of_reference_uids)}, not the CT's {ct_frame_of_reference_uid or '(unknown)'}: "
                "regions must be drawn on the study's CT (or registered to it) before they are sent")
    if ct_series_uid and ct_series_uid in region.referenced_series_uids:
        return None
    return (f"{region.kind} {region.sop_instance_uid} names no frame of reference and does not reference the CT "
            f"series {ct_series_uid or '(unknown)'}")
