"""DICOM ingest: selection, geometry, units, times and refusals, on small synthetic studies."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from spectdose.dicom.ingest import CameraCalibration, load_calibrations, load_study, scan_dicom
from spectdose.errors import CalibrationError, GeometryError, InputError

from . import dicom_factory as f

CT_SHAPE = (16, 20, 24)
CT_SPACING = (5.0, 2.0, 2.5)
CT_ORIGIN = (-30.0, -20.0, -40.0)
NM_SHAPE = (8, 10, 12)
NM_SPACING = (4.0, 4.0, 4.0)
NM_FIRST_VOXEL = (-22.0, -18.0, -14.0)
VOXEL_ML = 0.064  # 4 mm cubic voxels


def _ct(root: Path, study: f.StudyIds, **kw) -> f.Written:
    kw.setdefault("origin_mm", CT_ORIGIN)
    kw.setdefault("spacing_mm", CT_SPACING)
    return f.write_ct_series(root / "CT", study, f.smooth_hu(CT_SHAPE), **kw)


def _nm(root: Path, study: f.StudyIds, name: str = "nm.dcm", counts=None, **kw) -> f.Written:
    kw.setdefault("spacing_mm", NM_SPACING)
    kw.setdefault("first_voxel_mm", NM_FIRST_VOXEL)
    counts = f.blob_counts(NM_SHAPE) if counts is None else counts
    return f.write_nm_recon(root / "NM" / name, study, counts, **kw)


def _quant_study(root: Path, **nm_kw):
    study = f.StudyIds()
    ct = _ct(root, study)
    nm_kw.setdefault("rwvm", (2.5, 0.0))
    nm = _nm(root, study, **nm_kw)
    return study, ct, nm


# ----------------------------------------------------------------------------- happy paths


def test_quantitative_study_reads_hu_bqml_geometry_and_times(tmp_path):
    _, ct, nm = _quant_study(tmp_path)
    s = load_study(tmp_path)
    assert s.ct.units == "HU" and s.ct.array.dtype == np.float32
    np.testing.assert_array_equal(s.ct.array, ct.values.astype(np.float32))
    assert s.ct.grid.same_as(ct.grid)
    assert s.spect.units == "Bq/ml" and s.spect.array.dtype == np.float32
    np.testing.assert_allclose(s.spect.array, nm.values, rtol=1e-6)
    assert s.spect.grid.same_as(nm.grid)
    assert s.administration.nuclide == "Lu-177"
    assert s.administration.injected_activity_bq == pytest.approx(7.4e9)  # NM: 7400 MBq
    assert s.administration.administration_datetime == dt.datetime(2024, 3, 4, 10, 0)
    assert s.acquisition_datetime == dt.datetime(2024, 3, 5, 9, 30)
    assert "Real World Value Mapping" in s.calibration_note
    assert s.spect_series.series_instance_uid == nm.series_uid
    assert s.ct_series.series_instance_uid == ct.series_uid
    assert len(s.ct_series.sop_instance_uids) == CT_SHAPE[0]
    assert s.patient.patient_id == "SYNTH-0001"
    assert s.warnings == []


def test_shuffled_nested_folder_and_zip_give_the_same_study(tmp_path):
    rng = random.Random(3)
    study = f.StudyIds()
    names = [f"x{n:03d}" for n in rng.sample(range(1000), CT_SHAPE[0])]
    src = tmp_path / "src"
    ct = f.write_ct_series(
        src / "deep",
        study,
        f.smooth_hu(CT_SHAPE),
        origin_mm=CT_ORIGIN,
        spacing_mm=CT_SPACING,
        file_name=lambda k: f"{'a/b' if k % 3 else 'c'}/{names[k]}",  # no extension, mixed folders
    )
    nm = f.write_nm_recon(
        src / "z" / "y" / "IM0001",
        study,
        f.blob_counts(NM_SHAPE),
        spacing_mm=NM_SPACING,
        first_voxel_mm=NM_FIRST_VOXEL,
        rwvm=(1.5, 0.0),
    )
    (src / "notes.txt").write_text("scanner export log\n")
    (src / "deep" / "thumbs.db").write_bytes(b"\x00\x01garbage" * 10)
    f.write_dicomdir_stub(src / "DICOMDIR")

    folder = load_study(src)
    archive = tmp_path / "study.zip"
    members = sorted(p for p in src.rglob("*") if p.is_file())
    rng.shuffle(members)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in members:
            zf.write(p, p.relative_to(src).as_posix())
    zipped = load_study(archive)

    for s in (folder, zipped):
        np.testing.assert_array_equal(s.ct.array, ct.values.astype(np.float32))
        np.testing.assert_allclose(s.spect.array, nm.values, rtol=1e-6)
        assert s.ct.grid.same_as(ct.grid) and s.spect.grid.same_as(nm.grid)
        ignored = dict(s.ignored_files)
        assert "not DICOM" in ignored["notes.txt"]
        assert "DICOMDIR" in ignored["DICOMDIR"]
        assert "deep/thumbs.db" in ignored
    assert folder.ct_series.sop_instance_uids == zipped.ct_series.sop_instance_uids


@pytest.mark.parametrize("reverse_files", [False, True])
def test_ct_sorted_along_slice_normal_regardless_of_file_order(tmp_path, reverse_files):
    """Feet-first style orientation (normal = -z) with slice positions given in scrambled order."""
    study = f.StudyIds()
    offsets = np.arange(CT_SHAPE[0]) * 5.0
    perm = np.random.default_rng(1).permutation(CT_SHAPE[0])
    if reverse_files:
        perm = perm[::-1]
    col_dir = (0.0, -1.0, 0.0)  # row x col = (1,0,0) x (0,-1,0) = (0,0,-1)
    ct = f.write_ct_series(
        tmp_path / "CT",
        study,
        f.smooth_hu(CT_SHAPE),
        origin_mm=(-30, 20, 40),
        col_dir=col_dir,
        slice_offsets_mm=offsets[perm],
        spacing_mm=CT_SPACING,
    )
    _nm(tmp_path, study, rwvm=(1.0, 0.0), first_voxel_mm=(-22, -18, -14))
    s = load_study(tmp_path)
    expected = ct.values[np.argsort(offsets[perm])]
    np.testing.assert_array_equal(s.ct.array, expected.astype(np.float32))
    np.testing.assert_allclose(s.ct.grid.axes[0], [0, 0, -1], atol=1e-9)
    # voxel (k, j, i) centre: origin + k*5*(0,0,-1) + j*2*(0,-1,0) + i*2.5*(1,0,0)
    centre = s.ct.grid.index_to_lps_mm(np.array([3, 2, 1]))
    np.testing.assert_allclose(centre, [-30 + 2.5, 20 - 4.0, 40 - 15.0])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_nm_geometry_from_detector_information_sequence(tmp_path, sign):
    study = f.StudyIds()
    _ct(tmp_path, study)
    first = np.array([-22.0, -18.0, 14.0 if sign < 0 else -14.0])
    counts = f.blob_counts(NM_SHAPE)
    spacing = (4.0, 3.0, 3.5)  # slice, row (along y), column (along x): all different
    _nm(
        tmp_path,
        study,
        counts=counts,
        rwvm=(1.0, 0.0),
        spacing_sign=sign,
        first_voxel_mm=first,
        spacing_mm=spacing,
    )
    s = load_study(tmp_path)
    grid = s.spect.grid
    x, y, z = np.eye(3)
    # PS3.3 C.8.4.15: frame n (0-based) at IPP + n * SpacingBetweenSlices * (row x col)
    for k, j, i in [(0, 0, 0), (5, 0, 0), (7, 9, 11), (2, 3, 4)]:
        want = first + k * sign * 4.0 * z + j * 3.0 * y + i * 3.5 * x
        np.testing.assert_allclose(grid.index_to_lps_mm(np.array([k, j, i])), want, atol=1e-6)
    np.testing.assert_array_equal(
        s.spect.array, counts.astype(np.float32)
    )  # frames kept in file order


def test_single_frame_nm_slices_are_stacked_and_calibrated(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    counts = f.blob_counts(NM_SHAPE)
    nm = f.write_nm_slices(tmp_path / "NMS", study, counts)
    s = load_study(tmp_path, sensitivity_cps_per_mbq=9.3)
    assert s.spect.grid.same_as(nm.grid)
    np.testing.assert_allclose(s.spect.array, counts / (9.3 * 20.0) * 1e6 / VOXEL_ML, rtol=1e-6)
    assert len(s.spect_series.sop_instance_uids) == NM_SHAPE[0]


def test_oblique_in_plane_nm_orientation(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    c, sn = math.cos(math.radians(20)), math.sin(math.radians(20))
    row, col = (c, sn, 0.0), (-sn, c, 0.0)  # rotated about z: still axial slices
    _nm(tmp_path, study, rwvm=(1.0, 0.0), row_dir=row, col_dir=col)
    s = load_study(tmp_path)
    want = (
        np.array(NM_FIRST_VOXEL)
        + 2 * 4.0 * np.array([0, 0, 1.0])
        + 3 * 4.0 * np.array(col)
        + 5 * 4.0 * np.array(row)
    )
    np.testing.assert_allclose(s.spect.grid.index_to_lps_mm(np.array([2, 3, 5])), want, atol=1e-6)


def test_ct_rescale_slope_and_intercept_per_slice(tmp_path):
    study = f.StudyIds()
    intercepts = [-1024.0 + 10 * k for k in range(CT_SHAPE[0])]
    ct = _ct(tmp_path, study, slope=0.5, intercepts=intercepts)
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    s = load_study(tmp_path)
    np.testing.assert_array_equal(s.ct.array, ct.values.astype(np.float32))
    # soft tissue inside the body reads ~40 HU + slice offset, air -1000
    assert abs(float(s.ct.array[0, 10, 5]) - 40) < 25
    assert abs(float(s.ct.array[0, 10, 12]) - 900) < 25  # bone rod
    assert abs(float(s.ct.array[0, 0, 0]) + 1000) < 25


def test_pixel_padding_outside_the_ct_field_becomes_air(tmp_path):
    study = f.StudyIds()
    hu = f.smooth_hu(CT_SHAPE)
    hu[:, :3, :3] = -3024.0  # stored -2000 with intercept -1024: the scanner's padding
    ct = f.write_ct_series(
        tmp_path / "CT", study, hu, origin_mm=CT_ORIGIN, pixel_padding_value=-2000
    )
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    s = load_study(tmp_path)
    assert np.all(s.ct.array[:, :3, :3] == -1000.0)
    np.testing.assert_array_equal(s.ct.array[:, 3:, 3:], ct.values[:, 3:, 3:].astype(np.float32))


def test_file_without_preamble_is_read(tmp_path):
    study = f.StudyIds()
    ct = _ct(tmp_path, study, preamble=False)
    nm = _nm(tmp_path, study, rwvm=(1.0, 0.0), preamble=False)
    s = load_study(tmp_path)
    np.testing.assert_array_equal(s.ct.array, ct.values.astype(np.float32))
    np.testing.assert_allclose(s.spect.array, nm.values)


@pytest.mark.skipif(not Path("/usr/bin/dcmcjpeg").exists(), reason="dcmtk dcmcjpeg not installed")
def test_jpeg_lossless_ct_decoded_with_stored_values_then_rescaled(tmp_path):
    """pydicom has no JPEG Lossless decoder here; SimpleITK decodes, and we undo GDCM's rescale."""
    study = f.StudyIds()
    ct = _ct(tmp_path, study, slope=0.5, intercepts=-1000.0)
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    for p in ct.paths:
        packed = p.with_suffix(".jpl")
        subprocess.run(["/usr/bin/dcmcjpeg", str(p), str(packed)], check=True, capture_output=True)
        packed.replace(p)
    s = load_study(tmp_path)
    np.testing.assert_array_equal(s.ct.array, ct.values.astype(np.float32))


