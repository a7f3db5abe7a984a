"""Training data preparation and a tiny training run (the real one lives in models/configs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spectdose.cnn import load_model, predict_on_ct_grid
from spectdose.errors import InputError
from spectdose.training import (
    DATASETS,
    TrainConfig,
    dataset_members,
    model_card,
    prepare_case,
    train,
)

from .dicom_factory import copy_with_zero_activity

TINY_CONFIG = Path(__file__).resolve().parent.parent / "models" / "configs" / "tiny.json"


def test_dataset_splits_are_disjoint_by_patient():
    for version, spec in DATASETS.items():
        splits = [set(spec[s]) for s in ("train", "val", "test")]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2]), version
        members = dataset_members(version)
        assert len({name for _, name, _, _ in members}) == len(members)
    extra = [m for m in dataset_members("v1") if m[3] is not None]
    assert extra and all(split == "test" for split, *_ in extra)


@pytest.fixture(scope="module")
def prepared(small_study, kernel_cache_dir, tmp_path_factory):
    arrays = prepare_case(small_study, kernel_cache=kernel_cache_dir)
    path = tmp_path_factory.mktemp("prepared") / "case.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_prepared_case_is_normalised_and_consistent(prepared):
    _, a = prepared
    shapes = {a[k].shape for k in ("activity", "density", "dvk", "label")}
    assert len(shapes) == 1
    # Activity is a fraction of the total (times the constant): it sums to the constant.
    assert float(a["activity"].sum()) == pytest.approx(1e6, rel=0.02)
    # The label (reference from the truth) and the DVK map (from the SPECT) are of one scale.
    ratio = a["dvk"].sum() / a["label"].sum()
    assert 0.6 < ratio < 1.4
    assert np.all(a["label"] >= 0) and a["total_mbq"] > 0


def test_tiny_training_runs_resumes_and_gives_a_usable_model(prepared, tmp_path, small_study, kernel_cache_dir):
    path, _ = prepared
    cfg = TrainConfig.from_file(TINY_CONFIG)
    summary = train({"train": [path], "val": [path]}, tmp_path, cfg, progress=False)
    history = [row for row in (tmp_path / "losses.csv").read_text().splitlines()[1:]]
    assert len(history) == cfg.epochs and np.isfinite(summary["final_val_loss"])
    assert (tmp_path / "losses.png").is_file() and (tmp_path / "checkpoint.pt").is_file()
    # Resume: asking for more epochs continues from the checkpoint instead of starting over.
    more = dataclasses.replace(cfg, epochs=cfg.epochs + 1)
    summary2 = train({"train": [path], "val": [path]}, tmp_path, more, progress=False)
    assert summary2["epochs_run"] == cfg.epochs + 1
    model = load_model(tmp_path / "tiny.pt", device="cpu")
    card = model_card(summary2, data_version="tiny")
    assert "validation" in card and json.dumps(cfg.network)[:20] in card

    # Fine-tuning starts from given weights (here: no epochs, so it returns them unchanged),
    # and refuses weights of another architecture.
    ft = dataclasses.replace(cfg, init_from=str(tmp_path / "tiny.pt"), rel_loss_weight=0.1, epochs=0)
    train({"train": [path], "val": [path]}, tmp_path / "ft", ft, progress=False)
    tuned = load_model(tmp_path / "ft" / "tiny.pt", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), tuned.net.state_dict().values(), strict=True))
    other = dataclasses.replace(ft, network={**cfg.network, "residual": not cfg.network.get("residual", True)})
    with pytest.raises(InputError, match="network configuration differs"):
        train({"train": [path], "val": [path]}, tmp_path / "ft2", other, progress=False)

    from spectdose.density import hu_to_density
    from spectdose.geometry import Volume
    from spectdose.ingest import load_study
    from spectdose.pipeline import DoseOptions, compute_dose_rate, spect_on_ct_grid

    study = load_study(small_study / "dicom")
    act, _ = spect_on_ct_grid(study, [])
    rho = Volume(hu_to_density(study.ct.array), study.ct.grid, "g/cm3")
    dvk, _ = compute_dose_rate(act, rho, options=DoseOptions(kernel_cache_dir=kernel_cache_dir))
    out = predict_on_ct_grid(model, act, rho, dvk)
    assert out.grid is study.ct.grid and np.all(np.isfinite(out.array)) and np.all(out.array >= 0)
    assert not np.any(out.array[rho.array < 0.1])

    # The command a user runs: `spectdose dose STUDY -o OUT --method cnn --model W`.
    from spectdose.cli import main
    from spectdose.export import read_rtdose

    assert main(["dose", str(small_study / "dicom"), "-o", str(tmp_path / "cnn"), "--method", "cnn",
                 "--model", str(tmp_path / "tiny.pt"), "--kernel-cache", str(kernel_cache_dir)]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "cnn" / "summary.json").read_text())
    assert summary["method"] == "cnn" and read_rtdose(tmp_path / "cnn" / "rtdose.dcm").array.max() > 0
    # No activity in: refused with the network too (issue 8), never a 0 Gy RT Dose.
    zero = copy_with_zero_activity(small_study / "dicom", tmp_path / "zero")
    assert main(["dose", str(zero), "-o", str(tmp_path / "cnn0"), "--method", "cnn",
                 "--model", str(tmp_path / "tiny.pt"), "--kernel-cache", str(kernel_cache_dir)]) == 2  # fmt: skip
    assert not (tmp_path / "cnn0" / "rtdose.dcm").exists()


def test_unknown_training_option_refused(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"name": "x", "epochz": 3}))
    with pytest.raises(InputError, match="epochz"):
        TrainConfig.from_file(f)
