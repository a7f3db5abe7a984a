"""Regions: RTSTRUCT contours to masks, statistics and DVHs, bad region input, and the
RTSTRUCT-vs-SEG agreement of issue 11 (the pipeline-level tests are in test_regions_pipeline.py)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage

from spectdose.dicom.rtstruct import (
    build_rtstruct,
    contours_to_mask,
    mask_to_contours,
    read_rtstruct,
)
from spectdose.errors import GeometryError, InputError
from spectdose.geometry import Grid
from spectdose.regions import cumulative_dvh, load_regions, region_statistics

FOR = "1.2.826.0.1.3680043.8.498.1"


def _oblique_feet_first_grid() -> Grid:
    # Slices run towards the feet (-z) and the rows/columns are turned 20 degrees about z.
    angle = np.radians(20.0)
    turn = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    axes = np.array([[0, 0, -1.0], [0, 1.0, 0], [1.0, 0, 0]]) @ turn.T
    return Grid((60, 80, 80), (2.0, 1.5, 1.5), (10.0, -20.0, 30.0), axes, FOR)


def _sphere_contours(grid: Grid, centre_kji, radius_mm: float, points: int = 200) -> list[np.ndarray]:
    """Circles of a sphere on every CT slice plane it cuts, in LPS mm."""
    centre = grid.index_to_lps_mm(np.asarray(centre_kji, float))
    out = []
    for k in range(grid.shape[0]):
        on_plane = grid.index_to_lps_mm(np.array([k, centre_kji[1], centre_kji[2]], float))
        d = float((on_plane - centre) @ grid.axes[0])
        if abs(d) >= radius_mm:
            continue
        r = np.sqrt(radius_mm**2 - d**2)
        t = np.linspace(0, 2 * np.pi, points, endpoint=False)
        out.append(on_plane + np.outer(r * np.cos(t), grid.axes[1]) + np.outer(r * np.sin(t), grid.axes[2]))
    return out


def test_contoured_sphere_volume_within_2_percent_on_an_oblique_feet_first_ct():
    grid = _oblique_feet_first_grid()
    for radius_mm in (20.0, 30.0):  # 33.5 ml and 113 ml (10 and 15 slices in radius)
        mask, info = contours_to_mask(_sphere_contours(grid, (30, 40, 40), radius_mm), grid)
        true_ml = 4 / 3 * np.pi * radius_mm**3 / 1000
        assert abs(mask.sum() * grid.voxel_volume_ml / true_ml - 1) < 0.02
        assert info["outside_grid"] == 0 and info["between_slices"] == 0
    # The sphere's centre voxel is inside, a voxel just beyond its radius is not.
    assert mask[30, 40, 40] and mask[30, 40, 40 + 19] and not mask[30, 40, 40 + 21]  # 28.5 mm in, 31.5 mm out


def test_masks_survive_contours_and_back_exactly():
    grid = _oblique_feet_first_grid()
    blobs = ndimage.gaussian_filter(np.random.default_rng(1).random(grid.shape), 2) > 0.52  # holes, islands, diagonals
    contours = [points for _, points in mask_to_contours(blobs, grid)]
    back, _ = contours_to_mask(contours, grid)
    assert blobs.sum() > 1000 and np.array_equal(back, blobs)


def test_a_contour_across_ct_slices_is_refused():
    grid = _oblique_feet_first_grid()
    tilted = _sphere_contours(grid, (30, 40, 40), 10.0)[5] + np.linspace(0, 5, 200)[:, None] * grid.axes[0]
    with pytest.raises(GeometryError, match="across the CT slices"):
        contours_to_mask([tilted], grid)


def test_statistics_and_dvh_on_known_values():
    dose = np.arange(100, dtype=float).reshape(1, 10, 10)  # 0..99 Gy, one voxel each
    rate = dose / 3.6e6  # 1 mGy/h per Gy
    mask = np.ones_like(dose, bool)
    (row,) = region_statistics(dose, rate, {"box": mask}, 0.5, v_thresholds_gy=(10.0, 50.0))
    assert row["volume_ml"] == 50.0 and row["mean_gy"] == pytest.approx(49.5) and row["median_gy"] == pytest.approx(49.5)
    assert (row["min_gy"], row["max_gy"]) == (0.0, 99.0)
    assert row["d98_gy"] == pytest.approx(1.98) and row["d2_gy"] == pytest.approx(97.02)
    assert row["v_gy"]["10"] == {"ml": 45.0, "pct": 90.0} and row["v_gy"]["50"] == {"ml": 25.0, "pct": 50.0}
    assert row["uncertainty_gy"] is None
    dvh = row["dvh_gy"]
    assert dvh["bin_width"] == 0.2 and dvh["volume_ml"][0] == 50.0
    assert dvh["volume_ml"][50] == 45.0  # >= 10 Gy
    assert row["dvh_dose_rate_mgy_per_h"]["volume_ml"][0] == 50.0
    assert cumulative_dvh(np.zeros(4), 1.0)["volume_ml"] == [4.0]


def _header() -> Dataset:
    h = Dataset()
    h.PatientName, h.PatientID, h.StudyInstanceUID = "VP^1", "VP1", "1.2.826.0.1.3680043.8.498.2"
    return h


def _write_rtstruct(tmp_path, grid, masks, name="rs.dcm"):
    ds = build_rtstruct(masks, grid, _header(), ct_series_uid="1.2.826.0.1.3680043.8.498.3",
                        ct_instance_uids=[f"1.2.826.0.1.3680043.8.498.4.{k}" for k in range(grid.shape[0])],
                        sop_instance_uid="1.2.826.0.1.3680043.8.498.5", series_instance_uid="1.2.826.0.1.3680043.8.498.6",
                        label="TEST")
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _small_grid() -> Grid:
    return Grid((20, 32, 32), (3.0, 2.0, 2.0), (0.0, 0.0, 0.0), frame_of_reference_uid=FOR)


def _cube(grid):
    m = np.zeros(grid.shape, bool)
    m[5:10, 10:20, 10:20] = True
    return m


def test_rtstruct_file_gives_the_masks_back(tmp_path):
    grid = _small_grid()
    path = _write_rtstruct(tmp_path, grid, {"cube": _cube(grid)})
    regions = load_regions(path, grid)
    assert regions.source == "RTSTRUCT" and regions.regions[0].number == 1
    assert np.array_equal(regions.masks["cube"], _cube(grid))


def test_bad_region_input_gets_a_specific_message(tmp_path):
    grid = _small_grid()
    good = _write_rtstruct(tmp_path, grid, {"cube": _cube(grid)})
    other_for = Grid(grid.shape, grid.spacing_mm, grid.origin_mm, frame_of_reference_uid="1.2.826.0.1.3680043.8.498.9")
    with pytest.raises(GeometryError, match="frame of reference .* not the CT's"):
        load_regions(good, other_for)
    far = Grid(grid.shape, grid.spacing_mm, (500.0, 500.0, 500.0), frame_of_reference_uid=FOR)
    with pytest.raises(GeometryError, match="'cube' lies outside the CT"):
        load_regions(good, far)

    ds = pydicom.dcmread(good)
    del ds.ROIContourSequence[0].ContourSequence
    ds.save_as(tmp_path / "empty.dcm")
    with pytest.raises(InputError, match="structure 1 'cube' is empty"):
        load_regions(tmp_path / "empty.dcm", grid)

    ds = pydicom.dcmread(good)
    ds.ROIContourSequence[0].ContourSequence[0].NumberOfContourPoints = 99
    ds.save_as(tmp_path / "corrupt.dcm")
    with pytest.raises(InputError, match="corrupt RT Structure Set corrupt.dcm: ROI 'cube' contour 1"):
        load_regions(tmp_path / "corrupt.dcm", grid)

    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all" * 20)
    with pytest.raises(InputError, match="not a readable DICOM file"):
        load_regions(tmp_path / "junk.dcm", grid)


def test_an_empty_structure_among_good_ones_is_left_out_with_a_warning(tmp_path):
    grid = _small_grid()
    path = _write_rtstruct(tmp_path, grid, {"cube": _cube(grid), "nothing": np.zeros(grid.shape, bool)})
    regions = load_regions(path, grid)
    assert list(regions.masks) == ["cube"]
    assert any("'nothing' is empty" in w for w in regions.warnings)
    _, structures = read_rtstruct(path)
    assert [s.name for s in structures] == ["cube", "nothing"]


def test_a_per_mbq_run_gets_statistics_and_a_seg_that_reads_back_on_an_oblique_ct(tmp_path):
    from spectdose.dicom.region_outputs import RegionContext, write_region_outputs
    from spectdose.regions import Region, RegionSet

    grid = _oblique_feet_first_grid()
    blob, _ = contours_to_mask(_sphere_contours(grid, (30, 40, 40), 15.0), grid)
    regions = RegionSet([Region("auto_lesion_1", blob, 1, automatic=True, lesion=True)], "automatic",
                        description="test method")
    ctx = RegionContext(grid, "1.2.826.0.1.3680043.8.498.3",
                        tuple(f"1.2.826.0.1.3680043.8.498.4.{k}" for k in range(grid.shape[0])), _header(), "test")
    rate = np.where(blob, 2.0, 0.5) / 3.6e6  # mGy/h per MBq, as Gy/s
    outputs, rows, _ = write_region_outputs(tmp_path, regions, None, rate, ctx)
    assert set(outputs) == {"regions_csv", "dvh_csv", "autoseg"}  # no RT Dose: no DVH module, no SR
    assert rows[0]["mean_dose_rate_mgy_per_h"] == pytest.approx(2.0) and "mean_gy" not in rows[0]
    back = load_regions(outputs["autoseg"], grid)
    assert back.regions[0].automatic and np.array_equal(back.masks["auto_lesion_1"], blob)


# --- issue 18 item 1 (field of view), item 7 (automatic regions), issue 17 item 5 (small regions)


def _half_covering_spect_grid() -> Grid:
    """A SPECT volume whose top edge (z 19.5 mm) cuts between CT slices 6 (z 18) and 7 (z 21)."""
    return Grid((4, 16, 16), (6.0, 6.0, 6.0), (-10.0, -10.0, -1.5), frame_of_reference_uid=FOR)  # origin x, y, z


def _six_slice_cube(grid):
    m = np.zeros(grid.shape, bool)
    m[4:10, 10:20, 10:20] = True  # slices 4-6 inside the SPECT above, 7-9 outside
    return m


def test_a_region_half_outside_the_spect_gets_no_dose_statistic(tmp_path):
    from spectdose.dicom.region_outputs import (
        RegionContext,
        _build_seg,
        _build_sr,
        write_region_outputs,
    )
    from spectdose.regions import FieldOfView, Region, RegionSet, coverage_text

    grid = _small_grid()
    inside = _cube(grid)
    inside[5:10] = False
    inside[1:4, 2:6, 2:6] = True  # wholly inside the SPECT
    regions = RegionSet([Region("liver", _six_slice_cube(grid), 1), Region("kidney", inside, 2)], "SEG",
                        description="test")
    ctx = RegionContext(grid, "1.2.826.0.1.3680043.8.498.3",
                        tuple(f"1.2.826.0.1.3680043.8.498.4.{k}" for k in range(grid.shape[0])), _header(), "test")
    dose = np.full(grid.shape, 3.0)
    fov = FieldOfView(_half_covering_spect_grid())
    assert fov.z_span_mm() == (-4.5, 19.5)
    _, rows, _ = write_region_outputs(tmp_path, regions, dose, dose / 3.6e6, ctx, field_of_view=fov)
    liver, kidney = rows
    assert liver["coverage"] == "partly covered" and liver["spect_coverage_fraction"] == 0.5
    assert liver["ct_coverage_fraction"] == 1.0
    assert all(liver[k] is None for k in ("mean_gy", "d2_gy", "max_gy", "mean_dose_rate_mgy_per_h", "dvh_gy"))
    assert "partly covered 0.5" in coverage_text(liver) and "'liver'" in coverage_text(liver)
    assert kidney["coverage"] == "covered" and kidney["mean_gy"] == pytest.approx(3.0) and coverage_text(kidney) == ""
    csv_rows = (tmp_path / "regions.csv").read_text().splitlines()
    header = csv_rows[0].split(",")
    liver_csv = dict(zip(header, csv_rows[1].split(","), strict=False))
    assert liver_csv["coverage"] == "partly covered" and liver_csv["spect_coverage_fraction"] == "0.5"
    assert liver_csv["mean_gy"] == ""

    # The SR says so with standard codes and carries no dose for it.
    from pydicom.sr.codedict import codes

    seg_ds = _build_seg(regions, ctx, description="test", method="")
    sr = _build_sr(rows, regions, str(seg_ds.SOPInstanceUID), [1, 2], None, seg_ds, ctx)
    groups = _groups(sr)
    liver_group, kidney_group = groups
    assert not [m for m in liver_group.get_measurements() if m.name == codes.DCM.AbsorbedDose]
    assert [m for m in kidney_group.get_measurements() if m.name == codes.DCM.AbsorbedDose]
    evaluations = {(e.name.value, e.value.value) for e in liver_group.get_qualitative_evaluations()}
    assert (codes.DCM.QualityFinding.value, codes.DCM.AnatomyCoverageIncomplete.value) in evaluations
    fov_percent = [m.value for m in liver_group.get_measurements() if m.name.value == "SPECTFOV"]
    assert fov_percent == [50.0]

    # Accepted partial coverage: the statistics of the part inside, still labelled.
    _, rows, _ = write_region_outputs(tmp_path, regions, np.where(grid_z(grid) < 19.5, 3.0, 99.0),
                                      dose / 3.6e6, ctx, field_of_view=fov, accept_partial=True)
    assert rows[0]["coverage"] == "partly covered" and rows[0]["mean_gy"] == pytest.approx(3.0)
    assert "part inside" in coverage_text(rows[0])


def grid_z(grid: Grid) -> np.ndarray:
    """LPS z of every voxel centre."""
    k = np.arange(grid.shape[0])
    z = grid.index_to_lps_mm(np.stack([k, 0 * k, 0 * k], axis=1))[:, 2]
    return np.broadcast_to(z[:, None, None], grid.shape)


def _groups(sr):
    import highdicom as hd

    path_free = hd.sr.Comprehensive3DSR.from_dataset(sr)
    return path_free.content.get_volumetric_roi_measurement_groups()


def test_a_seg_reaching_beyond_the_ct_reports_the_fraction_inside(tmp_path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from spectdose.dicom.region_outputs import RegionContext, _build_seg
    from spectdose.regions import Region, RegionSet

    wide = Grid((30, 32, 32), (3.0, 2.0, 2.0), (0.0, 0.0, 0.0), frame_of_reference_uid=FOR)  # 10 slices more than the CT
    mask = np.zeros(wide.shape, bool)
    mask[15:25, 10:20, 10:20] = True  # slices 15-19 on the CT (20 slices), 20-24 beyond it
    ctx = RegionContext(wide, "1.2.826.0.1.3680043.8.498.3",
                        tuple(f"1.2.826.0.1.3680043.8.498.4.{k}" for k in range(wide.shape[0])), _header(), "test")
    seg = _build_seg(RegionSet([Region("spleen", mask, 1)], "SEG"), ctx, description="wide", method="")
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Organ.value
    seg.save_as(tmp_path / "wide.dcm")
    region = load_regions(tmp_path / "wide.dcm", _small_grid()).regions[0]
    assert region.ct_coverage_fraction == pytest.approx(0.5) and region.mask.sum() == 500
    assert hd.seg.segread(tmp_path / "wide.dcm").number_of_segments == 1


def test_small_regions_carry_the_measured_bias_for_their_size_and_method():
    from spectdose.regions import SMALL_REGION_BIAS, size_bias, size_note

    def measured(lo_ml, method):
        return next((r[4], r[5]) for r in SMALL_REGION_BIAS if r[0] == lo_ml and r[2] == method)

    (low, high), (low_2_5, high_2_5) = measured(0.0, "dvk"), measured(2.0, "dvk")
    assert low < high < 0 and low_2_5 < high_2_5 < 0  # resolution loss lowers small regions' doses
    note = size_note(1.9, "dvk")
    assert note.startswith("1.9 ml is near the SPECT resolution") and f"{low:+.0f} to {high:+.0f} %" in note and "DVK" in note
    assert "v2-test" in note and "issue 17" in note  # where the figure comes from
    assert f"{low_2_5:+.0f} to {high_2_5:+.0f} %" in size_note(3.0, "dvk")
    assert "with DVK-RR" in size_note(1.5, "dvk-rr") and size_bias(1.5, "dvk-rr")["low_pct"] == measured(0.0, "dvk-rr")[0]
    assert size_note(10.7, "dvk") == "" and size_bias(10.7, "dvk") is None
    dose = np.full((1, 10, 10), 2.0)
    (row,) = region_statistics(dose, dose / 3.6e6, {"node": np.ones_like(dose, bool)}, 0.019)
    assert row["size_note"].startswith("1.9 ml") and row["size_bias_pct"] == [low, high]
    assert row["coverage"] == "covered" and row["automatic"] is False and row["location"] == ""


def test_a_learned_methods_small_region_bias_holds_only_for_the_network_it_was_measured_with():
    """A network replaced by a training campaign must not inherit its predecessor's measured bias."""
    from spectdose.regions import SMALL_REGION_BIAS, size_bias, size_note

    lo, hi, _, measured_sha, low, high, _ = next(r for r in SMALL_REGION_BIAS if r[2] == "cnn")
    volume = (lo + hi) / 2
    same = size_bias(volume, "cnn", measured_sha + "0" * 52)
    assert (same["low_pct"], same["high_pct"], same["method"]) == (low, high, "cnn")
    assert "with CNN" in size_note(volume, "cnn", measured_sha + "0" * 52)
    dvk = size_bias(volume, "dvk")
    for other in ("f" * 64, None):
        bias = size_bias(volume, "cnn", other)
        assert (bias["low_pct"], bias["high_pct"], bias["method"]) == (dvk["low_pct"], dvk["high_pct"], "dvk")
        assert "not measured for this network" in size_note(volume, "cnn", other) and "with DVK" in size_note(volume, "cnn", other)
    dose = np.full((1, 10, 10), 2.0)
    (row,) = region_statistics(dose, dose / 3.6e6, {"node": np.ones_like(dose, bool)}, volume / 100, method="cnn",
                               network_sha256="f" * 64)
    assert row["size_bias_pct"] == [dvk["low_pct"], dvk["high_pct"]] and "ffffffffffff" in row["size_note"]


