"""Voxel-wise uncertainty of the CNN dose rate: a deep ensemble with a calibrated spread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectdose.cnn.inference import (
    Ensemble,
    Normalisation,
    SigmaCalibration,
    TrainedModel,
    absorbed_dose_with_uncertainty,
    ensemble_mean_sd,
    fit_sigma_calibration,
    load_ensemble,
    load_model,
    predict_on_ct_grid,
    predict_with_uncertainty,
    save_ensemble,
    save_model,
)
from spectdose.cnn.model import TINY, DblurDoseNet
from spectdose.errors import InputError
from spectdose.geometry import Grid, Volume
from spectdose.learning.evaluation import coverage_pct

SPACING = (3.0, 1.953125, 1.953125)


def _member(seed: int, name: str = "m") -> TrainedModel:
    torch.manual_seed(seed)
    net = DblurDoseNet(TINY).eval()
    return TrainedModel(net=net, config=TINY, normalisation=Normalisation(), spacing_mm=SPACING, name=f"{name}{seed}", metadata={})


def _study(zero: bool = False):
    """A CT-grid study at 2x the model's in-plane resolution, with air around a body."""
    grid = Grid((14, 32, 32), (3.0, 0.9765625, 0.9765625), (0.0, 0.0, 0.0))
    rng = np.random.default_rng(0)
    rho = np.full(grid.shape, 1.04, np.float32)
    rho[:, :, :4] = 0.001  # air
    act = np.where(rho > 0.1, rng.gamma(2.0, 5e4, grid.shape), 0.0).astype(np.float32)
    if zero:
        act[:] = 0.0
    dvk = (act * 2e-10).astype(np.float32)
    return Volume(act, grid, "Bq/ml"), Volume(rho, grid, "g/cm3"), Volume(dvk, grid, "Gy/s")


def test_calibration_recovers_the_scale_of_the_true_error():
    rng = np.random.default_rng(1)
    mean = rng.gamma(3.0, 1.0, 40_000)
    sd = 0.05 * mean * rng.uniform(0.5, 1.5, mean.size)
    ref = mean + rng.normal(0.0, 3.0 * sd)  # true errors 3x the members' spread
    cal = fit_sigma_calibration([mean], [sd], [ref], patients=["vpX"])
    assert cal.scale == pytest.approx(3.0, rel=0.15) and cal.rel_floor < 0.05
    assert cal.coverage_1sigma_pct == pytest.approx(68.3, abs=3) and cal.coverage_2sigma_pct == pytest.approx(95.4, abs=2)
    cov = coverage_pct(mean, cal.apply(mean, sd), ref)
    assert cov["within_1sigma_pct"] == pytest.approx(68.3, abs=3) and cov["within_2sigma_pct"] == pytest.approx(95.4, abs=2)
    # A spread that misses the error (identical members) is made up by the relative floor.
    ref2 = mean * (1 + rng.normal(0.0, 0.1, mean.size))
    cal2 = fit_sigma_calibration([mean], [np.zeros_like(mean)], [ref2])
    assert cal2.rel_floor == pytest.approx(0.1, rel=0.2)
    # Uncalibrated (scale 1) the spread would cover far too little: the calibration matters.
    assert coverage_pct(mean, sd, ref)["within_2sigma_pct"] < 60


def test_sigma_is_the_standard_deviation_so_heavy_tailed_errors_keep_their_2_sigma_interval():
    """Dose errors are heavy-tailed: a Gaussian compromise between the +-1 and +-2 sigma targets
    left +-2 sigma covering 87.5 % of the test voxels. sigma is the error's standard deviation."""
    rng = np.random.default_rng(3)
    mean = rng.gamma(3.0, 1.0, 40_000)
    sd = 0.05 * mean * rng.uniform(0.5, 1.5, mean.size)
    ref = mean + rng.laplace(0.0, 2.0 * sd / np.sqrt(2.0))  # Laplace errors, standard deviation 2 x sd
    cal = fit_sigma_calibration([mean], [sd], [ref])
    sigma = cal.apply(mean, sd)
    assert np.mean(((ref - mean) / sigma) ** 2) == pytest.approx(1.0, abs=0.05)
    cov = coverage_pct(mean, sigma, ref)
    assert 93.0 <= cov["within_2sigma_pct"] <= 95.5  # Laplace: 94.1 %
    assert cov["within_1sigma_pct"] > 72.0  # Laplace: 75.7 %, wider than a Gaussian's 68.3 %: the safe side
    assert cal.coverage_2sigma_pct == pytest.approx(cov["within_2sigma_pct"], abs=0.5)


