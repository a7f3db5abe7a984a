"""Write a virtual patient as a real SPECT/CT study (CT series, NM SPECT) plus its truth.

Layout under ``out_dir``::

    dicom/CT/CT_0001.dcm ...   CT Image Storage, one file per axial slice, HU (int16)
    dicom/NM/NM_SPECT.dcm      NM Image Storage, one multi-frame RECON TOMO file (uint16)
    truth/seg.dcm              DICOM SEG (highdicom, binary) of the VOIs on the CT
    truth/truth.npz            activity (Bq/ml), density, HU, tissue codes, all labels, grid
    truth/phantom.json         seed, size, lesions, counts, calibration, times, versions

The NM file carries what a quantitative camera's does: the Real World Value Mapping to
Bq/ml (or to reconstructed counts, ``spect_units="counts"``), the administered activity and
time, the acquisition start, the energy window, the collimator and the view duration.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    NuclearMedicineImageStorage,
    generate_uid,
)

from spectdose.constants import LU177_HALF_LIFE_S
from spectdose.errors import InputError
from spectdose.geometry import Grid, Volume
from spectdose.paths import atomic_write
from spectdose.phantoms.anatomy import TISSUES, UPTAKE_24H, VirtualPatient, study_uids
from spectdose.phantoms.spect_sim import SimulatedSpect

__all__ = ["write_phantom_study", "study_uids", "SEG_VOIS", "PhantomCase", "load_phantom_case"]

_MANUFACTURER = "spectdose"
_MODEL = "spectdose virtual camera"
_STATION = "VIRTUAL01"
# The largest stored value used for the SPECT (uint16); a little head-room below 65535.
_SPECT_MAX_STORED = 65000

# VOIs written to the DICOM SEG (all labels go to truth.npz).
SEG_VOIS = (
    "body",
    "lungs",
    "liver",
    "healthy_liver",
    "spleen",
    "kidney_left",
    "kidney_right",
    "kidney_cortex",
    "kidney_medulla",
    "spine",
    "lumbar_vertebrae",
)


def _ct_instance_uid(seed: int, size: str, k: int, time_point: str | None = None) -> str:
    tag = [] if time_point is None else [str(time_point)]
    return str(generate_uid(entropy_srcs=["spectdose-phantom", str(int(seed)), size, *tag, "ct-instance", str(k)]))


def _da(t: dt.datetime) -> str:
    return t.strftime("%Y%m%d")


def _tm(t: dt.datetime) -> str:
    return t.strftime("%H%M%S")


def _ds(value: float, digits: int = 6) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.{digits}g}"
    while len(text) > 16 and digits > 1:
        digits -= 1
        text = f"{value:.{digits}g}"
    return text


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _base_dataset(sop_class: str, sop_instance: str, patient: VirtualPatient, uids: dict, when: dt.datetime) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.InstanceCreationDate = _da(when)
    ds.InstanceCreationTime = _tm(when)
    # Patient (synthetic identity)
    ds.PatientName = f"VP^{patient.seed}"
    ds.PatientID = f"VP{patient.seed:06d}-{patient.size}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientWeight = _ds(_patient_weight_kg(patient), 4)
    # Study (SPECT/CT session on the acquisition day)
    acq = patient.acquisition_datetime
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate = _da(acq)
    ds.StudyTime = _tm(acq)
    ds.StudyID = f"{patient.seed}"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Lu-177 DOTATATE SPECT/CT (spectdose virtual patient)"
    # Frame of reference and equipment
    ds.FrameOfReferenceUID = uids["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = _MANUFACTURER
    ds.ManufacturerModelName = _MODEL
    ds.StationName = _STATION
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = f"spectdose {_version()}"
    ds.InstitutionName = "spectdose virtual clinic"
    return ds


def _version() -> str:
    from spectdose import __version__

    return __version__


def _patient_weight_kg(patient: VirtualPatient) -> float:
    """A plausible whole-body weight: 72 kg scaled by the patient's cross-section."""
    sx, sy, sz = patient.anatomy.s
    return round(72.0 * sx * sy * sz, 1)