# ----------------------------------------------------------------------------- CT checks


def test_localizers_and_reformats_are_dropped(tmp_path):
    study = f.StudyIds()
    ct = _ct(tmp_path, study)
    f.write_ct_series(
        tmp_path / "scout",
        study,
        f.smooth_hu((1, 20, 24)),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        description="Topogram",
    )
    f.write_ct_series(tmp_path / "single", study, f.smooth_hu((1, 20, 24)), description="key image")
    f.write_ct_series(
        tmp_path / "sag",
        study,
        f.smooth_hu((4, 20, 24)),
        row_dir=(0, 1, 0),
        col_dir=(0, 0, -1),
        description="sagittal MPR",
    )
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    s = load_study(tmp_path)
    assert s.ct_series.series_instance_uid == ct.series_uid
    reasons = " | ".join(r for _, r in s.ignored_files)
    assert "localizer" in reasons and "single CT slice" in reasons and "not axial" in reasons


def test_missing_slices_refused_naming_positions(tmp_path):
    study = f.StudyIds()
    offsets = [0, 5, 10, 15, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80]  # 20 mm missing
    _ct(tmp_path, study, slice_offsets_mm=offsets)
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    with pytest.raises(
        GeometryError, match=r"slices missing.*between -25\.00 and -15\.00 mm.*1 slice"
    ):
        load_study(tmp_path)


