"""DICOM export: RT Dose and dose-rate Parametric Map, checked by independent readers.

A tiny CT series is written with pydicom so SimpleITK can read the CT and the exported
objects side by side; dciodvfy (dicom3tools) and plastimatch are the external validators.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    NuclearMedicineImageStorage,
    ParametricMapStorage,
    RTDoseStorage,
    generate_uid,
)
from scipy.spatial.transform import Rotation

from spectdose.dicom.export import (
    DOSE_SUMMATION_TYPE,
    ExportError,
    Replaces,
    average_onto_grid,
    build_dose_rate_map,
    build_rtdose,
    content_digest,
    dose_grid_scaling_ds,
    output_grid,
    read_dose_rate_map,
    read_rtdose,
    write_dose_rate_map,
    write_rtdose,
)
from spectdose.geometry import Grid, Volume
from spectdose.study import Administration, PatientInfo, SeriesRef, Study

DCIODVFY = shutil.which("dciodvfy", path="/usr/bin") or shutil.which("dciodvfy")
PLASTIMATCH = shutil.which("plastimatch", path="/usr/bin") or shutil.which("plastimatch")
# dcmqi's converter comes with `pip install dcmqi` (the dev extra), next to this Python.
PARAMAP2ITKIMAGE = shutil.which(
    "paramap2itkimage", path=str(Path(sys.executable).parent)
) or shutil.which("paramap2itkimage")
UINT32_MAX = 2**32 - 1
CREATED = dt.datetime(2024, 3, 5, 14, 30, 0)
DESCRIPTION = "Lu-177 absorbed dose (DVK, Hanscheid STP)"

# dciodvfy (dicom3tools 2022-06-18) warnings that are expected and harmless:
KNOWN_WARNINGS = [
    # Our chosen Dose Summation Type is a Defined Term newer than this dciodvfy build.
    r"Unrecognized defined term <PLAN_OVERVIEW> for value 1 of attribute <Dose Summation Type>",
    # The Plan Overview Sequence that goes with it, and the attributes inside it, are
    # equally unknown to this build's RT Dose IOD tables.
    r"Attribute is not present in standard DICOM IOD - \((0x0008,0x1140|0x0008,0x1150|0x0008,0x1155|"
    r"0x300a,0x0002|0x300c,0x0114|0x300c,0x0116|0x300c,0x0117|0x300c,0x0119|0x3010,0x0077|"
    r"0x3010,0x0078)\)",
    r"Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard "
    r"Extended SOP Class",
    # Parametric Map: highdicom's Derived Pixel Contrast QUANTITY is newer than this build.
    r"Unrecognized defined term <QUANTITY> for value 4 of attribute <(Image|Frame) Type>",
]


# --------------------------------------------------------------------------------------
# Synthetic study


def _axes(kind: str) -> np.ndarray:
    """Grid axes (rows: slice, row, column directions) for a named patient orientation."""
    if kind == "oblique":
        rot = Rotation.from_euler("zx", [30, 10], degrees=True).as_matrix()
        col, row = rot @ [1.0, 0, 0], rot @ [0, 1.0, 0]
        return np.stack([np.cross(col, row), row, col])
    col, row, slice_dir = {
        # head-first supine, slices stored foot to head
        "hfs": ([1, 0, 0], [0, 1, 0], [0, 0, 1]),
        # feet-first prone: image x runs to the patient's left... mirrored in-plane axes
        "ffp": ([-1, 0, 0], [0, -1, 0], [0, 0, 1]),
        # slices stored head to foot: slice axis against the plane normal
        "hfs_head_to_foot": ([1, 0, 0], [0, 1, 0], [0, 0, -1]),
    }[kind]
    return np.array([slice_dir, row, col], dtype=float)


def make_study(orientation: str = "hfs", *, nm_in_other_study: bool = False) -> Study:
    """A 16 x 20 x 24 CT on non-cubic voxels with a non-trivial origin, and its NM."""
    seed = f"spectdose-test-{orientation}"
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    frame_of_reference = generate_uid(entropy_srcs=[seed, "for"])
    shape = (16, 20, 24)
    grid = Grid(
        shape, (2.5, 1.2, 0.9), (-101.3, -87.25, 412.5), _axes(orientation), frame_of_reference
    )
    ct = Volume(np.zeros(shape, np.int16), grid, "HU")
    spect_grid = Grid((8, 10, 12), (4.8, 4.8, 4.8), grid.origin_mm, grid.axes, frame_of_reference)
    spect = Volume(np.zeros(spect_grid.shape, np.float32), spect_grid, "Bq/ml")
    ct_ref = SeriesRef(
        study_uid,
        generate_uid(entropy_srcs=[seed, "ct-series"]),
        "CT",
        CTImageStorage,
        tuple(generate_uid(entropy_srcs=[seed, "ct", str(k)]) for k in range(shape[0])),
        "CT low dose",
        2,
        frame_of_reference,
    )
    nm_ref = SeriesRef(
        generate_uid(entropy_srcs=[seed, "other-study"]) if nm_in_other_study else study_uid,
        generate_uid(entropy_srcs=[seed, "nm-series"]),
        "NM",
        NuclearMedicineImageStorage,
        (generate_uid(entropy_srcs=[seed, "nm"]),),
        "SPECT Lu177 recon",
        3,
        frame_of_reference,
    )
    patient = PatientInfo(
        "Doe^Jane", "P0001", "19600101", "F", "20240305", "101500", "S1", "ACC1", ""
    )
    administration = Administration(
        "Lu-177", 7.4e9, dt.datetime(2024, 3, 4, 9, 0), "Lu-177 DOTATATE"
    )
    return Study(
        ct, spect, ct_ref, nm_ref, patient, administration, dt.datetime(2024, 3, 5, 10, 0), "test"
    )


def dose_pattern_gy(study: Study, peak_gy: float = 37.0) -> Volume:
    """A smooth background, a hot lesion and an air gap of exact zeros, in Gy."""
    grid = study.ct.grid
    k, j, i = np.indices(grid.shape, dtype=float)
    values = 0.2 + 0.05 * k + 0.01 * j + 0.003 * i
    values += peak_gy * np.exp(-((k - 7) ** 2 / 4 + (j - 9) ** 2 / 9 + (i - 14) ** 2 / 16))
    values[:, :, :3] = 0.0  # outside the body: no dose
    return Volume(values, grid, "Gy")


def ct_headers(study: Study) -> list[pydicom.Dataset]:
    """Single-frame CT Image instances matching ``study.ct`` (positions from its grid)."""
    grid, ref, p = study.ct.grid, study.ct_series, study.patient
    datasets = []
    for k, sop_uid in enumerate(ref.sop_instance_uids):
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.study_instance_uid, ref.series_instance_uid
        ds.FrameOfReferenceUID = grid.frame_of_reference_uid
        ds.PatientName, ds.PatientID = p.patient_name, p.patient_id
        ds.PatientBirthDate, ds.PatientSex = p.patient_birth_date, p.patient_sex
        ds.StudyDate, ds.StudyTime, ds.StudyID = p.study_date, p.study_time, p.study_id
        ds.AccessionNumber, ds.ReferringPhysicianName = p.accession_number, ""
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in grid.index_to_lps_mm(np.array([k, 0, 0]))]
        ds.ImageOrientationPatient = [float(v) for v in (*grid.axes[2], *grid.axes[1])]
        ds.PixelSpacing = [grid.spacing_mm[1], grid.spacing_mm[2]]
        ds.SliceThickness = grid.spacing_mm[0]
        ds.Rows, ds.Columns = grid.shape[1], grid.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.full(grid.shape[1:], 1024, "<i2").tobytes()
        datasets.append(ds)
    return datasets


def read_ct_series_with_sitk(study: Study, folder) -> sitk.Image:
    folder.mkdir()
    for k, ds in enumerate(ct_headers(study)):
        ds.save_as(folder / f"ct{k:03d}.dcm", enforce_file_format=True)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_same_voxels(
    volume: Volume, reference: Volume, *, tol_mm: float = 0.01, rtol: float = 1e-3
):
    """Every reference voxel centre is a voxel centre of ``volume`` with the same value.

    Independent of slice order and axis conventions: it compares patient positions.
    """
    centres = reference.grid.index_to_lps_mm(np.indices(reference.grid.shape).reshape(3, -1).T)
    index = volume.grid.lps_mm_to_index(centres)
    nearest = np.rint(index).astype(int)
    assert np.all((nearest >= 0) & (nearest < np.asarray(volume.grid.shape))), (
        "grids do not overlap"
    )
    offset_mm = np.linalg.norm(volume.grid.index_to_lps_mm(nearest) - centres, axis=1)
    assert offset_mm.max() <= tol_mm, f"voxel centres differ by up to {offset_mm.max():.3g} mm"
    assert volume.grid.shape == reference.grid.shape
    got = volume.array[tuple(nearest.T)]
    want = reference.array.ravel()
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * want.max() * 1e-3)


def dciodvfy(path) -> tuple[list[str], list[str]]:
    """(error lines, unexpected warning lines) of dciodvfy on ``path``."""
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [
        line
        for line in lines
        if line.startswith("Warning") and not any(re.search(p, line) for p in KNOWN_WARNINGS)
    ]
    return errors, warnings


needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) not installed"
)
needs_plastimatch = pytest.mark.skipif(
    PLASTIMATCH is None, reason="plastimatch (Debian) not installed"
)
needs_dcmqi = pytest.mark.skipif(
    PARAMAP2ITKIMAGE is None, reason="dcmqi not installed (pip install dcmqi; in the dev extra)"
)


@pytest.fixture(scope="module")
def study() -> Study:
    return make_study()


@pytest.fixture(scope="module")
def dose(study) -> Volume:
    return dose_pattern_gy(study)


def _rtdose(dose, study, **kwargs):
    kwargs = {"method": "DVK", "description": DESCRIPTION, "created_at": CREATED, **kwargs}
    return build_rtdose(dose, study, **kwargs)


# --------------------------------------------------------------------------------------
# RT Dose: content


def test_rtdose_header_states_what_the_dose_is_and_where_it_came_from(dose, study):
    ds = _rtdose(dose, study, options_key="hanscheid-stp")

    assert ds.SOPClassUID == RTDoseStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "RTDOSE"
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == (
        "GY",
        "PHYSICAL",
        DOSE_SUMMATION_TYPE.value,
    )
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (32, 32, 31, 0)
    assert (ds.SamplesPerPixel, ds.PhotometricInterpretation) == (1, "MONOCHROME2")
    assert ds.FrameIncrementPointer == 0x3004000C
    offsets = np.asarray(ds.GridFrameOffsetVector, dtype=float)
    assert offsets[0] == 0 and np.allclose(np.diff(offsets), 2.5)
    assert ds.NumberOfFrames == 16 and (ds.Rows, ds.Columns) == (20, 24)
    # Files into the source study, on the CT's frame of reference.
    assert ds.StudyInstanceUID == study.ct_series.study_instance_uid
    assert ds.FrameOfReferenceUID == study.ct.grid.frame_of_reference_uid
    assert (ds.PatientID, ds.PatientName, ds.AccessionNumber) == ("P0001", "Doe^Jane", "ACC1")
    assert ds.SeriesDescription == ds.DoseComment == DESCRIPTION
    assert "hanscheid-stp" in ds.ImageComments and "7400.0 MBq" in ds.ImageComments
    assert ds.Manufacturer == "spectdose" and ds.SoftwareVersions
    assert ds.InstanceCreationDate == ds.ContentDate == "20240305"
    # Every CT and NM instance is referenced, per instance and per series.
    sources = {item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence}
    assert sources == set(study.ct_series.sop_instance_uids) | set(
        study.spect_series.sop_instance_uids
    )
    series = {item.SeriesInstanceUID for item in ds.ReferencedSeriesSequence}
    assert series == {study.ct_series.series_instance_uid, study.spect_series.series_instance_uid}
    overview_images = ds.PlanOverviewSequence[0].ReferencedImageSequence
    assert [i.ReferencedSOPInstanceUID for i in overview_images] == list(
        study.ct_series.sop_instance_uids
    )


def test_rtdose_round_trip_through_our_reader(tmp_path, dose, study):
    path = write_rtdose(tmp_path / "dose.dcm", dose, study, method="DVK", description=DESCRIPTION)

    back = read_rtdose(path)

    assert back.units == "Gy"
    assert back.grid.same_as(study.ct.grid, tol_mm=0.01)
    assert back.grid.frame_of_reference_uid == study.ct.grid.frame_of_reference_uid
    np.testing.assert_allclose(back.array, dose.array, rtol=1e-3, atol=0)
    assert np.all(back.array[:, :, :3] == 0), "zero dose must stay exactly zero"
    # 32-bit quantisation is far finer than the 0.1 % contract.
    assert np.abs(back.array - dose.array).max() <= dose.array.max() / UINT32_MAX


@pytest.mark.parametrize("orientation", ["hfs", "ffp", "hfs_head_to_foot", "oblique"])
def test_simpleitk_reads_rtdose_on_the_ct_geometry(tmp_path, orientation):
    study = make_study(orientation)
    dose = dose_pattern_gy(study)
    path = write_rtdose(tmp_path / "dose.dcm", dose, study, method="DVK", description=DESCRIPTION)
    ct_image = read_ct_series_with_sitk(study, tmp_path / "ct")

    dose_image = sitk.ReadImage(str(path))

    # The same geometry as SimpleITK gives the CT series itself.
    assert dose_image.GetSize() == ct_image.GetSize()
    np.testing.assert_allclose(dose_image.GetOrigin(), ct_image.GetOrigin(), atol=0.01)
    np.testing.assert_allclose(dose_image.GetSpacing(), ct_image.GetSpacing(), atol=0.01)
    np.testing.assert_allclose(dose_image.GetDirection(), ct_image.GetDirection(), atol=1e-6)
    # SimpleITK returns the stored integers; Dose Grid Scaling is ours to apply.
    scaling = float(pydicom.dcmread(path, stop_before_pixels=True).DoseGridScaling)
    read = Volume.from_sitk(dose_image, "Gy")
    read.array = read.array.astype(np.float64) * scaling
    assert_same_voxels(read, dose)


@pytest.mark.parametrize("orientation", ["oblique", "hfs_head_to_foot"])
def test_our_reader_places_every_voxel_for_any_orientation(tmp_path, orientation):
    study = make_study(orientation)
    dose = dose_pattern_gy(study)

    back = read_rtdose(
        write_rtdose(tmp_path / "d.dcm", dose, study, method="DVK", description=DESCRIPTION)
    )

    assert_same_voxels(back, dose)


@needs_plastimatch
@pytest.mark.parametrize("orientation", ["hfs", "ffp", "hfs_head_to_foot"])
def test_plastimatch_reads_rtdose_geometry_and_values(tmp_path, orientation):
    # Axis-aligned orientations only: plastimatch 1.9.4 transposes the direction cosines of
    # an oblique RT Dose (it reads an oblique CT series correctly); see docs/rtdose.md.
    study = make_study(orientation)
    dose = dose_pattern_gy(study)
    path = write_rtdose(tmp_path / "dose.dcm", dose, study, method="DVK", description=DESCRIPTION)
    out = tmp_path / "dose.mha"

    result = subprocess.run(
        [PLASTIMATCH, "convert", "--input", str(path), "--output-dose-img", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    read = Volume.from_sitk(sitk.ReadImage(str(out)), "Gy")  # plastimatch applies the scaling
    read.array = read.array.astype(np.float64)
    assert_same_voxels(read, dose)


# --------------------------------------------------------------------------------------
# RT Dose: validation by dciodvfy


@needs_dciodvfy
@pytest.mark.parametrize("nm_in_other_study", [False, True])
def test_dciodvfy_finds_no_error_in_the_16_bit_twin(tmp_path, nm_in_other_study):
    # dciodvfy aborts on 32-bit pixels (an assertion in its pixel-data reader), so the
    # validated object is the same writer's 16-bit twin.
    study = make_study(nm_in_other_study=nm_in_other_study)
    path = write_rtdose(
        tmp_path / "d16.dcm",
        dose_pattern_gy(study),
        study,
        method="DVK",
        description=DESCRIPTION,
        bits=16,
    )

    errors, unexpected_warnings = dciodvfy(path)

    assert errors == []
    assert unexpected_warnings == []
    if nm_in_other_study:
        assert "StudiesContainingOtherReferencedInstancesSequence" in pydicom.dcmread(path)


@needs_dciodvfy
@pytest.mark.parametrize(
    "summation_type, missing",
    [
        ("PLAN", "ReferencedRTPlanSequence"),
        ("FRACTION", "ReferencedRTPlanSequence"),
        ("BEAM", "ReferencedRTPlanSequence"),
        ("RECORD", "ReferencedTreatmentRecordSequence"),
    ],
)
def test_dciodvfy_rejects_the_plan_based_summation_types(
    tmp_path, dose, study, summation_type, missing
):
    # The evidence behind DOSE_SUMMATION_TYPE: the classic values need a plan or a
    # treatment record, which a radionuclide therapy does not have.
    ds = _rtdose(dose, study, bits=16)
    ds.DoseSummationType = summation_type
    del ds.PlanOverviewSequence
    ds.save_as(tmp_path / "d.dcm", enforce_file_format=True)

    errors, _ = dciodvfy(tmp_path / "d.dcm")

    assert any(f"Missing attribute Type 1C Conditional Element=<{missing}>" in e for e in errors), (
        errors
    )


def test_16_bit_twin_holds_the_same_dose_to_its_coarser_step(tmp_path, dose, study):
    back = read_rtdose(
        write_rtdose(
            tmp_path / "d16.dcm", dose, study, method="DVK", description=DESCRIPTION, bits=16
        )
    )
    ds = pydicom.dcmread(tmp_path / "d16.dcm", stop_before_pixels=True)

    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 16, 15)
    assert np.abs(back.array - dose.array).max() <= 0.5 * float(ds.DoseGridScaling) * (1 + 1e-9)


# --------------------------------------------------------------------------------------
# Dose Grid Scaling


AWKWARD_MAXIMA_GY = [
    1e-7,
    12345.678,
    1.0,
    0.1,
    2.0 / 3.0,
    float(UINT32_MAX),  # the ideal scaling is exactly 1
    float(UINT32_MAX) * 1e-12,  # ... exactly 1e-12
    4294967296.0,  # one more than the largest pixel: the scaling must not round to 1
    np.nextafter(1.0, 2.0),
    123456789012.5,
]


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("max_dose_gy", AWKWARD_MAXIMA_GY)
def test_dose_grid_scaling_fits_16_characters_and_never_clips(max_dose_gy, bits):
    max_stored = 2**bits - 1

    text = dose_grid_scaling_ds(max_dose_gy, max_stored)
    scaling = float(text)

    assert len(text) <= 16
    assert pydicom.valuerep.DSfloat(text, validation_mode=pydicom.config.RAISE) == scaling
    assert round(max_dose_gy / scaling) <= max_stored, "the maximum would clip"
    # ... and the pixel range is used, not wasted on a coarse step.
    assert max_dose_gy / scaling >= max_stored * (1 - 1e-9)
    assert Decimal(text) >= Decimal(max_dose_gy) / max_stored


@pytest.mark.parametrize("max_dose_gy", [1e-7, 12345.678, float(UINT32_MAX), 4294967296.0])
def test_maximum_dose_survives_the_file(tmp_path, study, max_dose_gy):
    dose = dose_pattern_gy(study)
    dose = Volume(dose.array * (max_dose_gy / dose.array.max()), dose.grid, "Gy")

    path = write_rtdose(tmp_path / "d.dcm", dose, study, method="DVK", description=DESCRIPTION)
    ds = pydicom.dcmread(path)

    assert len(ds["DoseGridScaling"].value.original_string) <= 16
    stored_max = int(ds.pixel_array.max())
    assert UINT32_MAX * (1 - 1e-9) <= stored_max <= UINT32_MAX
    assert read_rtdose(path).array.max() == pytest.approx(max_dose_gy, rel=1e-9)


def test_all_zero_dose_is_written_as_zeros(tmp_path, study):
    zero = Volume(np.zeros(study.ct.grid.shape), study.ct.grid, "Gy")

    back = read_rtdose(
        write_rtdose(tmp_path / "z.dcm", zero, study, method="DVK", description=DESCRIPTION)
    )

    assert np.all(back.array == 0)


def test_mgy_input_is_converted_to_gy(dose, study):
    in_mgy = Volume(dose.array * 1e3, dose.grid, "mGy")

    ds_gy, ds_mgy = _rtdose(dose, study), _rtdose(in_mgy, study)

    assert ds_mgy.DoseUnits == "GY"
    assert float(ds_mgy.DoseGridScaling) == pytest.approx(float(ds_gy.DoseGridScaling), rel=1e-12)


# --------------------------------------------------------------------------------------
# Deterministic UIDs


def test_same_inputs_give_the_same_uids_so_a_rerun_replaces(dose, study):
    first = _rtdose(dose, study, options_key="stp=hanscheid")
    again = _rtdose(
        dose, study, options_key="stp=hanscheid", created_at=CREATED + dt.timedelta(days=1)
    )

    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert first.SOPInstanceUID == again.SOPInstanceUID
    for uid in (first.SeriesInstanceUID, first.SOPInstanceUID):
        assert UID(uid).is_valid and uid not in (study.ct_series.series_instance_uid,)


@pytest.mark.parametrize(
    "change",
    [
        {"options_key": "stp=hanscheid;kernel=v2"},
        {"method": "DblurDoseNet"},
        {"bits": 16},
    ],
)
def test_different_options_give_different_uids(dose, study, change):
    base = _rtdose(dose, study, options_key="stp=hanscheid")
    other = _rtdose(dose, study, **{"options_key": "stp=hanscheid", **change})

    assert other.SeriesInstanceUID != base.SeriesInstanceUID
    assert other.SOPInstanceUID != base.SOPInstanceUID


def test_uids_do_not_depend_on_the_order_ingest_listed_the_instances(dose, study):
    shuffled = dataclasses.replace(
        study.ct_series, sop_instance_uids=tuple(reversed(study.ct_series.sop_instance_uids))
    )

    again = _rtdose(dose, dataclasses.replace(study, ct_series=shuffled))

    assert again.SOPInstanceUID == _rtdose(dose, study).SOPInstanceUID


def test_method_and_options_cannot_alias_each_other(dose, study):
    # pydicom concatenates entropy sources; ("DVK", "") must not equal ("DV", "K").
    a = _rtdose(dose, study, method="DVK", options_key="")
    b = _rtdose(dose, study, method="DV", options_key="K")

    assert a.SOPInstanceUID != b.SOPInstanceUID


def test_different_source_instances_give_different_uids(dose, study):
    other_nm = dataclasses.replace(study.spect_series, sop_instance_uids=(generate_uid(),))
    other_study = dataclasses.replace(study, spect_series=other_nm)

    assert _rtdose(dose, other_study).SOPInstanceUID != _rtdose(dose, study).SOPInstanceUID


# --------------------------------------------------------------------------------------
# Refusals


def test_refuses_dose_on_another_frame_of_reference(dose, study):
    elsewhere = dataclasses.replace(dose.grid, frame_of_reference_uid=generate_uid())

    with pytest.raises(ExportError, match="frame of reference"):
        _rtdose(Volume(dose.array, elsewhere, "Gy"), study)


def test_refuses_dose_reaching_outside_the_ct_field_of_view(dose, study):
    # More than half a voxel (2.5 mm slices) past the CT's last slice.
    shifted = dataclasses.replace(dose.grid, origin_mm=(-101.3, -87.25, 414.0))
    tilted = dataclasses.replace(dose.grid, axes=_axes("ffp"))

    with pytest.raises(ExportError, match="outside the CT field of view"):
        _rtdose(Volume(dose.array, shifted, "Gy"), study)
    with pytest.raises(ExportError, match="not oriented like the CT"):
        _rtdose(Volume(dose.array, tilted, "Gy"), study)


@pytest.mark.parametrize(
    "bad, message", [(np.nan, "non-finite"), (np.inf, "non-finite"), (-0.01, "negative")]
)
def test_refuses_non_finite_or_negative_dose(dose, study, bad, message):
    values = dose.array.copy()
    values[3, 4, 5] = bad

    with pytest.raises(ExportError, match=message):
        _rtdose(Volume(values, dose.grid, "Gy"), study)


def test_refuses_a_dose_that_is_not_3d(dose, study):
    flat = Volume(dose.array.copy(), dose.grid, "Gy")
    flat.array = flat.array[0]

    with pytest.raises(ExportError, match="3D"):
        _rtdose(flat, study)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 8}, "bits must be 16 or 32"),
        ({"description": "x" * 65}, "1-64 characters"),
        ({"method": ""}, "method"),
    ],
)
def test_refuses_bad_options(dose, study, kwargs, message):
    with pytest.raises(ExportError, match=message):
        _rtdose(dose, study, **kwargs)


def test_refuses_dose_in_other_units(dose, study):
    with pytest.raises(ExportError, match="units 'Gy/h'"):
        _rtdose(Volume(dose.array, dose.grid, "Gy/h"), study)


def test_readers_refuse_the_other_kind_of_file(tmp_path, dose, study):
    rtdose = write_rtdose(tmp_path / "d.dcm", dose, study, method="DVK", description=DESCRIPTION)
    pmap = write_dose_rate_map(
        tmp_path / "p.dcm", Volume(dose.array, dose.grid, "mGy/h"), study, method="DVK"
    )

    with pytest.raises(ExportError, match="not an RT Dose"):
        read_rtdose(pmap)
    with pytest.raises(ExportError, match="not a Parametric Map"):
        read_dose_rate_map(rtdose)


# --------------------------------------------------------------------------------------
# Dose-rate Parametric Map


def _dose_rate(study) -> Volume:
    dose = dose_pattern_gy(study)
    return Volume(dose.array * 0.731, dose.grid, "mGy/h")


@pytest.mark.parametrize("orientation", ["hfs", "ffp", "hfs_head_to_foot", "oblique"])
def test_parametric_map_round_trip_is_exact(tmp_path, orientation):
    study = make_study(orientation)
    rate = _dose_rate(study)

    path = write_dose_rate_map(tmp_path / "pm.dcm", rate, study, method="DVK", created_at=CREATED)
    ds = pydicom.dcmread(path)
    back = read_dose_rate_map(path)

    assert ds.SOPClassUID == ParametricMapStorage
    assert "FloatPixelData" in ds and ds.BitsAllocated == 32
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("mGy/h", "UCUM")
    assert ds.StudyInstanceUID == study.ct_series.study_instance_uid
    assert ds.FrameOfReferenceUID == study.ct.grid.frame_of_reference_uid
    assert back.units == "mGy/h"
    # float32 pixels: exactly the float32 values handed in, nothing rescaled, each in place.
    as_float32 = Volume(rate.array.astype(np.float32).astype(np.float64), rate.grid, "mGy/h")
    assert_same_voxels(back, as_float32, rtol=0)


def test_parametric_map_references_every_ct_and_nm_instance(study):
    pm = build_dose_rate_map(_dose_rate(study), study, method="DVK", created_at=CREATED)

    sources = {item.ReferencedSOPInstanceUID for item in pm.SourceImageSequence}
    assert sources == set(study.ct_series.sop_instance_uids) | set(
        study.spect_series.sop_instance_uids
    )
    series = {item.SeriesInstanceUID for item in pm.ReferencedSeriesSequence}
    assert series == {study.ct_series.series_instance_uid, study.spect_series.series_instance_uid}
    # Without the CT headers no frame claims a CT slice it cannot vouch for.
    assert all(
        len(f.get("DerivationImageSequence", [])) == 0 for f in pm.PerFrameFunctionalGroupsSequence
    )


@pytest.mark.parametrize("orientation", ["hfs", "hfs_head_to_foot"])
def test_parametric_map_links_frames_to_ct_slices_when_given_the_headers(orientation):
    study = make_study(orientation)
    headers = ct_headers(study)
    position_of = {ds.SOPInstanceUID: np.asarray(ds.ImagePositionPatient) for ds in headers}

    pm = build_dose_rate_map(_dose_rate(study), study, method="DVK", ct_datasets=headers)

    for frame in pm.PerFrameFunctionalGroupsSequence:
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        frame_position = np.asarray(
            frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float
        )
        np.testing.assert_allclose(
            position_of[source.ReferencedSOPInstanceUID], frame_position, atol=1e-3
        )


def test_parametric_map_converts_gy_per_h(study):
    rate = _dose_rate(study)
    in_gy_per_h = Volume(rate.array / 1e3, rate.grid, "Gy/h")

    pm = build_dose_rate_map(in_gy_per_h, study, method="DVK")

    assert np.asarray(pm.pixel_array).max() == pytest.approx(rate.array.max(), rel=1e-6)


def test_parametric_map_uids_are_deterministic_and_distinct_from_rtdose(dose, study):
    rate = _dose_rate(study)
    a = build_dose_rate_map(rate, study, method="DVK", options_key="x", created_at=CREATED)
    b = build_dose_rate_map(rate, study, method="DVK", options_key="x")
    c = build_dose_rate_map(rate, study, method="DVK", options_key="y")

    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert (
        a.DimensionIndexSequence[0].DimensionOrganizationUID
        == b.DimensionIndexSequence[0].DimensionOrganizationUID
    )
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID
    assert a.SOPInstanceUID != _rtdose(dose, study, options_key="x").SOPInstanceUID


@needs_dciodvfy
@pytest.mark.parametrize(
    "with_headers, nm_in_other_study", [(False, False), (True, False), (False, True)]
)
def test_dciodvfy_finds_no_error_in_the_parametric_map(tmp_path, with_headers, nm_in_other_study):
    study = make_study(nm_in_other_study=nm_in_other_study)
    path = write_dose_rate_map(
        tmp_path / "pm.dcm",
        _dose_rate(study),
        study,
        method="DVK",
        ct_datasets=ct_headers(study) if with_headers else None,
    )

    errors, unexpected_warnings = dciodvfy(path)

    assert errors == []
    assert unexpected_warnings == []


def test_all_zero_dose_rate_map_reads_back_as_zeros(tmp_path, study):
    zero = Volume(np.zeros(study.ct.grid.shape), study.ct.grid, "mGy/h")

    back = read_dose_rate_map(write_dose_rate_map(tmp_path / "z.dcm", zero, study, method="DVK"))

    assert np.all(back.array == 0)


def test_parametric_map_refuses_bad_input(study):
    rate = _dose_rate(study)
    values = rate.array.copy()
    values[0, 0, 5] = np.nan
    elsewhere = dataclasses.replace(rate.grid, frame_of_reference_uid=generate_uid())
    foreign = ct_headers(make_study("ffp"))

    with pytest.raises(ExportError, match="non-finite"):
        build_dose_rate_map(Volume(values, rate.grid, "mGy/h"), study, method="DVK")
    with pytest.raises(ExportError, match="frame of reference"):
        build_dose_rate_map(Volume(rate.array, elsewhere, "mGy/h"), study, method="DVK")
    with pytest.raises(ExportError, match="units 'Gy'"):
        build_dose_rate_map(Volume(rate.array, rate.grid, "Gy"), study, method="DVK")
    with pytest.raises(ExportError, match="not the study's CT series"):
        build_dose_rate_map(rate, study, method="DVK", ct_datasets=foreign)


# --------------------------------------------------------------------------------------
# Every distinct result is a distinct object: UIDs from the content


def _changed_spect_pixel(study: Study) -> Study:
    spect = study.spect.array.copy()
    spect[4, 5, 6] += 1.0
    return dataclasses.replace(study, spect=Volume(spect, study.spect.grid, study.spect.units))


@pytest.mark.parametrize(
    "change",
    [
        _changed_spect_pixel,
        lambda s: dataclasses.replace(
            s, ct=Volume(s.ct.array + np.int16(1), s.ct.grid, s.ct.units)
        ),
        lambda s: dataclasses.replace(
            s,
            administration=dataclasses.replace(
                s.administration, administration_datetime=dt.datetime(2024, 3, 3, 9, 0)
            ),
        ),
        lambda s: dataclasses.replace(s, acquisition_datetime=dt.datetime(2024, 3, 5, 11, 0)),
        lambda s: dataclasses.replace(s, calibration_note="sensitivity 12.3 cps/MBq"),
        lambda s: dataclasses.replace(
            s, patient=dataclasses.replace(s.patient, patient_name="Doe^Janet")
        ),
    ],
    ids=["spect-pixel", "ct-pixels", "administration", "acquisition", "calibration", "patient"],
)
def test_any_change_in_the_inputs_gives_new_uids(dose, study, change):
    changed = change(study)

    digest = content_digest(study, {"options": "x"})
    assert content_digest(study, {"options": "x"}) == digest  # identical inputs: same digest
    assert content_digest(changed, {"options": "x"}) != digest
    first = _rtdose(dose, study, content_digest=digest)
    again = _rtdose(dose, study, content_digest=content_digest(study, {"options": "x"}))
    other = _rtdose(dose, changed, content_digest=content_digest(changed, {"options": "x"}))
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (
        first.SeriesInstanceUID,
        first.SOPInstanceUID,
    )
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID


def test_facts_the_caller_used_enter_the_digest(study):
    base = content_digest(study, {"options": "x", "hours": 32.9})

    assert content_digest(study, {"options": "x", "hours": 8.9}) != base
    assert content_digest(study, {"options": "y", "hours": 32.9}) != base


def test_a_new_software_version_gives_new_uids(dose, study, monkeypatch):
    import spectdose

    before = _rtdose(dose, study)
    pm_before = build_dose_rate_map(_dose_rate(study), study, method="DVK")
    monkeypatch.setattr(spectdose, "__version__", spectdose.__version__ + ".post1")
    after = _rtdose(dose, study)
    pm_after = build_dose_rate_map(_dose_rate(study), study, method="DVK")

    assert after.SOPInstanceUID != before.SOPInstanceUID
    assert after.SeriesInstanceUID != before.SeriesInstanceUID
    assert pm_after.SOPInstanceUID != pm_before.SOPInstanceUID
    assert after.SoftwareVersions == spectdose.__version__


# --------------------------------------------------------------------------------------
# Warnings, provenance and corrections travel in the objects

WARNINGS = [
    "a Radiopharmaceutical Start Time without a date was taken on the acquisition day",
    "3.2 % of the SPECT activity lies outside the CT field of view",
]
PROVENANCE = {
    "method": "CNN (DblurDoseNet)",
    "software": "spectdose 9.9",
    "model_sha256": "ab12" * 16,
    "time_model": "hanscheid, t = 32.90 h",
    "calibration": "Real World Value Mapping (Bq/ml)",
}
OLD_SERIES = "1.2.826.0.1.3680043.8.498.1234567890"


def test_rtdose_carries_warnings_provenance_and_what_it_replaces(dose, study):
    plain = _rtdose(dose, study)
    ds = _rtdose(
        dose,
        study,
        warnings=WARNINGS,
        provenance=PROVENANCE,
        replaces=Replaces(OLD_SERIES, "corrected administration date"),
    )

    assert ds.SeriesDescription.endswith("[CORRECTED, 2 WARNINGS]")
    assert len(ds.SeriesDescription) <= 64 and ds.DoseComment == ds.SeriesDescription
    assert ds.SeriesDescription.startswith(DESCRIPTION[:20])
    assert f"replaces {OLD_SERIES} (corrected administration date)" in ds.ImageComments
    for warning in WARNINGS:
        assert f"WARNING: {warning}" in ds.ImageComments
    for value in PROVENANCE.values():
        assert value in ds.DerivationDescription and value in ds.ImageComments
    # A correction is a new object, even of identical numbers.
    assert ds.SeriesInstanceUID != plain.SeriesInstanceUID
    assert plain.SeriesDescription == DESCRIPTION and "WARNING" not in plain.ImageComments


def test_parametric_map_carries_warnings_provenance_and_what_it_replaces(study):
    pm = build_dose_rate_map(
        _dose_rate(study),
        study,
        method="DVK",
        warnings=WARNINGS[:1],
        provenance=PROVENANCE,
        replaces=Replaces(OLD_SERIES, "new calibration"),
    )

    assert pm.SeriesDescription.endswith("[CORRECTED, 1 WARNING]")
    assert pm.ContentDescription == pm.SeriesDescription
    assert f"replaces {OLD_SERIES} (new calibration)" in pm.ImageComments
    assert f"WARNING: {WARNINGS[0]}" in pm.ImageComments
    assert PROVENANCE["model_sha256"] in pm.ImageComments


@pytest.mark.parametrize("uid, reason", [("not-a-uid", "x"), (OLD_SERIES, "  ")])
def test_replaces_needs_a_uid_and_a_reason(uid, reason):
    with pytest.raises(ExportError, match="replaces"):
        Replaces(uid, reason)


# --------------------------------------------------------------------------------------
# The Parametric Map opens everywhere


def test_parametric_map_has_frame_anatomy_and_content_creator(study):
    pm = build_dose_rate_map(_dose_rate(study), study, method="DVK")

    anatomy = pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
    assert anatomy.FrameLaterality == "U"
    region = anatomy.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodingSchemeDesignator) == ("38266002", "SCT")
    assert str(pm.ContentCreatorName)
    assert "Laterality" not in pm


def test_normalised_map_is_coded_per_mbq(tmp_path, study):
    rate = _dose_rate(study)
    per_mbq = Volume(rate.array, rate.grid, "mGy/h/MBq")

    path = write_dose_rate_map(tmp_path / "pm.dcm", per_mbq, study, method="DVK")
    ds = pydicom.dcmread(path)
    back = read_dose_rate_map(path)

    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("mGy/h/MBq", "UCUM")
    assert "per MBq" in mapping.LUTExplanation and "per MBq" in ds.SeriesDescription
    assert back.units == "mGy/h/MBq"
    np.testing.assert_allclose(back.array.max(), rate.array.max(), rtol=1e-6)


def test_highdicom_reads_the_parametric_map(tmp_path, study):
    import highdicom as hd

    rate = _dose_rate(study)
    path = write_dose_rate_map(tmp_path / "pm.dcm", rate, study, method="DVK")

    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path))

    assert pm.SOPInstanceUID == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    np.testing.assert_allclose(
        np.sort(pm.pixel_array.ravel()), np.sort(rate.array.ravel()), rtol=1e-6
    )


def _dcmqi_convert(path, out_dir) -> tuple[sitk.Image, dict]:
    import json

    out_dir.mkdir()
    result = subprocess.run(
        [PARAMAP2ITKIMAGE, "--inputDICOM", str(path), "--outputDirectory", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    images = list(out_dir.glob("*.nrrd"))
    assert len(images) == 1, f"dcmqi wrote {sorted(p.name for p in out_dir.iterdir())}"
    return sitk.ReadImage(str(images[0])), json.loads((out_dir / "meta.json").read_text())


@needs_dcmqi
@pytest.mark.parametrize("orientation", ["hfs", "ffp", "hfs_head_to_foot"])
def test_dcmqi_converts_the_map_and_simpleitk_reads_it_on_the_ct_geometry(tmp_path, orientation):
    # 3D Slicer imports Parametric Maps with dcmqi; GDCM (SimpleITK, plastimatch) has no
    # reader for Parametric Map Storage, so SimpleITK reads dcmqi's image (docs/rtdose.md).
    study = make_study(orientation)
    rate = _dose_rate(study)
    path = write_dose_rate_map(tmp_path / "pm.dcm", rate, study, method="DVK", warnings=WARNINGS)
    ct_image = read_ct_series_with_sitk(study, tmp_path / "ct")

    image, meta = _dcmqi_convert(path, tmp_path / "dcmqi")

    assert image.GetSize() == ct_image.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), ct_image.GetOrigin(), atol=0.01)
    np.testing.assert_allclose(image.GetSpacing(), ct_image.GetSpacing(), atol=0.01)
    np.testing.assert_allclose(image.GetDirection(), ct_image.GetDirection(), atol=1e-6)
    read = Volume.from_sitk(image, "mGy/h")
    assert read.array.max() == pytest.approx(rate.array.max(), rel=1e-3)
    assert_same_voxels(read, rate, rtol=1e-3)
    assert meta["MeasurementUnitsCode"]["CodeValue"] == "mGy/h"
    assert meta["AnatomicRegionSequence"]["CodeValue"] == "38266002"


@needs_dcmqi
def test_dcmqi_keeps_the_per_mbq_unit(tmp_path, study):
    rate = _dose_rate(study)
    path = write_dose_rate_map(
        tmp_path / "pm.dcm", Volume(rate.array, rate.grid, "mGy/h/MBq"), study, method="DVK"
    )

    image, meta = _dcmqi_convert(path, tmp_path / "dcmqi")

    assert meta["MeasurementUnitsCode"]["CodeValue"] == "mGy/h/MBq"
    assert float(sitk.GetArrayViewFromImage(image).max()) == pytest.approx(
        rate.array.max(), rel=1e-3
    )


@needs_dcmqi
@needs_plastimatch
def test_plastimatch_converts_dcmqis_image_of_the_map(tmp_path, study):
    rate = _dose_rate(study)
    path = write_dose_rate_map(tmp_path / "pm.dcm", rate, study, method="DVK")
    _dcmqi_convert(path, tmp_path / "dcmqi")
    (nrrd,) = (tmp_path / "dcmqi").glob("*.nrrd")
    out = tmp_path / "pm.mha"

    result = subprocess.run(
        [PLASTIMATCH, "convert", "--input", str(nrrd), "--output-img", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    read = Volume.from_sitk(sitk.ReadImage(str(out)), "mGy/h")
    read.array = read.array.astype(np.float64)
    assert_same_voxels(read, rate, rtol=1e-3)


# --------------------------------------------------------------------------------------
# Output grid (--dose-grid spect|MM)


@pytest.mark.parametrize("spacing_mm", [3.0, 4.8, 0.9])
def test_output_grid_covers_the_ct_field_of_view_on_its_axes(study, spacing_mm):
    ct = study.ct.grid

    grid = output_grid(ct, (spacing_mm,) * 3)

    assert grid.frame_of_reference_uid == ct.frame_of_reference_uid
    np.testing.assert_allclose(grid.axes, ct.axes)
    ct_lo, ct_hi = ct.corners_lps_mm().min(axis=0), ct.corners_lps_mm().max(axis=0)
    lo, hi = grid.corners_lps_mm().min(axis=0), grid.corners_lps_mm().max(axis=0)
    assert np.all(lo <= ct_lo + 1e-6) and np.all(hi >= ct_hi - 1e-6), "must cover the CT"
    assert np.all(ct_lo - lo < spacing_mm / 2) and np.all(hi - ct_hi < spacing_mm / 2)
    # centred on the CT
    np.testing.assert_allclose((lo + hi) / 2, (ct_lo + ct_hi) / 2, atol=1e-6)


def test_same_spacing_gives_the_ct_grid_back(study):
    ct = study.ct.grid

    assert output_grid(ct, ct.spacing_mm).same_as(ct, tol_mm=1e-6)


def test_averaging_onto_a_coarser_grid_is_the_block_mean(study):
    # Spacing exactly 2 x the CT's in every axis: each output voxel is a 2 x 2 x 2 block.
    ct = study.ct.grid
    rng = np.random.default_rng(1)
    values = Volume(rng.random(ct.shape), ct, "Gy")
    grid = output_grid(ct, tuple(2 * s for s in ct.spacing_mm))

    averaged = average_onto_grid(values, grid)

    blocks = values.array.reshape(8, 2, 10, 2, 12, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(averaged.array, blocks, rtol=1e-5)
    assert averaged.units == "Gy" and averaged.grid is grid


def test_averaging_keeps_a_uniform_dose_and_the_integral(study):
    ct = study.ct.grid
    grid = output_grid(ct, (3.0, 3.0, 3.0))  # not a multiple of any CT spacing
    uniform = Volume(np.full(ct.shape, 2.5), ct, "Gy")
    dose = dose_pattern_gy(study)

    np.testing.assert_allclose(average_onto_grid(uniform, grid).array, 2.5, rtol=1e-6)
    averaged = average_onto_grid(dose, grid)
    # Interior voxels (fully inside the CT) conserve the dose integral; edge voxels average
    # only the part inside, so compare the integral of a field that is zero at the edges.
    assert averaged.array.max() <= dose.array.max() + 1e-9
    k, j, i = np.indices(ct.shape)
    inner = np.where((k > 2) & (k < 13) & (j > 2) & (j < 17) & (i > 3) & (i < 20), dose.array, 0.0)
    inner_avg = average_onto_grid(Volume(inner, ct, "Gy"), grid)
    assert inner_avg.array.sum() * grid.voxel_volume_ml == pytest.approx(
        inner.sum() * ct.voxel_volume_ml, rel=1e-5
    )


@pytest.mark.parametrize("orientation", ["hfs", "hfs_head_to_foot", "oblique"])
def test_rtdose_and_map_on_a_3_mm_grid_read_back_in_place(tmp_path, orientation):
    study = make_study(orientation)
    grid = output_grid(study.ct.grid, (3.0, 3.0, 3.0))
    dose = average_onto_grid(dose_pattern_gy(study), grid)
    rate = average_onto_grid(_dose_rate(study), grid)

    dose_path = write_rtdose(tmp_path / "d.dcm", dose, study, method="DVK", description=DESCRIPTION)
    rate_path = write_dose_rate_map(tmp_path / "p.dcm", rate, study, method="DVK")

    assert_same_voxels(read_rtdose(dose_path), dose)
    assert_same_voxels(read_dose_rate_map(rate_path), rate, rtol=1e-6)
    image = sitk.ReadImage(str(dose_path))
    assert image.GetSize() == grid.shape[::-1]
    np.testing.assert_allclose(image.GetSpacing(), (3.0, 3.0, 3.0), atol=1e-6)
    assert pydicom.dcmread(dose_path, stop_before_pixels=True).FrameOfReferenceUID == (
        study.ct.grid.frame_of_reference_uid
    )


@needs_dciodvfy
def test_dciodvfy_finds_no_error_on_a_coarse_grid_with_warnings_and_corrections(tmp_path, study):
    grid = output_grid(study.ct.grid, (3.0, 3.0, 3.0))
    kwargs = dict(
        method="DVK",
        warnings=WARNINGS,
        provenance=PROVENANCE,
        replaces=Replaces(OLD_SERIES, "corrected administration date"),
    )
    dose_path = write_rtdose(
        tmp_path / "d16.dcm",
        average_onto_grid(dose_pattern_gy(study), grid),
        study,
        description=DESCRIPTION,
        bits=16,
        **kwargs,
    )
    rate = average_onto_grid(_dose_rate(study), grid)
    map_path = write_dose_rate_map(
        tmp_path / "pm.dcm", Volume(rate.array, grid, "mGy/h/MBq"), study, **kwargs
    )

    for path in (dose_path, map_path):
        errors, unexpected_warnings = dciodvfy(path)
        assert errors == [] and unexpected_warnings == [], path.name


# --------------------------------------------------------------------------------------
# Through pipeline.run: UIDs, warnings, corrections and the dose grid end to end.
# The dose-rate engine is replaced by a linear stand-in (dose rate proportional to the
# activity on the CT grid): these tests are about what reaches the files, not the physics
# (tests/test_pipeline.py runs the real engine).

_GY_PER_S_PER_BQ_ML = 2e-9


def _stand_in_dose_rate(activity_bq_per_ml, density_g_cm3, *, options):
    rate = np.asarray(activity_bq_per_ml.array, dtype=np.float32) * np.float32(_GY_PER_S_PER_BQ_ML)
    return Volume(rate, activity_bq_per_ml.grid, "Gy/s"), {
        "kernel": {"shape": [], "stand_in": True}
    }


@pytest.fixture
def stand_in_engine(monkeypatch):
    import spectdose.pipeline

    monkeypatch.setattr(spectdose.pipeline, "compute_dose_rate", _stand_in_dose_rate)


def _write_study(root, *, nm_first_voxel_mm=(-22.0, -18.0, -14.0), rwvm=(2.5, 0.0)):
    """A small quantitative SPECT/CT: 16 x 20 x 24 CT, 4 mm SPECT in Bq/ml, 71.5 h after
    administration (inside the Hänscheid model's range)."""
    from . import dicom_factory as f

    ids = f.StudyIds()
    f.write_ct_series(
        root / "CT",
        ids,
        f.smooth_hu((16, 20, 24)),
        spacing_mm=(5.0, 2.0, 2.5),
        origin_mm=(-30.0, -20.0, -40.0),
    )
    f.write_nm_recon(
        root / "NM" / "nm.dcm",
        ids,
        f.blob_counts((8, 10, 12)),
        spacing_mm=(4.0, 4.0, 4.0),
        first_voxel_mm=nm_first_voxel_mm,
        rwvm=rwvm,
        admin_datetime="20240302100000",
    )
    return root


def _run(study_dir, out, **options):
    from spectdose.pipeline import DoseOptions, run

    replaces = options.pop("replaces", None)
    return run(study_dir, out, DoseOptions(**options), replaces=replaces)


def _uids(result) -> dict:
    return {
        name: (uids["series_instance_uid"], uids["sop_instance_uid"])
        for name, uids in result.summary["uids"].items()
    }


def _edit_nm(study_dir, edit):
    (path,) = (study_dir / "NM").glob("*.dcm")
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)