# ---------------------------------------------------------------------------------------
# CT
# ---------------------------------------------------------------------------------------
def _ct_datasets(patient: VirtualPatient, uids: dict) -> list[FileDataset]:
    grid = patient.hu.grid
    hu = np.rint(patient.hu.array).astype(np.int16)
    spect_end = patient.acquisition_datetime
    ct_time = spect_end + dt.timedelta(minutes=1)  # CT right after the SPECT set-up
    nz, ny, nx = grid.shape
    out = []
    for k in range(nz):
        sop = _ct_instance_uid(patient.seed, patient.size, k, patient.time_point)
        ds = _base_dataset(CTImageStorage, sop, patient, uids, ct_time)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = uids["ct_series"]
        ds.SeriesNumber = 2
        ds.SeriesDescription = "CT for attenuation correction and localisation"
        ds.SeriesDate = _da(ct_time)
        ds.SeriesTime = _tm(ct_time)
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "ABDOMEN"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.AcquisitionDate = _da(ct_time)
        ds.AcquisitionTime = _tm(ct_time)
        ds.ContentDate = _da(ct_time)
        ds.ContentTime = _tm(ct_time)
        pos = grid.index_to_lps_mm(np.array([k, 0, 0]))
        ds.ImagePositionPatient = [_ds(v, 10) for v in pos]
        ds.ImageOrientationPatient = [_ds(v) for v in (*grid.axes[2], *grid.axes[1])]
        ds.PixelSpacing = [_ds(grid.spacing_mm[1], 10), _ds(grid.spacing_mm[2], 10)]
        ds.SliceThickness = _ds(grid.spacing_mm[0])
        ds.SliceLocation = _ds(float(pos[2]), 10)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.KVP = "120"
        ds.DataCollectionDiameter = _ds(nx * grid.spacing_mm[2], 6)
        ds.ReconstructionDiameter = _ds(nx * grid.spacing_mm[2], 6)
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.XRayTubeCurrent = 30
        ds.ExposureTime = 600
        ds.ConvolutionKernel = "SMOOTH"
        ds.PixelData = hu[k].tobytes()
        out.append(ds)
    return out


