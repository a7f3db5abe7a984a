import numpy as np
import pytest
import SimpleITK as sitk

from spectdose.errors import GeometryError
from spectdose.geometry import Grid, Volume, register_rigid, resample_to_grid


def _oblique_axes():
    # A rotation about z by 30 degrees: rows are the LPS directions of (slice, row, column).
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    col = np.array([c, s, 0.0])
    row = np.array([-s, c, 0.0])
    return np.stack([np.cross(col, row), row, col])


def test_index_lps_round_trip_and_sitk_agree():
    grid = Grid((7, 9, 11), (3.0, 0.9, 0.8), (-100.0, 20.0, 35.5), _oblique_axes(), "1.2.3")
    vol = Volume(np.zeros(grid.shape, np.float32), grid, "HU")
    img = vol.to_sitk()
    idx = np.array([4, 2, 6])
    lps = grid.index_to_lps_mm(idx)
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint([6, 2, 4]), lps, atol=1e-9)
    np.testing.assert_allclose(grid.lps_mm_to_index(lps), idx, atol=1e-9)
    back = Volume.from_sitk(img, "HU", "1.2.3")
    assert back.grid.same_as(grid)


def test_non_orthonormal_axes_refused():
    with pytest.raises(GeometryError, match="orthonormal"):
        Grid((2, 2, 2), (1, 1, 1), (0, 0, 0), np.array([[0, 0, 1], [0, 1, 0.3], [1, 0, 0]]))
    with pytest.raises(GeometryError, match="positive"):
        Grid((2, 2, 2), (1, 0, 1), (0, 0, 0))


def test_resample_conserves_activity_from_spect_to_ct_grid():
    rng = np.random.default_rng(0)
    spect_grid = Grid((20, 24, 24), (4.8, 4.8, 4.8), (-55.2, -55.2, -45.6))
    arr = np.zeros(spect_grid.shape, np.float32)
    arr[4:16, 5:19, 5:19] = rng.gamma(4.0, 250.0, size=(12, 14, 14))
    spect = Volume(arr, spect_grid, "Bq/ml")
    # CT grid covering the SPECT with finer, non-cubic voxels and an offset origin.
    ct_grid = Grid((36, 140, 140), (3.0, 0.98, 0.98), (-60.0, -70.0, -70.0))
    on_ct = resample_to_grid(spect, ct_grid)
    total_spect = arr.sum() * spect_grid.voxel_volume_ml
    total_ct = on_ct.array.sum() * ct_grid.voxel_volume_ml
    assert total_ct == pytest.approx(total_spect, rel=0.01)


def test_resample_places_a_point_where_patient_coordinates_say():
    src_grid = Grid((10, 10, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    arr = np.zeros(src_grid.shape, np.float32)
    arr[3, 5, 7] = 1.0  # LPS (14, 10, 6)
    target = Grid((30, 30, 30), (1.0, 1.0, 1.0), (-5.0, -5.0, -5.0))
    out = resample_to_grid(Volume(arr, src_grid, "x"), target).array
    k, j, i = np.unravel_index(np.argmax(out), out.shape)
    np.testing.assert_allclose(target.index_to_lps_mm(np.array([k, j, i])), [14.0, 10.0, 6.0], atol=1e-6)


def _torso(shape=(40, 64, 64)):
    zz, yy, xx = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    body = ((xx - 32) / 24.0) ** 2 + ((yy - 34) / 17.0) ** 2 <= 1
    lungs = ((np.abs(xx - 32) - 11) / 8.0) ** 2 + ((yy - 32) / 10.0) ** 2 + ((zz - 34) / 14.0) ** 2 <= 1
    spine = ((xx - 32) / 4.0) ** 2 + ((yy - 45) / 4.0) ** 2 <= 1
    liver = ((xx - 20) / 10.0) ** 2 + ((yy - 32) / 9.0) ** 2 + ((zz - 16) / 7.0) ** 2 <= 1
    kidney = ((np.abs(xx - 32) - 13) / 4.0) ** 2 + ((yy - 42) / 4.0) ** 2 + ((zz - 10) / 5.0) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0)
    hu[lungs & body] = -800.0
    hu[spine & body] = 700.0
    hu[liver & body] = 60.0
    act = np.where(body, 50.0, 0.0)
    act[lungs] = 5.0
    act[liver & body] = 800.0
    act[kidney & body] = 2000.0
    return hu.astype(np.float32), act.astype(np.float32)


def test_rigid_registration_recovers_a_shift():
    # A torso-like CT and a SPECT of the same anatomy shifted by (8, -6, 10) mm in LPS.
    hu, act = _torso()
    ct_grid = Grid(hu.shape, (4.0, 4.0, 4.0), (-128.0, -128.0, -80.0))
    shift = np.array([8.0, -6.0, 10.0])
    spect_grid = Grid(act.shape, (4.0, 4.0, 4.0), tuple(np.array(ct_grid.origin_mm) + shift))
    transform, _ = register_rigid(Volume(hu, ct_grid, "HU"), Volume(act, spect_grid, "Bq/ml"))
    # A CT point maps to the SPECT point of the same anatomy: p + shift.
    for p in ([0.0, 0.0, 0.0], [-30.0, 10.0, -40.0]):
        moved = np.array(transform.TransformPoint(p)) - np.array(p)
        np.testing.assert_allclose(moved, shift, atol=2.5)  # about half a SPECT voxel
    assert isinstance(transform, sitk.Transform)