def test_irregular_spacing_refused(tmp_path):
    study = f.StudyIds()
    offsets = np.cumsum([0] + [5.0, 4.0, 6.0, 5.0] * 3 + [5.0, 5.0, 5.0])
    _ct(tmp_path, study, slice_offsets_mm=offsets)
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    with pytest.raises(GeometryError, match=r"uneven slice spacing \(4\.000 to 6\.000 mm"):
        load_study(tmp_path)


def test_spacing_jitter_below_one_percent_accepted(tmp_path):
    study = f.StudyIds()
    jitter = np.random.default_rng(2).uniform(-0.02, 0.02, CT_SHAPE[0])  # <= 0.4 % of 5 mm
    jitter[0] = jitter[-1] = 0.0
    _ct(tmp_path, study, slice_offsets_mm=np.arange(CT_SHAPE[0]) * 5.0 + jitter)
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    s = load_study(tmp_path)
    assert s.ct.grid.spacing_mm[0] == pytest.approx(5.0, abs=1e-9)


def test_gantry_tilt_attribute_refused(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study, gantry_tilt_deg=15.0)
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    with pytest.raises(GeometryError, match="gantry tilt of 15 degrees"):
        load_study(tmp_path)


def test_tilted_geometry_refused(tmp_path):
    """Slices tilted 15 degrees about x but stacked straight along z (how tilted CTs look)."""
    study = f.StudyIds()
    t = math.radians(15)
    col = np.array([0.0, math.cos(t), math.sin(t)])
    normal = np.cross([1.0, 0, 0], col)
    z = np.array([0, 0, 1.0])
    n = CT_SHAPE[0]
    _ct(
        tmp_path,
        study,
        col_dir=col,
        slice_offsets_mm=np.arange(n) * 5.0 * (z @ normal),
        inplane_shift_per_slice_mm=5.0 * (z - (z @ normal) * normal),
    )
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    with pytest.raises(
        GeometryError, match=r"not stacked along their normal \(gantry tilt of about 15\.0 degrees"
    ):
        load_study(tmp_path)


