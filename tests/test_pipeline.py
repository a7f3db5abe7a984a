"""End to end on a small virtual patient: DICOM in, RT Dose + dose-rate map + summary out."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from spectdose.density import hu_to_density
from spectdose.dicom.export import MAP_16_BIT_MAX_ERROR, read_dose_rate_map, read_rtdose
from spectdose.dicom.ingest import load_study
from spectdose.dose import dvk_dose_rate
from spectdose.errors import CalibrationError, GeometryError, InputError
from spectdose.geometry import Grid, Volume
from spectdose.kernels import get_kernel
from spectdose.pipeline import DoseOptions, run

from .conftest import SMALL_STUDY_SEED
from .dicom_factory import copy_with_zero_activity


@pytest.fixture(scope="module")
def result(small_study, kernel_cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dose")
    return run(small_study / "dicom", out, DoseOptions(kernel_cache_dir=kernel_cache_dir))


def test_outputs_on_the_ct_grid_and_frame_of_reference(result, small_study):
    ct = result.study.ct
    dose = read_rtdose(result.outputs["rtdose"])
    rate = read_dose_rate_map(result.outputs["doserate"])
    for vol in (dose, rate):
        assert vol.grid.frame_of_reference_uid == ct.grid.frame_of_reference_uid
        assert vol.grid.shape == ct.grid.shape
        centres = vol.grid.index_to_lps_mm(np.array([[0, 0, 0], [s - 1 for s in vol.grid.shape]]))
        np.testing.assert_allclose(centres, ct.grid.index_to_lps_mm(np.array([[0, 0, 0], [s - 1 for s in ct.grid.shape]])), atol=0.01)
    # The dose is the dose rate times the stated time-integration factor (Hanscheid STP).
    factor_h = result.summary["time"]["integration_factor_h"]
    hours = result.summary["time"]["hours_since_administration"]
    assert factor_h == pytest.approx(2 * hours / np.log(2), rel=1e-6)
    hot = rate.array > 0.05 * rate.array.max()
    ratio = dose.array[hot] / (rate.array[hot] * 1e-3 * factor_h)
    np.testing.assert_allclose(ratio, 1.0, rtol=1e-3)


def test_dose_rate_matches_the_dvk_formula_and_the_truth_totals(result, small_study, kernel_cache_dir):
    study = result.study
    truth = np.load(small_study / "truth" / "truth.npz")
    # Activity on the CT grid conserves the SPECT's total (within 1 %) ...
    a = result.summary["activity"]
    assert a["total_on_ct_grid_mbq"] == pytest.approx(a["total_in_spect_fov_mbq"], rel=0.01)
    # ... and the quantitative SPECT recovers the true activity in the field of view to a few %.
    true_total_mbq = float(truth["activity_bq_per_ml"].sum()) * study.ct.grid.voxel_volume_ml / 1e6
    assert a["total_on_ct_grid_mbq"] == pytest.approx(true_total_mbq, rel=0.05)
    # Dose rate where density < 0.1 g/cm3 is exactly zero (air outside the body, lungs are denser).
    rho = hu_to_density(study.ct.array)
    assert not np.any(result.dose_rate_gy_per_s.array[rho < 0.1])
    # The same DVK formula applied to the true activity gives the same order of magnitude in the
    # liver (SPECT blur and noise make them differ, but not by 2x).
    kernel = get_kernel(study.ct.grid.spacing_mm, cache_dir=kernel_cache_dir)
    truth_rate = dvk_dose_rate(truth["activity_bq_per_ml"], rho, kernel.total_mgy_per_mbq_s, study.ct.grid.voxel_volume_ml)
    liver = truth["label_healthy_liver"].astype(bool)
    ratio = result.dose_rate_gy_per_s.array[liver].mean() / truth_rate[liver].mean()
    assert 0.7 < ratio < 1.3


def test_summary_records_what_was_done(result):
    s = json.loads(result.outputs["summary_json"].read_text())
    assert s["series"]["ct"]["modality"] == "CT" and s["series"]["spect"]["modality"] == "NM"
    assert s["activity"]["units"] == "Bq/ml"
    assert s["time"]["model"] == "hanscheid" and s["time"]["hours_since_administration"] > 0
    assert s["density"]["curve"] == "schneider2000"
    assert s["dose_rate"]["kernel"]["shape"]
    # No regions given: automatic lesion regions and their files come with the dose (issue 11).
    assert set(s["outputs"]) == {"rtdose", "doserate", "summary_json", "summary_txt", "regions_csv", "dvh_csv",
                                 "autoseg", "regions_rtstruct", "sr", "report", "report_pdf", "view"}
    text = result.outputs["summary_txt"].read_text()
    assert "Absorbed dose" in text and "MBq" in text
    # No patient identity in the summary (it may travel in logs and tickets).
    nm = pydicom.dcmread(next((result.outputs["rtdose"].parent).glob("rtdose.dcm")))
    assert str(nm.PatientName) not in json.dumps(s)


def test_rerun_gives_the_same_series_and_instance_uids(result, small_study, kernel_cache_dir, tmp_path):
    again = run(small_study / "dicom", tmp_path, DoseOptions(kernel_cache_dir=kernel_cache_dir))
    a, b = pydicom.dcmread(result.outputs["rtdose"]), pydicom.dcmread(again.outputs["rtdose"])
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert a.StudyInstanceUID == result.study.ct_series.study_instance_uid
    physical = run(small_study / "dicom", tmp_path / "phys", DoseOptions(time_model="physical", kernel_cache_dir=kernel_cache_dir))
    c = pydicom.dcmread(physical.outputs["rtdose"])
    assert c.SeriesInstanceUID != a.SeriesInstanceUID
    assert read_rtdose(physical.outputs["rtdose"]).array.max() > read_rtdose(result.outputs["rtdose"]).array.max()


def test_simpleitk_reads_the_rt_dose_on_the_ct_geometry(result):
    img = sitk.ReadImage(str(result.outputs["rtdose"]))
    ct = result.study.ct.grid
    assert img.GetSize() == (ct.shape[2], ct.shape[1], ct.shape[0])
    np.testing.assert_allclose(img.GetSpacing(), ct.spacing_mm[::-1], atol=0.01)
    corner = ct.index_to_lps_mm(np.array([0, 0, 0]))
    origin = np.array(img.GetOrigin())
    other = ct.index_to_lps_mm(np.array([ct.shape[0] - 1, 0, 0]))
    assert np.allclose(origin, corner, atol=0.01) or np.allclose(origin, other, atol=0.01)


def _copy_study(src, dst):
    shutil.copytree(src / "dicom", dst)
    return dst


def test_all_zero_activity_is_refused_and_writes_no_dose(small_study, kernel_cache_dir, tmp_path):
    """Issue 8: a SPECT with no activity is refused, never a 0 Gy RT Dose; the refusal names the
    assumption that allows an all-zero dose (issue 10) for a blank or QA acquisition."""
    study_dir = copy_with_zero_activity(small_study / "dicom", tmp_path / "zero")
    with pytest.raises(InputError, match="pixel data are all zero") as refused:
        run(study_dir, tmp_path / "out", DoseOptions(kernel_cache_dir=kernel_cache_dir))
    assert "--accept no_activity_gives_zero_dose (CLI) / accept=no_activity_gives_zero_dose (REST)" in str(refused.value)
    assert not (tmp_path / "out" / "rtdose.dcm").exists()


def test_counts_spect_needs_a_calibration_and_then_matches(small_study, kernel_cache_dir, tmp_path):
    from spectdose.phantoms import generate

    info = generate(tmp_path / "counts", SMALL_STUDY_SEED, size="small", spect_units="counts")
    meta = json.loads((tmp_path / "counts" / "truth" / "phantom.json").read_text())
    sens = meta["calibration"]["sensitivity_cps_per_mbq"]
    with pytest.raises(CalibrationError, match="cps/MBq"):
        load_study(info["dicom_dir"])
    res = run(info["dicom_dir"], tmp_path / "out", DoseOptions(sensitivity_cps_per_mbq=sens, kernel_cache_dir=kernel_cache_dir))
    ref = load_study(small_study / "dicom")
    total_ref = float(ref.spect.array.sum()) * ref.spect.grid.voxel_volume_ml
    total = float(res.study.spect.array.sum()) * res.study.spect.grid.voxel_volume_ml
    assert total == pytest.approx(total_ref, rel=0.01)


def test_spect_on_another_frame_of_reference_is_registered_with_a_warning(small_study, result, kernel_cache_dir, tmp_path):
    study_dir = _copy_study(small_study, tmp_path / "moved")
    nm_path = next((study_dir / "NM").glob("*.dcm"))
    ds = pydicom.dcmread(nm_path)
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    shift = np.array([9.0, -6.0, 7.0])
    det = ds.DetectorInformationSequence[0]
    det.ImagePositionPatient = [float(v) + d for v, d in zip(det.ImagePositionPatient, shift, strict=True)]
    ds.save_as(nm_path)
    res = run(study_dir, tmp_path / "out", DoseOptions(kernel_cache_dir=kernel_cache_dir))
    assert any("registered" in w for w in res.summary["warnings"])
    # After registration the dose-rate map lands where it is without the shift: its centre of
    # mass within 2 mm (under half a SPECT voxel) and the maps strongly correlated.
    ref = result.dose_rate_gy_per_s.array
    got = res.dose_rate_gy_per_s.array
    grid = result.study.ct.grid
    idx = np.indices(ref.shape).reshape(3, -1).T

    def centre_mm(a):
        w = a.ravel().astype(np.float64)
        return grid.index_to_lps_mm((idx * w[:, None]).sum(0) / w.sum())

    assert np.linalg.norm(centre_mm(ref) - centre_mm(got)) < 2.0
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95


def test_spect_outside_the_ct_is_refused(small_study, kernel_cache_dir, tmp_path):
    study_dir = _copy_study(small_study, tmp_path / "outside")
    nm_path = next((study_dir / "NM").glob("*.dcm"))
    ds = pydicom.dcmread(nm_path)
    det = ds.DetectorInformationSequence[0]
    det.ImagePositionPatient = [float(det.ImagePositionPatient[0]), float(det.ImagePositionPatient[1]), float(det.ImagePositionPatient[2]) + 2000.0]
    ds.save_as(nm_path)
    with pytest.raises(GeometryError, match="CT"):
        run(study_dir, tmp_path / "out", DoseOptions(kernel_cache_dir=kernel_cache_dir))
    assert not (tmp_path / "out" / "rtdose.dcm").exists()


def test_volume_helper_types_are_consistent():
    # Guard the conventions the pipeline relies on: Gy/s volumes share the CT Grid object.
    g = Grid((2, 3, 4), (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), frame_of_reference_uid="1.2")
    v = Volume(np.zeros(g.shape, np.float32), g, "Gy/s")
    assert v.grid is g


def test_region_statistics_from_a_dicom_seg(small_study, kernel_cache_dir, tmp_path):
    res = run(
        small_study / "dicom",
        tmp_path,
        DoseOptions(kernel_cache_dir=kernel_cache_dir, regions_path=small_study / "truth" / "seg.dcm"),
    )
    truth = np.load(small_study / "truth" / "truth.npz")
    regions = {r["region"]: r for r in res.summary["regions"]}
    voxel_ml = res.study.ct.grid.voxel_volume_ml
    for name in ("liver", "kidney_left", "spleen", "lesion_1"):
        mask = truth[f"label_{name}"].astype(bool)
        # The SEG's masks land on exactly the truth's voxels of the CT grid.
        assert regions[name]["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
        assert regions[name]["mean_gy"] == pytest.approx(float(res.dose_gy.array[mask].mean()), rel=1e-5)
        assert regions[name]["d98_gy"] <= regions[name]["mean_gy"] <= regions[name]["d2_gy"]
    assert "kidney_left" in res.outputs["summary_txt"].read_text()


def test_segmentation_on_another_frame_of_reference_is_refused(small_study, kernel_cache_dir, tmp_path):
    seg = pydicom.dcmread(small_study / "truth" / "seg.dcm")
    seg.FrameOfReferenceUID = pydicom.uid.generate_uid()
    seg.save_as(tmp_path / "other.dcm")
    # The region set is refused with its reason; the dose is kept (issue 11).
    res = run(small_study / "dicom", tmp_path / "out", DoseOptions(kernel_cache_dir=kernel_cache_dir, regions_path=tmp_path / "other.dcm"))
    assert res.outputs["rtdose"].is_file() and res.summary["regions"] is None
    assert "frame of reference" in res.summary["regions_error"]
    assert any(w.startswith("REGIONS NOT REPORTED: segmentation other.dcm is on frame of reference") for w in res.summary["region_warnings"])


def test_the_dose_rate_map_is_16_bit_jpeg_ls_within_the_stated_precision(result):
    """Issue 20: the map a PACS takes (and a REST client downloads) is 16-bit, stored JPEG-LS, and the
    summary states its step; read back, every voxel is within half a step of the computed dose rate."""
    precision = result.summary["geometry"]["output_grid"]["map_precision"]["doserate"]
    header = pydicom.dcmread(result.outputs["doserate"], stop_before_pixels=True)
    assert precision["bits"] == 16 and header.BitsAllocated == 16
    assert str(header.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.80"  # JPEG-LS Lossless
    assert precision["max_rounding_error_of_smallest_reference"] <= MAP_16_BIT_MAX_ERROR
    rate = read_dose_rate_map(result.outputs["doserate"])
    computed = result.dose_rate_gy_per_s.array.astype(np.float64) * 3.6e6  # Gy/s -> mGy/h
    if not rate.grid.same_as(result.dose_rate_gy_per_s.grid):  # frames stored along the normal
        rate.array = rate.array[::-1]
    assert np.abs(rate.array - computed).max() <= precision["max_rounding_error"] + 1e-6 * computed.max()
    assert rate.array.max() == pytest.approx(result.summary["dose_rate"]["max_mgy_per_h"], rel=1e-6)


def test_map_precision_float32_gives_a_float_map_that_dcmqi_converts(result, small_study, kernel_cache_dir, tmp_path):
    """3D Slicer imports Parametric Maps through dcmqi, which reads float maps only: a site or user
    that works in Slicer asks for float32 and gets the same dose rates, as floats."""
    import subprocess
    import sys
    from pathlib import Path

    converter = shutil.which("paramap2itkimage", path=str(Path(sys.executable).parent)) or shutil.which(
        "paramap2itkimage")
    res = run(small_study / "dicom", tmp_path / "out",
              DoseOptions(kernel_cache_dir=kernel_cache_dir, map_precision="float32"))
    header = pydicom.dcmread(res.outputs["doserate"], stop_before_pixels=True)
    assert header.BitsAllocated == 32 and "FloatPixelData" in pydicom.dcmread(res.outputs["doserate"])
    assert res.summary["geometry"]["output_grid"]["map_precision"]["doserate"]["bits"] == 32
    as_float, as_16 = read_dose_rate_map(res.outputs["doserate"]), read_dose_rate_map(result.outputs["doserate"])
    step = result.summary["geometry"]["output_grid"]["map_precision"]["doserate"]["max_rounding_error"]
    assert np.abs(as_float.array - as_16.array).max() <= step + 1e-6 * as_float.array.max()
    assert header.SOPInstanceUID != pydicom.dcmread(result.outputs["doserate"], stop_before_pixels=True).SOPInstanceUID
    if converter is None:
        pytest.skip("dcmqi not installed (pip install dcmqi; in the dev extra)")
    for path, works in ((res.outputs["doserate"], True), (result.outputs["doserate"], False)):
        out = tmp_path / ("dcmqi-" + str(works))
        out.mkdir()
        done = subprocess.run([converter, "--inputDICOM", str(path), "--outputDirectory", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert (done.returncode == 0 and any(out.glob("*.nrrd"))) == works, done.stdout[-500:] + done.stderr[-500:]


def test_time_model_none_gives_the_dose_rate_map_and_no_absorbed_dose(result, small_study, kernel_cache_dir,
                                                                       tmp_path):
    """A time point of a cycle: the same dose-rate map as with a time model, in mGy/h, but no RT Dose
    (no single-time-point dose that could be read as the cycle's), and the result says so."""
    out = run(small_study / "dicom", tmp_path / "none", DoseOptions(time_model="none", kernel_cache_dir=kernel_cache_dir))
    assert out.dose_gy is None and "rtdose" not in out.outputs and out.summary["dose"] is None
    rate = read_dose_rate_map(out.outputs["doserate"])
    assert rate.units == "mGy/h"
    assert np.array_equal(rate.array, read_dose_rate_map(result.outputs["doserate"]).array)
    assert any("dose rate only (time model none)" in w for w in out.summary["warnings"])
    assert all("mean_gy" not in r for r in out.summary["regions"] or [])
    with pytest.raises(InputError, match="hanscheid, physical, effective or none"):
        DoseOptions(time_model="trapezoid")


def test_weights_hash_in_the_provenance_follows_the_file_when_it_is_replaced(tmp_path):
    """The result names the weights it used: a replaced weights file must give its own hash, not a cached one."""
    import hashlib
    import os

    from spectdose.pipeline import _file_sha256

    w = tmp_path / "w.pt"
    w.write_bytes(b"first weights")
    assert _file_sha256(w) == hashlib.sha256(b"first weights").hexdigest() == _file_sha256(w)
    w.write_bytes(b"other weights!")
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a later write, even on a coarse clock
    assert _file_sha256(w) == hashlib.sha256(b"other weights!").hexdigest()
    assert _file_sha256(tmp_path / "absent.pt") is None