# ---------------------------------------------------------------------------------------
# NM (reconstructed SPECT, one multi-frame file)
# ---------------------------------------------------------------------------------------
def _nm_dataset(patient: VirtualPatient, spect: SimulatedSpect, uids: dict, spect_units: str) -> tuple[FileDataset, dict]:
    grid = spect.recon.grid
    acq = patient.acquisition_datetime
    nz, ny, nx = grid.shape
    ds = _base_dataset(NuclearMedicineImageStorage, uids["nm_instance"], patient, uids, acq)
    ds.Modality = "NM"
    ds.SeriesInstanceUID = uids["nm_series"]
    ds.SeriesNumber = 1
    ideal = spect.n_iters == 0  # spect_sim.ideal_spect: the truth on the SPECT grid, no camera
    ds.SeriesDescription = (
        "SPECT Lu177 ideal camera (truth)"
        if ideal
        else f"SPECT Lu177 OSEM {spect.n_iters}i{spect.n_subsets}s AC" + (" RR" if spect.resolution_recovery else "")
    )
    ds.SeriesDate = _da(acq)
    ds.SeriesTime = _tm(acq)
    ds.BodyPartExamined = "ABDOMEN"
    # NM/PET Patient Orientation (CID 19, 20, 21): recumbent, supine, head first
    orient = _code("102538003", "SCT", "recumbent")
    orient.PatientOrientationModifierCodeSequence = Sequence([_code("40199007", "SCT", "supine")])
    ds.PatientOrientationCodeSequence = Sequence([orient])
    ds.PatientGantryRelationshipCodeSequence = Sequence([_code("102540008", "SCT", "headfirst")])
    # General image / acquisition
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.InstanceNumber = 1
    ds.AcquisitionDate = _da(acq)
    ds.AcquisitionTime = _tm(acq)
    ds.AcquisitionDateTime = acq.strftime("%Y%m%d%H%M%S")
    recon_time = acq + dt.timedelta(seconds=spect.view_duration_s * spect.n_views + 600)
    ds.ContentDate = _da(recon_time)
    ds.ContentTime = _tm(recon_time)
    # Image pixel + NM image pixel + multi-frame
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [_ds(grid.spacing_mm[1]), _ds(grid.spacing_mm[2])]
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = Tag("SliceVector")
    ds.SliceVector = list(range(1, nz + 1))
    ds.NumberOfSlices = nz
    # NM image
    ds.CountsAccumulated = int(spect.total_counts)
    ds.AcquisitionTerminationCondition = "TIME"
    ds.CorrectedImage = ["ATTN"]
    # NM isotope: 208 keV window, radiopharmaceutical
    window = Dataset()
    rng = Dataset()
    rng.EnergyWindowLowerLimit = _ds(spect.energy_window_kev[0])
    rng.EnergyWindowUpperLimit = _ds(spect.energy_window_kev[1])
    window.EnergyWindowRangeSequence = Sequence([rng])
    window.EnergyWindowName = "Lu177_208keV_20%"
    ds.EnergyWindowInformationSequence = Sequence([window])
    ds.NumberOfEnergyWindows = 1
    rp = Dataset()
    rp.Radiopharmaceutical = "Lu-177 DOTATATE"
    rp.RadiopharmaceuticalCodeSequence = Sequence([_code(codes.SCT.Lutetium177DOTATATE.value, "SCT", codes.SCT.Lutetium177DOTATATE.meaning)])
    rp.RadionuclideCodeSequence = Sequence([_code(codes.SCT._177Lutetium.value, "SCT", codes.SCT._177Lutetium.meaning)])
    rp.RadiopharmaceuticalRoute = "Intravenous"
    rp.AdministrationRouteCodeSequence = Sequence([_code(codes.SCT.IntravenousRoute.value, "SCT", codes.SCT.IntravenousRoute.meaning)])
    admin = patient.administration_datetime
    rp.RadiopharmaceuticalStartTime = _tm(admin)
    rp.RadiopharmaceuticalStartDateTime = admin.strftime("%Y%m%d%H%M%S")
    # NM Isotope module: Radionuclide Total Dose in MBq (the PET module uses Bq)
    rp.RadionuclideTotalDose = _ds(patient.injected_activity_bq / 1e6, 8)
    rp.RadionuclideHalfLife = _ds(LU177_HALF_LIFE_S, 10)
    ds.RadiopharmaceuticalInformationSequence = Sequence([rp])
    # NM detector: one item for RECON TOMO, with the geometry of frame 1
    det = Dataset()
    # Siemens names its ME collimator "MELP" (low penetration); GE and Philips "MEGP"
    det.CollimatorGridName = "MELP" if spect.collimator == "SY-ME" else "MEGP"
    det.CollimatorType = "PARA"
    det.FieldOfViewShape = "RECTANGLE"
    det.FieldOfViewDimensions = [533, 387]
    det.ZoomFactor = ["1", "1"]
    det.CenterOfRotationOffset = "0"
    det.GantryDetectorTilt = "0"
    det.ImagePositionPatient = [_ds(v, 10) for v in grid.index_to_lps_mm(np.zeros(3))]
    det.ImageOrientationPatient = [_ds(v) for v in (*grid.axes[2], *grid.axes[1])]
    det.RadialPosition = _ds(spect.orbit_radius_mm)
    det.StartAngle = "0"
    ds.DetectorInformationSequence = Sequence([det])
    ds.NumberOfDetectors = 1
    # NM TOMO acquisition: one 360 degree rotation of n_views step-and-shoot views
    rot = Dataset()
    rot.StartAngle = "0"
    rot.AngularStep = _ds(360.0 / spect.n_views)
    rot.RotationDirection = "CW"
    rot.ScanArc = "360"
    rot.ActualFrameDuration = int(round(spect.view_duration_s * 1000.0))
    rot.NumberOfFramesInRotation = spect.n_views
    rot.RadialPosition = _ds(spect.orbit_radius_mm)
    rot.TableTraverse = "0"
    ds.RotationInformationSequence = Sequence([rot])
    ds.NumberOfRotations = 1
    ds.TypeOfDetectorMotion = "STEP AND SHOOT"
    # NM reconstruction
    ds.SpacingBetweenSlices = _ds(grid.spacing_mm[0])
    ds.SliceThickness = _ds(grid.spacing_mm[0])
    ds.ReconstructionDiameter = _ds(nx * grid.spacing_mm[2])
    # SH holds 16 characters a value, so the parts are values of their own (VM 1-n).
    ds.ConvolutionKernel = (
        "NONE" if ideal else [f"OSEM {spect.n_iters}i{spect.n_subsets}s", "AC", *(["CDR"] if spect.resolution_recovery else [])]
    )
    # values: stored uint16 -> Bq/ml (or reconstructed counts) by the RWVM
    if spect_units == "Bq/ml":
        values = spect.recon.array
        unit_code = _code("Bq/ml", "UCUM", "Becquerels/milliliter")
        explanation, label = "Bq/ml", "BQML"
    else:
        values = spect.recon_counts.array
        unit_code = _code("{counts}", "UCUM", "Counts")
        explanation, label = "reconstructed counts per view", "COUNTS"
    vmax = float(values.max())
    slope = vmax / _SPECT_MAX_STORED if vmax > 0 else 1.0
    stored = np.clip(np.rint(values / slope), 0, 65535).astype(np.uint16)
    rwvm = Dataset()
    rwvm.add_new(Tag("RealWorldValueFirstValueMapped"), "US", 0)
    rwvm.add_new(Tag("RealWorldValueLastValueMapped"), "US", 65535)
    rwvm.RealWorldValueIntercept = 0.0
    rwvm.RealWorldValueSlope = float(slope)
    rwvm.LUTExplanation = explanation
    rwvm.LUTLabel = label
    rwvm.MeasurementUnitsCodeSequence = Sequence([unit_code])
    ds.RealWorldValueMappingSequence = Sequence([rwvm])
    ds.PixelData = stored.tobytes()
    return ds, {"units": spect_units, "rwvm_slope": float(slope), "rwvm_intercept": 0.0}


