"""Training data preparation and a tiny training run (the real one lives in models/configs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spectdose.cnn.inference import load_model, predict_on_ct_grid
from spectdose.errors import InputError
from spectdose.learning.training import (
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
    # a subset names the patients it used, not the whole version's
    sub = model_card(summary2, data_version="v2", patients={"train": ["vp2001", "vp2002"], "val": ["vp2101"], "test": ["vp2201"]})
    assert "train ['vp2001', 'vp2002'], validation ['vp2101']" in sub and "2040" not in sub

    # Fine-tuning starts from given weights (here: no epochs, so it returns them unchanged),
    # and refuses weights of another architecture.
    ft = dataclasses.replace(cfg, init_from=str(tmp_path / "tiny.pt"), rel_loss_weight=0.1, epochs=0)
    train({"train": [path], "val": [path]}, tmp_path / "ft", ft, progress=False)
    tuned = load_model(tmp_path / "ft" / "tiny.pt", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), tuned.net.state_dict().values(), strict=True))
    other = dataclasses.replace(ft, network={**cfg.network, "residual": not cfg.network.get("residual", True)})
    with pytest.raises(InputError, match="network configuration differs"):
        train({"train": [path], "val": [path]}, tmp_path / "ft2", other, progress=False)

    from spectdose.pipeline import network_inputs

    act, rho, dvk = network_inputs(small_study / "dicom", kernel_cache_dir)
    out = predict_on_ct_grid(model, act, rho, dvk)
    assert out.grid is act.grid and np.all(np.isfinite(out.array)) and np.all(out.array >= 0)
    assert not np.any(out.array[rho.array < 0.1])

    # The command a user runs: `spectdose dose STUDY -o OUT --method cnn --model W`.
    from spectdose.cli import main
    from spectdose.dicom.export import read_rtdose

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


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_gives_the_uninterrupted_result(prepared, tmp_path, small_study, kernel_cache_dir):
    """`spectdose train --resume RUN_DIR` after a sitting cut short (max_minutes 0: one epoch
    per sitting) ends with the weights, optimiser state and losses of one uninterrupted run."""
    path, _ = prepared
    cfg = dataclasses.replace(TrainConfig.from_file(TINY_CONFIG), epochs=2, steps_per_epoch=3, val_patches=2)
    whole = train({"train": [path], "val": [path]}, tmp_path / "whole", cfg, progress=False)

    # The same through the command line, with the data set folder a user has.
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split).mkdir(parents=True)
        (data / split / "vp0008").symlink_to(small_study)
        (data / "prepared" / split).mkdir(parents=True)
        (data / "prepared" / split / "vp0008.npz").write_bytes(path.read_bytes())  # already prepared
    (data / "manifest.json").write_text(json.dumps({"version": "tiny", "members": []}))
    cfg_file = tmp_path / "cut.json"
    cfg_file.write_text(json.dumps({**dataclasses.asdict(cfg), "max_minutes": 0}))
    from spectdose.cli import main

    run = tmp_path / "run"
    common = ["--kernel-cache", str(kernel_cache_dir)]
    assert main(["train", "--data", str(data), "--config", str(cfg_file), "-o", str(run), *common]) == 0
    assert _state(run / "checkpoint.pt")["epoch"] == 1
    assert main(["train", "--resume", str(run), *common]) == 0
    a, b = _state(tmp_path / "whole" / "checkpoint.pt"), _state(run / "checkpoint.pt")
    assert b["epoch"] == 2 and b["best_epoch"] == a["best_epoch"]
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert all(torch.equal(x, y) for x, y in zip(a["opt"]["state"][0].values(), b["opt"]["state"][0].values(), strict=True))
    assert json.loads((run / "run.json").read_text())["data"] == str(data.resolve())
    shipped = load_model(run / "tiny.pt", device="cpu")
    assert shipped.metadata["selected_epoch"] == whole["selected_epoch"]
    # Atomic writes leave no temporary files behind.
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    # A run folder of another architecture is refused, not silently mixed.
    other = dataclasses.replace(cfg, network={**cfg.network, "residual": False})
    with pytest.raises(InputError, match="network configuration differs"):
        train({"train": [path], "val": [path]}, run, dataclasses.replace(other, epochs=3), progress=False)
    assert main(["train", "--resume", str(tmp_path / "nothing"), *common]) == 2  # refused, stated


def test_sampling_favours_lesions_edges_and_marrow(prepared):
    from spectdose.learning.training import REGION_EDGE, REGION_LESION, REGION_MARROW, _PatchSampler

    path, arrays = prepared
    regions = arrays["regions"]
    share = {name: float(np.mean(regions & bit > 0)) for name, bit in
             (("lesion", REGION_LESION), ("edge", REGION_EDGE), ("marrow", REGION_MARROW))}  # fmt: skip
    assert all(0 < v < 0.2 for v in share.values()), share

    def centre_shares(sampling: dict) -> dict:
        cfg = dataclasses.replace(TrainConfig.from_file(TINY_CONFIG), sampling=sampling)
        sampler = _PatchSampler([path], cfg, np.random.default_rng(0), 11)
        centres = [sampler.centre(0)[1] for _ in range(3000)]
        flags = np.array([regions[c] for c in centres])
        return {name: float(np.mean(flags & bit > 0)) for name, bit in
                (("lesion", REGION_LESION), ("edge", REGION_EDGE), ("marrow", REGION_MARROW))}  # fmt: skip

    uniform = centre_shares({"uniform": 1.0})
    weighted = centre_shares(TrainConfig.from_file(TINY_CONFIG).sampling)
    for name in share:
        assert uniform[name] == pytest.approx(share[name], abs=0.03)  # uniform: the volume share
        assert weighted[name] >= max(3 * share[name], 0.1), (name, weighted, share)
    # Low-dose tissue (marrow is in it) is what plain dose-weighted sampling never reaches.
    dose = centre_shares({"dose": 1.0})
    assert dose["marrow"] < 0.5 * weighted["marrow"]


def test_intensity_augmentation_scales_activity_dvk_and_label_together(prepared):
    from spectdose.learning.training import _PatchSampler

    path, _ = prepared
    base = TrainConfig.from_file(TINY_CONFIG)
    plain = dataclasses.replace(base, augment={"flip_x": 0.0, "flip_y": 0.0, "intensity_scale": None})
    scaled = dataclasses.replace(base, augment={"flip_x": 0.0, "flip_y": 0.0, "intensity_scale": [3.0, 3.0]})
    (i0, d0, l0), (i1, d1, l1) = (_PatchSampler([path], c, np.random.default_rng(5), 11).sample() for c in (plain, scaled))
    assert float(l0.abs().sum()) > 0
    assert torch.allclose(i1[:, 0], 3 * i0[:, 0]) and torch.equal(i1[:, 1], i0[:, 1])
    assert torch.allclose(d1, 3 * d0) and torch.allclose(l1, 3 * l0)
    with pytest.raises(InputError, match="sampling"):
        dataclasses.replace(base, sampling={"bones": 1.0}).check()


@pytest.mark.parametrize("variant", ["dblurdosenet_no_residual", "dblurdosenet_2d"])
def test_ablation_configs_train_with_the_same_recipe(variant, prepared, tmp_path):
    configs = TINY_CONFIG.parent
    main_cfg = json.loads((configs / "dblurdosenet_v2.json").read_text())
    cfg_json = json.loads((configs / f"{variant}.json").read_text())
    differs = {k for k in main_cfg if main_cfg[k] != cfg_json.get(k)}
    assert differs == {"name", "network"}, differs  # the ablation changes the network only
    # The same code path at a tiny size.
    tiny = TrainConfig.from_file(TINY_CONFIG)
    network = {**tiny.network, **{k: cfg_json["network"][k] for k in ("stem", "residual")}}
    cfg = dataclasses.replace(tiny, name=variant, network=network, epochs=1, steps_per_epoch=2, val_patches=2)
    path, _ = prepared
    train({"train": [path], "val": [path]}, tmp_path, cfg, progress=False)
    model = load_model(tmp_path / f"{variant}.pt", device="cpu")
    assert model.config.stem == cfg_json["network"]["stem"] and model.config.residual == cfg_json["network"]["residual"]
