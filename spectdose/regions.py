"""Regions of interest from a DICOM SEG, and dose statistics per region.

A clinic often has organ and lesion contours on the CT (from a planning or segmentation
tool) as a DICOM Segmentation; `spectdose dose --regions SEG.dcm` reports absorbed dose
and dose rate per segment. The phantom generator writes its VOIs as such a SEG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import GeometryError, InputError
from .geometry import Grid, Volume, resample_to_grid

__all__ = ["load_segmentation_masks", "region_statistics"]


def load_segmentation_masks(path: str | Path, ct_grid: Grid) -> dict[str, np.ndarray]:
    """Boolean masks on ``ct_grid``, one per segment label, from a DICOM SEG file."""
    import highdicom as hd
    import pydicom

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except (OSError, ValueError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"{path.name} is not a readable DICOM Segmentation ({type(exc).__name__})") from exc
    if ct_grid.frame_of_reference_uid and seg.FrameOfReferenceUID != ct_grid.frame_of_reference_uid:
        raise GeometryError(
            f"segmentation {path.name} is on frame of reference {seg.FrameOfReferenceUID}, "
            f"not the CT's {ct_grid.frame_of_reference_uid}"
        )
    try:
        vol = seg.get_volume()
    except (RuntimeError, ValueError) as exc:
        raise GeometryError(f"segmentation {path.name} does not form a regular volume: {exc}") from exc
    grid = Grid(vol.array.shape[:3], tuple(vol.spacing), tuple(vol.position), np.asarray(vol.direction).T)
    masks = {}
    for index, number in enumerate(seg.segment_numbers):
        label = str(seg.get_segment_description(number).SegmentLabel)
        planes = np.ascontiguousarray(vol.array[..., index] > 0).astype(np.uint8)
        on_ct = resample_to_grid(Volume(planes, grid, "label"), ct_grid, interpolation="nearest").array > 0
        if on_ct.any():
            masks[label] = on_ct
    return masks


def region_statistics(
    dose_gy: np.ndarray | None, dose_rate_gy_per_s: np.ndarray, masks: dict[str, np.ndarray], voxel_volume_ml: float
) -> list[dict]:
    """Per region: volume, mean dose rate, and mean / max / D2 / D50 / D98 absorbed dose.

    Dx is the minimum dose to the hottest x % of the region (so D98 is near the minimum).
    """
    rows = []
    for label, mask in masks.items():
        rate = dose_rate_gy_per_s[mask]
        row = {
            "region": label,
            "volume_ml": round(float(mask.sum()) * voxel_volume_ml, 3),
            "mean_dose_rate_mgy_per_h": float(rate.mean() * 3.6e6),
        }
        if dose_gy is not None:
            d = dose_gy[mask]
            row.update(
                mean_gy=float(d.mean()),
                max_gy=float(d.max()),
                d2_gy=float(np.percentile(d, 98)),
                d50_gy=float(np.percentile(d, 50)),
                d98_gy=float(np.percentile(d, 2)),
            )
        rows.append(row)
    return rows