def test_automatic_regions_are_unreviewed_regions_in_space_never_neoplasms(tmp_path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from spectdose.dicom.region_outputs import (
        UNREVIEWED,
        RegionContext,
        _build_sr,
        write_region_outputs,
    )
    from spectdose.regions import Region, RegionSet

    grid = _small_grid()
    regions = RegionSet([Region("auto_hotspot_1", _cube(grid), 1, automatic=True, lesion=True,
                                location="soft tissue 100%, left posterior, z 20 mm")], "automatic",
                        description="test method")
    ctx = RegionContext(grid, "1.2.826.0.1.3680043.8.498.3",
                        tuple(f"1.2.826.0.1.3680043.8.498.4.{k}" for k in range(grid.shape[0])), _header(), "test")
    dose = np.full(grid.shape, 3.0)
    outputs, rows, _ = write_region_outputs(tmp_path, regions, None, dose / 3.6e6, ctx)
    seg = hd.seg.segread(outputs["autoseg"])
    item = seg.SegmentSequence[0]
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.DCM.RegionInSpace.value
    assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.SCT.SpatialAndRelationalConcept.value
    assert item.SegmentDescription.startswith(UNREVIEWED) and "left posterior" in item.SegmentDescription
    assert UNREVIEWED in seg.SeriesDescription
    back = load_regions(outputs["autoseg"], grid).regions[0]
    assert back.automatic and back.location == "soft tissue 100%, left posterior, z 20 mm"
    assert rows[0]["automatic"] is True and "left posterior" in rows[0]["location"]

    rows = region_statistics(dose, dose / 3.6e6, regions.masks, grid.voxel_volume_ml, regions=regions.regions)
    sr = _build_sr(rows, regions, str(seg.SOPInstanceUID), [1], None, pydicom.dcmread(outputs["autoseg"]), ctx)
    (group,) = _groups(sr)
    assert group.finding_type == codes.DCM.RegionInSpace and group.finding_type != codes.SCT.Neoplasm
    assert UNREVIEWED in group.tracking_identifier
    (site,) = group.finding_sites
    assert site.value == codes.DCM.SoftTissue and site.laterality == codes.SCT.Left
    evaluations = {(e.name.value, e.value.value) for e in group.get_qualitative_evaluations()}
    assert (codes.DCM.CertaintyOfFinding.value, codes.SCT.Indeterminate.value) in evaluations
    assert sr.VerificationFlag == "UNVERIFIED"


def test_field_of_view_follows_the_registration_and_survives_the_summary():
    import SimpleITK as sitk

    from spectdose.regions import FieldOfView

    # The registration maps CT points 30 mm up into the SPECT: the SPECT saw CT z -34.5 to -10.5 mm.
    fov = FieldOfView.from_transform(_half_covering_spect_grid(), sitk.TranslationTransform(3, (0.0, 0.0, 30.0)))
    assert fov.z_span_mm() == pytest.approx((-34.5, -10.5))
    points = np.array([[20.0, 20.0, -20.0], [20.0, 20.0, 0.0]])
    assert fov.inside(points).tolist() == [True, False]
    back = FieldOfView.from_json(fov.to_json())
    assert back.inside(points).tolist() == [True, False] and back.z_span_mm() == pytest.approx((-34.5, -10.5))


def _full_grid_row(dose: np.ndarray, mask: np.ndarray, voxel_ml: float) -> dict:
    """The statistics of issue 11, taken on the whole grid (what the box-wise ones must equal)."""
    d = dose[mask].astype(np.float64)
    return {"mean_gy": float(d.mean()), "median_gy": float(np.median(d)), "d2_gy": float(np.percentile(d, 98)),
            "d98_gy": float(np.percentile(d, 2)), "v10_ml": round(float((d >= 10).sum()) * voxel_ml, 3),
            "dvh_gy": cumulative_dvh(d, voxel_ml)}


def test_statistics_in_a_regions_box_equal_those_on_the_whole_grid():
    from spectdose.dicom.region_outputs import _label_volume, _packed_mask
    from spectdose.regions import Region, RegionSet, mask_box

    rng = np.random.default_rng(7)
    grid = _oblique_feet_first_grid()
    dose = (rng.gamma(2.0, 6.0, grid.shape)).astype(np.float32)
    blob = ndimage.gaussian_filter(rng.random(grid.shape), 3) > 0.52  # irregular, several pieces
    edge = np.zeros(grid.shape, bool)
    edge[-3:, :5, 70:] = True  # touching three faces of the grid
    loose = (slice(0, 60), slice(0, 20), slice(60, 80))  # a box larger than the region, as hot spots carry
    regions = [Region("blob", blob, 1), Region("edge", edge, 2, box=loose)]
    assert mask_box(edge) == (slice(57, 60), slice(0, 5), slice(70, 80))
    rows = region_statistics(dose, dose / 3600.0, {r.name: r.mask for r in regions}, grid.voxel_volume_ml,
                             regions=regions)
    for row, r in zip(rows, regions, strict=True):
        want = _full_grid_row(dose, r.mask, grid.voxel_volume_ml)
        assert row["voxels"] == int(r.mask.sum())
        assert {k: row[k] for k in ("mean_gy", "median_gy", "d2_gy", "d98_gy", "dvh_gy")} == \
            {k: want[k] for k in ("mean_gy", "median_gy", "d2_gy", "d98_gy", "dvh_gy")}
        assert row["v_gy"]["10"]["ml"] == want["v10_ml"]
        # The SEG's and the UIDs' view of the region, built from its box, is the whole grid's.
        assert _packed_mask(r) == np.packbits(r.mask).tobytes()
    labels = _label_volume(RegionSet(regions, "automatic"), grid.shape)
    assert np.array_equal(labels == 1, blob) and np.array_equal(labels == 2, edge)
    overlapping = RegionSet([Region("a", blob, 1), Region("b", blob.copy(), 2)], "RTSTRUCT")
    assert _label_volume(overlapping, grid.shape) is None  # overlapping regions: one frame stack per segment


def test_hot_spots_do_not_depend_on_the_air_around_the_body():
    """The search is cropped to the tissue: padding the CT with air (with activity in it) changes nothing."""
    from spectdose.lesions import find_hot_spots

    rng = np.random.default_rng(3)
    shape = (40, 64, 64)
    density = np.full(shape, 1.04, np.float32)
    density[:, :6, :] = 0.0  # air in front of the body
    activity = rng.gamma(20.0, 0.05, shape).astype(np.float32)  # ~1 Bq/ml of noisy background
    kk, jj, ii = np.indices(shape)
    for (k, j, i), peak in (((12, 30, 20), 60.0), ((28, 40, 44), 25.0), ((20, 10, 50), 12.0)):
        activity += (peak * np.exp(-(((kk - k) * 3) ** 2 + (jj - j) ** 2 + (ii - i) ** 2) / (2 * 4.0**2))).astype(np.float32)
    grid = Grid(shape, (3.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3)[::-1], FOR)
    spots = find_hot_spots(activity, grid, density)
    assert len([s for s in spots if s.excluded is None]) >= 2

    pad = ((3, 5), (20, 7), (11, 30))
    big_density = np.pad(density, pad)  # air (density 0) all round
    big_activity = np.pad(activity, pad) + np.pad(np.zeros(shape, np.float32), pad,
                                                  constant_values=50.0)  # hot "activity" in the air is ignored
    origin = grid.index_to_lps_mm(-np.array([p[0] for p in pad], float))
    big_grid = Grid(big_density.shape, grid.spacing_mm, tuple(origin), grid.axes, FOR)
    big_spots = find_hot_spots(big_activity, big_grid, big_density)
    inner = tuple(slice(p[0], p[0] + n) for p, n in zip(pad, shape, strict=True))
    assert len(big_spots) == len(spots)
    for a, b in zip(spots, big_spots, strict=True):
        assert np.array_equal(b.mask[inner], a.mask) and b.mask.sum() == a.mask.sum()
        assert (a.volume_ml, a.peak_bq_per_ml, a.location, a.excluded) == (b.volume_ml, b.peak_bq_per_ml, b.location,
                                                                            b.excluded)


def test_hot_spot_seeds_are_the_maxima_of_their_cube_ties_and_grid_edges_included():
    """Seeds as the module docstring defines them: hot voxels equal to the maximum of the cube of
    2 x seed_radius + 1 voxels around them (clipped to the grid), found without filtering the grid."""
    from spectdose.lesions import _median, _seed_peaks

    rng = np.random.default_rng(11)
    # Smooth blobs, rounded to a few levels so that plateaus (ties) occur, hot up to every face of the grid.
    a = ndimage.gaussian_filter(rng.random((23, 41, 37)), 2.0)
    a = np.round((a - a.min()) / np.ptp(a) * 12.0).astype(np.float32)
    a[0, 5, 5], a[-1, -1, 20], a[10, 0, -1] = 20.0, 20.0, 13.0  # maxima on faces and a corner row
    hot = a >= np.float64(6.0)
    for size in ((3, 5, 5), (7, 21, 21), (1, 3, 3), (3, 1, 5)):
        want = np.argwhere((a == ndimage.maximum_filter(a, size=size)) & hot)
        assert np.array_equal(_seed_peaks(a, hot, np.array(size)), want)
        assert len(want) > 0
    # The background median: numpy's median in float64, without a float64 copy (even, odd, NaN).
    values = rng.gamma(2.0, 3.0, 10001).astype(np.float32)
    for sample in (values, values[:-1], values[:2], values[:1]):
        want = float(np.median(sample.astype(np.float64)))
        assert _median(sample) == want and _median(sample.copy(), overwrite=True) == want
    assert np.isnan(_median(np.append(values, np.float32("nan"))))
