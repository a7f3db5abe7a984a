"""`spectdose evaluate`: the per-VOI metrics other tools read, on a small virtual patient."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from spectdose.cli import main
from spectdose.evaluate import METRIC_COLUMNS, voi_metrics

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