def test_run_gives_the_same_uids_for_a_retry_and_new_ones_for_any_change(tmp_path, stand_in_engine):
    study_dir = _write_study(tmp_path / "study")
    first = _run(study_dir, tmp_path / "a")
    retry = _run(study_dir, tmp_path / "b")

    assert _uids(retry) == _uids(first)
    assert {"rtdose", "doserate"} <= set(_uids(first))
    for name, (series, sop) in _uids(first).items():
        ds = pydicom.dcmread(first.outputs[name], stop_before_pixels=True)
        assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (series, sop)

    # one SPECT pixel, same SOP Instance UIDs
    def one_pixel(ds):
        pixels = ds.pixel_array.copy()
        pixels[4, 5, 6] += 1
        ds.PixelData = pixels.tobytes()

    _edit_nm(study_dir, one_pixel)
    pixel_changed = _run(study_dir, tmp_path / "c")
    # a corrected administration time in the header
    _edit_nm(
        study_dir,
        lambda ds: setattr(
            ds.RadiopharmaceuticalInformationSequence[0],
            "RadiopharmaceuticalStartDateTime",
            "20240302080000",
        ),
    )
    header_changed = _run(study_dir, tmp_path / "d")
    option_changed = _run(study_dir, tmp_path / "e", time_model="physical")

    seen = [_uids(first), _uids(pixel_changed), _uids(header_changed), _uids(option_changed)]
    for name in ("rtdose", "doserate"):
        series = [uids[name][0] for uids in seen]
        instances = [uids[name][1] for uids in seen]
        assert len(set(series)) == len(set(instances)) == 4, name
    assert header_changed.summary["time"]["hours_since_administration"] == pytest.approx(73.5)
    assert _uids(_run(study_dir, tmp_path / "f")) == _uids(header_changed)


