"""Dose-rate Parametric Map (PS3.3 A.75) on the CT frame, written with highdicom.

Pixels are either unsigned 16-bit integers whose Real World Value Mapping (slope = max / 65535,
intercept 0) gives the dose rate, or float32 values that are the dose rate itself (slope 1); the
mapping carries the UCUM unit ``mGy/h`` (``mGy/h/MBq`` for an MBq-normalised map). A 16-bit map
is stored JPEG-LS lossless: 10-20 MB instead of 136 MB on a clinical CT grid (issue 20).
``docs/rtdose.md`` explains the precision, the references, UIDs and which readers open it
(dciodvfy, highdicom, dcmqi, SimpleITK).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.pm import ParametricMap, RealWorldValueMapping
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGLSLossless, ParametricMapStorage

from spectdose.dicom.rtdose import (
    MANUFACTURER,
    ExportError,
    Replaces,
    check_on_ct_frame,
    comments_text,
    ct_frame_of_reference_uid,
    da_tm,
    derive_uid,
    ds,
    series_description,
    series_references,
    software_version,
    source_image_items,
)
from spectdose.dicom.transfer import jpegls_available
from spectdose.geometry import Grid, Volume
from spectdose.study import Study

__all__ = [
    "DOSE_RATE_UNIT",
    "MAP_16_BIT_MAX_ERROR",
    "MEASURED_16_BIT_MAX_BOUND",
    "MeasuredErrors",
    "sixteen_bit_rule",
    "dose_rate_map_bits",
    "build_dose_rate_map",
    "write_dose_rate_map",
    "read_dose_rate_map",
]

# UCUM unit codes for the stored values (PS3.16 CID 7181 allows any UCUM unit). A map of an
# MBq-normalised activity is per MBq in the field of view: "mGy/h/MBq" is valid UCUM
# (mGy.h-1.MBq-1; UCUM 2.1, section 2.1 "/" is left-associative division).
DOSE_RATE_UNIT = hd.sr.CodedConcept(value="mGy/h", scheme_designator="UCUM", meaning="mGy/h")
DOSE_RATE_PER_MBQ_UNIT = hd.sr.CodedConcept(
    value="mGy/h/MBq", scheme_designator="UCUM", meaning="mGy/h/MBq"
)
# Volume units accepted -> (stored unit, factor to it).
_ACCEPTED_UNITS = {
    "mGy/h": (DOSE_RATE_UNIT, 1.0),
    "Gy/h": (DOSE_RATE_UNIT, 1e3),
    "mGy/h/MBq": (DOSE_RATE_PER_MBQ_UNIT, 1.0),
    "Gy/h/MBq": (DOSE_RATE_PER_MBQ_UNIT, 1e3),
}
_READ_UNITS = {"mGy/h": ("mGy/h", 1.0), "Gy/h": ("mGy/h", 1e3), "mGy/h/MBq": ("mGy/h/MBq", 1.0)}
_LUT_LABEL = "DOSE_RATE"
_PATIENT = hd.CoordinateSystemNames.PATIENT
# Frame Anatomy functional group (PS3.3 C.7.6.16.2.8), mandatory in the Parametric Map IOD
# (PS3.3 A.75.4); dcmqi's reader needs it. The map covers the CT field of view, whose
# body part the study does not name: SNOMED CT 38266002 "Entire body" (CID 4031), frame
# laterality U (unpaired).
_ANATOMIC_REGION = ("38266002", "SCT", "Entire body")
# Content Creator's Name (Type 2, Content Identification macro): the software, as a PN
# with an explicit component delimiter (a bare name is the retired PN form for dciodvfy).
_CONTENT_CREATOR = "spectdose^"
# Largest stored value of a 16-bit map (unsigned, all 16 bits used).
_MAX_STORED_16 = 2**16 - 1
# A map is written in 16 bits when rounding to its step (max / 65535) moves each reference mean
# (mean in tissue, each region's mean) by at most this fraction; rounding moves a voxel by at most
# half a step, so any mean by at most that much too: a worst-case bound. The RT Dose's criterion
# (spectdose.dicom.export.RTDOSE_16_BIT_MAX_ERROR; issue 20: region means within 0.1 %).
MAP_16_BIT_MAX_ERROR = 1e-3


# When the worst-case bound is above 0.1 % but at most this, the quoted means are rounded as the
# 16-bit object will hold them and their change is measured: 16 bits when none moved by more than
# 0.1 %. The cap keeps any other mean at or above the smallest quoted one (a region added later)
# within 1 % even in the worst case (docs/rtdose.md, "16 or 32 bits").
MEASURED_16_BIT_MAX_BOUND = 1e-2

# step -> the relative change of each quoted mean when the volume is rounded to multiples of step
MeasuredErrors = Callable[[float], Sequence[float]]


def sixteen_bit_rule(bound: float, step: float, measured_errors: MeasuredErrors | None,
                     max_error: float) -> tuple[int, dict]:
    """16 or 32 bits, and the facts of the choice, for the RT Dose and the maps alike.

    ``bound``: half the 16-bit ``step`` relative to the smallest quoted mean (the worst case). 16
    bits when it is at most ``max_error``; else, when it is at most
    :data:`MEASURED_16_BIT_MAX_BOUND` and ``measured_errors`` is given, 16 bits when every quoted
    mean rounded to ``step`` moved by at most ``max_error`` (measured on the volume: the
    rounding errors of a smooth dose average out over a mean of thousands of voxels); else 32.
    """
    if bound <= max_error:
        return 16, {"criterion": "worst-case bound"}
    if measured_errors is None or bound > MEASURED_16_BIT_MAX_BOUND:
        return 32, {"criterion": "worst-case bound"}
    worst = max((abs(float(e)) for e in measured_errors(step)), default=0.0)
    return (16 if worst <= max_error else 32), {"criterion": "measured", "measured_max_error_of_quoted_means": worst}


def dose_rate_map_bits(values: np.ndarray, references: Sequence[float], *,
                       measured_errors: MeasuredErrors | None = None) -> tuple[int, dict]:
    """16 (unsigned integers + Real World Value Mapping) or 32 (float32) bits for a map, and why.

    16 when half the 16-bit step, max / 65535 / 2, is at most :data:`MAP_16_BIT_MAX_ERROR` of the
    smallest positive reference mean (the means the summary quotes, in the map's units), or when
    ``measured_errors`` shows every quoted mean within that (:func:`sixteen_bit_rule`): a PACS
    takes the 16-bit map JPEG-LS compressed, the float one only deflated (136 MB -> 37 MB on a
    clinical grid). Without a positive reference the map stays float32; an all-zero map is
    16-bit (exact).
    """
    top = float(np.max(values)) if np.size(values) else 0.0
    refs = [float(r) for r in references if r is not None and np.isfinite(r) and r > 0]
    facts: dict = {"max": top, "smallest_reference": min(refs) if refs else None}
    if top <= 0:
        return 16, {**facts, "bits": 16, "step": 0.0, "max_rounding_error": 0.0}
    if not refs:
        return 32, {**facts, "bits": 32}
    step = top / _MAX_STORED_16
    error = step / 2
    bits, rule = sixteen_bit_rule(error / min(refs), step, measured_errors, MAP_16_BIT_MAX_ERROR)
    if bits == 32:
        return 32, {**facts, **rule, "bits": 32, "max_rounding_error_if_16_bit_of_smallest_reference": error / min(refs)}
    return 16, {**facts, **rule, "bits": 16, "step": step, "max_rounding_error": error,
                "max_rounding_error_of_smallest_reference": error / min(refs)}


def build_dose_rate_map(
    dose_rate_mgy_per_h: Volume,
    study: Study,
    *,
    method: str,
    options_key: str = "",
    content_digest: str = "",
    warnings: Sequence[str] = (),
    provenance: Mapping[str, object] | None = None,
    replaces: Replaces | None = None,
    ct_datasets: Sequence[Dataset] | None = None,
    description: str | None = None,
    series_number: int = 902,
    created_at: dt.datetime | None = None,
    sigma: bool = False,
    bits: int = 32,
) -> ParametricMap:
    """A Parametric Map of the dose rate on the CT frame, referencing the CT and NM series.

    Parameters
    ----------
    dose_rate_mgy_per_h : dose rate, units ``"mGy/h"`` (or ``"Gy/h"``, converted), or per
        MBq of a normalised activity, ``"mGy/h/MBq"`` (``"Gy/h/MBq"``); on the CT grid or an
        output grid built from it (:func:`spectdose.dose_grid.output_grid`).
    study : the source study; patient, study and references are copied from it.
    method : short name of the dose method (e.g. ``"DVK"``), part of the UIDs.
    options_key : everything else that changes the values, part of the UIDs.
    content_digest : :func:`spectdose.dicom.rtdose.content_digest` of the inputs, part of the UIDs.
    warnings : caveats; written to Image Comments, their count to the descriptions.
    provenance : how the map was made; written to Image Comments.
    replaces : the earlier map series this one corrects; said in the comments and
        marked in the description; part of the UIDs.
    ct_datasets : the CT headers, if at hand (pixel data not needed). With them highdicom
        links each frame to the CT slice at the same position and copies the scanner as
        contributing equipment; without them only instance-level references are written.
    description : Series Description / Content Description; a default names the method.
    series_number : Series Number of the new series.
    created_at : content and creation date/time; defaults to now.
    sigma : the map holds the 1-sigma uncertainty of the dose rate (same units), coded as a
        Standard Deviation (SCT 386136009) in the Real World Value Mapping; other UIDs.
    bits : 32 writes float32 pixels (the value itself); 16 writes unsigned 16-bit pixels,
        round(value / slope) with slope = max / 65535 and intercept 0 in the Real World Value
        Mapping (step max / 65535; zero stays exactly zero); other UIDs. See
        :func:`dose_rate_map_bits` for when 16 bits keep the quoted means.

    Returns
    -------
    highdicom.pm.ParametricMap
        A pydicom Dataset with file meta information.

    Raises
    ------
    ExportError
        If the dose rate is not on the CT's frame of reference, axes and field of view, has
        other units, holds negative or non-finite values, or ``ct_datasets`` are not the
        study's CT, or ``bits`` is not 16 or 32.
    """
    if bits not in (16, 32):
        raise ExportError(f"bits must be 16 or 32, got {bits!r}")
    if not method:
        raise ExportError("method must name the dose method (it is part of the UIDs)")
    check_on_ct_frame(dose_rate_mgy_per_h, study, "dose-rate volume")
    if dose_rate_mgy_per_h.units not in _ACCEPTED_UNITS:
        raise ExportError(
            f"dose-rate volume has units {dose_rate_mgy_per_h.units!r}; expected one of {sorted(_ACCEPTED_UNITS)}"
        )
    unit, factor = _ACCEPTED_UNITS[dose_rate_mgy_per_h.units]
    per_mbq = unit is DOSE_RATE_PER_MBQ_UNIT
    if factor == 1.0:  # the common case: no float64 copy of a clinical volume (issue 20: memory)
        values_f32 = np.asarray(dose_rate_mgy_per_h.array, dtype=np.float32)
    else:
        values_f32 = (np.asarray(dose_rate_mgy_per_h.array, dtype=np.float64) * factor).astype(np.float32)
    if not np.all(np.isfinite(values_f32)):
        raise ExportError("dose-rate values overflow float32")
    grid = dose_rate_mgy_per_h.grid
    quantity = "dose rate 1-sigma" if sigma else "dose rate"
    description = description or (
        f"{study.administration.nuclide} {quantity} per MBq ({method})"
        if per_mbq
        else f"{study.administration.nuclide} {quantity} ({method})"
    )
    if len(description) > 64:
        raise ExportError(f"description must be at most 64 characters, got {len(description)}")
    sources = _source_images(study, grid, ct_datasets)
    uid_parts = (method, options_key, content_digest, replaces.text() if replaces else "")
    explanation = "Absorbed dose rate per MBq in the field of view" if per_mbq else "Absorbed dose rate"
    if sigma:
        uid_parts = ("sigma", *uid_parts)
        explanation = "1-sigma uncertainty of the " + explanation[0].lower() + explanation[1:]
    if bits == 16:  # float maps keep the UIDs they always had
        uid_parts = (*uid_parts, "bits=16")

    created_at = created_at or dt.datetime.now()
    created_date, created_time = da_tm(created_at)
    maximum = float(values_f32.max())
    if bits == 16:
        pixels, slope = _quantised_16(values_f32, maximum)
        value_range = (int(pixels.min()), int(pixels.max()))
        window_top = float(value_range[1])  # the VOI LUT acts on stored values
    else:
        pixels, slope = values_f32, 1.0
        value_range = (float(values_f32.min()), maximum)
        window_top = maximum
    del values_f32  # one copy of the volume at a time (issue 20: memory)
    marked = series_description(description, warnings, replaces)
    pmap = ParametricMap(
        source_images=sources,
        pixel_array=pixels,
        series_instance_uid=derive_uid("PM-series", study, *uid_parts),
        series_number=series_number,
        sop_instance_uid=derive_uid("PM-instance", study, *uid_parts),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_version(),
        # Type 1 in Enhanced General Equipment; software has no serial, so its version.
        device_serial_number=software_version(),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[
            RealWorldValueMapping(
                lut_label=_LUT_LABEL,
                lut_explanation=explanation,
                quantity_definition=codes.SCT.StandardDeviation if sigma else None,
                unit=unit,
                value_range=value_range,
                slope=slope,
                intercept=0.0,
            )
        ],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=window_top / 2, window_width=max(window_top, 1e-6))
        ],
        content_description=marked,
        content_creator_name=_CONTENT_CREATOR,
        content_label=_LUT_LABEL,
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=[grid.spacing_mm[1], grid.spacing_mm[2]],
            slice_thickness=grid.spacing_mm[0],
            spacing_between_slices=grid.spacing_mm[0],
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system=_PATIENT, image_orientation=[*grid.axes[2], *grid.axes[1]]
        ),
        plane_positions=[
            hd.PlanePositionSequence(_PATIENT, grid.index_to_lps_mm(np.array([k, 0, 0])))
            for k in range(grid.shape[0])
        ],
        series_description=marked,
        content_date=created_date,
        content_time=created_time,
        series_date=created_date,
        series_time=created_time,
    )
    pmap.InstanceCreationDate = created_date
    pmap.InstanceCreationTime = created_time
    pmap.SpecificCharacterSet = "ISO_IR 192"
    pmap.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [_frame_anatomy()]
    # General Series Laterality (Type 2C) is not needed: Frame Laterality says "unpaired".
    if "Laterality" in pmap:
        del pmap.Laterality
    comments = comments_text(provenance=provenance, warnings=warnings, replaces=replaces)
    if comments:
        pmap.ImageComments = comments
    # highdicom referenced only the CT images it was given; list every CT and NM instance
    # the map derives from, as the RT Dose does.
    pmap.SourceImageSequence = source_image_items(study)
    same_study, other_studies = series_references(study, own_study_uid=pmap.StudyInstanceUID)
    pmap.ReferencedSeriesSequence = same_study
    if other_studies:
        pmap.StudiesContainingOtherReferencedInstancesSequence = other_studies
    _make_dimension_uid_deterministic(pmap, study, uid_parts)
    _order_frames_along_normal(pmap)
    return pmap


def _quantised_16(values: np.ndarray, maximum: float) -> tuple[np.ndarray, float]:
    """Unsigned 16-bit pixels and the slope that maps them back: round(value / slope), slope =
    max / 65535 (1 for an all-zero map), so the maximum is 65535 and zero stays zero.

    Slab by slab in float64, so no float64 copy of a whole clinical volume (272 MB) is made.
    """
    slope = maximum / _MAX_STORED_16 if maximum > 0 else 1.0
    stored = np.empty(values.shape, dtype=np.uint16)
    for k in range(values.shape[0]):
        # The minimum guards the maximum against a last-bit excursion above 65535.
        stored[k] = np.minimum(np.rint(values[k].astype(np.float64) / slope), _MAX_STORED_16)
    return stored, slope


def _order_frames_along_normal(pmap: Dataset) -> None:
    """Store frames in increasing position along the plane normal (row x column).

    highdicom stacks a volume's frames along the negative normal; dcmqi 1.5.7
    (``paramap2itkimage``, the converter 3D Slicer uses) then places every slice mirrored
    about the volume centre while reporting the right origin. Frame order is free in a
    Parametric Map, so the frames, their functional groups and the Dimension Index Values
    of the position dimension are rewritten in increasing order along the normal, as in
    the RT Dose (docs/rtdose.md).
    """
    orientation = np.asarray(
        pmap.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
        dtype=float,
    )
    normal = np.cross(orientation[:3], orientation[3:])
    if len(pmap.DimensionIndexSequence) != 1:
        raise ExportError("expected one (position) dimension in the map's Dimension Index Sequence")
    frames = pmap.PerFrameFunctionalGroupsSequence
    distances = np.array(
        [
            np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float) @ normal
            for f in frames
        ]
    )
    order = np.argsort(distances, kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return
    n_frames, rows, columns = len(frames), int(pmap.Rows), int(pmap.Columns)
    keyword, dtype = ("FloatPixelData", "<f4") if "FloatPixelData" in pmap else ("PixelData", "<u2")
    if keyword == "PixelData" and int(pmap.BitsAllocated) != 16:
        raise ExportError(f"expected 16-bit integer pixels, got {pmap.BitsAllocated} bits")
    pixels = np.frombuffer(pmap[keyword].value, dtype=dtype).reshape(n_frames, rows, columns)
    setattr(pmap, keyword, np.ascontiguousarray(pixels[order]).tobytes())
    pmap.PerFrameFunctionalGroupsSequence = [frames[int(k)] for k in order]
    for rank, frame in enumerate(pmap.PerFrameFunctionalGroupsSequence, start=1):
        frame.FrameContentSequence[0].DimensionIndexValues = rank


def _frame_anatomy() -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _ANATOMIC_REGION
    item = Dataset()
    item.AnatomicRegionSequence = [code]
    item.FrameLaterality = "U"
    return item


def _source_images(
    study: Study, grid: Grid, ct_datasets: Sequence[Dataset] | None
) -> list[Dataset]:
    """The CT headers to hand highdicom: the caller's, checked, or a stand-in from the study."""
    ct_ref = study.ct_series
    frame_of_reference = ct_frame_of_reference_uid(study)
    if ct_datasets:
        for dataset in ct_datasets:
            if dataset.get("SeriesInstanceUID") != ct_ref.series_instance_uid:
                raise ExportError(
                    f"ct_datasets holds series {dataset.get('SeriesInstanceUID')}, "
                    f"not the study's CT series {ct_ref.series_instance_uid}"
                )
            if dataset.get("FrameOfReferenceUID") != frame_of_reference:
                raise ExportError(
                    f"ct_datasets instance {dataset.get('SOPInstanceUID')} is on frame of reference "
                    f"{dataset.get('FrameOfReferenceUID')}, not the CT's {frame_of_reference}"
                )
        return list(ct_datasets)
    # Stand-in: one header carrying the study's identity and the CT's frame of reference.
    # Its position lies one slice outside the grid, so highdicom does not claim any
    # frame-by-frame correspondence that the study (which lists instances, not their
    # positions) cannot back up. Only its UIDs and patient/study attributes are written.
    p = study.patient
    stand_in = Dataset()
    stand_in.SOPClassUID = ct_ref.sop_class_uid
    stand_in.SOPInstanceUID = ct_ref.sop_instance_uids[0]
    stand_in.StudyInstanceUID = ct_ref.study_instance_uid
    stand_in.SeriesInstanceUID = ct_ref.series_instance_uid
    stand_in.Modality = ct_ref.modality
    stand_in.FrameOfReferenceUID = frame_of_reference
    stand_in.PositionReferenceIndicator = ""
    stand_in.Rows, stand_in.Columns = grid.shape[1], grid.shape[2]
    stand_in.PixelSpacing = [ds(grid.spacing_mm[1]), ds(grid.spacing_mm[2])]
    stand_in.SliceThickness = ds(grid.spacing_mm[0])
    stand_in.ImageOrientationPatient = [ds(v) for v in (*grid.axes[2], *grid.axes[1])]
    stand_in.ImagePositionPatient = [ds(v) for v in grid.index_to_lps_mm(np.array([-1, 0, 0]))]
    stand_in.PatientName = p.patient_name
    stand_in.PatientID = p.patient_id
    stand_in.PatientBirthDate = p.patient_birth_date
    stand_in.PatientSex = p.patient_sex
    stand_in.StudyDate = p.study_date
    stand_in.StudyTime = p.study_time
    stand_in.StudyID = p.study_id
    stand_in.AccessionNumber = p.accession_number
    stand_in.ReferringPhysicianName = p.referring_physician_name
    return [stand_in]


def _make_dimension_uid_deterministic(
    pmap: Dataset, study: Study, uid_parts: tuple[str, ...]
) -> None:
    """highdicom draws a random Dimension Organization UID; derive it like the others."""
    uid = derive_uid("PM-dimensions", study, *uid_parts)
    for item in pmap.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = uid
    for item in pmap.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = uid


def write_dose_rate_map(
    path: str | os.PathLike, dose_rate_mgy_per_h: Volume, study: Study, *, compress: bool = True, **kwargs
) -> Path:
    """Build (see :func:`build_dose_rate_map`) and write a Parametric Map file; returns its path.

    A 16-bit map is stored JPEG-LS lossless (``compress``, when pydicom has the CharLS encoder):
    the file a REST client downloads is then the object a PACS receives, 10-20 MB instead of
    68 MB on a clinical CT grid, in a transfer syntax PACS and viewers decode (docs/rtdose.md,
    "Transfer syntaxes"). Float32 maps are stored uncompressed: no standard image codec takes
    float pixels.
    """
    dataset = build_dose_rate_map(dose_rate_mgy_per_h, study, **kwargs)
    if compress and "PixelData" in dataset and jpegls_available():
        dataset.compress(JPEGLSLossless, generate_instance_uid=False)
    path = Path(path)
    dataset.save_as(path, enforce_file_format=True)
    return path


def read_dose_rate_map(path: str | os.PathLike) -> Volume:
    """A dose-rate Parametric Map as a Volume in mGy/h (or mGy/h/MBq), mapping applied.

    Frames are ordered along the plane normal (row x column direction).

    Raises
    ------
    ExportError
        If the file is not a Parametric Map, has no usable Real World Value Mapping in a
        known dose-rate unit, or its frames are not an evenly spaced stack of parallel planes.
    """
    dataset = pydicom.dcmread(path)
    if dataset.get("SOPClassUID") != ParametricMapStorage:
        raise ExportError(
            f"{path} is not a Parametric Map (SOP Class {dataset.get('SOPClassUID')})"
        )
    shared = dataset.SharedFunctionalGroupsSequence[0]
    per_frame = dataset.PerFrameFunctionalGroupsSequence
    mapping_item = shared if "RealWorldValueMappingSequence" in shared else per_frame[0]
    mappings = mapping_item.get("RealWorldValueMappingSequence", [])
    mapping = next(
        (m for m in mappings if m.MeasurementUnitsCodeSequence[0].CodeValue in _READ_UNITS),
        None,
    )
    if mapping is None:
        units = [m.MeasurementUnitsCodeSequence[0].CodeValue for m in mappings]
        raise ExportError(
            f"{path} has no Real World Value Mapping in {sorted(_READ_UNITS)}, only {units}"
        )
    units_read, to_mgy_per_h = _READ_UNITS[mapping.MeasurementUnitsCodeSequence[0].CodeValue]
    slope = float(mapping.get("RealWorldValueSlope", 1.0))
    intercept = float(mapping.get("RealWorldValueIntercept", 0.0))

    orientation = np.asarray(
        shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float
    )
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array(
        [item.PlanePositionSequence[0].ImagePositionPatient for item in per_frame], dtype=float
    )
    distances = positions @ normal
    order = np.argsort(distances)
    steps = np.diff(distances[order])
    if steps.size and (not np.allclose(steps, steps[0], rtol=1e-4, atol=1e-4) or steps[0] <= 0):
        raise ExportError(f"{path}: frames are not evenly spaced along the plane normal")
    in_plane = positions[order] - positions[order][0]
    if not np.allclose(in_plane - np.outer(in_plane @ normal, normal), 0, atol=1e-3):
        raise ExportError(f"{path}: frames are not stacked along the plane normal")
    pixel_spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    slice_spacing = (
        float(steps[0]) if steps.size else float(shared.PixelMeasuresSequence[0].SliceThickness)
    )
    grid = Grid(
        (len(per_frame), int(dataset.Rows), int(dataset.Columns)),
        (slice_spacing, pixel_spacing[0], pixel_spacing[1]),
        tuple(positions[order][0]),
        np.stack([normal, col_dir, row_dir]),
        dataset.get("FrameOfReferenceUID"),
    )
    stored = dataset.pixel_array.reshape(grid.shape)[order]
    values = (stored.astype(np.float64) * slope + intercept) * to_mgy_per_h
    return Volume(values, grid, units_read)
