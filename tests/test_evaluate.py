"""`spectdose evaluate`: the per-VOI metrics other tools read, on a small virtual patient."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from spectdose.cli import main
from spectdose.learning.evaluation import METRIC_COLUMNS, voi_metrics

from .conftest import SMALL_STUDY_SEED

REQUIRED = "patient,voi,method,mean_error_pct,nrmse_pct,dr10_error_pct,dr30_error_pct,dr70_error_pct,dr90_error_pct"


def test_metrics_are_the_papers_absolute_percentages():
    rng = np.random.default_rng(0)
    ref = rng.gamma(2.0, 1.0, size=(8, 8, 8))
    mask = np.ones(ref.shape, bool)
    assert all(v == 0 for v in voi_metrics(ref, ref, mask).values())
    m = voi_metrics(0.8 * ref, ref, mask)  # 20 % low everywhere
    assert m["mean_error_pct"] == pytest.approx(20) and m["signed_mean_error_pct"] == pytest.approx(-20)
    assert m["nrmse_pct"] == pytest.approx(20) and m["dr30_error_pct"] == pytest.approx(20)


def test_evaluate_writes_metrics_for_every_voi_of_a_phantom(small_study, kernel_cache_dir, tmp_path):
    out = tmp_path / "eval"
    # no weights in the models folder: DVK alone
    assert main(["evaluate", str(small_study), "-o", str(out), "--models-dir", str(tmp_path / "none"),
                 "--kernel-cache", str(kernel_cache_dir)]) == 0  # fmt: skip
    with (out / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        assert set(REQUIRED.split(",")) <= set(reader.fieldnames) and reader.fieldnames == METRIC_COLUMNS
        rows = list(reader)
    vois = {r["voi"] for r in rows}
    assert {"healthy_liver", "lesion_1", "kidney_left", "kidney_right", "spleen"} <= vois
    assert {r["method"] for r in rows} == {"dvk"} and {r["patient"] for r in rows} == {f"vp{SMALL_STUDY_SEED:04d}"}
    errors = {r["voi"]: float(r["mean_error_pct"]) for r in rows}
    assert all(np.isfinite(v) and v >= 0 for v in errors.values())
    # DVK on the SPECT is close to the reference in a large, smooth organ
    assert errors["healthy_liver"] < 15
    assert (out / "metrics.md").read_text().startswith("| VOI group")
    assert (out / "profiles.png").stat().st_size > 0 and (out / "drvh.png").stat().st_size > 0


def test_lesion_volume_bins_cover_half_to_two_hundred_ml():
    from spectdose.learning.evaluation import lesion_volume_table

    rows = [
        {"voi": f"lesion_{i}", "method": m, "voi_ml": v, "mean_error_pct": e, "nrmse_pct": 2 * e, "signed_mean_error_pct": -e}
        for i, (v, e) in enumerate([(0.3, 50.0), (0.7, 40.0), (1.5, 20.0), (30.0, 10.0), (150.0, 4.0), (250.0, 2.0)])
        for m, e in (("dvk", e), ("cnn", e / 2))
    ] + [{"voi": "spleen", "method": "dvk", "voi_ml": 150.0, "mean_error_pct": 9.0, "nrmse_pct": 9.0, "signed_mean_error_pct": 9.0}]
    table = lesion_volume_table(rows)
    got = {(r["volume_bin"], r["method"]): r for r in table}
    assert got[("0.5-2 ml", "dvk")]["n"] == 2 and got[("0.5-2 ml", "dvk")]["mean_error_pct"] == 30.0
    assert got[("0.5-2 ml", "cnn")]["mean_error_pct"] == 15.0
    assert {b for b, _ in got} == {"<0.5 ml", "0.5-2 ml", "20-50 ml", "50-200 ml", ">=200 ml"}  # spleen is no lesion
    assert [r["volume_bin"] for r in table][:2] == ["<0.5 ml", "<0.5 ml"] and table[0]["method"] == "dvk"


def test_evaluate_with_ablations_and_an_ensemble(small_study, kernel_cache_dir, tmp_path):
    """Ablation rows appear when their weights exist; an ensemble beside the CNN adds its mean,
    its coverage (voxels and VOI means) and a sigma band."""
    import torch

    from spectdose.cnn.inference import (
        Normalisation,
        SigmaCalibration,
        TrainedModel,
        save_ensemble,
        save_model,
    )
    from spectdose.cnn.model import TINY, DblurDoseNet, NetworkConfig
    from spectdose.learning.evaluation import evaluate

    models = tmp_path / "models"
    members = []
    COARSE_MM = (6.0, 3.90625, 3.90625)  # noqa: N806 - a coarse model grid keeps the test quick
    # The 2D ablation (no stem, pack by pack) stands for both: the no-residual one takes the
    # CNN's code path, which the training tests cover.
    two_d = NetworkConfig(**{**TINY.to_dict(), "stem": "none", "stem_channels": (2, 4, 4)})
    for name, cfg in (("dblurdosenet", TINY), ("dblurdosenet_2d", two_d)):
        torch.manual_seed(len(name))
        net = DblurDoseNet(cfg).eval()
        save_model(models / f"{name}.pt", net, normalisation=Normalisation(), spacing_mm=COARSE_MM, name=name, metadata={})
    for seed in (1, 2):
        torch.manual_seed(seed)
        members.append(TrainedModel(DblurDoseNet(TINY).eval(), TINY, Normalisation(), COARSE_MM, f"m{seed}", {}))
    save_ensemble(models / "dblurdosenet_ensemble.pt", members, SigmaCalibration(scale=3.0, rel_floor=0.2), name="dblurdosenet_ensemble", metadata={})
    names = {"cnn": "dblurdosenet", "cnn_no_residual": "dblurdosenet_no_residual", "cnn_2d": "dblurdosenet_2d"}  # no_residual absent
    result = evaluate([small_study], tmp_path / "eval", models={k: models / f"{v}.pt" for k, v in names.items()},
                      kernel_cache=kernel_cache_dir)  # fmt: skip
    out = tmp_path / "eval"
    assert set(result["methods"]) == {"dvk", "cnn", "cnn_2d", "cnn_ensemble"}  # weights missing: no row
    assert {r["method"] for r in result["rows"]} == set(result["methods"])
    unc = list(csv.DictReader((out / "uncertainty.csv").open()))
    assert [r["scope"] for r in unc] == ["voxels > 10 % of max", "VOI means"]
    for r in unc:
        assert 0 <= float(r["within_1sigma_pct"]) <= float(r["within_2sigma_pct"]) <= 100 and int(r["n"]) > 0
    lv = list(csv.DictReader((out / "lesion_volume.csv").open()))
    assert lv and {r["method"] for r in lv} == set(result["methods"])
    md = (out / "metrics.md").read_text()
    assert "Lesion errors by volume" in md and "Uncertainty of `dblurdosenet_ensemble`" in md and "cnn_2d" in md
    assert (out / "lesion_volume.png").stat().st_size > 0 and (out / "profiles.png").stat().st_size > 0


def test_profiles_show_different_patients():
    from types import SimpleNamespace

    from spectdose.learning.evaluation import one_per_patient

    cases = [SimpleNamespace(patient=p) for p in ("vp0201", "vp0201", "vp0201", "vp0202", "vp0203", "vp0204")]
    picked = one_per_patient([(c, i) for i, c in enumerate(cases)])
    assert [c.patient for c, _ in picked] == ["vp0201", "vp0202", "vp0203"] and [i for _, i in picked] == [0, 3, 4]


def test_evaluate_compares_another_network_given_by_name(small_study, kernel_cache_dir, tmp_path):
    """`--also cnn_v1=W.pt` puts an older network's rows beside the current one's (e.g. v1 vs v2)."""
    import torch

    from spectdose.cnn.inference import Normalisation, save_model
    from spectdose.cnn.model import TINY, DblurDoseNet

    torch.manual_seed(3)
    weights = tmp_path / "old.pt"
    save_model(weights, DblurDoseNet(TINY).eval(), normalisation=Normalisation(), spacing_mm=(6.0, 3.90625, 3.90625), name="old", metadata={})
    out = tmp_path / "eval"
    common = ["--models-dir", str(tmp_path / "none"), "--kernel-cache", str(kernel_cache_dir)]
    # a name that would hide a built-in method, or a missing file, is refused before any work
    assert main(["evaluate", str(small_study), "-o", str(out), *common, "--also", f"dvk={weights}"]) != 0
    assert main(["evaluate", str(small_study), "-o", str(out), *common, "--also", f"cnn_v1={tmp_path / 'no.pt'}"]) != 0
    assert not (out / "metrics.csv").exists()
    assert main(["evaluate", str(small_study), "-o", str(out), *common, "--also", f"cnn_v1={weights}", "--dvk-rr"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["method"] for r in rows} == {"dvk", "dvk-rr", "cnn_v1"}
    # lesions are split at the paper's 4 ml (issue 17)
    md = (out / "metrics.md").read_text().splitlines()
    assert any(line.startswith(("| lesions >= 4 ml | cnn_v1 |", "| lesions < 4 ml | cnn_v1 |")) for line in md)


# Noise spheres (issue 17): the paper's "uniform background VOI" inside the healthy liver.
SPACING_MM = (3.0, 2.5, 2.5)


def _liver_with_lesion(shape=(30, 48, 48), semi_mm=(40.0, 55.0, 55.0), hole_mm=8.0) -> np.ndarray:
    """An ellipsoid with a spherical hole (a lesion) at its centre, on an anisotropic grid."""
    z, y, x = (np.arange(n)[(slice(None),) + (None,) * (2 - a)] * s for a, (n, s) in enumerate(zip(shape, SPACING_MM, strict=True)))
    cz, cy, cx = ((n - 1) * s / 2 for n, s in zip(shape, SPACING_MM, strict=True))
    inside = ((z - cz) / semi_mm[0]) ** 2 + ((y - cy) / semi_mm[1]) ** 2 + ((x - cx) / semi_mm[2]) ** 2 <= 1
    return inside & ((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 > hole_mm**2)


def _depth_mm(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(np.pad(mask, 1), sampling=SPACING_MM)[1:-1, 1:-1, 1:-1]


def test_noise_spheres_keep_clear_of_edges_and_lesions_and_never_overlap():
    from spectdose.learning.noise_voi import place_spheres

    mask = _liver_with_lesion()
    spheres = place_spheres(mask, SPACING_MM, n=3, radius_mm=10.0, margin_mm=10.0)
    assert spheres.count == 3 and spheres.shortfall() is None
    depth = _depth_mm(mask)
    grid_mm = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(mask.shape, SPACING_MM, strict=True)), indexing="ij"), -1)
    centres_mm = [np.asarray(c) * SPACING_MM for c in spheres.centres_vox]
    for k, (c, sphere) in enumerate(zip(centres_mm, spheres.masks(), strict=True)):
        assert depth[spheres.centres_vox[k]] >= 20.0  # radius + margin from the rim and the lesion
        assert sphere.any() and not (sphere & ~mask).any()
        assert depth[sphere].min() >= 10.0 - 1e-6  # every voxel one margin inside
        # the whole ball is labelled: no later sphere took voxels of an earlier one
        assert sphere.sum() == (np.linalg.norm(grid_mm - c, axis=-1) <= 10.0).sum()
    for i in range(3):
        for j in range(i):
            assert np.linalg.norm(centres_mm[i] - centres_mm[j]) > 20.0
    # deterministic: the same region (another copy) gives the same spheres
    again = place_spheres(mask.copy(), SPACING_MM)
    assert again.centres_vox == spheres.centres_vox and np.array_equal(again.labels, spheres.labels)
    # the array's border counts as outside: a region filling the whole array keeps clear of it
    full = place_spheres(np.ones((24, 40, 40), bool), SPACING_MM)
    assert full.count >= 1 and _depth_mm(np.ones((24, 40, 40), bool))[full.union].min() >= 10.0 - 1e-6


def test_too_small_a_region_gets_no_sphere_and_says_why():
    from spectdose.errors import InputError
    from spectdose.learning.noise_voi import place_spheres

    small = _liver_with_lesion(semi_mm=(18.0, 25.0, 25.0), hole_mm=0.0)  # deepest point ~18 mm < 20 mm
    spheres = place_spheres(small, SPACING_MM)
    assert spheres.count == 0 and not spheres.union.any()
    assert spheres.shortfall().startswith("0 of 3 spheres") and "deepest point" in spheres.shortfall()
    assert place_spheres(np.zeros((5, 5, 5), bool), SPACING_MM).count == 0
    # some fit, not all: the count says so
    many = place_spheres(_liver_with_lesion(), SPACING_MM, n=50)
    assert 3 <= many.count < 50 and many.shortfall().startswith(f"{many.count} of 50")
    with pytest.raises(InputError):
        place_spheres(small, (3.0, 0.0, 2.5))


def _edge_noisy_realisations(mask: np.ndarray, m: int = 3) -> list[dict[str, np.ndarray]]:
    """Dose rates uniform inside the region (1 % noise) but 30 % noisy in an 8 mm rim, as edge
    blur and lesion spill-in make them."""
    rng = np.random.default_rng(4)
    sd = np.where(_depth_mm(mask) < 8.0, 0.3, 0.01)
    return [{"dvk": 1.0 + sd * rng.standard_normal(mask.shape), "cnn": 1.0 + 0.5 * sd * rng.standard_normal(mask.shape)} for _ in range(m)]


def test_noise_in_the_spheres_leaves_out_the_noisy_rim():
    from spectdose.learning.evaluation import noise_rows_for, summary_table

    mask = _liver_with_lesion()
    rows, note = noise_rows_for("vp9001", _edge_noisy_realisations(mask), {"healthy_liver": mask}, SPACING_MM)
    assert note is None
    got = {(r["voi"], r["method"]): r for r in rows}
    assert set(got) == {(v, m) for v in ("healthy_liver", "liver_spheres") for m in ("dvk", "cnn")}
    sph, whole = got[("liver_spheres", "dvk")], got[("healthy_liver", "dvk")]
    assert sph["spheres"] == 3 and sph["sphere_radius_mm"] == 10.0 and whole["spheres"] is None
    assert sph["ensemble_noise_pct"] == pytest.approx(1.0, rel=0.1)  # the uniform interior's noise
    assert whole["ensemble_noise_pct"] > 5 * sph["ensemble_noise_pct"]
    # the same rows from the healthy liver's voxels alone (what `evaluate` keeps of each study)
    within = [{m: v[mask] for m, v in r.items()} for r in _edge_noisy_realisations(mask)]
    assert noise_rows_for("vp9001", within, {"healthy_liver": mask}, SPACING_MM) == (rows, note)
    metric = {"patient": "vp9001", "voi": "healthy_liver", "method": "dvk", "voi_ml": 100.0, **{k: 1.0 for k in METRIC_COLUMNS[3:9]}}
    md = summary_table([metric], rows)
    assert "| vp9001 | liver_spheres (3 x 10 mm) | dvk | 0.99 | 3 |" in md and "| vp9001 | healthy_liver | dvk |" in md


def test_evaluate_writes_sphere_noise_and_says_when_none_fit(tmp_path, monkeypatch):
    """`evaluate` with two realisations per patient: noise.csv holds healthy-liver and sphere rows
    on the study's own spacing; a liver too small for any sphere is named in metrics.md.
    (Methods and reference are stubbed: the methods' own tests cover them.)"""
    from types import SimpleNamespace

    import spectdose.learning.evaluation as ev
    import spectdose.reference
    from spectdose.geometry import Grid, Volume

    livers = {"vp9001": _liver_with_lesion(), "vp9002": _liver_with_lesion(semi_mm=(18.0, 25.0, 25.0), hole_mm=0.0)}
    noisy = {p: _edge_noisy_realisations(m, 2) for p, m in livers.items()}
    grid = Grid(livers["vp9001"].shape, SPACING_MM, (0.0, 0.0, 0.0))

    def case(path):
        patient, realisation = str(path).split("-")
        ones = Volume(np.ones(grid.shape, np.float32), grid, "Bq/ml")
        return SimpleNamespace(path=path, patient=patient, realisation=int(realisation), labels={"healthy_liver": livers[patient]},
                               activity_true=ones, density_true=ones)  # fmt: skip

    monkeypatch.setattr(ev, "load_phantom_case", case)
    monkeypatch.setattr(spectdose.reference, "reference_dose_rate", lambda a, d, **_: (Volume(np.ones(grid.shape), grid, "Gy/s"), None))
    monkeypatch.setattr(ev, "_method_dose_rates", lambda c, *_: (noisy[c.patient][c.realisation], None))
    monkeypatch.setattr(ev, "_plot", lambda *_: None)
    result = ev.evaluate(["vp9001-0", "vp9001-1", "vp9002-0", "vp9002-1"], tmp_path)
    noise = list(csv.DictReader((tmp_path / "noise.csv").open()))
    assert {(r["patient"], r["voi"]) for r in noise} == {("vp9001", "healthy_liver"), ("vp9001", "liver_spheres"), ("vp9002", "healthy_liver")}
    sph = next(r for r in noise if r["voi"] == "liver_spheres" and r["method"] == "dvk")
    assert sph["spheres"] == "3" and float(sph["sphere_radius_mm"]) == 10.0 and sph["realisations"] == "2"
    md = (tmp_path / "metrics.md").read_text()
    assert "liver_spheres (3 x 10 mm)" in md and "Note: vp9002: healthy liver: 0 of 3 spheres" in md
    assert len(result["noise_notes"]) == 1 and result["noise_notes"][0].startswith("vp9002")


def _rows(method: str, errors: dict[str, tuple[float, float]]) -> list[dict]:
    """Metric rows of one method: per VOI (name, ml) its (mean error %, NRMSE %)."""
    vois = {"lesion_1": 10.0, "lesion_2": 1.5, "kidney_left": 150.0, "healthy_liver": 1500.0, "spleen": 200.0, "lumbar_vertebrae": 80.0}
    return [{"patient": "vp2301", "voi": voi, "method": method, "mean_error_pct": errors[voi][0], "nrmse_pct": errors[voi][1], "voi_ml": ml}
            for voi, ml in vois.items()]  # fmt: skip


def test_acceptance_holds_the_cnn_to_the_papers_margins_on_lesions_of_4_ml_and_up_and_kidneys():
    from spectdose.learning.evaluation import acceptance

    dvk = {"lesion_1": (20.0, 30.0), "lesion_2": (60.0, 70.0), "kidney_left": (20.0, 25.0), "healthy_liver": (3.0, 25.0),
           "spleen": (10.0, 20.0), "lumbar_vertebrae": (12.0, 35.0)}  # fmt: skip
    # lesions >= 4 ml -60 % / -20 %; kidneys -70 % / -12 %; the rest a little better; the 1.5 ml lesion worse (not judged)
    good = {"lesion_1": (8.0, 24.0), "lesion_2": (65.0, 75.0), "kidney_left": (6.0, 22.0), "healthy_liver": (2.9, 24.9),
            "spleen": (9.0, 19.0), "lumbar_vertebrae": (11.0, 34.0)}  # fmt: skip
    noise = [{"patient": "vp2301", "voi": "liver_spheres", "method": m, "ensemble_noise_pct": v} for m, v in (("dvk", 10.0), ("cnn", 8.0))]
    checks = acceptance(_rows("dvk", dvk) + _rows("cnn", good), noise, method="cnn")
    assert all(c["passed"] for c in checks), checks
    by = {c["criterion"]: c for c in checks}
    assert by["lesions >= 4 ml: mean error vs DVK"]["value"] == pytest.approx(-60.0)
    assert by["kidneys: NRMSE vs DVK"]["value"] == pytest.approx(-12.0)

    # kidneys better than DVK but short of the paper's -66 %: the criterion fails
    short = {**good, "kidney_left": (10.0, 22.0)}
    by = {c["criterion"]: c for c in acceptance(_rows("dvk", dvk) + _rows("cnn", short), noise, method="cnn")}
    assert by["kidneys: mean error vs DVK"]["passed"] is False and by["kidneys: NRMSE vs DVK"]["passed"] is True
    # more noise than DVK fails; no noise rows cannot pass
    louder = [dict(r, ensemble_noise_pct=12.0) if r["method"] == "cnn" else r for r in noise]
    noise_check = [c for c in acceptance(_rows("dvk", dvk) + _rows("cnn", good), louder, method="cnn") if "noise" in c["criterion"]]
    assert noise_check[0]["passed"] is False
    assert [c["passed"] for c in acceptance(_rows("dvk", dvk) + _rows("cnn", good), method="cnn") if "noise" in c["criterion"]] == [None]


def test_acceptance_of_an_ensemble_needs_its_2_sigma_coverage_between_90_and_98_percent():
    from spectdose.learning.evaluation import acceptance

    same = {v: (10.0, 20.0) for v in ("lesion_1", "lesion_2", "kidney_left", "healthy_liver", "spleen", "lumbar_vertebrae")}
    rows = _rows("dvk", same) + _rows("cnn_ensemble", same)

    def coverage(*pairs):
        unc = [{"scope": "voxels > 10 % of max", "n": n, "within_2sigma_pct": c} for n, c in pairs]
        unc.append({"scope": "VOI means", "n": 10, "within_2sigma_pct": 100.0})  # not the voxel criterion
        (check,) = [c for c in acceptance(rows, (), unc, method="cnn_ensemble") if "coverage" in c["criterion"]]
        return check

    assert coverage((1000, 95.0), (3000, 91.0))["value"] == pytest.approx(92.0)  # pooled over voxels
    assert coverage((1000, 95.0), (3000, 91.0))["passed"] is True
    assert coverage((1000, 85.0))["passed"] is False and coverage((1000, 99.5))["passed"] is False
    (none,) = [c for c in acceptance(rows, (), (), method="cnn_ensemble") if "coverage" in c["criterion"]]
    assert none["passed"] is None


def test_small_region_bias_rows_tie_a_learned_methods_figure_to_its_weights(tmp_path):
    """bench/small_region_bias.py: DVK pools every evaluation; a network's figure only its own weights'."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("small_region_bias", Path(__file__).parents[1] / "bench" / "small_region_bias.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def write(folder, rows, weights=None):
        folder.mkdir()
        with (folder / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, restval="")
            w.writeheader()
            w.writerows({"patient": f"vp-{folder.name}", "voi": voi, "method": m, "voi_ml": ml, "signed_mean_error_pct": e}
                        for voi, m, ml, e in rows)  # fmt: skip
        if weights:
            (folder / "acceptance.json").write_text(json.dumps({"weights": {k: {"sha256": v} for k, v in weights.items()}}))

    write(tmp_path / "a", [("lesion_1", "dvk", 1.0, -80), ("lesion_1", "cnn", 1.0, -70), ("lesion_2", "dvk", 3.0, -40),
                           ("lesion_3", "dvk", 9.0, -10), ("spleen", "dvk", 1.5, 5), ("lesion_1", "cnn_ensemble", 1.0, -60)],
          {"cnn": "a" * 64, "cnn_ensemble": "e" * 64})  # fmt: skip
    write(tmp_path / "b", [("lesion_1", "dvk", 1.2, -60), ("lesion_1", "cnn", 1.2, -10)])  # no weights named: its cnn is not used
    rows = {(r["lo_ml"], r["method"], r["network"]): r
            for r in mod.bias_rows([(tmp_path / "a", "A"), (tmp_path / "b", "B"), (tmp_path / "a", "A again")])}  # fmt: skip
    assert set(rows) == {(0.0, "dvk", None), (2.0, "dvk", None), (0.0, "cnn", "a" * 12), (0.0, "cnn", "e" * 12)}
    dvk = rows[(0.0, "dvk", None)]
    assert dvk["n"] == 2 and dvk["mean_pct"] == -70 and (dvk["low_pct"], dvk["high_pct"]) == (-78, -62) and dvk["sources"] == {"A": 1, "B": 1}
    assert rows[(0.0, "cnn", "a" * 12)]["mean_pct"] == -70  # B's cnn (-10 %) has no weights to tie it to
    assert rows[(0.0, "cnn", "e" * 12)]["measured_as"] == "cnn_ensemble"