def test_run_writes_warnings_and_provenance_into_every_output(tmp_path, stand_in_engine):
    # The SPECT reaches 16 mm past the CT's last slice: part of the activity is outside
    # the dose calculation, which the pipeline warns about.
    study_dir = _write_study(tmp_path / "study", nm_first_voxel_mm=(-22.0, -18.0, 22.0))

    result = _run(study_dir, tmp_path / "out")

    warnings = result.summary["warnings"]
    assert any("outside the CT field of view" in w for w in warnings)
    dose = pydicom.dcmread(result.outputs["rtdose"], stop_before_pixels=True)
    rate = pydicom.dcmread(result.outputs["doserate"], stop_before_pixels=True)
    marker = f"[{len(warnings)} WARNING" + ("S]" if len(warnings) > 1 else "]")
    for ds in (dose, rate):
        assert ds.SeriesDescription.endswith(marker)
        for warning in warnings:
            assert f"WARNING: {warning}" in ds.ImageComments
    assert dose.DoseComment.endswith(marker)
    provenance = result.summary["provenance"]
    assert provenance["software"].startswith("spectdose ")
    assert provenance["time_model"].startswith("hanscheid, t = 71.50 h")
    assert provenance["calibration"] and provenance["inputs_sha256"] in dose.ImageComments
    for key in ("software", "time_model", "calibration", "method"):
        assert provenance[key] in dose.DerivationDescription
        assert provenance[key] in rate.ImageComments


