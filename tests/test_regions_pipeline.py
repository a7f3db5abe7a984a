"""Regions in a dose run and after it, on the small virtual patient (issue 11):
automatic lesions against the truth, the SR and the RT Dose's DVHs, and a region set
(the truth SEG, and the same VOIs as an RT Structure Set written by rt-utils) given later."""

from __future__ import annotations

import json
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from spectdose.cli import main
from spectdose.pipeline import DoseOptions, run
from spectdose.region_report import region_report
from spectdose.regions import load_regions

# Automatic lesions on seed 8 (small): every true lesion of >= 2 ml must be found (sensitivity
# 1.0; a lesion counts as found when an automatic region overlaps it with Dice >= 0.3) with a
# Dice of at least 0.5. Measured at the time of writing: lesion_2 (29.8 ml, necrotic core)
# 0.70, lesion_4 (10.7 ml, necrotic) 0.57; the necrotic cores are cold, so the 40 %
# threshold leaves them out, which the truth VOI includes.
MIN_LESION_ML = 2.0
DETECTED_DICE = 0.3
MIN_DICE = 0.5


@pytest.fixture(scope="module")
def auto_run(small_study, kernel_cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto")
    return run(small_study / "dicom", out, DoseOptions(kernel_cache_dir=kernel_cache_dir))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_automatic_lesions_find_the_true_lesions_of_2_ml_and_more(auto_run, small_study):
    truth = np.load(small_study / "truth" / "truth.npz")
    grid = auto_run.study.ct.grid
    auto = load_regions(auto_run.outputs["autoseg"], grid)  # the SEG as a viewer would read it
    assert auto.source == "SEG" and all(r.automatic for r in auto.regions)
    assert all(r.mask.sum() * grid.voxel_volume_ml >= 1.0 for r in auto.regions)
    lesions = {k[6:]: truth[k].astype(bool) for k in truth.files if k.startswith("label_lesion_")}
    big = {n: m for n, m in lesions.items() if m.sum() * grid.voxel_volume_ml >= MIN_LESION_ML}
    assert len(big) >= 2
    dice = {n: max(_dice(m, r.mask) for r in auto.regions) for n, m in big.items()}
    sensitivity = sum(d >= DETECTED_DICE for d in dice.values()) / len(big)
    assert sensitivity == 1.0, dice
    assert min(dice.values()) >= MIN_DICE, dice
    summary = auto_run.summary
    assert summary["regions_source"]["kind"] == "automatic" and "Nestle" in summary["regions_source"]["method"]
    assert any("automatic region(s), unreviewed" in w for w in summary["region_warnings"])
    assert not any("automatic region" in w for w in summary["warnings"])


def test_automatic_regions_leave_out_kidneys_and_spleen_and_are_no_neoplasm_in_the_sr(auto_run, small_study):
    """Issue 18: 11 of 15 automatic regions were organs, all coded Neoplasm in the SR."""
    from pydicom.sr.codedict import codes

    truth = np.load(small_study / "truth" / "truth.npz")
    auto = load_regions(auto_run.outputs["autoseg"], auto_run.study.ct.grid)
    organs = ("kidney_left", "kidney_right", "spleen", "lumbar_vertebrae")
    for region in auto.regions:
        for organ in organs:
            share = float((truth[f"label_{organ}"] & region.mask).sum()) / region.mask.sum()
            assert share < 0.5, (region.name, organ, share)
    assert any("left out as physiological uptake" in w and "kidney" in w for w in auto_run.summary["region_warnings"])
    rows = auto_run.summary["regions"]
    assert all(r["automatic"] and r["location"] and r["region"].startswith("auto_hotspot_") for r in rows)
    assert all(r["coverage"] == "covered" for r in rows)

    sr = hd.sr.srread(auto_run.outputs["sr"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(rows)
    for group in groups:
        assert group.finding_type == codes.DCM.RegionInSpace, group.finding_type
        assert "unreviewed, automatic" in group.tracking_identifier
        assert group.finding_sites and group.finding_sites[0].value in (codes.DCM.SoftTissue, codes.SCT.AdiposeTissue,
                                                                       codes.SCT.Bone, codes.SCT.Lung)
        evaluations = {(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()}
        assert (codes.DCM.CertaintyOfFinding.value, codes.SCT.Indeterminate.value) in evaluations
    assert codes.SCT.Neoplasm.value not in str(pydicom.dcmread(auto_run.outputs["sr"]))
    assert "unreviewed, automatic" in auto_run.outputs["summary_txt"].read_text()


def test_sr_and_rtdose_dvhs_reference_the_regions(auto_run):
    out, rows = auto_run.outputs, auto_run.summary["regions"]
    rtdose, rtstruct = pydicom.dcmread(out["rtdose"]), pydicom.dcmread(out["regions_rtstruct"])
    seg = pydicom.dcmread(out["autoseg"], stop_before_pixels=True)
    assert rtdose.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rtstruct.SOPInstanceUID
    assert len(rtdose.DVHSequence) == len(rows) == len(rtstruct.StructureSetROISequence)
    for item, row, roi in zip(rtdose.DVHSequence, rows, rtstruct.StructureSetROISequence, strict=True):
        assert item.DVHReferencedROISequence[0].ReferencedROINumber == roi.ROINumber
        assert float(item.DVHMeanDose) == pytest.approx(row["mean_gy"], rel=1e-6)
        assert float(item.DVHData[1]) == pytest.approx(row["volume_ml"], rel=1e-3)  # first bin: whole region, cm3
        assert roi.DefinitionSourceSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert auto_run.summary["uids"]["rtdose"]["sop_instance_uid"] == rtdose.SOPInstanceUID

    sr = hd.sr.srread(out["sr"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(rows)
    segment = groups[0].referenced_segment
    assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    means = [m for m in groups[0].get_measurements() if m.name.meaning == "Absorbed Dose" and m.derivation
             and m.derivation.meaning == "Mean"]
    assert means[0].value == pytest.approx(rows[0]["mean_gy"], rel=1e-6)
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert {rtdose.SOPInstanceUID, seg.SOPInstanceUID} <= evidence

    header = out["regions_csv"].read_text().splitlines()[0].split(",")
    assert {"region", "mean_gy", "d98_gy", "v23gy_ml", "uncertainty_gy"} <= set(header)
    assert "absorbed_dose" in out["dvh_csv"].read_text()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_finds_no_errors_in_the_region_objects(auto_run):
    for name in ("rtdose", "regions_rtstruct", "autoseg", "sr"):
        report = subprocess.run(["dciodvfy", str(auto_run.outputs[name])], capture_output=True, text=True).stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, (name, errors)


def _truth_as_rtstruct_by_rt_utils(small_study, grid, tmp_path):
    """The truth VOIs written as an RT Structure Set by another tool (rt-utils, OpenCV contours)."""
    from rt_utils import RTStructBuilder

    truth = np.load(small_study / "truth" / "truth.npz")
    ct_dir = tmp_path / "ct"
    shutil.copytree(small_study / "dicom" / "CT", ct_dir)
    rs = RTStructBuilder.create_new(dicom_series_path=str(ct_dir))
    # rt-utils orders slices by position along the normal; map each to our grid's slice.
    order = [int(round(grid.lps_mm_to_index(np.asarray(d.ImagePositionPatient, float))[0])) for d in rs.series_data]
    names = ["liver", "spleen", "kidney_left", "kidney_right", "lesion_2", "lesion_4"]
    for name in names:
        mask = truth[f"label_{name}"].astype(bool)[order]  # (slices, rows, cols) in rt-utils' order
        rs.add_roi(mask=np.moveaxis(mask, 0, -1), name=name, approximate_contours=False)
    path = tmp_path / "truth_rtstruct.dcm"
    rs.save(str(path))
    return path, names


def test_a_region_set_given_later_matches_the_seg_within_2_percent(auto_run, small_study, tmp_path):
    grid = auto_run.study.ct.grid
    folder = auto_run.outputs["rtdose"].parent
    from_seg = region_report(folder, small_study / "truth" / "seg.dcm", tmp_path / "seg")
    rtstruct, names = _truth_as_rtstruct_by_rt_utils(small_study, grid, tmp_path)
    assert main(["regions", str(folder), "--regions", str(rtstruct), "-o", str(tmp_path / "rs")]) == 0
    seg_rows = {r["region"]: r for r in json.loads(from_seg["regions_json"].read_text())["regions"]}
    rs_report = json.loads((tmp_path / "rs" / "regions.json").read_text())
    rs_rows = {r["region"]: r for r in rs_report["regions"]}
    assert rs_report["source"] == "RTSTRUCT" and set(rs_rows) == set(names)
    # The dose read back equals the run's: the truth SEG's liver mean is the run's dose over the truth mask.
    truth_liver = np.load(small_study / "truth" / "truth.npz")["label_liver"].astype(bool)
    assert seg_rows["liver"]["mean_gy"] == pytest.approx(float(auto_run.dose_gy.array[truth_liver].mean()), rel=1e-4)
    for name in names:
        if seg_rows[name]["volume_ml"] < 5.0:
            continue
        for key in ("mean_gy", "median_gy", "d50_gy"):
            assert rs_rows[name][key] == pytest.approx(seg_rows[name][key], rel=0.02), (name, key)
        assert rs_rows[name]["volume_ml"] == pytest.approx(seg_rows[name]["volume_ml"], rel=0.02), name
    assert (tmp_path / "rs" / "regions_seg.dcm").is_file() and (tmp_path / "rs" / "sr.dcm").is_file()
    rtdose = pydicom.dcmread(tmp_path / "rs" / "rtdose.dcm", stop_before_pixels=True)
    assert rtdose.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(rtstruct).SOPInstanceUID
