"""Issue 18 item 1: no dose for what the SPECT never saw. The small virtual patient with only the
first half of its SPECT slices (one of two beds), run with the truth SEG: every region says how
much of it the SPECT covered, and only those fully covered get a dose statistic."""

from __future__ import annotations

import json
import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from spectdose.geometry import Grid
from spectdose.pipeline import DoseOptions, run
from spectdose.region_report import region_report


@pytest.fixture(scope="module")
def half_spect(small_study, kernel_cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("half-spect")
    shutil.copytree(small_study / "dicom", root / "dicom")
    (nm,) = (root / "dicom" / "NM").glob("*.dcm")
    ds = pydicom.dcmread(nm)
    n = int(ds.NumberOfFrames) // 2
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:n]).tobytes()
    ds.NumberOfFrames, ds.NumberOfSlices, ds.SliceVector = n, n, list(range(1, n + 1))
    ds.save_as(nm)
    # The SPECT's axial span, from its header: first slice centre +- half a slice, n slices up (+z).
    z0, dz = float(ds.DetectorInformationSequence[0].ImagePositionPatient[2]), float(ds.SpacingBetweenSlices)
    span = (z0 - dz / 2, z0 + (n - 0.5) * dz)
    result = run(root / "dicom", root / "out",
                 DoseOptions(kernel_cache_dir=kernel_cache_dir, regions_path=small_study / "truth" / "seg.dcm"))
    return result, span


def _inside_fractions(small_study, span) -> dict[str, float]:
    """Fraction of each truth label's CT voxels whose centre lies in the SPECT's z span (independent of spectdose)."""
    truth = np.load(small_study / "truth" / "truth.npz")
    grid = Grid(truth["label_liver"].shape, tuple(truth["spacing_mm"]), tuple(truth["origin_mm"]), truth["axes"])
    out = {}
    for key in truth.files:
        if key.startswith("label_") and truth[key].any():
            z = grid.index_to_lps_mm(np.argwhere(truth[key]))[:, 2]
            out[key[6:]] = float(((z >= span[0]) & (z <= span[1])).mean())
    return out


def test_regions_partly_outside_the_spect_get_no_dose_and_say_how_much_was_seen(half_spect, small_study):
    result, span = half_spect
    rows = {r["region"]: r for r in result.summary["regions"]}
    expected = _inside_fractions(small_study, span)
    assert 0.2 < expected["kidney_left"] < 0.99 and expected["spleen"] == 0.0 and expected["lumbar_vertebrae"] == 1.0
    assert {"liver", "spleen", "kidney_left", "lumbar_vertebrae", "lesion_2"} <= set(rows)
    for name, row in rows.items():
        fraction = expected[name]
        assert row["spect_coverage_fraction"] == pytest.approx(fraction, abs=0.005), name
        assert row["ct_coverage_fraction"] == 1.0
        if fraction >= 0.99:
            assert row["coverage"] == "covered" and row["mean_gy"] is not None, name
        else:
            assert row["coverage"] == ("not covered" if fraction < 0.01 else "partly covered"), name
            assert all(row[k] is None for k in ("mean_gy", "median_gy", "d2_gy", "max_gy", "mean_dose_rate_mgy_per_h"))
            assert any(f"region '{name}'" in w for w in result.summary["region_warnings"]), name
    assert rows["lumbar_vertebrae"]["mean_gy"] > 0

    fov = result.summary["field_of_view"]
    assert fov["spect_z_mm"] == pytest.approx(span, abs=0.1)
    assert {"spleen", "lesion_2", "lesion_4"} <= set(fov["regions_not_covered"])
    assert "kidney_left" in {r["region"] for r in fov["regions_partly_covered"]}
    text = result.outputs["summary_txt"].read_text()
    assert f"SPECT field of view: z {span[0]:.0f} to {span[1]:.0f} mm" in text
    assert f"kidney_left (partly covered {expected['kidney_left']:.2f})" in text

    csv_lines = result.outputs["regions_csv"].read_text().splitlines()
    header = csv_lines[0].split(",")
    by_name = {line.split(",")[0]: dict(zip(header, line.split(","), strict=False)) for line in csv_lines[1:]}
    assert by_name["kidney_left"]["coverage"] == "partly covered" and by_name["kidney_left"]["mean_gy"] == ""
    assert by_name["spleen"]["coverage"] == "not covered"

    # The SR: no absorbed dose for a region not fully covered, and a standard code that says why.
    sr = hd.sr.srread(result.outputs["sr"])
    for group in sr.content.get_volumetric_roi_measurement_groups():
        name = group.tracking_identifier
        doses = [m for m in group.get_measurements() if m.name == codes.DCM.AbsorbedDose]
        evaluations = {(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()}
        incomplete = (codes.DCM.QualityFinding.value, codes.DCM.AnatomyCoverageIncomplete.value) in evaluations
        covered = rows[name]["coverage"] == "covered"
        assert bool(doses) == covered and incomplete == (not covered), name
    # The RT Dose holds DVHs only for the covered regions.
    rtdose = pydicom.dcmread(result.outputs["rtdose"], stop_before_pixels=True)
    assert len(rtdose.DVHSequence) == sum(r["coverage"] == "covered" for r in rows.values())


def test_a_region_set_given_later_is_checked_against_the_recorded_field_of_view(half_spect, small_study, tmp_path):
    result, _ = half_spect
    outputs = region_report(result.outputs["rtdose"].parent, small_study / "truth" / "seg.dcm", tmp_path)
    report = json.loads(outputs["regions_json"].read_text())
    later = {r["region"]: r for r in report["regions"]}
    for row in result.summary["regions"]:
        assert later[row["region"]]["coverage"] == row["coverage"]
        assert later[row["region"]]["spect_coverage_fraction"] == pytest.approx(row["spect_coverage_fraction"], abs=1e-4)
    assert any("region 'spleen' not covered" in w for w in report["warnings"])