def test_run_marks_a_correction_of_an_earlier_result(tmp_path, stand_in_engine):
    from spectdose.dicom.export import replacements_from_summary

    study_dir = _write_study(tmp_path / "study")
    earlier = _run(study_dir, tmp_path / "a")
    replaces = replacements_from_summary(earlier.summary, "corrected administration time")

    corrected = _run(study_dir, tmp_path / "b", replaces=replaces)

    for name in ("rtdose", "doserate"):
        old_series = earlier.summary["uids"][name]["series_instance_uid"]
        ds = pydicom.dcmread(corrected.outputs[name], stop_before_pixels=True)
        assert ds.SeriesInstanceUID != old_series
        assert "[CORRECTED" in ds.SeriesDescription
        assert f"replaces {old_series} (corrected administration time)" in ds.ImageComments
        assert corrected.summary["replaces"][name]["series_instance_uid"] == old_series
    # ... and retrying the correction is idempotent
    assert _uids(_run(study_dir, tmp_path / "c", replaces=replaces)) == _uids(corrected)
    # The stored (JSON) form is the same correction; other forms are refused, naming the form.
    stored = {
        name: {"series_instance_uid": r.series_instance_uid, "reason": r.reason}
        for name, r in replaces.items()
    }
    assert _uids(_run(study_dir, tmp_path / "d", replaces=stored)) == _uids(corrected)
    with pytest.raises(ExportError, match="unknown output 'rtstruct'"):
        _run(study_dir, tmp_path / "e", replaces={"rtstruct": replaces["rtdose"]})
    with pytest.raises(ExportError, match="must map output names"):
        _run(study_dir, tmp_path / "f", replaces=f"{OLD_SERIES} (corrected administration time)")


