"""Small synthetic CT / NM / PT DICOM files for tests, written with pydicom.

Each writer returns what it intended (the grid and the values in physical units), so a
test can compare what ingest reads against what was written. Geometry follows the core's
convention (arrays ``(slice, row, col)``, LPS millimetres, see spectdose/geometry.py).
Only synthetic names and IDs are used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    RTDoseStorage,
    generate_uid,
)

from spectdose.geometry import Grid

RT_DOSE = RTDoseStorage
MEDIA_STORAGE_DIRECTORY = MediaStorageDirectoryStorage

SLICE_VECTOR = 0x00540080
ENERGY_WINDOW_VECTOR = 0x00540010
DETECTOR_VECTOR = 0x00540020
ROTATION_VECTOR = 0x00540050
ANGULAR_VIEW_VECTOR = 0x00540090


@dataclasses.dataclass
class StudyIds:
    """Study-level identity shared by the series of one synthetic study."""

    study_uid: str = dataclasses.field(default_factory=generate_uid)
    frame_of_reference_uid: str = dataclasses.field(default_factory=generate_uid)
    patient_id: str = "SYNTH-0001"
    patient_name: str = "Synthetic^Patient"
    study_date: str = "20240305"
    study_time: str = "090000"


@dataclasses.dataclass
class Written:
    """What a writer produced: where, which series, and the intended grid and values."""

    series_uid: str
    paths: list[Path]
    grid: Grid | None
    values: np.ndarray | None  # physical units intended (HU, Bq/ml) or stored counts
    sop_instance_uid: str = ""


def _base(
    sop_class: str,
    modality: str,
    study: StudyIds,
    series_uid: str,
    description: str,
    frame_of_reference_uid: str | None,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = sop_class
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = modality
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid or study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    ds.StudyID = "1"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = description
    ds.SeriesNumber = 1
    ds.Manufacturer = "SYNTHETIC"
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def _save(ds: Dataset, path: Path, preamble: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    if not preamble:  # drop the 128-byte preamble and 'DICM': a stream some old systems write
        path.write_bytes(path.read_bytes()[132:])
    return path


def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def write_ct_series(
    out_dir: Path,
    study: StudyIds,
    hu: np.ndarray,
    *,
    spacing_mm: tuple[float, float, float] = (5.0, 2.0, 2.5),
    origin_mm: Sequence[float] = (-20.0, -19.0, -60.0),
    row_dir: Sequence[float] = (1.0, 0.0, 0.0),
    col_dir: Sequence[float] = (0.0, 1.0, 0.0),
    slice_offsets_mm: Sequence[float] | None = None,
    inplane_shift_per_slice_mm: Sequence[float] = (0.0, 0.0, 0.0),
    slope: float = 1.0,
    intercepts: float | Sequence[float] = -1024.0,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    gantry_tilt_deg: float | None = None,
    pixel_padding_value: int | None = None,
    series_uid: str | None = None,
    description: str = "CT 5mm",
    frame_of_reference_uid: str | None = None,
    file_name: Callable[[int], str] = lambda k: f"ct_{k:04d}.dcm",
    preamble: bool = True,
) -> Written:
    """One file per slice; slice ``k`` at ``origin + offset_k * (row x col)``.

    ``hu`` is ``(slices, rows, cols)``. Stored values are ``round((hu - b_k) / slope)``
    (int16), so the returned ``values`` are the HU a reader must reproduce exactly.
    """
    series_uid = series_uid or generate_uid()
    n, rows, cols = hu.shape
    row, col = _unit(row_dir), _unit(col_dir)
    normal = np.cross(row, col)
    offsets = (
        np.arange(n) * spacing_mm[0]
        if slice_offsets_mm is None
        else np.asarray(slice_offsets_mm, float)
    )
    b = np.broadcast_to(np.asarray(intercepts, dtype=float), (n,))
    values = np.empty(hu.shape, dtype=np.float64)
    paths = []
    for k in range(n):
        stored = np.round((hu[k] - b[k]) / slope).astype(np.int16)
        values[k] = stored * slope + b[k]
        ds = _base(CTImageStorage, "CT", study, series_uid, description, frame_of_reference_uid)
        ds.ImageType = list(image_type)
        ds.InstanceNumber = k + 1
        ipp = (
            np.asarray(origin_mm, float)
            + offsets[k] * normal
            + k * np.asarray(inplane_shift_per_slice_mm, float)
        )
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{spacing_mm[1]:g}", f"{spacing_mm[2]:g}"]
        ds.SliceThickness = f"{spacing_mm[0]:g}"
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        if gantry_tilt_deg is not None:
            ds.GantryDetectorTilt = f"{gantry_tilt_deg:g}"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{b[k]:g}"
        ds.RescaleType = "HU"
        if pixel_padding_value is not None:
            ds.PixelPaddingValue = int(pixel_padding_value)
        ds.PixelData = stored.tobytes()
        paths.append(_save(ds, out_dir / file_name(k), preamble))
    grid = Grid(
        shape=hu.shape,
        spacing_mm=spacing_mm,
        origin_mm=tuple(np.asarray(origin_mm, float) + offsets[0] * normal),
        axes=np.stack([normal, col, row]),
        frame_of_reference_uid=frame_of_reference_uid or study.frame_of_reference_uid,
    )
    return Written(series_uid, paths, grid, values)


def _radiopharmaceutical(
    injected: float | None,
    admin_datetime: str | None,
    admin_time_only: str | None,
    radionuclide: tuple[str, str] | None = ("^177^Lutetium", "574300.8"),
) -> Dataset:
    """``radionuclide``: (code meaning, half-life in s), or None for an item that names none."""
    item = Dataset()
    if radionuclide is not None:
        code = Dataset()
        code.CodeValue = "LU177" if "177" in radionuclide[0] else "OTHER"
        code.CodingSchemeDesignator = "99SPECTDOSE"  # local scheme: synthetic test data
        code.CodeMeaning = radionuclide[0]
        item.RadionuclideCodeSequence = DicomSequence([code])
        item.Radiopharmaceutical = "Lu-177 DOTATATE" if "177" in radionuclide[0] else "tracer"
        item.RadionuclideHalfLife = radionuclide[1]
    else:
        item.Radiopharmaceutical = "DOTATATE"
    if injected is not None:
        item.RadionuclideTotalDose = f"{injected:g}"
    if admin_datetime is not None:
        item.RadiopharmaceuticalStartDateTime = admin_datetime
    if admin_time_only is not None:
        item.RadiopharmaceuticalStartTime = admin_time_only
    return item


def _rwvm(slope: float, intercept: float, unit: str) -> Dataset:
    item = Dataset()
    item.RealWorldValueFirstValueMapped = 0
    item.RealWorldValueLastValueMapped = 65535
    item.RealWorldValueSlope = slope
    item.RealWorldValueIntercept = intercept
    item.LUTExplanation = "activity concentration"
    item.LUTLabel = "COUNTS" if "count" in unit.lower() else "BQML"
    units = Dataset()
    units.CodeValue = unit
    units.CodingSchemeDesignator = "UCUM"
    units.CodeMeaning = "becquerels/milliliter"
    item.MeasurementUnitsCodeSequence = DicomSequence([units])
    return item


def write_nm_recon(
    path: Path,
    study: StudyIds,
    stored: np.ndarray,
    *,
    spacing_mm: tuple[float, float, float] = (4.8, 4.8, 4.8),
    first_voxel_mm: Sequence[float] = (-15.0, -14.0, -50.0),
    row_dir: Sequence[float] = (1.0, 0.0, 0.0),
    col_dir: Sequence[float] = (0.0, 1.0, 0.0),
    spacing_sign: float = 1.0,
    rwvm: tuple[float, float] | None = None,
    rwvm_unit: str = "Bq/ml",
    rwvm_where: str = "top",
    frame_duration_ms: int | None = 20000,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"),
    injected: float | None = 7400.0,
    admin_datetime: str | None = "20240304100000",
    admin_time_only: str | None = None,
    acquisition: tuple[str, str] | None = ("20240305", "093000"),
    manufacturer: str = "SYNTHETIC",
    station_name: str = "NM-ROOM-1",
    device_serial_number: str = "SN-42",
    series_uid: str | None = None,
    description: str = "SPECT RECON",
    frame_of_reference_uid: str | None = None,
    preamble: bool = True,
    energy_window: tuple[str, float | None, float | None] = ("Lu177 208keV", 187.2, 228.8),
    extra_windows: Sequence[tuple[np.ndarray, str, float, float]] = (),
    units_bqml_slope: float | None = None,
    radionuclide: tuple[str, str] | None = ("^177^Lutetium", "574300.8"),
) -> Written:
    """One multi-frame NM RECON TOMO object; frame ``n`` at ``IPP + n*sign*spacing*(row x col)``.

    ``energy_window`` is (name, lower keV, upper keV). ``extra_windows`` adds further
    windows, each (stored, name, lower, upper), to the same object: frames then run window
    by window, indexed by Energy Window Vector and Slice Vector. ``units_bqml_slope`` writes
    NM Units BQML with that Rescale Slope instead of a Real World Value Mapping.

    ``stored`` is ``(frames, rows, cols)`` uint16. With ``rwvm=(slope, intercept)`` a Real
    World Value Mapping to ``rwvm_unit`` is added (at the top level, in the shared
    functional group, or per frame with slope scaled by frame number), and ``values`` are
    the Bq/ml a reader must produce; otherwise ``values`` are the counts.
    """
    series_uid = series_uid or generate_uid()
    stored = np.asarray(stored, dtype=np.uint16)
    n, rows, cols = stored.shape
    ds = _base(NuclearMedicineImageStorage, "NM", study, series_uid, description, frame_of_reference_uid)
    ds.Manufacturer = manufacturer
    ds.StationName = station_name
    ds.DeviceSerialNumber = device_serial_number
    ds.ImageType = list(image_type)
    ds.InstanceNumber = 1
    windows = [(stored, *energy_window), *[(np.asarray(w[0], np.uint16), *w[1:]) for w in extra_windows]]
    ds.NumberOfFrames = n * len(windows)
    if len(windows) == 1:
        ds.FrameIncrementPointer = SLICE_VECTOR
    else:
        ds.FrameIncrementPointer = [ENERGY_WINDOW_VECTOR, SLICE_VECTOR]
        ds.EnergyWindowVector = [w + 1 for w in range(len(windows)) for _ in range(n)]
    ds.SliceVector = list(range(1, n + 1)) * len(windows)
    ds.NumberOfSlices = n
    ds.PixelSpacing = [f"{spacing_mm[1]:g}", f"{spacing_mm[2]:g}"]
    ds.SliceThickness = f"{spacing_mm[0]:g}"
    ds.SpacingBetweenSlices = f"{spacing_sign * spacing_mm[0]:g}"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelRepresentation = 0
    row, col = _unit(row_dir), _unit(col_dir)
    det = Dataset()
    det.ImagePositionPatient = [f"{v:.6f}" for v in first_voxel_mm]
    det.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
    ds.DetectorInformationSequence = DicomSequence([det])
    det.CollimatorType = "PARA"
    ds.NumberOfDetectors = 1
    ds.PatientOrientationCodeSequence = DicomSequence([])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([])
    ds.CountsAccumulated = int(stored.sum())
    rot = Dataset()
    rot.StartAngle = "0"
    rot.AngularStep = "3"
    rot.RotationDirection = "CW"
    rot.NumberOfFramesInRotation = 120
    rot.ScanArc = "360"
    if frame_duration_ms is not None:
        rot.ActualFrameDuration = frame_duration_ms
    ds.RotationInformationSequence = DicomSequence([rot])
    ds.NumberOfRotations = 1
    items = []
    for _, name, lower, upper in windows:
        ew = Dataset()
        ew.EnergyWindowName = name
        if lower is not None:  # None: a window known only by its name
            limits = Dataset()
            limits.EnergyWindowLowerLimit = f"{lower:g}"
            limits.EnergyWindowUpperLimit = f"{upper:g}"
            ew.EnergyWindowRangeSequence = DicomSequence([limits])
        items.append(ew)
    ds.EnergyWindowInformationSequence = DicomSequence(items)
    ds.NumberOfEnergyWindows = len(windows)
    ds.RadiopharmaceuticalInformationSequence = DicomSequence(
        [_radiopharmaceutical(injected, admin_datetime, admin_time_only, radionuclide)]
    )
    if acquisition is not None:
        ds.AcquisitionDate, ds.AcquisitionTime = acquisition
    values = stored.astype(np.float64)
    if units_bqml_slope is not None:
        ds.Units = "BQML"
        ds.RescaleSlope = f"{units_bqml_slope:g}"
        ds.RescaleIntercept = "0"
        values = stored * units_bqml_slope
    if rwvm is not None:
        slope, intercept = rwvm
        if rwvm_where == "top":
            ds.RealWorldValueMappingSequence = DicomSequence([_rwvm(slope, intercept, rwvm_unit)])
            values = stored * slope + intercept
        elif rwvm_where == "shared":
            group = Dataset()
            group.RealWorldValueMappingSequence = DicomSequence(
                [_rwvm(slope, intercept, rwvm_unit)]
            )
            ds.SharedFunctionalGroupsSequence = DicomSequence([group])
            values = stored * slope + intercept
        elif rwvm_where == "per-frame":
            groups = []
            for k in range(n):
                group = Dataset()
                group.RealWorldValueMappingSequence = DicomSequence(
                    [_rwvm(slope * (k + 1), intercept, rwvm_unit)]
                )
                groups.append(group)
                values[k] = stored[k] * slope * (k + 1) + intercept
            ds.PerFrameFunctionalGroupsSequence = DicomSequence(groups)
        else:
            raise ValueError(rwvm_where)
    ds.PixelData = b"".join(w[0].tobytes() for w in windows)
    _save(ds, path, preamble)
    normal = np.cross(row, col)
    grid = Grid(
        shape=stored.shape,
        spacing_mm=spacing_mm,
        origin_mm=tuple(first_voxel_mm),
        axes=np.stack([np.sign(spacing_sign) * normal, col, row]),
        frame_of_reference_uid=frame_of_reference_uid or study.frame_of_reference_uid,
    )
    return Written(series_uid, [path], grid, values, ds.SOPInstanceUID)


def write_nm_slices(
    out_dir: Path,
    study: StudyIds,
    stored: np.ndarray,
    *,
    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0),
    first_voxel_mm: Sequence[float] = (-22.0, -18.0, -14.0),
    frame_duration_ms: int | None = 20000,
    description: str = "SPECT RECON single-frame",
    rwvm: tuple[float, float] | None = None,
    admin_datetime: str | None = "20240304100000",
) -> Written:
    """A reconstructed NM volume as one single-frame NM file per slice (some workstations do this).

    Each file carries its slice's position in DetectorInformationSequence[0]; files are
    named in reverse slice order so a reader must sort by position. ``values`` are counts,
    or Bq/ml with ``rwvm=(slope, intercept)`` (a Real World Value Mapping per file).
    """
    series_uid = generate_uid()
    stored = np.asarray(stored, dtype=np.uint16)
    n, rows, cols = stored.shape
    paths = []
    for k in range(n):
        ds = _base(NuclearMedicineImageStorage, "NM", study, series_uid, description, None)
        ds.StationName = "NM-ROOM-1"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
        ds.InstanceNumber = k + 1
        ds.NumberOfFrames = 1
        ds.FrameIncrementPointer = SLICE_VECTOR
        ds.SliceVector = [k + 1]
        ds.PixelSpacing = [f"{spacing_mm[1]:g}", f"{spacing_mm[2]:g}"]
        ds.SliceThickness = f"{spacing_mm[0]:g}"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelRepresentation = 0
        det = Dataset()
        det.ImagePositionPatient = [
            f"{v:.6f}" for v in np.asarray(first_voxel_mm, float) + [0, 0, k * spacing_mm[0]]
        ]
        det.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.DetectorInformationSequence = DicomSequence([det])
        rot = Dataset()
        if frame_duration_ms is not None:
            rot.ActualFrameDuration = frame_duration_ms
        ds.RotationInformationSequence = DicomSequence([rot])
        ds.RadiopharmaceuticalInformationSequence = DicomSequence(
            [_radiopharmaceutical(7400.0, admin_datetime, None)]
        )
        ds.AcquisitionDate, ds.AcquisitionTime = "20240305", "093000"
        if rwvm is not None:
            ds.RealWorldValueMappingSequence = DicomSequence([_rwvm(*rwvm, "Bq/ml")])
        ds.PixelData = stored[k].tobytes()
        paths.append(_save(ds, out_dir / f"slice_{n - k:04d}.dcm"))
    grid = Grid(
        shape=stored.shape,
        spacing_mm=spacing_mm,
        origin_mm=tuple(first_voxel_mm),
        axes=np.stack([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]]),
        frame_of_reference_uid=study.frame_of_reference_uid,
    )
    values = stored.astype(np.float64) if rwvm is None else stored * rwvm[0] + rwvm[1]
    return Written(series_uid, paths, grid, values)


def write_nm_projections(
    path: Path,
    study: StudyIds,
    *,
    views: int = 6,
    rows: int = 10,
    cols: int = 8,
    description: str = "SPECT RAW",
) -> Written:
    """Raw tomographic projections: frames indexed by energy window, detector and rotation."""
    series_uid = generate_uid()
    ds = _base(NuclearMedicineImageStorage, "NM", study, series_uid, description, None)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMO", "EMISSION"]
    ds.NumberOfFrames = views
    ds.FrameIncrementPointer = [
        ENERGY_WINDOW_VECTOR,
        DETECTOR_VECTOR,
        ROTATION_VECTOR,
        ANGULAR_VIEW_VECTOR,
    ]
    ds.EnergyWindowVector = [1] * views
    ds.DetectorVector = [1] * views
    ds.RotationVector = [1] * views
    ds.AngularViewVector = list(range(1, views + 1))
    ds.PixelSpacing = ["4.8", "4.8"]
    ds.Rows, ds.Columns = rows, cols
    ds.PixelRepresentation = 0
    ds.PixelData = np.ones((views, rows, cols), np.uint16).tobytes()
    _save(ds, path)
    return Written(series_uid, [path], None, None, ds.SOPInstanceUID)


def write_pt_series(
    out_dir: Path,
    study: StudyIds,
    bq_per_ml: np.ndarray,
    *,
    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0),
    origin_mm: Sequence[float] = (-12.0, -10.0, -40.0),
    decay_correction: str = "START",
    units: str = "BQML",
    injected_bq: float | None = 7.4e9,
    admin_datetime: str | None = "20240304100000",
    acquisition: tuple[str, str] = ("20240305", "093000"),
    description: str = "SPECT as PET-style",
    frame_of_reference_uid: str | None = None,
) -> Written:
    """PET-style single-frame slices with per-slice Rescale Slope (Units BQML)."""
    series_uid = generate_uid()
    n, rows, cols = bq_per_ml.shape
    values = np.empty(bq_per_ml.shape)
    paths = []
    for k in range(n):
        peak = float(bq_per_ml[k].max())
        slope = peak / 32000.0 if peak > 0 else 1.0
        stored = np.round(bq_per_ml[k] / slope).astype(np.uint16)
        ds = _base(PositronEmissionTomographyImageStorage, "PT", study, series_uid, description, frame_of_reference_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [
            f"{v:.6f}" for v in np.asarray(origin_mm, float) + [0, 0, k * spacing_mm[0]]
        ]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [f"{spacing_mm[1]:g}", f"{spacing_mm[2]:g}"]
        ds.SliceThickness = f"{spacing_mm[0]:g}"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = "0"
        values[k] = stored * float(ds.RescaleSlope)
        ds.Units = units
        ds.DecayCorrection = decay_correction
        ds.CorrectedImage = (
            ["ATTN", "SCAT", "DECY"] if decay_correction != "NONE" else ["ATTN", "SCAT"]
        )
        ds.AcquisitionDate, ds.AcquisitionTime = acquisition
        item = Dataset()
        item.Radiopharmaceutical = "Lu-177 DOTATATE"
        item.RadionuclideHalfLife = "574300.8"
        if injected_bq is not None:
            item.RadionuclideTotalDose = f"{injected_bq:g}"
        if admin_datetime is not None:
            item.RadiopharmaceuticalStartDateTime = admin_datetime
        ds.RadiopharmaceuticalInformationSequence = DicomSequence([item])
        ds.PixelData = stored.tobytes()
        paths.append(_save(ds, out_dir / f"pt_{k:04d}.dcm"))
    grid = Grid(
        shape=bq_per_ml.shape,
        spacing_mm=spacing_mm,
        origin_mm=tuple(origin_mm),
        axes=np.stack([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]]),
        frame_of_reference_uid=frame_of_reference_uid or study.frame_of_reference_uid,
    )
    return Written(series_uid, paths, grid, values)


def write_rtdose(path: Path, study: StudyIds) -> Written:
    """A small RT Dose object, standing in for one of our own earlier outputs."""
    series_uid = generate_uid()
    ds = _base(RT_DOSE, "RTDOSE", study, series_uid, "spectdose dose rate", None)
    ds.NumberOfFrames = 2
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = "1e-6"
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["2", "2"]
    ds.GridFrameOffsetVector = ["0", "2"]
    ds.FrameIncrementPointer = 0x3004000C
    ds.PixelData = np.zeros((2, 4, 4), np.uint32).tobytes()
    _save(ds, path)
    return Written(series_uid, [path], None, None)


def write_dicomdir_stub(path: Path) -> Path:
    """A file named DICOMDIR of the Media Storage Directory class (empty directory record)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MEDIA_STORAGE_DIRECTORY
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.FileSetID = "SYNTH"
    ds.DirectoryRecordSequence = DicomSequence([])
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def smooth_hu(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A CT-like volume: air outside an ellipse of soft tissue with a bone rod, plus noise."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    cj, ci = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    inside = ((j - cj) / (0.45 * shape[1])) ** 2 + ((i - ci) / (0.45 * shape[2])) ** 2 <= 1
    hu = np.where(inside, 40.0, -1000.0)
    hu[(np.abs(j - cj) < 2) & (np.abs(i - ci) < 2)] = 900.0
    return hu + rng.normal(0, 5, shape) + k  # slice-dependent offset makes order testable


def blob_counts(shape: tuple[int, int, int], peak: int = 1000, seed: int = 0) -> np.ndarray:
    """A SPECT-like uint16 volume: a Gaussian hot spot on a weak background, Poisson noise."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(float)
    centre = (np.asarray(shape) - 1) / 2
    r2 = sum(((idx[a] - centre[a]) / (0.25 * shape[a])) ** 2 for a in range(3))
    mean = 20 + peak * np.exp(-r2)
    return rng.poisson(mean).astype(np.uint16)


def copy_with_zero_activity(study_dicom_dir: Path, dst: Path) -> Path:
    """A copy of a phantom study whose reconstructed SPECT is all zero (zero in, zero out)."""
    import shutil

    import pydicom

    shutil.copytree(study_dicom_dir, dst)
    nm_path = next((dst / "NM").glob("*.dcm"))
    ds = pydicom.dcmread(nm_path)
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(nm_path)
    return dst