def test_uncertainty_on_the_ct_grid_zero_in_zero_out(tmp_path):
    members = [_member(s) for s in (1, 2, 3)]
    cal = SigmaCalibration(scale=2.0, rel_floor=0.05)
    ens = Ensemble(members=members, calibration=cal, name="ens", metadata={})
    act, rho, dvk = _study()
    mean, sigma = predict_with_uncertainty(ens, act, rho, dvk)
    assert mean.grid is act.grid and sigma.grid is act.grid and sigma.units == mean.units == "Gy/s"
    assert np.all(np.isfinite(sigma.array)) and np.all(sigma.array >= 0) and sigma.array.max() > 0
    air = rho.array < 0.1
    assert not mean.array[air].any() and not sigma.array[air].any()
    # The floor alone bounds sigma from below: 5 % of the mean.
    assert np.all(sigma.array >= 0.05 * mean.array * (1 - 1e-5))
    # Zero activity in: zero dose and zero uncertainty out.
    z_mean, z_sigma = predict_with_uncertainty(ens, *_study(zero=True))
    assert not z_mean.array.any() and not z_sigma.array.any()
    # Identical members: no spread, and the mean is the single model's prediction.
    same = Ensemble(members=[_member(1), _member(1)], calibration=SigmaCalibration(scale=2.0), name="s", metadata={})
    s_mean, s_sigma = predict_with_uncertainty(same, act, rho, dvk)
    assert not s_sigma.array.any()
    np.testing.assert_allclose(s_mean.array, predict_on_ct_grid(members[0], act, rho, dvk).array, rtol=1e-5, atol=1e-12)
    # Linear in activity, like the dose rate: doubling activity doubles mean and sigma.
    d_mean, d_sigma = predict_with_uncertainty(ens, Volume(2 * act.array, act.grid, "Bq/ml"), rho, Volume(2 * dvk.array, dvk.grid, "Gy/s"))
    np.testing.assert_allclose(d_mean.array, 2 * mean.array, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(d_sigma.array, 2 * sigma.array, rtol=1e-4, atol=1e-12)


def test_ensemble_file_round_trip_and_refusals(tmp_path):
    members = [_member(s) for s in (1, 2)]
    cal = SigmaCalibration(scale=1.7, rel_floor=0.02, fitted_on=("vp0151",), coverage_1sigma_pct=67.0, coverage_2sigma_pct=95.0, n_voxels=10)
    path = save_ensemble(tmp_path / "ens.pt", members, cal, name="ens", metadata={"k": 2})
    back = load_ensemble(path, device="cpu")
    assert back.calibration == cal and len(back.members) == 2 and back.metadata == {"k": 2}
    act, rho, dvk = _study()
    a = predict_with_uncertainty(back, act, rho, dvk)
    b = predict_with_uncertainty(Ensemble(members, cal, "ens", {}), act, rho, dvk)
    assert np.array_equal(a[0].array, b[0].array) and np.array_equal(a[1].array, b[1].array)
    with pytest.raises(InputError, match="ensemble"):
        load_model(path)
    with pytest.raises(InputError, match="at least two"):
        save_ensemble(tmp_path / "one.pt", members[:1], cal, name="x", metadata={})
    with pytest.raises(InputError, match="at least two"):
        ensemble_mean_sd([np.ones(3)])


def test_build_ensemble_calibrates_on_validation_cases(tmp_path):
    from spectdose.learning.training import build_ensemble, ensemble_card

    rng = np.random.default_rng(2)
    shape = (12, 16, 16)
    density = np.full(shape, 1.04, np.float32)
    activity = rng.gamma(2.0, 1.0, shape).astype(np.float32)
    dvk = (activity * 0.5).astype(np.float32)
    label = (dvk * rng.normal(1.0, 0.2, shape)).astype(np.float32)
    val = tmp_path / "val.npz"
    np.savez(val, activity=activity, density=density, dvk=dvk, label=label)
    weights = []
    for s in (1, 2, 3):
        m = _member(s)
        weights.append(save_model(tmp_path / f"m{s}.pt", m.net, normalisation=m.normalisation, spacing_mm=SPACING, name=m.name, metadata={}))
    ens = build_ensemble(weights, [val], tmp_path / "ens.pt")
    c = load_ensemble(tmp_path / "ens.pt").calibration
    assert c == ens.calibration and c.fitted_on == ("val",) and c.n_voxels > 0
    assert abs(c.coverage_2sigma_pct - 95.45) < 3 and abs(c.coverage_1sigma_pct - 68.27) < 6
    assert "deep ensemble of 3 members" in ensemble_card(ens)


def test_absorbed_dose_uncertainty_is_linear_in_the_time_integral():
    rate = np.array([0.0, 1e-6, 2e-6], np.float32)
    sigma = np.array([0.0, 1e-7, 3e-7], np.float32)
    dose, s_dose = absorbed_dose_with_uncertainty(rate, sigma, 3.6e5)
    np.testing.assert_allclose(dose, rate * 3.6e5, rtol=1e-6)
    np.testing.assert_allclose(s_dose, sigma * 3.6e5, rtol=1e-6)
    assert dose[0] == 0 and s_dose[0] == 0  # zero in, zero out
    _, s2 = absorbed_dose_with_uncertainty(rate, sigma, 3.6e5, 3.6e4)  # 10 % on tau adds in quadrature
    np.testing.assert_allclose(s2, np.hypot(sigma * 3.6e5, rate * 3.6e4), rtol=1e-6)


def test_dose_with_uncertainty_writes_a_sigma_map_and_region_sigmas(tmp_path, small_study, kernel_cache_dir):
    """`spectdose dose --method cnn --uncertainty`: the ensemble beside the weights gives a second
    Parametric Map (same grid and units, coded as a standard deviation) and a sigma per region;
    without the ensemble, or with DVK, the request is refused naming what supplies it."""
    import json

    import pydicom

    from spectdose.cli import main
    from spectdose.cnn.inference import save_model
    from spectdose.dicom.export import read_dose_rate_map

    weights = tmp_path / "models" / "tiny.pt"
    weights.parent.mkdir()
    member = _member(3)
    save_model(weights, member.net, normalisation=member.normalisation, spacing_mm=member.spacing_mm, name="tiny",
               metadata={})
    common = [str(small_study / "dicom"), "--method", "cnn", "--model", str(weights), "--uncertainty",
              "--kernel-cache", str(kernel_cache_dir)]
    assert main(["dose", *common, "-o", str(tmp_path / "refused")]) == 2  # no tiny_ensemble.pt yet
    assert main(["dose", str(small_study / "dicom"), "--uncertainty", "-o", str(tmp_path / "dvk")]) in (2, 64)

    cal = SigmaCalibration(scale=1.5, rel_floor=0.05, fitted_on=("test",), coverage_1sigma_pct=68.0,
                           coverage_2sigma_pct=95.0, n_voxels=1)
    save_ensemble(weights.with_name("tiny_ensemble.pt"), [_member(1), _member(2)], cal, name="tiny-ens", metadata={})
    out = tmp_path / "out"
    assert main(["dose", *common, "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    unc = summary["uncertainty"]
    assert unc["map"] == "doserate_sigma_pm.dcm" and unc["dose_rate_is"] == "the ensemble mean"
    # the numbers are the ensemble's (members 1 and 2), not the single network's (member 3): so says the provenance
    assert summary["provenance"]["method"] == "CNN (tiny-ens)", summary["provenance"]
    assert summary["provenance"]["model_sha256"] == unc["ensemble_sha256"]
    rate, sigma = read_dose_rate_map(out / "doserate_pm.dcm"), read_dose_rate_map(out / "doserate_sigma_pm.dcm")
    assert sigma.grid.same_as(rate.grid) and sigma.units == rate.units
    assert np.all(sigma.array >= 0) and sigma.array.max() > 0
    # the calibration's floor alone gives sigma >= 5 % of the dose rate wherever there is dose
    hot = rate.array > 0.1 * rate.array.max()
    assert np.all(sigma.array[hot] >= 0.05 * rate.array[hot] * 0.99)
    ds = pydicom.dcmread(out / "doserate_sigma_pm.dcm")
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert "1-sigma" in mapping.LUTExplanation
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "386136009"
    assert ds.SeriesInstanceUID != pydicom.dcmread(out / "doserate_pm.dcm").SeriesInstanceUID
    rows = [r for r in summary["regions"] if r["voxels"] > 0]
    assert rows and all(r["uncertainty_dose_rate_mgy_per_h"] > 0 for r in rows)
    if summary["dose"] is not None:
        factor_h = summary["time"]["integration_factor_h"]
        r = rows[0]
        assert r["uncertainty_gy"] == pytest.approx(r["uncertainty_dose_rate_mgy_per_h"] * factor_h / 1000.0, rel=1e-3)
    assert "uncertainty_dose_rate_mgy_per_h" in (out / "regions.csv").read_text().splitlines()[0]


def test_uncertainty_is_refused_for_dvk_and_for_a_cycle(tmp_path):
    from spectdose.cycle import run_cycle
    from spectdose.pipeline import DoseOptions

    with pytest.raises(InputError, match="needs --method"):
        DoseOptions(uncertainty=True)
    with pytest.raises(InputError, match="give one study"):
        run_cycle([tmp_path / "a", tmp_path / "b"], tmp_path / "out", DoseOptions(method="cnn", uncertainty=True))


def test_members_sharing_a_recovery_setting_share_one_deconvolution(monkeypatch, kernel_cache_dir):
    """The RL-recovered DVK input costs seconds at clinical size: once per ensemble, same dose as once per member."""
    import dataclasses

    import spectdose.cnn.recovery as recovery

    cfg = dataclasses.replace(TINY, inputs=("activity", "density", "dvk_rr"), recovery={"fwhm_mm": 10.0, "iterations": 2, "smooth_mm": 5.0})
    members = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        net = DblurDoseNet(cfg).eval()
        members.append(TrainedModel(net=net, config=cfg, normalisation=Normalisation(), spacing_mm=SPACING, name=f"rr{seed}", metadata={}))
    ens = Ensemble(members=members, calibration=SigmaCalibration(scale=2.0), name="rr", metadata={})
    act, rho, dvk = _study()
    calls = []
    real = recovery.recovered_dvk
    monkeypatch.setattr(recovery, "recovered_dvk", lambda *a, **k: calls.append(1) or real(*a, **k))
    mean, _ = predict_with_uncertainty(ens, act, rho, dvk, kernel_cache_dir=kernel_cache_dir)
    assert len(calls) == 1
    each = [predict_on_ct_grid(m, act, rho, dvk, kernel_cache_dir=kernel_cache_dir).array for m in members]
    assert len(calls) == 4
    np.testing.assert_allclose(mean.array, np.mean(each, axis=0), rtol=1e-4, atol=1e-12)


def test_calibration_ignores_voxels_the_network_zeroes_but_counts_them_in_the_coverage():
    """Below 0.1 g/cm3 the estimate and its spread are 0 while the reference may carry dose."""
    rng = np.random.default_rng(2)
    mean = rng.gamma(3.0, 1.0, 20_000)
    sd = 0.05 * mean * rng.uniform(0.5, 1.5, mean.size)
    ref = mean + rng.normal(0.0, 2.0 * sd)
    mean[:50], sd[:50], ref[:50] = 0.0, 0.0, 2.0  # zeroed by the network, hot in the reference
    cal = fit_sigma_calibration([mean], [sd], [ref])  # raised "zero on every calibration voxel" before
    assert cal.scale == pytest.approx(2.0, rel=0.2)
    assert cal.coverage_2sigma_pct == pytest.approx(95.4, abs=2)