@pytest.mark.parametrize(
    "dose_grid, spacing_mm", [("3", (3.0, 3.0, 3.0)), ("spect", (4.0, 4.0, 4.0))]
)
def test_run_writes_both_objects_on_the_chosen_dose_grid(
    tmp_path, stand_in_engine, dose_grid, spacing_mm
):
    study_dir = _write_study(tmp_path / "study")
    on_ct = _run(study_dir, tmp_path / "ct")

    coarse = _run(study_dir, tmp_path / "coarse", dose_grid=dose_grid)

    ct_grid = coarse.study.ct.grid
    expected = output_grid(ct_grid, spacing_mm)
    dose, rate = (
        read_rtdose(coarse.outputs["rtdose"]),
        read_dose_rate_map(coarse.outputs["doserate"]),
    )
    for volume in (dose, rate):
        assert volume.grid.same_as(expected, tol_mm=0.01)
        assert volume.grid.frame_of_reference_uid == ct_grid.frame_of_reference_uid
    # Dose is averaged, not sampled: the same mean over the field of view (the CT extent is
    # a whole number of output voxels in x and y here, and 80 mm of z is covered by 81 or
    # 80 mm; compare means weighted by volume inside the CT).
    fine = read_rtdose(on_ct.outputs["rtdose"])
    assert dose.array.max() <= fine.array.max() * (1 + 1e-6)
    # Within the stored step: the RT Dose may be 16-bit (rounding <= half its Dose Grid Scaling).
    step = float(pydicom.dcmread(coarse.outputs["rtdose"], stop_before_pixels=True).DoseGridScaling)
    assert average_onto_grid(
        Volume(on_ct.dose_gy.array, ct_grid, "Gy"), expected
    ).array == pytest.approx(dose.array, rel=1e-4, abs=0.5 * step + 1e-6 * fine.array.max())
    assert coarse.summary["geometry"]["output_grid"]["shape_zyx"] == list(expected.shape)
    assert coarse.summary["geometry"]["output_grid"]["bytes_per_object"] < fine.array.size * 4
    assert _uids(coarse)["rtdose"] != _uids(on_ct)["rtdose"]


def test_run_codes_a_normalised_map_per_mbq(tmp_path, stand_in_engine):
    # Counts without a calibration: only a per-MBq dose-rate map, no RT Dose in Gy.
    study_dir = _write_study(tmp_path / "study", rwvm=None)

    result = _run(study_dir, tmp_path / "out", allow_normalised=True)

    assert "rtdose" not in result.outputs and "rtdose" not in result.summary["uids"]
    assert "doserate" in result.summary["uids"]
    ds = pydicom.dcmread(result.outputs["doserate"], stop_before_pixels=True)
    unit = (
        ds.SharedFunctionalGroupsSequence[0]
        .RealWorldValueMappingSequence[0]
        .MeasurementUnitsCodeSequence[0]
    )
    assert unit.CodeValue == "mGy/h/MBq"
    assert read_dose_rate_map(result.outputs["doserate"]).units == "mGy/h/MBq"
    assert result.summary["provenance"]["time_model"] == "none (dose rate only)"
