"""Data set v2: varied virtual patients, drawn per patient, generated resumably.

The range tests work on the parameter draw alone (no image); the generation test makes the
two members of ``v2-tiny`` (coarse grids, ~5 s each) and resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pydicom
import pytest

from spectdose.errors import InputError
from spectdose.learning.training import (
    DATASETS,
    _exclusive,
    dataset_members,
    generate_dataset,
    member_complete,
)
from spectdose.phantoms.spect_sim import PHOTOPEAK_KEV, _psf_sigma_params, _sigma_cm
from spectdose.phantoms.variation import V2_RANGES, draw_settings, make_varied_patient


def _v2_settings():
    seeds = sorted({seed for _, _, seed, _ in dataset_members("v2")})
    return [draw_settings(seed) for seed in seeds]


def test_v1_member_list_is_unchanged():
    # the shipped model was trained on exactly these studies
    expected = [("train", f"vp{s:04d}", s, None) for s in range(101, 109)]
    expected += [("val", "vp0151", 151, None), ("val", "vp0152", 152, None)]
    expected += [("test", "vp0201", 201, None), ("test", "vp0201-r7201", 201, 7201), ("test", "vp0201-r8201", 201, 8201)]
    expected += [("test", "vp0202", 202, None), ("test", "vp0203", 203, None)]
    assert dataset_members("v1") == expected
    assert DATASETS["v1"]["size"] == "clinical"


def test_v2_has_40_training_10_validation_and_a_separate_test_set():
    spec = DATASETS["v2"]
    assert len(spec["train"]) >= 40 and len(spec["val"]) >= 10 and len(spec["test"]) >= 5
    all_seeds = spec["train"] + spec["val"] + spec["test"]
    assert len(set(all_seeds)) == len(all_seeds)
    assert not set(all_seeds) & {s for v in ("v1", "tiny") for k in ("train", "val", "test") for s in DATASETS[v][k]}
    # ensemble noise: >= 3 realisations of >= 2 test patients
    assert sum(len(r) + 1 >= 3 for s, r in spec["test_realisations"].items() if s in spec["test"]) >= 2


def test_v2_draw_covers_the_stated_ranges_over_its_members():
    settings = _v2_settings()
    r = V2_RANGES

    def span(values, lo, hi, near_lo, near_hi):
        values = np.asarray(values, dtype=float)
        assert values.min() >= lo - 1e-9 and values.max() <= hi + 1e-9, (values.min(), values.max())
        assert values.min() <= near_lo and values.max() >= near_hi, (values.min(), values.max())

    span([s.anatomy.body_scale[0] for s in settings], 0.80, 1.25, 0.85, 1.20)
    span([s.anatomy.body_scale[1] for s in settings], 0.75, 1.35, 0.82, 1.28)
    span([s.anatomy.organ_volume_factor[1] for s in settings], 0.5, 2.0, 0.7, 1.8)
    shifts = np.array([xyz for s in settings for _, xyz in s.anatomy.organ_shift_mm])
    assert np.all(np.abs(shifts) <= np.asarray(r["organ_shift_max_mm"])) and np.abs(shifts).max(axis=0).min() > 4.0
    span([s.anatomy.shape_amplitude for s in settings], 0.5, 1.8, 0.7, 1.6)
    span([len(s.anatomy.lesions) for s in settings], 1, 10, 2, 9)
    lesions = [p for s in settings for p in s.anatomy.lesions]
    span([p.volume_ml for p in lesions], 0.5, 200.0, 1.0, 150.0)
    span([p.tumour_to_liver_24h for p in lesions], 2.0, 25.0, 3.0, 18.0)
    assert {p.location for p in lesions} == {"liver", "outside"}
    necrotic = [p for p in lesions if p.necrotic_core_fraction is not None]
    assert 0 < len(necrotic) < len([p for p in lesions if p.volume_ml >= 5.0])
    assert all(p.volume_ml >= 5.0 and 0.0 <= p.necrotic_uptake_fraction <= 0.25 for p in necrotic)
    span([s.hours_after_administration for s in settings], 4.0, 168.0, 8.0, 120.0)
    span([s.total_counts for s in settings], 2e6, 2e7, 3e6, 1.4e7)
    assert {s.n_subsets for s in settings} == {4, 8, 16}
    span([s.n_iters for s in settings], 2, 12, 3, 10)
    assert all(16 <= s.n_iters * s.n_subsets <= 128 for s in settings)
    assert {s.resolution_recovery for s in settings} == {True, False}
    assert len({s.collimator for s in settings}) >= 3
    span([s.intrinsic_fwhm_140kev_mm for s in settings], 3.3, 4.2, 3.5, 4.0)
    span([s.spect_voxel_mm for s in settings], 3.9, 4.8, 4.0, 4.7)
    assert len({s.spect_shape[1] for s in settings}) >= 2 and all(s.spect_shape[1] == s.spect_shape[2] for s in settings)
    span([s.ct_spacing_mm[1] for s in settings], 500.0 / 512.0, 3.0, 1.1, 2.6)
    slices = {s.ct_spacing_mm[0] for s in settings}
    assert min(slices) == 1.25 and max(slices) == 5.0 and len(slices) >= 5
    for s in settings:
        # the SPECT holds the body in-plane; the CT covers the SPECT's axial field and stays under the cap
        assert s.spect_shape[1] * s.spect_voxel_mm >= 2 * (165.0 * s.anatomy.body_scale[0] + 12.0) + 30.0
        assert s.ct_shape[0] * s.ct_spacing_mm[0] >= s.spect_shape[0] * s.spect_voxel_mm - 1e-6
        assert math.prod(s.ct_shape) <= r["ct_max_voxels"]
        assert 370.0 - 5.0 <= s.spect_shape[0] * s.spect_voxel_mm <= 400.0 + 5.0


def test_v2_draw_is_deterministic_per_seed_and_differs_between_seeds():
    assert draw_settings(2001).to_dict() == draw_settings(2001).to_dict()
    assert draw_settings(2001).to_dict() != draw_settings(2002).to_dict()
    with pytest.raises(InputError, match="profile"):
        draw_settings(2001, "huge")


def test_camera_fwhm_varies_with_collimator_and_intrinsic_resolution():
    fwhm_10cm = []
    for collimator in V2_RANGES["collimators"]:
        for intrinsic_mm in V2_RANGES["intrinsic_fwhm_140kev_mm"]:
            psf = _psf_sigma_params(PHOTOPEAK_KEV, collimator, intrinsic_mm / 10.0)
            fwhm_10cm.append(float(_sigma_cm(np.asarray(10.0), psf)) * 10.0 * 2.3548)
    # medium-energy cameras at 208 keV: ~9-12 mm at 10 cm, and the draw spans a real spread
    assert min(fwhm_10cm) > 8.0 and max(fwhm_10cm) < 13.0 and max(fwhm_10cm) - min(fwhm_10cm) > 1.5


def test_uptake_pattern_follows_the_time_point():
    settings = dataclasses.replace(draw_settings(2003, "tiny"), hours_after_administration=4.0)
    early, tissue_k, lesion_k = make_varied_patient(settings)
    assert early.hours_after_administration == pytest.approx(4.0, abs=1e-3)
    c4 = early.uptake_bq_per_ml
    # the same patient at 7 d, by the kinetics the 4 h patient was made with
    c168 = {t: c * float(tissue_k[t].relative(168.0) / tissue_k[t].relative(4.0)) for t, c in c4.items()}
    # 4 h: fast-clearing blood and remainder still high relative to the liver; 7 d: mostly gone
    assert c4["muscle"] / c4["liver"] > 1.2 * c168["muscle"] / c168["liver"]
    assert c168["kidney_cortex"] < c4["kidney_cortex"] and c168["liver"] < c4["liver"]
    # at 4 h the tumours are still taking up (uptake half-lives 3-12 h): below their 24 h level
    assert all(float(k.relative(4.0)) < 1.0 for k in lesion_k)
    les = early.anatomy.lesions
    assert len(les) == len(settings.anatomy.lesions)
    for lesion, k in zip(les, lesion_k, strict=True):
        assert lesion.conc_bq_ml == pytest.approx(lesion.conc_24h_bq_ml * float(k.relative(4.0)))


def test_generation_records_settings_resumes_and_redoes_an_incomplete_member(tmp_path):
    out = tmp_path / "v2tiny"
    messages: list[str] = []
    generate_dataset(out, "v2-tiny", progress=messages.append)
    members = dataset_members("v2-tiny")
    assert len(members) == 2 and sum(m.startswith("generated ") and " s (" in m for m in messages) == 2
    for split, name, seed, noise in members:
        member = out / split / name
        assert member_complete(member, seed, noise)
        meta = json.loads((member / "truth" / "phantom.json").read_text())
        settings = draw_settings(seed, "tiny")
        recorded = {k: v for k, v in meta["variation"].items() if k not in ("system_fwhm_at_100mm_mm", "kinetics")}
        assert recorded == json.loads(json.dumps(settings.to_dict()))
        assert meta["dataset_member"] == {"version": "v2-tiny", "split": split, "name": name}
        assert set(meta["variation"]["kinetics"]["lesions"]) == {d["name"] for d in meta["lesions"]}
        # what was drawn is what was made
        assert meta["grids"]["ct"]["shape"] == list(settings.ct_shape)
        assert meta["grids"]["spect"]["spacing_mm"] == [settings.spect_voxel_mm] * 3
        assert meta["reconstruction"]["n_iters"] == settings.n_iters and meta["counts"]["target"] == settings.total_counts
        assert meta["acquisition"]["collimator"] == settings.collimator
        assert meta["hours_after_administration"] == pytest.approx(settings.hours_after_administration, abs=1e-3)
        assert len(meta["lesions"]) == len(settings.anatomy.lesions)
        assert [d["necrotic"] for d in meta["lesions"]] == [p.necrotic_core_fraction is not None for p in settings.anatomy.lesions]
        nm = pydicom.dcmread(member / "dicom" / "NM" / "NM_SPECT.dcm", stop_before_pixels=True)
        kernel = list(nm.ConvolutionKernel) if nm["ConvolutionKernel"].VM > 1 else [nm.ConvolutionKernel]
        assert ("CDR" in kernel) == settings.resolution_recovery and all(len(v) <= 16 for v in kernel)  # SH
        assert int(nm.RotationInformationSequence[0].NumberOfFramesInRotation) == settings.n_views

    (done_split, done_name, *_), (bad_split, bad_name, bad_seed, _) = members[0], members[1]
    done_json = out / done_split / done_name / "truth" / "phantom.json"
    stamp = done_json.stat().st_mtime_ns
    npz = out / bad_split / bad_name / "truth" / "truth.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])  # a write cut short
    stale = out / "train" / ".vp2001.crashed.partial"
    stale.mkdir()
    assert not member_complete(out / bad_split / bad_name, bad_seed)

    messages.clear()
    generate_dataset(out, "v2-tiny", progress=messages.append)
    assert messages[0].endswith("1 of 2 members complete, 1 to make")
    assert [m.split()[1] for m in messages if m.startswith("generated ")] == [f"{bad_split}/{bad_name}"]
    assert done_json.stat().st_mtime_ns == stamp  # skipped, not rewritten
    assert member_complete(out / bad_split / bad_name, bad_seed) and not stale.exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["name"] for m in manifest["members"]] == [name for _, name, _, _ in members]

    with _exclusive(out), pytest.raises(InputError, match="another"):
        generate_dataset(out, "v2-tiny")


def test_a_limited_subset_takes_the_first_patients_of_each_split_and_rejects_bad_limits():
    full = dataset_members("v2")
    subset = dataset_members("v2", {"train": 3, "test": 1})
    train = [m for m in subset if m[0] == "train"]
    assert train == [m for m in full if m[0] == "train"][:3]
    assert [m for m in subset if m[0] == "val"] == [m for m in full if m[0] == "val"]  # no limit: whole split
    # a test patient keeps its noise realisations (ensemble noise needs them)
    first_test = DATASETS["v2"]["test"][0]
    assert [m for m in subset if m[0] == "test"] == [m for m in full if m[0] == "test" and m[2] == first_test]
    assert len([m for m in subset if m[0] == "test"]) == 1 + len(DATASETS["v2"]["test_realisations"][first_test])
    for bad in ({"training": 3}, {"train": -1}):
        with pytest.raises(InputError, match="SPLIT=N"):
            dataset_members("v2", bad)


def test_fast_path_cases_share_one_projection_and_truth_and_match_the_reference(kernel_cache_dir):
    """Issue 17's training cases: in memory on the model grid, noise realisations that differ only
    in their noise, labels equal to the reference dose rate of the truth on that grid."""
    from spectdose.cnn.recovery import DEFAULT_RECOVERY
    from spectdose.geometry import Volume
    from spectdose.learning.fast_cases import fast_training_cases, model_grid_settings
    from spectdose.reference import reference_dose_rate

    spacing = (7.2, 4.8, 4.8)
    p = fast_training_cases(2003, profile="tiny", spacing_mm=spacing, n_noise=2, recovery=DEFAULT_RECOVERY, kernel_cache=kernel_cache_dir)
    assert p.noise_seeds == [2003, 1_002_003] and len(p.cases) == 2
    a, b = p.cases
    assert a["density"] is b["density"] and a["regions"] is b["regions"]
    # one reference dose rate, normalised by each realisation's own total activity
    np.testing.assert_allclose(a["label"] * a["total_mbq"], b["label"] * b["total_mbq"], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(a["activity"], b["activity"])  # another Poisson draw ...
    assert a["total_mbq"] == pytest.approx(b["total_mbq"], rel=0.05)  # ... of the same counts
    for c in p.cases:
        assert {"activity", "density", "dvk", "dvk_rr", "label", "regions"} <= set(c)
        assert all(c[k].shape == c["label"].shape for k in ("activity", "dvk", "dvk_rr"))
    assert any(k.startswith("kidney") for k in p.vois) and set(p.cpu_s) >= {"osem", "noise_free_projection", "reference_dose_rate"}

    # the label is spectdose.reference on the truth painted on the model grid, normalised as the network's
    patient, _, _ = make_varied_patient(model_grid_settings(draw_settings(2003, "tiny"), spacing))
    ref, _ = reference_dose_rate(patient.activity_bq_per_ml, patient.density_g_cm3, cache_dir=kernel_cache_dir)
    assert isinstance(ref, Volume) and ref.array.shape[0] == a["label"].shape[0]
    # the crop to the body leaves out air only, where the dose rate is 0
    assert float(a["label"].sum(dtype=np.float64)) * float(a["total_mbq"]) / 1e8 == pytest.approx(float(ref.array.sum(dtype=np.float64)), rel=0.01)


@pytest.mark.parametrize("resolution_recovery", [False, True])
def test_the_fast_system_matrix_is_pytomographys_operator(resolution_recovery):
    """The realisations of a patient share a faster system matrix (attenuation computed once per
    view, the rotation's own layout, the blur summed in Fourier space): forward and back
    projections, over all views and over a subset, and the OSEM image equal PyTomography's to
    float32 round-off; a second realisation (caches filled) equals one reconstructed alone."""
    import torch

    from spectdose.phantoms.spect_sim import (
        OsemReconstructor,
        _fft_psf_transform,
        _import_pytomography,
        mu_map_from_hu,
        noise_free_projection,
        noisy_counts,
    )

    s = draw_settings(2001, "tiny")
    patient, _, _ = make_varied_patient(s)
    proj = noise_free_projection(patient, s.n_views, s.collimator, s.intrinsic_fwhm_140kev_mm / 10.0, "cpu")
    counts, _, _ = noisy_counts(proj.rate_views, patient.total_counts_target, 1)
    mu = mu_map_from_hu(patient.hu, patient.spect_grid).array
    psf = proj.psf_sigma_params_cm if resolution_recovery else None
    args = (mu, patient.spect_grid, proj.angles_deg, proj.orbit_radius_mm, psf, "cpu")
    pt = _import_pytomography()
    plain = OsemReconstructor(*args)  # then given PyTomography's own system matrix, as before 2026-12-07
    transforms = [pt.SPECTAttenuationTransform(attenuation_map=torch.from_numpy(np.ascontiguousarray(mu.transpose(2, 1, 0))))]
    if psf is not None:
        transforms.append(_fft_psf_transform(pt.Transform, psf, proj.orbit_radius_mm / 10.0))
    plain.system = pt.SPECTSystemMatrix(obj2obj_transforms=transforms, proj2proj_transforms=[], object_meta=plain.system.object_meta,
                                        proj_meta=plain.system.proj_meta)  # fmt: skip
    fast = OsemReconstructor(*args, cache_attenuation=True)
    plain.system.set_n_subsets(4)
    fast.system.set_n_subsets(4)
    obj = torch.rand(tuple(reversed(patient.spect_grid.shape)), generator=torch.Generator().manual_seed(0))
    for subset in (None, 1):
        theirs, ours = plain.system.forward(obj, subset), fast.system.forward(obj, subset)
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max())
        views = torch.rand(theirs.shape, generator=torch.Generator().manual_seed(1))
        theirs, ours = plain.system.backward(views, subset), fast.system.backward(views, subset)
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max())
    image = plain(counts, 2, 4)
    np.testing.assert_allclose(fast(counts, 2, 4), image, rtol=0, atol=1e-5 * float(image.max()))
    counts2, _, _ = noisy_counts(proj.rate_views, patient.total_counts_target, 2)
    again = OsemReconstructor(*args)(counts2, 2, 4)  # nothing kept: each factor recomputed when needed
    np.testing.assert_array_equal(fast(counts2, 2, 4), again)  # from the caches (attenuation, H^T 1): the same numbers


def test_the_campaign_test_set_is_five_patients_in_three_realisations_never_trained_or_selected_on():
    """Issue 17's fixed test set: >= 5 patients x 3 noise realisations, none of them a patient of
    any training or validation split, the first campaign's or this campaign's."""
    from pathlib import Path

    spec = DATASETS["v2-test"]
    members = dataset_members("v2-test")
    assert spec["size"] == DATASETS["v2"]["size"] and not spec["train"] and not spec["val"]
    per_patient = {seed: [q for _, _, s, q in members if s == seed] for seed in spec["test"]}
    assert len(per_patient) >= 5 and all(len(set(q)) >= 3 for q in per_patient.values())
    used = {s for v in ("v1", "v2", "tiny", "v2-tiny") for k in ("train", "val", "test") for s in DATASETS[v][k]}
    models = Path(__file__).resolve().parents[1] / "models"
    for campaign in ("campaign", "campaign-bn"):
        config = json.loads((models / campaign / "config.json").read_text())
        ledger = json.loads((models / campaign / "ledger.json").read_text())
        used |= set(config["val_seeds"]) | set(ledger["seeds_used"]) | {s for stint in ledger["stints"] for s in stint["seeds"]}
        assert min(spec["test"]) < config["first_seed"]  # the campaign draws upwards from first_seed
    assert not set(spec["test"]) & used


def test_a_patients_realisations_share_one_projection_and_equal_their_studies_made_alone(tmp_path, monkeypatch):
    """Generated together (one projection, one system matrix), each realisation is the same study,
    bit for bit, as when generated on its own."""
    from spectdose.phantoms.variation import generate_varied

    monkeypatch.setitem(
        DATASETS, "tiny-real", {"size": "varied-tiny", "train": [], "val": [], "test": [2001], "test_realisations": {2001: [72001, 82001]}}
    )
    messages: list[str] = []
    generate_dataset(tmp_path / "set", "tiny-real", progress=messages.append)
    generated = [m for m in messages if m.startswith("generated ")]
    assert len(generated) == 1 and all(f"test/{n}" in generated[0] for n in ("vp2001,", "vp2001-r72001", "vp2001-r82001"))
    members = dataset_members("tiny-real")
    assert all(member_complete(tmp_path / "set" / s / n, p, q) for s, n, p, q in members)

    generate_varied(tmp_path / "alone", 2001, "tiny", noise_seed=82001)

    def image(d):
        return pydicom.dcmread(d / "dicom" / "NM" / "NM_SPECT.dcm").pixel_array

    together = image(tmp_path / "set" / "test" / "vp2001-r82001")
    np.testing.assert_array_equal(together, image(tmp_path / "alone"))
    assert not np.array_equal(together, image(tmp_path / "set" / "test" / "vp2001"))  # another noise draw
    meta = json.loads((tmp_path / "set" / "test" / "vp2001-r82001" / "truth" / "phantom.json").read_text())
    assert meta["dataset_member"]["name"] == "vp2001-r82001" and meta["counts"]["noise_seed"] == 82001