# ----------------------------------------------------------------------------- SPECT units


@pytest.mark.parametrize(
    ("where", "unit", "factor"),
    [
        ("top", "Bq/ml", 1.0),
        ("top", "Bq/mL", 1.0),
        ("shared", "Bq/ml", 1.0),
        ("per-frame", "Bq/ml", 1.0),
        ("top", "kBq/mL", 1e3),
    ],
)
def test_real_world_value_mapping_round_trips(tmp_path, where, unit, factor):
    _, _, nm = _quant_study(tmp_path, rwvm=(3.25, -1.5), rwvm_where=where, rwvm_unit=unit)
    s = load_study(tmp_path)
    assert s.spect.units == "Bq/ml"
    np.testing.assert_allclose(s.spect.array, nm.values * factor, rtol=1e-6)


def test_counts_with_sensitivity_follow_the_formula(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    counts = f.blob_counts(NM_SHAPE)
    _nm(tmp_path, study, counts=counts, frame_duration_ms=25000)
    s = load_study(tmp_path, sensitivity_cps_per_mbq=9.3)
    # Bq/ml = counts / (S cps/MBq * t_view s) * 1e6 Bq/MBq / V_voxel ml
    expected = counts / (9.3 * 25.0) * 1e6 / VOXEL_ML
    assert s.spect.units == "Bq/ml"
    np.testing.assert_allclose(s.spect.array, expected, rtol=1e-6)
    assert "9.3 cps/MBq" in s.calibration_note and "25 s per view" in s.calibration_note


def test_counts_mapping_slope_is_applied_before_calibration(tmp_path):
    """A Real World Value Mapping to UCUM "{counts}" scales stored values to counts; S still needed."""
    study = f.StudyIds()
    _ct(tmp_path, study)
    stored = f.blob_counts(NM_SHAPE)
    _nm(tmp_path, study, counts=stored, rwvm=(0.25, 0.0), rwvm_unit="{counts}")
    with pytest.raises(CalibrationError, match="holds counts"):
        load_study(tmp_path)
    s = load_study(tmp_path, sensitivity_cps_per_mbq=9.3)
    np.testing.assert_allclose(
        s.spect.array, stored * 0.25 / (9.3 * 20.0) * 1e6 / VOXEL_ML, rtol=1e-6
    )


def test_calibration_entries_most_specific_match_wins(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    counts = f.blob_counts(NM_SHAPE)
    _nm(tmp_path, study, counts=counts, station_name="NM-ROOM-2", device_serial_number="SN-7")
    cals = [
        CameraCalibration(5.0),  # any camera
        CameraCalibration(6.0, manufacturer="synthetic"),  # case-insensitive match
        CameraCalibration(7.0, manufacturer="SYNTHETIC", station_name="NM-ROOM-2"),
        CameraCalibration(
            8.0, manufacturer="SYNTHETIC", station_name="NM-ROOM-1", device_serial_number="SN-7"
        ),
        CameraCalibration(9.0, station_name="NM-ROOM-2", calling_ae_title="OTHER_AE"),
    ]
    s = load_study(tmp_path, calibrations=cals)
    np.testing.assert_allclose(s.spect.array, counts / (7.0 * 20.0) * 1e6 / VOXEL_ML, rtol=1e-6)
    s = load_study(
        tmp_path,
        calibrations=cals
        + [
            CameraCalibration(
                11.0,
                station_name="nm-room-2",
                device_serial_number="SN-7",
                calling_ae_title="SPECT_AE",
            )
        ],
        calling_ae_title="SPECT_AE",
    )
    np.testing.assert_allclose(s.spect.array, counts / (11.0 * 20.0) * 1e6 / VOXEL_ML, rtol=1e-6)
    with pytest.raises(CalibrationError, match="ambiguous"):
        load_study(
            tmp_path,
            calibrations=[
                CameraCalibration(7.0, station_name="NM-ROOM-2"),
                CameraCalibration(7.5, device_serial_number="SN-7"),
            ],
        )


def test_counts_without_calibration_refused_naming_what_to_supply(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    _nm(tmp_path, study)
    with pytest.raises(
        CalibrationError,
        match=r"holds counts.*cps/MBq.*StationName 'NM-ROOM-1'.*normalised",
    ):
        load_study(tmp_path, calibrations=[CameraCalibration(7.0, station_name="ELSEWHERE")])


def test_counts_without_frame_duration_refused(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    _nm(tmp_path, study, frame_duration_ms=None)
    with pytest.raises(CalibrationError, match="ActualFrameDuration"):
        load_study(tmp_path, sensitivity_cps_per_mbq=9.3)


def test_counts_normalised_to_one_mbq_when_allowed(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    counts = f.blob_counts(NM_SHAPE)
    _nm(tmp_path, study, counts=counts)
    s = load_study(tmp_path, allow_normalised=True)
    assert s.spect.units == "MBq-normalised"
    assert float(
        s.spect.array.sum(dtype=np.float64)
    ) * s.spect.grid.voxel_volume_ml == pytest.approx(1e6, rel=1e-5)
    np.testing.assert_allclose(
        s.spect.array / s.spect.array.max(), counts / counts.max(), rtol=1e-5
    )
    assert any("normalised" in w for w in s.warnings)
    # a calibration, when there is one, still gives absolute units
    assert (
        load_study(tmp_path, allow_normalised=True, sensitivity_cps_per_mbq=9.3).spect.units
        == "Bq/ml"
    )


def test_empty_spect_is_refused_calibrated_or_normalised(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    _nm(tmp_path, study, counts=np.zeros(NM_SHAPE, np.uint16))
    for kw in ({"sensitivity_cps_per_mbq": 9.3}, {"allow_normalised": True}):
        with pytest.raises(InputError, match="pixel data are all zero"):
            load_study(tmp_path, **kw)


def test_pet_style_bqml_series(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    bq = f.blob_counts((8, 10, 12)).astype(float) * 37.0
    pt = f.write_pt_series(tmp_path / "PT", study, bq)
    s = load_study(tmp_path)
    assert s.spect.units == "Bq/ml"
    np.testing.assert_allclose(s.spect.array, pt.values, rtol=1e-6)
    assert s.spect.grid.same_as(pt.grid)
    assert s.administration.injected_activity_bq == pytest.approx(7.4e9)  # PET: Bq


def test_pet_style_decay_corrected_to_administration_is_referred_to_acquisition(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    bq = f.blob_counts((8, 10, 12)).astype(float) * 37.0
    pt = f.write_pt_series(tmp_path / "PT", study, bq, decay_correction="ADMIN")
    s = load_study(tmp_path)
    elapsed_s = 23.5 * 3600  # 2024-03-04 10:00 -> 2024-03-05 09:30
    factor = math.exp(-math.log(2) * elapsed_s / (6.647 * 86400))
    np.testing.assert_allclose(s.spect.array, pt.values * factor, rtol=1e-6)


def test_pet_style_in_mbq_and_nm_in_bq_are_recognised_by_magnitude(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path / "a", study)
    f.write_pt_series(tmp_path / "a" / "PT", study, np.ones((8, 10, 12)) * 100, injected_bq=7400.0)
    s = load_study(tmp_path / "a")
    assert s.administration.injected_activity_bq == pytest.approx(7.4e9)
    assert any("read as MBq" in w for w in s.warnings)
    _quant_study(tmp_path / "b", injected=7.4e9)
    s = load_study(tmp_path / "b")
    assert s.administration.injected_activity_bq == pytest.approx(7.4e9)
    assert any("read as Bq" in w for w in s.warnings)


# ----------------------------------------------------------------------------- times


def test_administration_time_without_date_is_kept_without_a_date(tmp_path):
    """Issue 7 item 1: the date is never completed from the series or study date at ingest."""
    _quant_study(tmp_path, admin_datetime=None, admin_time_only="081500")
    s = load_study(tmp_path)
    assert s.administration.administration_datetime is None
    assert s.administration.start_time_only == dt.time(8, 15)
    assert any("no date" in w for w in s.warnings)


def test_missing_times_are_recorded_with_their_source(tmp_path):
    _quant_study(tmp_path, admin_datetime=None, acquisition=None)
    s = load_study(tmp_path)
    assert s.administration.administration_datetime is None
    assert s.acquisition_datetime == dt.datetime(2024, 3, 5, 9, 0)  # the series date/time ...
    assert s.acquisition_datetime_source == "series"  # ... marked as such: used only when accepted
    assert any("only the series date/time" in w for w in s.warnings)


def test_utc_offset_is_dropped_to_naive_local_time(tmp_path):
    _quant_study(tmp_path, admin_datetime="20240304100000+0100")
    s = load_study(tmp_path)
    assert s.administration.administration_datetime == dt.datetime(2024, 3, 4, 10, 0)
    assert s.administration.administration_datetime.tzinfo is None


# ----------------------------------------------------------------------------- selection and refusals


def test_no_ct_refused(tmp_path):
    study = f.StudyIds()
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    f.write_ct_series(
        tmp_path / "scout",
        study,
        f.smooth_hu((1, 20, 24)),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    with pytest.raises(InputError, match="no usable axial CT.*localizer"):
        load_study(tmp_path)


def test_no_spect_refused_and_projections_are_not_a_spect(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    f.write_nm_projections(tmp_path / "raw.dcm", study)
    with pytest.raises(InputError, match="no reconstructed SPECT.*raw tomographic projections"):
        load_study(tmp_path)


def test_two_spects_refused_listing_uids_then_choosable(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    a = _nm(tmp_path, study, "a.dcm", rwvm=(1.0, 0.0), description="SPECT AC")
    b = _nm(tmp_path, study, "b.dcm", rwvm=(2.0, 0.0), description="SPECT NAC")
    with pytest.raises(InputError, match="2 candidate SPECT") as err:
        load_study(tmp_path)
    msg = str(err.value)
    assert a.series_uid in msg and b.series_uid in msg and "SPECT AC" in msg and "SPECT NAC" in msg
    s = load_study(tmp_path, spect_series_uid=b.series_uid)
    np.testing.assert_allclose(s.spect.array, b.values)


def test_two_recons_in_one_series_are_chosen_by_sop_instance_uid(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    uid = "1.2.826.0.1.3680043.8.498.1"
    a = _nm(tmp_path, study, "a.dcm", rwvm=(1.0, 0.0), series_uid=uid)
    b = _nm(tmp_path, study, "b.dcm", rwvm=(2.0, 0.0), series_uid=uid)
    with pytest.raises(InputError, match=b.sop_instance_uid):
        load_study(tmp_path)
    s = load_study(tmp_path, spect_series_uid=a.sop_instance_uid)
    np.testing.assert_allclose(s.spect.array, a.values)


def test_planar_whole_body_is_not_a_spect(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    _nm(
        tmp_path,
        study,
        "wb.dcm",
        rwvm=(1.0, 0.0),
        image_type=("ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"),
    )
    with pytest.raises(InputError, match="planar whole body"):
        load_study(tmp_path)


def test_ct_picked_by_frame_of_reference_then_by_choice(tmp_path):
    study = f.StudyIds()
    same = _ct(tmp_path / "a", study)
    _ct(tmp_path / "b", study, frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2")
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    s = load_study(tmp_path)
    assert s.ct_series.series_instance_uid == same.series_uid
    assert any("frame of reference" in w for w in s.warnings)
    twin = _ct(tmp_path / "c", study, description="CT twin")
    with pytest.raises(InputError, match=r"choose one with --ct-series \(CLI\) / ct_series \(REST\)") as err:
        load_study(tmp_path)
    assert twin.series_uid in str(err.value) and same.series_uid in str(err.value)
    assert (
        load_study(tmp_path, ct_series_uid=twin.series_uid).ct_series.series_instance_uid
        == twin.series_uid
    )


def test_mismatched_patient_refused_without_naming_the_patient(tmp_path):
    study = f.StudyIds(patient_id="PID-777", patient_name="Doe^Jane")
    other = f.StudyIds(patient_id="PID-888", patient_name="Roe^Richard")
    _ct(tmp_path, other)
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    with pytest.raises(InputError, match="mismatched studies") as err:
        load_study(tmp_path)
    for secret in ("PID-777", "PID-888", "Doe", "Jane", "Roe", "Richard"):
        assert secret not in str(err.value)


def test_other_study_of_same_patient_and_frame_accepted_with_warning(tmp_path):
    study = f.StudyIds()
    other = f.StudyIds(frame_of_reference_uid=study.frame_of_reference_uid)
    _ct(tmp_path, other)
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    s = load_study(tmp_path)
    assert any("different studies" in w for w in s.warnings)
    different_for = f.StudyIds()
    shutil.rmtree(tmp_path / "CT")
    _ct(tmp_path, different_for)
    with pytest.raises(InputError, match="mismatched studies"):
        load_study(tmp_path)


def test_different_frame_of_reference_in_one_study_is_a_warning(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study, frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3")
    _nm(tmp_path, study, rwvm=(1.0, 0.0))
    s = load_study(tmp_path)
    assert any("registered" in w for w in s.warnings)


def test_spect_outside_ct_refused(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)
    _nm(tmp_path, study, rwvm=(1.0, 0.0), first_voxel_mm=(-22.0, -18.0, 300.0))
    with pytest.raises(GeometryError, match="outside the CT: only 0% of its activity"):
        load_study(tmp_path)


def test_spect_outside_ct_hints_at_reversed_frames(tmp_path):
    study = f.StudyIds()
    _ct(tmp_path, study)  # z from -42.5 to 37.5 mm
    # frames written as going up from z = 34 but really occupying z in [6, 34]: stacked the wrong way
    _nm(
        tmp_path,
        study,
        rwvm=(1.0, 0.0),
        first_voxel_mm=(-22.0, -18.0, 34.0),
        spacing_mm=(4.0, 4.0, 4.0),
    )
    with pytest.raises(GeometryError, match="stacked the other way"):
        load_study(tmp_path)


def test_rtdose_and_other_outputs_ignored_with_reason(tmp_path):
    study = f.StudyIds()
    _quant_study(tmp_path)
    f.write_rtdose(tmp_path / "out" / "dose.dcm", study)
    s = load_study(tmp_path)
    assert "RT Dose" in dict(s.ignored_files)["out/dose.dcm"]


# ----------------------------------------------------------------------------- damaged input


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_ct_slice_is_fatal_and_named(tmp_path):
    _, ct, _ = _quant_study(tmp_path)
    _truncate(ct.paths[5])
    with pytest.raises(InputError, match=r"CT/ct_0005\.dcm: truncated"):
        load_study(tmp_path)


def test_ct_slice_cut_inside_its_header_is_named_in_the_geometry_error(tmp_path):
    _, ct, _ = _quant_study(tmp_path)
    original = ct.paths[7].read_bytes()
    for fraction in (0.07, 0.15):  # too short to tell which series it belonged to
        ct.paths[7].write_bytes(original[: int(len(original) * fraction)])
        with pytest.raises(
            GeometryError, match=r"slices missing.*CT/ct_0007\.dcm could not be attributed"
        ):
            load_study(tmp_path)


def test_truncated_spect_is_fatal_and_named(tmp_path):
    _, _, nm = _quant_study(tmp_path)
    _truncate(nm.paths[0], 0.9)
    with pytest.raises(InputError, match=r"NM/nm\.dcm: truncated.*pixel data cut short"):
        load_study(tmp_path)


def test_truncated_unrelated_file_ignored_with_warning(tmp_path):
    study, _, _ = _quant_study(tmp_path)
    raw = f.write_nm_projections(tmp_path / "raw" / "proj.dcm", study)
    _truncate(raw.paths[0], 0.8)
    header_only = tmp_path / "junk" / "cut.dcm"
    f.write_nm_projections(header_only, study)
    _truncate(header_only, 0.15)
    assert scan_dicom(tmp_path).damaged_files == ["junk/cut.dcm", "raw/proj.dcm"]
    s = load_study(tmp_path)
    assert any("raw/proj.dcm: truncated" in w for w in s.warnings)
    assert "raw/proj.dcm" in dict(s.ignored_files)
    assert "junk/cut.dcm" in dict(s.ignored_files)


def test_corrupted_headers_give_spectdose_errors_never_tracebacks(tmp_path):
    """Random byte damage in headers: either the study still loads or a SpectdoseError says why."""
    from spectdose.errors import SpectdoseError

    base = tmp_path / "base"
    _quant_study(base)
    rng = random.Random(7)
    outcomes = set()
    for n in range(40):
        work = tmp_path / f"w{n}"
        shutil.copytree(base, work)
        files = sorted(work.rglob("*.dcm"))
        for p in rng.sample(files, rng.randint(1, 3)):
            data = bytearray(p.read_bytes())
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(132, min(len(data), 1400))] = rng.randrange(256)
            p.write_bytes(bytes(data))
        try:
            load_study(work)
            outcomes.add("loaded")
        except SpectdoseError as exc:
            assert str(exc)
            outcomes.add(type(exc).__name__)
        shutil.rmtree(work)
    assert {"loaded", "InputError", "GeometryError"} <= outcomes


def test_zip_path_traversal_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/file.dcm", b"x")
        zf.writestr("../../etc/evil.dcm", b"x")
    with pytest.raises(InputError, match="points outside the archive"):
        load_study(archive)
    assert not (tmp_path.parent / "etc").exists()


def test_zip_bomb_ratio_and_size_refused(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\x00" * (20 * 2**20))  # 20 MiB of zeros deflates ~1000-fold
    with pytest.raises(InputError, match="zip bomb"):
        load_study(archive)
    small = tmp_path / "small.zip"
    with zipfile.ZipFile(small, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.dcm", np.random.default_rng(0).bytes(3 * 2**20))
    with pytest.raises(InputError, match="exceeds the limit of 1.0 MiB"):
        load_study(small, max_zip_bytes=2**20)


def test_not_a_zip_and_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_study(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match=r"no DICOM images in the input \(1 file\(s\) looked at, all ignored: x.txt: not DICOM\)"):
        load_study(tmp_path)


# ----------------------------------------------------------------------------- inventory, calibration files


def test_scan_dicom_lists_series_roles_and_reasons(tmp_path):
    study, ct, nm = _quant_study(tmp_path)
    raw = f.write_nm_projections(tmp_path / "raw.dcm", study)
    (tmp_path / "readme.md").write_text("# export")
    inv = scan_dicom(tmp_path)
    by_uid = {s.series_instance_uid: s for s in inv.series}
    assert by_uid[ct.series_uid].role == "ct" and by_uid[ct.series_uid].n_files == CT_SHAPE[0]
    assert by_uid[nm.series_uid].role == "spect" and by_uid[nm.series_uid].n_frames == NM_SHAPE[0]
    assert by_uid[raw.series_uid].role == "" and "projections" in by_uid[raw.series_uid].reason
    assert [s.series_instance_uid for s in inv.spect_candidates] == [nm.series_uid]
    assert inv.ignored_files == [("readme.md", "not DICOM")]
    assert "usable as SPECT" in inv.describe() and "Synthetic" not in inv.describe()


def test_load_calibrations_json_and_toml(tmp_path):
    js = tmp_path / "cams.json"
    js.write_text(
        json.dumps(
            {
                "cameras": [
                    {"sensitivity_cps_per_mbq": 9.5, "station_name": "NM-ROOM-1"},
                    {"sensitivity_cps_per_mbq": 10},
                ]
            }
        )
    )
    cams = load_calibrations(js)
    assert cams == [CameraCalibration(9.5, station_name="NM-ROOM-1"), CameraCalibration(10)]
    toml = tmp_path / "cams.toml"
    toml.write_text(
        '[[cameras]]\nsensitivity_cps_per_mbq = 9.1\nmanufacturer = "SYNTHETIC"\ncalling_ae_title = "NM1"\n'
    )
    assert load_calibrations(toml) == [
        CameraCalibration(9.1, manufacturer="SYNTHETIC", calling_ae_title="NM1")
    ]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"sensitivity": 9.5}]))
    with pytest.raises(InputError, match="unknown keys"):
        load_calibrations(bad)
    bad.write_text(json.dumps([{"sensitivity_cps_per_mbq": -1}]))
    with pytest.raises(CalibrationError, match="positive"):
        load_calibrations(bad)


# ----------------------------------------------------------------------------- phantom


@pytest.mark.slow
def test_ingests_generated_phantoms_in_both_unit_modes(tmp_path):
    """The virtual-patient generator's DICOM, quantitative and counts, against its own record."""
    from spectdose.phantoms import generate

    for name, units in (("q", "Bq/ml"), ("c", "counts")):
        generate(tmp_path / name, seed=0, size="small", n_iters=1, spect_units=units)
    record = json.loads((tmp_path / "q" / "truth" / "phantom.json").read_text())
    q = load_study(tmp_path / "q" / "dicom")
    assert q.ct.units == "HU" and q.spect.units == "Bq/ml"
    assert -1100 < float(np.median(q.ct.array)) < 2000
    assert q.administration.injected_activity_bq == pytest.approx(
        record["injected_activity_bq"], rel=1e-6
    )

    def naive(text: str) -> dt.datetime:
        return dt.datetime.fromisoformat(text).replace(tzinfo=None)

    assert q.administration.administration_datetime == naive(record["administration_datetime"])
    assert q.acquisition_datetime == naive(record["acquisition_datetime"])
    total_bq = (
        float(np.clip(q.spect.array, 0, None).sum(dtype=np.float64)) * q.spect.grid.voxel_volume_ml
    )
    assert 0.5 < total_bq / record["truth"]["activity_in_spect_fov_bq"] < 2.0

    counts_dir = tmp_path / "c" / "dicom"
    with pytest.raises(CalibrationError, match="holds counts"):
        load_study(counts_dir)
    calibration = json.loads((tmp_path / "c" / "truth" / "phantom.json").read_text())["calibration"]
    c = load_study(counts_dir, sensitivity_cps_per_mbq=calibration["sensitivity_cps_per_mbq"])
    assert c.spect.units == "Bq/ml" and c.spect.grid.same_as(q.spect.grid)
    total_c = (
        float(np.clip(c.spect.array, 0, None).sum(dtype=np.float64)) * c.spect.grid.voxel_volume_ml
    )
    assert total_c == pytest.approx(total_bq, rel=0.02)


def test_multi_window_recon_is_listed_per_window_and_chosen_by_energy(tmp_path):
    """Issue 7 item 6: each window is a candidate with its energies; --energy-window picks one."""
    study = f.StudyIds()
    _ct(tmp_path, study)
    counts = f.blob_counts(NM_SHAPE)
    nm = _nm(
        tmp_path, study, counts=counts, rwvm=(1.0, 0.0),
        extra_windows=[(counts * 3, "Lu177 113keV", 101.7, 124.3)],
    )  # fmt: skip
    inv = scan_dicom(tmp_path)
    keys = sorted(s.key for s in inv.spect_candidates)
    assert keys == [f"{nm.series_uid}/window-1", f"{nm.series_uid}/window-2"]
    text = inv.describe()
    assert "187.2-228.8 keV (centre 208 keV)" in text and "101.7-124.3 keV (centre 113 keV)" in text
    with pytest.raises(InputError, match=r"--energy-window \(CLI\) / energy_window \(REST\)"):
        load_study(tmp_path)
    s208 = load_study(tmp_path, energy_window_kev=208)
    np.testing.assert_allclose(s208.spect.array, counts, rtol=1e-6)
    assert s208.spect.grid.same_as(nm.grid)
    s113 = load_study(tmp_path, spect_series_uid=f"{nm.series_uid}/window-2")
    np.testing.assert_allclose(s113.spect.array, counts * 3.0, rtol=1e-6)
    # the series UID names both windows; the energy then decides
    assert load_study(tmp_path, spect_series_uid=nm.series_uid, energy_window_kev=113).spect.array.max() == (
        pytest.approx(3.0 * counts.max())
    )