# ---------------------------------------------------------------------------------------
# SEG, npz, json
# ---------------------------------------------------------------------------------------
def _seg_dataset(patient: VirtualPatient, ct: list[FileDataset], uids: dict):
    import highdicom as hd

    names = list(SEG_VOIS) + [les["name"] for les in patient.lesions]
    organ = codes.SCT.AnatomicalStructure
    types = {
        "body": codes.SCT.EntireBody,
        "lungs": codes.SCT.Lung,
        "liver": codes.SCT.Liver,
        "healthy_liver": codes.SCT.Liver,
        "spleen": codes.SCT.Spleen,
        "kidney_left": codes.SCT.Kidney,
        "kidney_right": codes.SCT.Kidney,
        "kidney_cortex": codes.SCT.Kidney,
        "kidney_medulla": codes.SCT.Kidney,
        "spine": codes.SCT.Spine,
        "lumbar_vertebrae": codes.SCT.LumbarSpine,
    }
    algorithm = hd.AlgorithmIdentificationSequence(
        name="spectdose virtual patient (procedural anatomy)",
        version=_version(),
        family=codes.cid7162.DeformableModels,
    )
    descriptions = []
    for number, name in enumerate(names, start=1):
        lesion = name.startswith("lesion_")
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure if lesion else organ,
                segmented_property_type=codes.SCT.Neoplasm if lesion else types[name],
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    masks = np.stack([patient.labels[n] for n in names], axis=-1)  # (slices, rows, cols, segments)
    return hd.seg.Segmentation(
        source_images=ct,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids["seg_series"],
        series_number=100,
        sop_instance_uid=uids["seg_instance"],
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=_MODEL,
        software_versions=f"spectdose {_version()}",
        device_serial_number="0001",
        series_description="Ground-truth VOIs (virtual patient)",
    )


def _grid_dict(grid: Grid) -> dict:
    return {
        "shape": list(grid.shape),
        "spacing_mm": list(grid.spacing_mm),
        "origin_mm": list(grid.origin_mm),
        "axes": grid.axes.tolist(),
    }


