"""Virtual patients: anatomy and truth, simulated SPECT, and the DICOM study they make.

One small phantom is built, simulated and written once per module (~20-40 s on 2 cores);
the tests read it back as a user of the study would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.uid import NuclearMedicineImageStorage
from scipy import ndimage

from spectdose.errors import InputError
from spectdose.geometry import resample_to_grid
from spectdose.phantoms import generate
from spectdose.phantoms.anatomy import SIZES, make_virtual_patient
from spectdose.phantoms.spect_sim import mass_attenuation_cm2_g, simulate_spect
from spectdose.phantoms.study_io import SEG_VOIS, study_uids, write_phantom_study

SEED = 3
SCALE3 = SIZES["small"].anatomy_scale ** 3  # small-phantom volumes = clinical x SCALE3


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    patient = make_virtual_patient(SEED, "small")
    spect = simulate_spect(patient)
    paths = write_phantom_study(out, patient, spect)
    return SimpleNamespace(patient=patient, spect=spect, paths=paths, out=out)


@pytest.fixture(scope="module")
def nm(study):
    return pydicom.dcmread(study.paths["nm"])


@pytest.fixture(scope="module")
def ct_slices(study):
    return [pydicom.dcmread(p) for p in study.paths["ct"]]


def _centroid_x_mm(patient, name):
    k, j, i = np.nonzero(patient.labels[name])
    idx = np.stack([k, j, i], axis=1).mean(axis=0)
    return patient.hu.grid.index_to_lps_mm(idx)[0]


# --- anatomy and truth ---------------------------------------------------------------
def test_same_seed_gives_the_same_patient_and_another_seed_another(study):
    again = make_virtual_patient(SEED, "small")
    p = study.patient
    np.testing.assert_array_equal(again.activity_bq_per_ml.array, p.activity_bq_per_ml.array)
    np.testing.assert_array_equal(again.hu.array, p.hu.array)
    assert again.lesions == p.lesions
    assert again.acquisition_datetime == p.acquisition_datetime
    other = make_virtual_patient(SEED + 1, "small")
    body_ml = p.labels["body"].sum(), other.labels["body"].sum()
    assert body_ml[0] != body_ml[1]
    assert [les["nominal_volume_ml"] for les in other.lesions] != [les["nominal_volume_ml"] for les in p.lesions]


def test_organs_have_adult_volumes_and_sit_on_the_right_side(study):
    p = study.patient
    vox_ml = p.hu.grid.voxel_volume_ml
    clinical_ml = {k: m.sum() * vox_ml / SCALE3 for k, m in p.labels.items()}
    assert 1000 < clinical_ml["liver"] < 2800
    assert 60 < clinical_ml["spleen"] < 500
    for side in ("kidney_left", "kidney_right"):
        assert 80 < clinical_ml[side] < 320
    assert clinical_ml["kidney_cortex"] > clinical_ml["kidney_medulla"] > 0
    assert 100 < clinical_ml["lumbar_vertebrae"] < clinical_ml["spine"]
    each = [clinical_ml[f"vertebra_L{i}"] for i in range(2, 6)]
    assert sum(each) == pytest.approx(clinical_ml["lumbar_vertebrae"]) and min(each) > 20
    assert clinical_ml["lungs"] > 100
    # LPS: patient left is +x; liver on the right
    assert _centroid_x_mm(p, "kidney_left") > 20 > -20 > _centroid_x_mm(p, "kidney_right")
    assert _centroid_x_mm(p, "liver") < -20 < 20 < _centroid_x_mm(p, "spleen")
    assert not np.any(p.labels["healthy_liver"] & p.labels["lesions"])
    assert np.all(p.labels["liver"] >= p.labels["healthy_liver"])


def test_lesions_span_2_to_180_ml_in_and_outside_the_liver_with_necrosis(study):
    p = study.patient
    lesions = p.lesions
    assert 3 <= len(lesions) <= 7
    assert {les["location"] for les in lesions} == {"liver", "outside"}
    for les in lesions:
        nominal_clinical = les["nominal_volume_ml"] / SCALE3
        assert 2.0 <= nominal_clinical <= 180.0
        assert 0.75 < les["volume_ml"] / les["nominal_volume_ml"] < 1.3  # as sampled on the CT grid
        assert p.labels[les["name"]].any()
        if les["location"] == "liver":
            overlap = (p.labels[les["name"]] & p.labels["liver"]).sum() / p.labels[les["name"]].sum()
            assert overlap == 1.0
    assert min(les["nominal_volume_ml"] for les in lesions) / SCALE3 < 10
    assert max(les["nominal_volume_ml"] for les in lesions) / SCALE3 > 50
    necrotic = [les for les in lesions if les["necrotic"]]
    assert necrotic
    # necrotic cores are cold: their mean uptake is well below the viable rim's
    act = p.activity_bq_per_ml.array
    for les in necrotic:
        mask = p.labels[les["name"]]
        core = mask & p.labels["necrosis"]
        assert core.sum() * p.hu.grid.voxel_volume_ml == pytest.approx(les["necrotic_volume_ml"])
        assert 0.03 < core.sum() / mask.sum() < 0.5
        # the truth has PET-like resolution (phantom.TRUTH_RESOLUTION_FWHM_MM), which fills a
        # small core in partly; it must still be clearly colder than the rim
        assert act[core].mean() < 0.75 * act[mask & ~core].mean()


def test_uptake_is_textured_with_dotatate_like_ratios(study):
    p = study.patient
    act = p.activity_bq_per_ml.array
    inner_liver = ndimage.binary_erosion(p.labels["healthy_liver"], iterations=2)
    liver = act[inner_liver]
    cv = liver.std() / liver.mean()
    assert 0.08 < cv < 0.5, f"healthy-liver uptake CV {cv:.3f}: not textured or implausibly noisy"
    assert len(np.unique(liver)) > 0.5 * liver.size
    mean = {k: act[p.labels[k]].mean() for k in ("kidney_cortex", "kidney_medulla", "spleen", "healthy_liver", "lesions")}
    marrow = act[p.labels["spine_trabecular"]].mean()
    fat = act[p.labels["body"] & (p.density_g_cm3.array < 0.99) & (p.density_g_cm3.array > 0.9)].mean()
    assert mean["kidney_cortex"] > 1.2 * mean["healthy_liver"]
    # cortex over medulla, as seen at the truth's PET-like resolution
    assert mean["kidney_cortex"] > 1.2 * mean["kidney_medulla"]
    assert mean["spleen"] > mean["healthy_liver"] > 2.5 * marrow > 0
    assert mean["lesions"] > 1.5 * mean["healthy_liver"]
    assert fat < 0.1 * mean["healthy_liver"]
    # 1-4 days after about 7.4 GBq
    assert 20 <= p.hours_after_administration <= 100
    assert 7.0e9 < p.injected_activity_bq < 7.8e9
    assert 3e6 <= p.total_counts_target <= 2e7


def test_ct_numbers_follow_the_true_density(study):
    from spectdose.density import hu_to_density

    p = study.patient
    rho = hu_to_density(p.hu.array)
    liver = p.labels["healthy_liver"]
    assert abs(rho[liver].mean() - p.density_g_cm3.array[liver].mean()) < 0.01
    assert p.hu.array[p.labels["spine_cortical"]].mean() > 900
    assert p.hu.array[p.labels["lungs"]].mean() < -600


# --- SPECT simulation ----------------------------------------------------------------
def test_projection_counts_match_the_requested_total(study):
    s, p = study.spect, study.patient
    assert s.expected_total_counts == pytest.approx(p.total_counts_target, rel=1e-3)
    assert abs(s.total_counts - s.expected_total_counts) < 5 * np.sqrt(s.expected_total_counts)
    nz, ny, _ = p.spect_grid.shape
    assert s.projections.shape == (SIZES["small"].n_views, ny, nz)  # (views, transaxial, axial)


def test_reconstruction_recovers_total_activity(study):
    s, p = study.spect, study.patient
    recon_bq = s.recon.array.sum() * s.recon.grid.voxel_volume_ml
    assert recon_bq == pytest.approx(s.true_activity_in_fov_bq, rel=0.05)
    truth_ct_bq = p.activity_bq_per_ml.array.sum() * p.hu.grid.voxel_volume_ml
    assert truth_ct_bq == pytest.approx(s.true_activity_in_fov_bq, rel=0.02)


def test_spect_is_blurrier_than_the_truth(study):
    s, p = study.spect, study.patient
    on_ct = resample_to_grid(s.recon, p.hu.grid).array
    truth = p.activity_bq_per_ml.array
    smallest = min(p.lesions, key=lambda les: les["volume_ml"])["name"]
    m = p.labels[smallest]
    assert on_ct[m].max() < 0.85 * truth[m].max()
    assert on_ct[m].mean() < 0.85 * truth[m].mean()
    # ...while a large organ keeps most of its activity
    kid = p.labels["kidney_left"] | p.labels["kidney_right"]
    assert 0.5 < on_ct[kid].mean() / truth[kid].mean() < 1.05


def test_projector_is_linear_when_it_skips_the_planes_that_do_not_emit():
    """The projector transforms only the planes between the first and the last that emit: a
    source near the detector and one far from it, projected apart and together, must agree, so
    the attenuation of the planes it skips is still counted."""
    import torch

    from spectdose.phantoms import spect_sim as ss

    rng = np.random.default_rng(1)
    n, nz, dx_cm = 32, 10, 0.48
    mu = np.full((n, n, nz), 0.15, np.float32)
    near, far = np.zeros((n, n, nz), np.float32), np.zeros((n, n, nz), np.float32)
    near[24:28, 12:20, 3:7] = rng.uniform(1.0, 2.0, (4, 8, 4))
    far[4:8, 10:18, 2:8] = rng.uniform(1.0, 2.0, (4, 8, 6))
    angles, psf = np.array([0.0, 37.0, 90.0, 200.0]), ss._psf_sigma_params(208.4)

    def project(obj):
        return ss._project(torch.from_numpy(obj), torch.from_numpy(mu), dx_cm, angles, 20.0, psf, "cpu").double().numpy()

    apart, together = project(near) + project(far), project(near + far)
    np.testing.assert_allclose(apart, together, rtol=1e-5, atol=1e-5 * together.max())  # float32 FFT round-off
    assert project(np.zeros_like(near)).shape == together.shape and not project(np.zeros_like(near)).any()


def test_projector_matches_pytomography_system_matrix():
    """Our projector (used on the fine grid) and PyTomography's (used by OSEM) agree on
    one grid: same geometry, attenuation and depth-dependent Gaussian blur."""
    import torch

    from spectdose.phantoms import spect_sim as ss

    rng = np.random.default_rng(0)
    n, nz, dx_cm, radius_cm = 32, 12, 0.48, 20.0
    x, y = np.meshgrid(np.arange(n) - n / 2 + 0.5, np.arange(n) - n / 2 + 0.5, indexing="ij")
    body = ((x * dx_cm / 6.0) ** 2 + (y * dx_cm / 4.5) ** 2 < 1).astype(np.float32)
    mu = np.repeat(body[:, :, None], nz, axis=2) * 0.15
    obj = np.repeat(body[:, :, None], nz, axis=2) * rng.uniform(0.5, 2.0, size=(n, n, nz)).astype(np.float32)
    obj[20:23, 10:13, 4:7] += 30.0  # an off-centre hot spot checks the orientation
    angles = np.arange(16) * 360.0 / 16
    psf = ss._psf_sigma_params(208.4)
    ours = ss._project(torch.from_numpy(obj), torch.from_numpy(mu), dx_cm, angles, radius_cm, psf, "cpu").numpy()
    pt = ss._import_pytomography()
    with ss._undo_import_side_effects():
        from pytomography.metadata.SPECT import SPECTPSFMeta
        from pytomography.transforms.SPECT import SPECTPSFTransform
    meta = SPECTPSFMeta(psf, sigma_fit=lambda r, a, b, c: np.sqrt((a * r + b) ** 2 + c**2), min_sigmas=5)
    system = pt.SPECTSystemMatrix(
        obj2obj_transforms=[pt.SPECTAttenuationTransform(attenuation_map=torch.from_numpy(mu)), SPECTPSFTransform(meta)],
        proj2proj_transforms=[],
        object_meta=pt.SPECTObjectMeta([dx_cm] * 3, [n, n, nz]),
        proj_meta=pt.SPECTProjMeta([n, nz], [dx_cm, dx_cm], angles, np.full(len(angles), radius_cm)),
    )
    theirs = system.forward(torch.from_numpy(obj)).numpy()
    assert ours.shape == theirs.shape == (16, n, nz)
    rms = np.sqrt(np.mean((ours - theirs) ** 2)) / np.sqrt(np.mean(theirs**2))
    assert rms < 0.01
    assert ours.sum() == pytest.approx(theirs.sum(), rel=1e-3)


def test_pytomography_import_leaves_warnings_and_numpy_state_alone():
    code = (
        "import warnings, numpy as np\n"
        "from spectdose.phantoms.spect_sim import _import_pytomography\n"
        "before = (list(warnings.filters), np.geterr())\n"
        "_import_pytomography()\n"
        "assert (list(warnings.filters), np.geterr()) == before\n"
        "import pytomography\n"
        "assert 'pytomography' in __import__('sys').modules\n"
    )
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # PyTomography's import-time print is swallowed


def test_water_attenuation_at_208kev_matches_nist():
    assert mass_attenuation_cm2_g("water", 208.4) == pytest.approx(0.1350, rel=0.01)
    assert mass_attenuation_cm2_g("bonecortical", 208.4) < mass_attenuation_cm2_g("water", 208.4)


# --- DICOM ---------------------------------------------------------------------------
def test_ct_series_geometry_and_hu(study, ct_slices, nm):
    p = study.patient
    grid = p.hu.grid
    assert len(ct_slices) == grid.shape[0]
    ordered = sorted(ct_slices, key=lambda ds: float(ds.ImagePositionPatient[2]))
    for k, ds in enumerate(ordered):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], grid.index_to_lps_mm(np.array([k, 0, 0])), atol=1e-3)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.StudyInstanceUID == nm.StudyInstanceUID
        assert ds.FrameOfReferenceUID == nm.FrameOfReferenceUID
        assert ds.PatientID == nm.PatientID and ds.PatientPosition == "HFS"
    np.testing.assert_allclose([float(v) for v in ordered[0].PixelSpacing], grid.spacing_mm[1:], atol=1e-6)
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ordered])
    np.testing.assert_array_equal(hu, p.hu.array)


def test_nm_frames_lie_on_the_spect_grid(study, nm):
    grid = study.spect.recon.grid
    assert nm.SOPClassUID == NuclearMedicineImageStorage
    assert list(nm.ImageType) == ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    assert int(nm.NumberOfFrames) == int(nm.NumberOfSlices) == grid.shape[0]
    assert nm.FrameIncrementPointer == pydicom.tag.Tag("SliceVector")
    assert list(nm.SliceVector) == list(range(1, grid.shape[0] + 1))
    det = nm.DetectorInformationSequence[0]
    ipp = np.array([float(v) for v in det.ImagePositionPatient])
    iop = np.array([float(v) for v in det.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    spacing = float(nm.SpacingBetweenSlices)
    assert spacing == pytest.approx(4.8) and float(nm.SliceThickness) == pytest.approx(4.8)
    for n in (0, grid.shape[0] // 2, grid.shape[0] - 1):
        np.testing.assert_allclose(ipp + n * spacing * normal, grid.index_to_lps_mm(np.array([n, 0, 0])), atol=1e-3)
    # the SPECT lies within the CT's axial field of view
    ct = study.patient.hu.grid
    z_ct = [ct.index_to_lps_mm(np.array([k, 0, 0]))[2] for k in (0, ct.shape[0] - 1)]
    z_nm = [grid.index_to_lps_mm(np.array([k, 0, 0]))[2] for k in (0, grid.shape[0] - 1)]
    assert z_ct[0] - ct.spacing_mm[0] / 2 <= z_nm[0] - 2.4 and z_nm[1] + 2.4 <= z_ct[1] + ct.spacing_mm[0] / 2


def test_nm_real_world_values_round_trip_to_bq_per_ml(study, nm):
    rwvm = nm.RealWorldValueMappingSequence[0]
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("Bq/ml", "UCUM")
    values = nm.pixel_array.astype(np.float64) * rwvm.RealWorldValueSlope + rwvm.RealWorldValueIntercept
    truth = study.spect.recon.array
    hot = truth > 0.01 * truth.max()
    np.testing.assert_allclose(values[hot], truth[hot], rtol=0.005)
    assert values.sum() == pytest.approx(truth.sum(), rel=1e-3)


def test_nm_carries_administration_acquisition_and_camera_facts(study, nm):
    p, s = study.patient, study.spect
    rp = nm.RadiopharmaceuticalInformationSequence[0]
    assert float(rp.RadionuclideTotalDose) == pytest.approx(p.injected_activity_bq / 1e6, rel=1e-6)  # MBq in NM
    assert float(rp.RadionuclideHalfLife) == pytest.approx(574300.8)
    assert rp.RadionuclideCodeSequence[0].CodeValue == "447553000"
    assert rp.RadiopharmaceuticalStartDateTime == p.administration_datetime.strftime("%Y%m%d%H%M%S")
    assert nm.AcquisitionDateTime == p.acquisition_datetime.strftime("%Y%m%d%H%M%S")
    rot = nm.RotationInformationSequence[0]
    assert int(rot.ActualFrameDuration) == round(s.view_duration_s * 1000)
    assert int(rot.NumberOfFramesInRotation) == s.n_views
    window = nm.EnergyWindowInformationSequence[0].EnergyWindowRangeSequence[0]
    assert (float(window.EnergyWindowLowerLimit), float(window.EnergyWindowUpperLimit)) == (187.2, 228.8)
    assert nm.DetectorInformationSequence[0].CollimatorGridName


def test_counts_mode_calibrates_with_the_sensitivity_in_phantom_json(study, tmp_path):
    paths = write_phantom_study(tmp_path, study.patient, study.spect, spect_units="counts", write_seg=False)
    nm = pydicom.dcmread(paths["nm"])
    info = json.loads(paths["json"].read_text())
    rwvm = nm.RealWorldValueMappingSequence[0]
    assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "{counts}"
    counts = nm.pixel_array * rwvm.RealWorldValueSlope + rwvm.RealWorldValueIntercept
    view_s = int(nm.RotationInformationSequence[0].ActualFrameDuration) / 1000.0
    mbq = counts / (info["calibration"]["sensitivity_cps_per_mbq"] * view_s)
    bq_ml = mbq * 1e6 / study.spect.recon.grid.voxel_volume_ml
    truth = study.spect.recon.array
    hot = truth > 0.01 * truth.max()
    np.testing.assert_allclose(bq_ml[hot], truth[hot], rtol=0.005)


def test_seg_holds_the_vois_of_the_truth(study, ct_slices):
    import highdicom as hd

    seg = hd.seg.segread(study.paths["seg"])
    labels = [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()]
    assert labels == list(SEG_VOIS) + [les["name"] for les in study.patient.lesions]
    uids = [ds.SOPInstanceUID for ds in ct_slices]
    number = labels.index("kidney_left") + 1
    mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[number], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(mask[..., 0].astype(bool), study.patient.labels["kidney_left"])


def test_truth_files_hold_maps_labels_and_facts(study):
    truth = np.load(study.paths["npz"])
    p = study.patient
    np.testing.assert_array_equal(truth["activity_bq_per_ml"], p.activity_bq_per_ml.array)
    np.testing.assert_allclose(truth["origin_mm"], p.hu.grid.origin_mm)
    assert truth["label_lumbar_vertebrae"].dtype == bool and truth["label_lesion_1"].any()
    info = json.loads(study.paths["json"].read_text())
    assert info["seed"] == SEED and info["size"] == "small"
    assert info["counts"]["acquired"] == study.spect.total_counts
    assert info["calibration"]["view_duration_s"] == study.spect.view_duration_s
    assert len(info["lesions"]) == len(p.lesions)
    assert info["versions"]["pytomography"]


def test_uids_are_deterministic_per_seed_and_size():
    assert study_uids(1, "small") == study_uids(1, "small")
    assert study_uids(1, "small")["study"] != study_uids(2, "small")["study"]
    assert study_uids(1, "small")["study"] != study_uids(1, "clinical")["study"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_reports_no_errors(study):
    for path in (study.paths["ct"][0], study.paths["nm"], study.paths["seg"]):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


# --- bad input -----------------------------------------------------------------------
def test_bad_requests_are_refused_with_reasons(study, tmp_path):
    with pytest.raises(InputError, match="size"):
        make_virtual_patient(1, "huge")
    with pytest.raises(InputError, match="total_counts"):
        make_virtual_patient(1, "small", total_counts=10)
    with pytest.raises(InputError, match="seed"):
        make_virtual_patient(-1, "small")
    with pytest.raises(InputError, match="spect_units"):
        write_phantom_study(tmp_path, study.patient, study.spect, spect_units="kBq/ml")
    with pytest.raises(InputError, match="spect_units"):
        generate(tmp_path, 1, spect_units="MBq")
    with pytest.raises(InputError, match="subsets"):
        simulate_spect(study.patient, n_subsets=100, n_views=64)


@pytest.mark.slow
def test_clinical_phantom_matches_the_paper_grids(tmp_path):
    paths = generate(tmp_path, 1, "clinical")
    ct = pydicom.dcmread(paths["ct"][0])
    nm = pydicom.dcmread(paths["nm"])
    assert len(paths["ct"]) == 130 and (ct.Rows, ct.Columns) == (512, 512)
    assert (int(nm.NumberOfFrames), nm.Rows, nm.Columns) == (81, 128, 128)
    info = json.loads(paths["json"].read_text())
    for les in info["lesions"]:
        assert 2.0 <= les["nominal_volume_ml"] <= 180.0
