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