def _versions() -> dict[str, str]:
    import highdicom
    import scipy
    import torch

    out = {
        "spectdose": _version(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pydicom": pydicom.__version__,
        "highdicom": highdicom.__version__,
        "torch": torch.__version__,
    }
    from importlib.metadata import PackageNotFoundError, version

    try:
        out["pytomography"] = version("pytomography")
    except PackageNotFoundError:  # pragma: no cover
        out["pytomography"] = "not installed"
    return out


def write_phantom_study(
    out_dir: str | Path,
    patient: VirtualPatient,
    spect: SimulatedSpect,
    *,
    spect_units: str = "Bq/ml",
    write_seg: bool = True,
    extra_truth_arrays: dict[str, np.ndarray] | None = None,
    extra_truth_info: dict | None = None,
) -> dict:
    """Write the CT series, the NM SPECT, the SEG and the truth files under ``out_dir``.

    Parameters
    ----------
    spect_units : {"Bq/ml", "counts"}
        "Bq/ml": the NM's Real World Value Mapping gives Bq/ml (UCUM "Bq/ml").
        "counts": it gives reconstructed counts per view (UCUM "{counts}"), to be turned
        into activity with the camera's sensitivity, as a site would:
        ``A_voxel[MBq] = counts / (cps_per_MBq * ActualFrameDuration[ms] / 1000)``;
        the sensitivity is written to ``truth/phantom.json`` only.
    extra_truth_arrays, extra_truth_info
        More truth for ``truth.npz`` / ``phantom.json`` (a cycle's time point adds its true
        dose rate, pose and landmarks).

    Returns
    -------
    dict with ``dicom_dir``, ``ct`` (list of paths), ``nm``, ``seg``, ``npz``, ``json``.

    Raises
    ------
    InputError
        Unknown ``spect_units``, or a SPECT that does not belong to this patient's grid.
    """
    if spect_units not in ("Bq/ml", "counts"):
        raise InputError(f"spect_units must be 'Bq/ml' or 'counts', got {spect_units!r}")
    if not spect.recon.grid.same_as(patient.spect_grid):
        raise InputError("the simulated SPECT is not on this patient's SPECT grid")
    out = Path(out_dir)
    ct_dir, nm_dir, truth_dir = out / "dicom" / "CT", out / "dicom" / "NM", out / "truth"
    for d in (ct_dir, nm_dir, truth_dir):
        d.mkdir(parents=True, exist_ok=True)
    uids = study_uids(patient.seed, patient.size, patient.time_point)
    # The NM object differs with the noise realisation, reconstruction and units: so do its UIDs
    # (the default realisation keeps the UIDs a rerun of the same phantom gives).
    spec = patient.size_spec
    variant = [spect_units, str(spect.seed), str(spect.n_iters), str(spect.n_subsets)]
    if variant != ["Bq/ml", str(patient.seed), str(spec.n_iters), str(spec.n_subsets)]:
        from pydicom.uid import generate_uid

        for key in ("nm_series", "nm_instance"):
            uids[key] = str(generate_uid(entropy_srcs=[uids[key], *variant]))
    if uids["frame_of_reference"] != patient.hu.grid.frame_of_reference_uid:
        raise InputError("patient frame of reference does not match its (seed, size) UIDs")

    ct = _ct_datasets(patient, uids)
    ct_paths = []
    for k, ds in enumerate(ct):
        path = ct_dir / f"CT_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ct_paths.append(path)
    nm, nm_info = _nm_dataset(patient, spect, uids, spect_units)
    nm_path = nm_dir / "NM_SPECT.dcm"
    nm.save_as(nm_path, enforce_file_format=True)

    seg_path = truth_dir / "seg.dcm"
    if write_seg:
        _seg_dataset(patient, ct, uids).save_as(seg_path)

    grid = patient.hu.grid
    npz_path = truth_dir / "truth.npz"
    arrays = {
        "activity_bq_per_ml": patient.activity_bq_per_ml.array.astype(np.float32),
        "density_g_cm3": patient.density_g_cm3.array.astype(np.float32),
        "hu": np.rint(patient.hu.array).astype(np.int16),
        "spacing_mm": np.asarray(grid.spacing_mm),
        "origin_mm": np.asarray(grid.origin_mm),
        "axes": np.asarray(grid.axes),
    }
    for name, mask in patient.labels.items():
        arrays[f"label_{name}"] = mask
    arrays.update(extra_truth_arrays or {})
    np.savez_compressed(npz_path, **arrays)

    vox_ml = grid.voxel_volume_ml
    info = {
        "seed": patient.seed,
        "size": patient.size,
        "size_spec": {k: v for k, v in vars(patient.size_spec).items()},
        "patient": {"name": f"VP^{patient.seed}", "weight_kg": _patient_weight_kg(patient)},
        "radiopharmaceutical": "Lu-177 DOTATATE",
        "injected_activity_bq": patient.injected_activity_bq,
        "administration_datetime": patient.administration_datetime.isoformat(),
        "acquisition_datetime": patient.acquisition_datetime.isoformat(),
        "hours_after_administration": patient.hours_after_administration,
        "half_life_s": LU177_HALF_LIFE_S,
        "activity_reference_time": "acquisition start (no decay during the acquisition is simulated)",
        "lesions": patient.lesions,
        "voi_volumes_ml": {k: float(m.sum() * vox_ml) for k, m in patient.labels.items()},
        "voi_mean_activity_bq_per_ml": {
            k: float(patient.activity_bq_per_ml.array[m].mean()) if m.any() else 0.0 for k, m in patient.labels.items()
        },
        "uptake_bq_per_ml": patient.uptake_bq_per_ml,
        "uptake_model_24h": {k: {"mbq_per_ml": v[0], "t_eff_h": v[1], "texture_fine": v[2], "texture_coarse": v[3]} for k, v in UPTAKE_24H.items()},
        "tissues": {k: {"code": v[0], "density_g_cm3": v[1], "attenuation_material": v[2]} for k, v in TISSUES.items()},
        "truth": {
            "activity_in_ct_fov_bq": float(patient.activity_bq_per_ml.array.sum() * vox_ml),
            "activity_in_spect_fov_bq": spect.true_activity_in_fov_bq,
            "projection_grid": _grid_dict(spect.projection_grid),
        },
        "counts": {
            "target": patient.total_counts_target,
            "expected": spect.expected_total_counts,
            "acquired": spect.total_counts,
            "noise_seed": spect.seed,
        },
        "calibration": {
            "sensitivity_cps_per_mbq": spect.sensitivity_cps_per_mbq,
            "view_duration_s": spect.view_duration_s,
            "formula": "A_voxel[MBq] = reconstructed_counts / (sensitivity_cps_per_mbq * view_duration_s)",
            "dicom_view_duration": "RotationInformationSequence[0].ActualFrameDuration (ms)",
        },
        "acquisition": {
            "n_views": spect.n_views,
            "arc_deg": 360.0,
            "orbit": "circular",
            "orbit_radius_mm": spect.orbit_radius_mm,
            "collimator": spect.collimator,
            "intrinsic_fwhm_140kev_cm": spect.intrinsic_fwhm_140kev_cm,
            "psf_sigma_params_cm": list(spect.psf_sigma_params_cm),
            "photopeak_kev": spect.photopeak_kev,
            "energy_window_kev": list(spect.energy_window_kev),
            "scatter": "not simulated",
        },
        "reconstruction": {
            "algorithm": "OSEM (PyTomography)",
            "n_iters": spect.n_iters,
            "n_subsets": spect.n_subsets,
            "attenuation_correction": "mu map from the CT (Schneider density x NIST mu/rho)",
            "resolution_modelling": "Gaussian collimator-detector response" if spect.resolution_recovery else "none",
            "post_filter": "none",
            "device": spect.device,
            "timings_s": spect.timings_s,
        },
        "dicom": {
            "spect_units": spect_units,
            **nm_info,
            "uids": uids,
            "radionuclide_total_dose_units": "MBq (NM Isotope module)",
        },
        "grids": {"ct": _grid_dict(grid), "spect": _grid_dict(spect.recon.grid)},
        "versions": _versions(),
    }
    if patient.time_point is not None:
        info["time_point"] = patient.time_point
        info["pose"] = patient.pose.to_dict() if patient.pose is not None else None
    info.update(extra_truth_info or {})
    json_path = truth_dir / "phantom.json"
    # written last and atomically: a phantom.json that parses means the study is whole
    text = json.dumps(info, indent=2).encode()
    atomic_write(json_path, lambda f: f.write(text))
    return {
        "out_dir": out,
        "dicom_dir": out / "dicom",
        "ct": ct_paths,
        "nm": nm_path,
        "seg": seg_path if write_seg else None,
        "npz": npz_path,
        "json": json_path,
    }


@dataclasses.dataclass
class PhantomCase:
    """One phantom study as written by `spectdose phantom`, with its truth."""

    path: Path
    patient: str
    realisation: int
    labels: dict[str, np.ndarray]
    activity_true: Volume
    density_true: Volume


def load_phantom_case(path: str | Path) -> PhantomCase:
    path = Path(path)
    truth_npz = path / "truth" / "truth.npz"
    meta_json = path / "truth" / "phantom.json"
    if not truth_npz.is_file() or not meta_json.is_file():
        raise InputError(f"{path} is not a phantom written by `spectdose phantom` (no truth/truth.npz, truth/phantom.json)")
    meta = json.loads(meta_json.read_text())
    with np.load(truth_npz) as t:
        grid = Grid(
            t["activity_bq_per_ml"].shape,
            tuple(t["spacing_mm"]),
            tuple(t["origin_mm"]),
            t["axes"],
            meta.get("dicom", {}).get("uids", {}).get("frame_of_reference"),
        )
        labels = {k[len("label_") :]: t[k].astype(bool) for k in t.files if k.startswith("label_")}
        activity = Volume(t["activity_bq_per_ml"].astype(np.float32), grid, "Bq/ml")
        density = Volume(t["density_g_cm3"].astype(np.float32), grid, "g/cm3")
    seed = int(meta["seed"])
    return PhantomCase(
        path=path,
        patient=f"vp{seed:04d}",
        realisation=int(meta.get("counts", {}).get("noise_seed", seed)),
        labels=labels,
        activity_true=activity,
        density_true=density,
    )
