"""The training campaign (issue 17): stints that resume, new seeds, kill-safety, installation only
on improvement; the snapshot ensemble the campaign keeps for the uncertainty; the recovered-DVK
input channel at inference; Richardson-Lucy recovery."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

TINY_CAMPAIGN = {
    "name": "tiny_campaign",
    "train": {
        "network": {"stem": "depth_valid", "residual": True, "pack": 11, "base_filters": 4, "levels": 2, "stem_channels": [2, 4, 4],
                    "stem_kernel_xy": 3, "leaky_slope": 0.1, "inputs": ["activity", "density", "dvk_rr"],
                    "recovery": {"fwhm_mm": 10.0, "iterations": 5, "smooth_mm": 5.0}},
        "patch": 32, "slab": 4, "batch": 2, "lr": 0.001, "plateau_patience": 5, "val_patches": 4, "seed": 0,
    },
    "profile": "tiny",
    "spacing_mm": [7.2, 4.8, 4.8],
    "first_seed": 5000,
    "val_seeds": [4901],
    "noise_realisations": 2,
    "pool_patients": 2,
    "start_patients": 1,
    "checkpoint_minutes": 0.05,
    "end_reserve_minutes": 0.0,
    "install": "../models/tiny_campaign.pt",
}  # fmt: skip


@pytest.fixture(scope="module")
def val_cache(tmp_path_factory, kernel_cache_dir) -> Path:
    """The validation cases and the kernels of the tiny grid, made once for the module (a
    stint's subprocess then starts training within seconds, even on a loaded machine)."""
    from spectdose.learning.campaign import CampaignConfig, _val_patients

    folder = tmp_path_factory.mktemp("campaign-val")
    _val_patients(CampaignConfig(**{**TINY_CAMPAIGN, "val_cache": str(folder)}), kernel_cache_dir, None)
    return folder


def _campaign(tmp_path: Path, val_cache: Path, **options) -> Path:
    folder = tmp_path / "campaign"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY_CAMPAIGN, "val_cache": str(val_cache), **options}))
    return folder


def _stint(folder: Path, steps: int, kernel_cache_dir: Path) -> dict:
    """A stint of ``steps`` training steps (the time budget far away: a loaded machine must not
    change what the test sees)."""
    from spectdose.learning.campaign import run_stint

    return run_stint(folder, deadline=time.time() + 3600, kernel_cache=kernel_cache_dir, threads=1, progress=lambda m: None,
                     max_steps=steps)  # fmt: skip


def _opt_steps(folder: Path) -> int:
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    return int(next(iter(state["opt"]["state"].values()))["step"])


def test_stints_resume_with_new_seeds_and_install_only_on_improvement(tmp_path, val_cache, kernel_cache_dir, monkeypatch):
    """Also the snapshot ensemble: every scored stint leaves a snapshot, the newest two
    (ensemble_members) make the uncertainty ensemble from the second stint on."""
    import spectdose.learning.campaign as campaign
    from spectdose.cnn.inference import load_ensemble

    folder = _campaign(tmp_path, val_cache, ensemble_members=2)
    installed = tmp_path / "models" / "tiny_campaign.pt"
    ensemble = tmp_path / "models" / "tiny_campaign_ensemble.pt"

    first = _stint(folder, 6, kernel_cache_dir)
    ledger = json.loads((folder / "ledger.json").read_text())
    assert first["end"] == "done" and first["seeds"] == [5000] and first["pixel_passes"] > 0
    assert ledger["seeds_used"] == first["seeds"] and ledger["pixel_passes"] == first["pixel_passes"]
    assert first["val"]["score"] > 0 and first["dvk"]["score"] > 0
    # nothing was installed before: the first scored network is installed, with its card
    assert first["installed"] and installed.is_file() and "Campaign stint 1" in installed.with_suffix(".md").read_text()
    steps = _opt_steps(folder)
    assert steps > 0
    csv_rows = (folder / "ledger.csv").read_text().splitlines()
    assert len(csv_rows) == 2 and csv_rows[0].startswith("stint,")
    assert _snapshot_stints(folder) == [1] and not ensemble.exists() and "score" not in first["ensemble"]

    # the second stint continues the optimiser and draws patients never used
    second = _stint(folder, 4, kernel_cache_dir)
    ledger = json.loads((folder / "ledger.json").read_text())
    assert second["seeds"] and not set(second["seeds"]) & set(first["seeds"])
    assert ledger["pixel_passes"] == first["pixel_passes"] + second["pixel_passes"]
    assert _opt_steps(folder) > steps
    assert [s["stint"] for s in ledger["stints"]] == [1, 2]

    # two snapshots: the ensemble of both, calibrated on the validation patient, installed (none was)
    assert _snapshot_stints(folder) == [1, 2]
    ens_record = ledger["stints"][1]["ensemble"]
    assert ens_record["members"] == [1, 2] and ens_record["installed"] and ens_record["score"]["score"] > 0
    ens = load_ensemble(ensemble)
    assert [m.metadata["stint"] for m in ens.members] == [1, 2] and ens.metadata["member_stints"] == [1, 2]
    assert ens.calibration.n_voxels > 0 and ens.calibration.fitted_on == ("4901",)
    assert ens.calibration.coverage_2sigma_pct == ens_record["calibration"]["coverage_2sigma_pct"] > 50
    assert "snapshot ensemble of 2" in ens.metadata["method"]
    assert "Uncertainty ensemble" in installed.with_suffix(".md").read_text()
    rows = (folder / "ledger.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert rows[2].split(",")[header.index("ensemble_score")] == str(ens_record["score"]["score"])

    # a network that scores worse than the installed one is not installed, and the ledger says why
    before = installed.read_bytes()

    def rigged(model, patients):
        if model is None:
            return {"score": 0.9, "voi_abs_rel_error": 0.9, "nrmse": 0.9}
        worse = model.name == "tiny_campaign" and not model.metadata  # the stint's own net carries no metadata
        return {"score": 0.5 if worse else 0.4, "voi_abs_rel_error": 0.5, "nrmse": 0.5}

    monkeypatch.setattr(campaign, "score_network", rigged)
    ledger_best = json.loads((folder / "ledger.json").read_text())["best_score"]
    third = _stint(folder, 4, kernel_cache_dir)
    assert third["installed"] is False and third["installed_network"]["score"] == 0.4 and third["val"]["score"] == 0.5
    assert installed.read_bytes() == before
    assert "0.4" in third["install_reason"]
    assert json.loads((folder / "ledger.json").read_text())["best_score"] == min(ledger_best, 0.5)
    # the worse network is still a snapshot; stint 1's is pruned (ensemble_members 2); the new
    # ensemble is compared with the installed one, whose score its file carries
    assert _snapshot_stints(folder) == [2, 3] and third["ensemble"]["members"] == [2, 3]
    assert third["ensemble"]["installed_ensemble"]["score"] == ens_record["score"]["score"]
    assert third["ensemble"]["installed"] == (third["ensemble"]["score"]["score"] < ens_record["score"]["score"])
    assert load_ensemble(ensemble).metadata["member_stints"] == ([2, 3] if third["ensemble"]["installed"] else [1, 2])


def test_a_stint_restarts_from_the_best_stints_weights_when_asked(tmp_path, val_cache, kernel_cache_dir, monkeypatch):
    """Issue 17: a campaign whose later stints scored worse than its best goes back to the best
    weights (a new optimiser, the current learning rate) rather than training on from a degraded
    state; the ledger says so."""
    import spectdose.learning.campaign as campaign
    from spectdose.cnn.inference import load_model
    from spectdose.errors import InputError

    folder = _campaign(tmp_path, val_cache)
    with pytest.raises(InputError, match="no stint has been scored"):
        campaign._best_weights(folder, campaign.CampaignConfig.from_file(folder / "config.json"),
                               campaign.CampaignConfig.from_file(folder / "config.json").network(),
                               {"stints": []}, tmp_path / "none.pt")
    _stint(folder, 4, kernel_cache_dir)
    best = load_model(folder / "snapshots" / "stint-001.pt").net.state_dict()
    real = campaign.score_network
    monkeypatch.setattr(campaign, "score_network",
                        lambda model, patients: {**real(model, patients), "score": 9.0} if model is not None else real(model, patients))
    _stint(folder, 4, kernel_cache_dir)  # scored worse than stint 1
    monkeypatch.setattr(campaign, "score_network", real)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    assert any(not torch.equal(state["net"][k], v) for k, v in best.items()), "stint 2 moved away from stint 1"

    third = campaign.run_stint(folder, deadline=time.time() + 3600, kernel_cache=kernel_cache_dir, threads=1,
                               progress=lambda m: None, max_steps=0, restart_from_best=True)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    assert all(torch.equal(state["net"][k], v) for k, v in best.items()), "the stint starts from stint 1's weights"
    assert not state["opt"]["state"], "with a new optimiser"
    assert third["restarted_from"]["stint"] == 1 and third["restarted_from"]["file"] == "snapshots/stint-001.pt"
    ledger = json.loads((folder / "ledger.json").read_text())
    assert ledger["stints"][-1]["restarted_from"]["score"] == ledger["stints"][0]["val"]["score"]


def test_a_stint_trains_on_several_patients_from_its_first_step(tmp_path, val_cache, kernel_cache_dir):
    """The pool does not survive a machine: a stint that began on one patient fitted its anatomy."""
    folder = _campaign(tmp_path, val_cache, start_patients=2)
    first = _stint(folder, 1, kernel_cache_dir)
    assert first["seeds"] == [5000, 5001] and first["realisations"] == 4 and _opt_steps(folder) == 1


def test_a_stint_out_of_time_keeps_its_snapshot_and_leaves_the_ensemble_for_later(tmp_path, val_cache, kernel_cache_dir):
    from spectdose.learning.campaign import run_stint

    folder = _campaign(tmp_path, val_cache)
    record = run_stint(folder, deadline=time.time() + 1.0, kernel_cache=kernel_cache_dir, threads=1, progress=lambda m: None)
    assert record["end"] == "done" and record["val"]["score"] > 0
    assert _snapshot_stints(folder) == [1]
    assert record["ensemble"]["note"].startswith("not built") and "--ensemble-only" in record["ensemble"]["note"]
    assert json.loads((folder / "ledger.json").read_text())["stints"][0]["ensemble"] == record["ensemble"]


def _snapshot_stints(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (folder / "snapshots").glob("stint-*.pt"))


# A campaign of networks without normalisation: untrained, such a network returns the DVK; its last
# layer's bias then shifts the dose everywhere, which makes a network as good or as bad as wanted.
NONORM_CAMPAIGN = {**TINY_CAMPAIGN, "train": {**TINY_CAMPAIGN["train"], "network": {**TINY_CAMPAIGN["train"]["network"], "norm": "none"}}}


def _shifted_net(bias: float):
    from spectdose.cnn.model import DblurDoseNet, NetworkConfig

    net = DblurDoseNet(NetworkConfig.from_dict(NONORM_CAMPAIGN["train"]["network"])).eval()
    with torch.no_grad():
        net.unet.outc.bias.fill_(bias)
    return net


def _hand_campaign(tmp_path: Path, val_cache: Path, kernel_cache_dir: Path, stints: int) -> tuple[Path, float]:
    """A campaign folder whose ledger has ``stints`` scored stints and no training behind it; also
    the maximum reference dose rate of the validation case (normalised units)."""
    from spectdose.learning.campaign import CampaignConfig, _val_patients

    folder = tmp_path / "campaign"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**NONORM_CAMPAIGN, "val_cache": str(val_cache)}))
    val = {"score": 0.3, "voi_abs_rel_error": 0.3, "nrmse": 0.3}
    records = [{"stint": i, "started_utc": "2026-12-07T00:00:00Z", "ended_utc": "2026-12-07T01:00:00Z", "end": "done",
                "seeds": [5000 + i], "realisations": 2, "pixel_passes": 100, "pixel_passes_total": 100 * i, "val": val}
               for i in range(1, stints + 1)]  # fmt: skip
    ledger = {"campaign": "tiny_campaign", "target_pixel_passes": 1e6, "pixel_passes": 100 * stints, "best_score": 0.3,
              "seeds_used": [5000 + i for i in range(1, stints + 1)], "stints": records}  # fmt: skip
    (folder / "ledger.json").write_text(json.dumps(ledger))
    cfg = CampaignConfig(**{**NONORM_CAMPAIGN, "val_cache": str(val_cache)})
    label_max = max(float(c["label"].max()) for p in _val_patients(cfg, kernel_cache_dir, None) for c in p.cases)
    return folder, label_max


def _files(root: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_ensemble_only_adds_the_installed_network_and_the_state_as_snapshots_and_is_idempotent(tmp_path, val_cache, kernel_cache_dir):
    """What the lead runs after a stint of the earlier code: stint 1 is the installed network, stint
    2's weights are in state.pt; a second run changes nothing."""
    from spectdose.cli import main
    from spectdose.cnn.inference import Normalisation, load_ensemble, load_model, save_model
    from spectdose.cnn.model import NetworkConfig

    folder, label_max = _hand_campaign(tmp_path, val_cache, kernel_cache_dir, stints=2)
    net_cfg = NONORM_CAMPAIGN["train"]["network"]
    save_model(tmp_path / "models" / "tiny_campaign.pt", _shifted_net(0.01 * label_max), normalisation=Normalisation(),
               spacing_mm=TINY_CAMPAIGN["spacing_mm"], name="tiny_campaign", metadata={"campaign": "tiny_campaign", "stint": 1})  # fmt: skip
    torch.save({"net": _shifted_net(0.02 * label_max).state_dict(), "network": NetworkConfig.from_dict(net_cfg).to_dict()}, folder / "state.pt")
    cmd = ["train", "--campaign", str(folder), "--ensemble-only", "--threads", "1", "--kernel-cache", str(kernel_cache_dir)]

    assert main(cmd) == 0
    assert _snapshot_stints(folder) == [1, 2]
    biases = [float(load_model(folder / "snapshots" / f"stint-00{i}.pt").net.unet.outc.bias[0].detach()) for i in (1, 2)]
    assert biases == pytest.approx([0.01 * label_max, 0.02 * label_max], rel=1e-6)
    ens = load_ensemble(tmp_path / "models" / "tiny_campaign_ensemble.pt")
    assert ens.metadata["member_stints"] == [1, 2] and ens.calibration.n_voxels > 0
    ledger = json.loads((folder / "ledger.json").read_text())
    assert ledger["stints"][1]["ensemble"]["installed"] and "ensemble" not in ledger["stints"][0]
    assert ledger["stints"][1]["ensemble"]["score"]["score"] == ens.metadata["score"]["score"]

    before = _files(tmp_path)
    assert main(cmd) == 0
    assert _files(tmp_path) == before, "a second run rewrites nothing"

    ledger["stints"].append({"stint": 3, "started_utc": "2026-12-07T02:00:00Z", "end": "running"})
    (folder / "ledger.json").write_text(json.dumps(ledger))
    assert main(cmd) == 2, "refused while a stint runs"
    assert main(["train", "--ensemble-only", "--threads", "1"]) == 2, "needs --campaign"


def test_recalibrate_ensemble_refits_only_sigma_of_an_ensemble_fitted_by_the_old_rule(tmp_path, val_cache, kernel_cache_dir):
    """An ensemble installed before sigma became the error's standard deviation gets the new sigma:
    the same members (so the same dose rate), a new file that keeps the old calibration in its
    metadata, a card line and a ledger record; run again, nothing changes."""
    from spectdose.cli import main
    from spectdose.cnn.inference import (
        SIGMA_CALIBRATION_RULE,
        Normalisation,
        SigmaCalibration,
        TrainedModel,
        load_ensemble,
        save_ensemble,
    )

    folder, label_max = _hand_campaign(tmp_path, val_cache, kernel_cache_dir, stints=2)
    members = [TrainedModel(_shifted_net(f * label_max), _shifted_net(0).cfg, Normalisation(), tuple(TINY_CAMPAIGN["spacing_mm"]), f"m{i}", {})
               for i, f in enumerate((0.01, 0.03))]  # fmt: skip
    path = tmp_path / "models" / "tiny_campaign_ensemble.pt"
    old = SigmaCalibration(scale=1.5, rel_floor=0.02, fitted_on=("4901",), coverage_1sigma_pct=68.0, coverage_2sigma_pct=88.0, n_voxels=9)
    save_ensemble(path, members, old, name="tiny_campaign_ensemble", metadata={"campaign": "tiny_campaign", "member_stints": [1, 2]})
    before = path.read_bytes()
    cmd = ["train", "--campaign", str(folder), "--recalibrate-ensemble", "--threads", "1", "--kernel-cache", str(kernel_cache_dir)]
    assert main(cmd) == 0

    ens = load_ensemble(path)
    assert path.read_bytes() != before
    assert ens.calibration.rule == SIGMA_CALIBRATION_RULE and ens.calibration.fitted_on == ("4901",)
    assert (ens.calibration.scale, ens.calibration.rel_floor) != (1.5, 0.02) and ens.calibration.n_voxels > 9
    for new_m, old_m in zip(ens.members, members, strict=True):
        for a, b in zip(new_m.net.state_dict().values(), old_m.net.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    prior = ens.metadata["recalibrated"][0]
    assert prior["before"]["scale"] == 1.5 and prior["sha256_before"] == hashlib.sha256(before).hexdigest()
    assert ens.metadata["member_stints"] == [1, 2]
    ledger = json.loads((folder / "ledger.json").read_text())
    assert ledger["recalibrations"][0]["sha256_after"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "recalibrated" in (tmp_path / "models" / "tiny_campaign.md").read_text()

    files = _files(tmp_path)
    assert main(cmd) == 0
    assert _files(tmp_path) == files, "a second run rewrites nothing"
    ledger["stints"].append({"stint": 3, "started_utc": "2026-12-07T02:00:00Z", "end": "running"})
    (folder / "ledger.json").write_text(json.dumps(ledger))
    save_ensemble(path, members, old, name="tiny_campaign_ensemble", metadata={})
    assert main(cmd) == 2, "refused while a stint runs"
    assert main(["train", "--recalibrate-ensemble", "--until", "23:00"]) == 2, "needs --campaign and no time budget"


@pytest.mark.parametrize(
    ("installed_ensemble", "installed_network", "snapshots", "replaced"),
    [
        ("good", None, "bad", False),  # a worse ensemble does not replace a better one
        ("bad", None, "good", True),
        ("good, other grid", "good", "bad", False),  # not comparable: the installed network decides
        ("good, other grid", "bad", "good", True),
    ],
)
def test_the_ensemble_replaces_the_installed_one_only_when_its_mean_scores_better(
    tmp_path, val_cache, kernel_cache_dir, installed_ensemble, installed_network, snapshots, replaced
):
    from spectdose.cnn.inference import (
        Normalisation,
        SigmaCalibration,
        TrainedModel,
        load_ensemble,
        save_ensemble,
        save_model,
    )
    from spectdose.learning.campaign import build_campaign_ensemble

    folder, label_max = _hand_campaign(tmp_path, val_cache, kernel_cache_dir, stints=2)
    shift = {"good": (0.0, 0.02), "bad": (5.0, 6.0)}  # x the maximum reference dose rate
    spacing = TINY_CAMPAIGN["spacing_mm"]
    for stint, f in zip((1, 2), shift[snapshots], strict=True):
        save_model(folder / "snapshots" / f"stint-00{stint}.pt", _shifted_net(f * label_max), normalisation=Normalisation(),
                   spacing_mm=spacing, name=f"snap{stint}", metadata={})  # fmt: skip
    ens_spacing = [3.0, 2.0, 2.0] if "other grid" in installed_ensemble else spacing
    members = [TrainedModel(_shifted_net(f * label_max), _shifted_net(0).cfg, Normalisation(), tuple(ens_spacing), f"old{i}", {})
               for i, f in enumerate(shift[installed_ensemble.split(",")[0]])]  # fmt: skip
    ens_path = tmp_path / "models" / "tiny_campaign_ensemble.pt"
    save_ensemble(ens_path, members, SigmaCalibration(scale=1.0, rel_floor=0.1), name="old", metadata={})
    if installed_network:
        save_model(tmp_path / "models" / "tiny_campaign.pt", _shifted_net(shift[installed_network][0] * label_max),
                   normalisation=Normalisation(), spacing_mm=spacing, name="single", metadata={})  # fmt: skip
    old_bytes = ens_path.read_bytes()

    result = build_campaign_ensemble(folder, kernel_cache=kernel_cache_dir, threads=1, progress=lambda m: None)
    assert result["installed"] is replaced
    if "other grid" in installed_ensemble:
        assert result["installed_ensemble"]["score"] is None and "not comparable" in result["install_reason"]
        assert (result["score"]["score"] < result["installed_network_score"]) is replaced
    else:
        assert (result["score"]["score"] < result["installed_ensemble"]["score"]) is replaced
    if replaced:
        assert load_ensemble(ens_path).metadata["member_stints"] == [1, 2]
    else:
        assert ens_path.read_bytes() == old_bytes
    rows = (folder / "ledger.csv").read_text().splitlines()
    assert rows[2].split(",")[rows[0].split(",").index("ensemble_installed")] == str(replaced)


def test_killed_stint_saves_and_the_next_resumes(tmp_path, val_cache, kernel_cache_dir):
    folder = _campaign(tmp_path, val_cache)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "spectdose.cli", "train", "--campaign", str(folder), "--minutes", "10", "--threads", "1",
           "--kernel-cache", str(kernel_cache_dir)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 600:  # until a checkpoint after some training
            ledger = folder / "ledger.json"
            if ledger.is_file() and json.loads(ledger.read_text())["pixel_passes"] > 0:
                break
            time.sleep(1.0)
        else:
            pytest.fail("the stint never checkpointed any training")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    ledger = json.loads((folder / "ledger.json").read_text())
    killed = ledger["stints"][-1]
    assert killed["end"].startswith("stopped") and killed["pixel_passes"] > 0 and killed["seeds"] == [5000]
    steps = _opt_steps(folder)
    nxt = _stint(folder, 4, kernel_cache_dir)
    assert nxt["seeds"] and nxt["seeds"][0] == 5001
    assert _opt_steps(folder) > steps
    assert json.loads((folder / "ledger.json").read_text())["pixel_passes"] == ledger["pixel_passes"] + nxt["pixel_passes"]


def test_campaign_needs_a_time_budget_and_a_config(tmp_path):
    from spectdose.cli import main

    assert main(["train", "--campaign", str(tmp_path), "--threads", "1"]) == 2
    assert main(["train", "--campaign", str(tmp_path), "--minutes", "1"]) == 2  # no config.json there


def test_richardson_lucy_recovers_a_blurred_sphere():
    from scipy import ndimage

    from spectdose.cnn.recovery import richardson_lucy

    spacing = (2.0, 2.0, 2.0)
    z, y, x = np.mgrid[:40, :40, :40]
    sphere = (((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2) * 4.0 <= 8.0**2).astype(np.float32) * 100.0  # 8 mm radius
    blurred = ndimage.gaussian_filter(sphere, 10.0 / 2.3548 / 2.0, mode="constant")
    rr = richardson_lucy(blurred, spacing, fwhm_mm=10.0, iterations=5, smooth_mm=5.0)
    inside = sphere > 0
    assert blurred[inside].mean() < 0.6 * 100.0  # partial volume: the blur takes much of it
    assert rr[inside].mean() > blurred[inside].mean() + 10.0  # recovery gives part of it back
    assert rr.sum() == pytest.approx(blurred.sum(), rel=0.02)  # and keeps the total
    assert (rr >= 0).all()


def test_recovery_is_the_same_on_one_thread_and_on_several():
    """Training cases are made on one thread (the campaign) and jobs deconvolve on several: the
    network's dvk_rr input must not depend on which, so the threaded blur is gaussian_filter's, bit for bit."""
    import torch

    from spectdose.cnn.recovery import richardson_lucy

    activity = np.random.default_rng(4).gamma(2.0, 1e4, size=(17, 45, 38)).astype(np.float32)
    spacing = (3.0, 1.953125, 1.953125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = richardson_lucy(activity, spacing, fwhm_mm=10.0, iterations=3, smooth_mm=5.0)
        torch.set_num_threads(3)
        several = richardson_lucy(activity, spacing, fwhm_mm=10.0, iterations=3, smooth_mm=5.0)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(one, several)


def test_installed_network_with_the_recovered_dvk_input_runs_from_its_saved_config(tmp_path, kernel_cache_dir):
    """The saved config drives inference: the dvk_rr channel is made as the fast path makes it."""
    from spectdose.cnn.inference import (
        Normalisation,
        load_model,
        normalised_inputs,
        predict_normalised,
        predict_on_ct_grid,
        save_model,
    )
    from spectdose.cnn.model import DblurDoseNet, NetworkConfig
    from spectdose.cnn.recovery import recovered_dvk
    from spectdose.dose import dvk_dose_rate
    from spectdose.geometry import Grid, Volume
    from spectdose.kernels import get_kernel

    cfg = NetworkConfig.from_dict(TINY_CAMPAIGN["train"]["network"])
    spacing = (7.2, 4.8, 4.8)
    torch.manual_seed(0)
    path = save_model(tmp_path / "rr.pt", DblurDoseNet(cfg).eval(), normalisation=Normalisation(), spacing_mm=spacing, name="rr", metadata={})
    model = load_model(path, device="cpu")
    assert model.config.inputs == ("activity", "density", "dvk_rr") and model.config.recovery["fwhm_mm"] == 10.0

    grid = Grid((16, 24, 24), spacing, (0.0, 0.0, 0.0))
    act = np.zeros(grid.shape, np.float32)
    act[6:10, 8:14, 8:14] = 1e5
    rho = np.ones(grid.shape, np.float32)
    kernel = get_kernel(spacing, cache_dir=kernel_cache_dir).total_mgy_per_mbq_s
    dvk = dvk_dose_rate(act, rho, kernel, grid.voxel_volume_ml)
    out = predict_on_ct_grid(model, Volume(act, grid, "Bq/ml"), Volume(rho, grid, "g/cm3"), Volume(dvk, grid, "Gy/s"),
                             kernel_cache_dir=kernel_cache_dir).array  # fmt: skip
    a_n, rho_n, d_n, total = normalised_inputs(act, rho, dvk, grid.voxel_volume_ml, model.normalisation)
    rr_n = recovered_dvk(act, rho, spacing, model.config.recovery, kernel_cache=kernel_cache_dir) / total * model.normalisation.dose_scale_per_gy_s
    by_hand = predict_normalised(model, a_n, rho_n, d_n, extra={"dvk_rr": rr_n.astype(np.float32)}) * total / model.normalisation.dose_scale_per_gy_s
    np.testing.assert_allclose(out, by_hand, rtol=1e-4, atol=1e-12 + 1e-5 * float(np.abs(by_hand).max()))
    with pytest.raises(Exception, match="dvk_rr"):
        predict_normalised(model, a_n, rho_n, d_n)


def test_dvk_rr_method_gives_back_dose_the_blur_took_from_a_small_sphere(kernel_cache_dir):
    """`--method dvk-rr`: DVK on the recovered SPECT, higher than DVK inside a blurred 2 ml sphere."""
    from scipy import ndimage

    from spectdose.geometry import Grid, Volume
    from spectdose.pipeline import DoseOptions, compute_dose_rate

    spacing = (4.0, 4.0, 4.0)
    grid = Grid((24, 24, 24), spacing, (0.0, 0.0, 0.0))
    z, y, x = np.mgrid[:24, :24, :24]
    sphere = ((z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) * 16.0 <= 8.0**2
    spect = ndimage.gaussian_filter(sphere.astype(np.float32) * 1e6, 10.0 / 2.3548 / 4.0, mode="constant")
    act, rho = Volume(spect, grid, "Bq/ml"), Volume(np.ones(grid.shape, np.float32), grid, "g/cm3")
    dvk, _ = compute_dose_rate(act, rho, options=DoseOptions(method="dvk", kernel_cache_dir=kernel_cache_dir))
    rr, info = compute_dose_rate(act, rho, options=DoseOptions(method="dvk-rr", kernel_cache_dir=kernel_cache_dir))
    assert rr.array[sphere].mean() > 1.2 * dvk.array[sphere].mean()
    assert info["resolution_recovery"]["fwhm_mm"] == 10.0
    assert rr.array.sum() == pytest.approx(dvk.array.sum(), rel=0.05)


def test_until_is_the_next_such_utc_time_and_malformed_times_are_refused():
    import datetime as dt

    from spectdose.errors import InputError
    from spectdose.learning.campaign import parse_until

    now = dt.datetime(2026, 12, 6, 23, 30, tzinfo=dt.UTC)
    assert parse_until("00:50", now) == dt.datetime(2026, 12, 7, 0, 50, tzinfo=dt.UTC)
    assert parse_until("23:45", now) == dt.datetime(2026, 12, 6, 23, 45, tzinfo=dt.UTC)
    for bad in ("25:00", "noon", "1:2:3"):
        with pytest.raises(InputError, match="HH:MM"):
            parse_until(bad, now)


def test_precise_bn_replaces_lagging_running_statistics(val_cache, kernel_cache_dir):
    """Running BatchNorm averages far from the data (as early in training) make the eval-mode
    network bad; recomputed statistics bring it back, weights untouched."""
    from spectdose.cnn.model import DblurDoseNet
    from spectdose.learning.campaign import CampaignConfig, _precise_bn, _val_patients
    from spectdose.learning.training import _evaluate_loss, _PatchSampler

    cfg = CampaignConfig(**{**TINY_CAMPAIGN, "val_cache": str(val_cache)})
    tcfg, net_cfg = cfg.train_config(), cfg.network()
    cases = [c for p in _val_patients(cfg, kernel_cache_dir, None) for c in p.cases]
    sampler = _PatchSampler([], tcfg, np.random.default_rng(0), net_cfg.pack, channels=net_cfg.inputs, cases=cases)
    batch = [sampler.sample(augment=False) for _ in range(8)]
    torch.manual_seed(0)
    net = DblurDoseNet(net_cfg)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(1e-2)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    lagging = _evaluate_loss(net, batch, "cpu", tcfg)
    assert np.isfinite(lagging)
    _precise_bn(net, sampler, "cpu", n_slabs=16)
    assert _evaluate_loss(net, batch, "cpu", tcfg) < 0.5 * lagging
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())


def test_a_stint_killed_without_its_final_save_is_marked_lost_by_the_next():
    from spectdose.learning.campaign import close_lost_stints

    ledger = {"stints": [{"stint": 1, "end": "until 00:50", "ended_utc": "a"},
                         {"stint": 2, "end": "running", "ended_utc": "2026-12-07T00:13:51Z"}]}
    close_lost_stints(ledger)
    assert ledger["stints"][0]["end"] == "until 00:50"
    assert ledger["stints"][1]["end"].startswith("lost") and "00:13:51" in ledger["stints"][1]["end"]


def test_a_network_without_normalisation_starts_at_the_dvk_and_does_not_depend_on_its_batch():
    """norm "none": eval and train mode give the same dose (BatchNorm's running statistics were what
    made the campaign's network worse than DVK in eval mode, stint 4); untrained it returns the DVK."""
    from spectdose.cnn.model import TINY, DblurDoseNet, NetworkConfig

    cfg = NetworkConfig.from_dict({**TINY.to_dict(), "norm": "none"})
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg and "norm" not in TINY.to_dict(), "batch: saved as before"
    torch.manual_seed(0)
    net = DblurDoseNet(cfg)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    slab = torch.rand(1, 2, 4 + 10, 32, 32)
    dvk = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.forward_slab(slab, dvk), dvk), "an untrained network adds nothing to the DVK"
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        loss = ((net.forward_slab(slab, dvk) - 2 * dvk) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = net.forward_slab(slab, dvk)
        assert not torch.equal(trained, dvk), "it learns a residual"
        net.eval()
        alone = torch.cat([net.forward_slab(slab[:, :, z : z + 11], dvk[z : z + 1]) for z in range(4)])
    assert torch.allclose(alone, trained, atol=1e-5), "the same output in eval and train mode, pack by pack or as a slab"


# The Python packages of the lent GPU machine's image ('cuda'), as read there on 2026-11-17
# (.library/device/KINDS.md, "Python packages already there"): the CUDA, JAX and ML-stack
# packages are left out, since the campaign does not import them.
DEVICE_IMAGE = {
    "certifi", "charset-normalizer", "contourpy", "cycler", "filelock", "fonttools", "fsspec", "idna", "jinja2", "joblib",
    "kiwisolver", "markupsafe", "matplotlib", "mpmath", "networkx", "numpy", "opencv-python-headless", "packaging", "pandas",
    "pillow", "psutil", "pyparsing", "python-dateutil", "pyyaml", "requests", "scikit-image", "scikit-learn", "scipy", "six",
    "sympy", "threadpoolctl", "tifffile", "torch", "tqdm", "typing-extensions", "urllib3", "setuptools", "imageio",
    "lazy-loader", "triton",
    "opencv-python",  # module cv2: the image's opencv-python-headless provides it
}  # fmt: skip

_IMPORT_GUARD = '''
import importlib.abc, importlib.machinery, importlib.metadata, os, sys, sysconfig
ALLOWED = set(os.environ["DEVICE_ALLOWED"].split(","))
SITE = tuple({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
DISTS = importlib.metadata.packages_distributions()

class DeviceImage(importlib.abc.MetaPathFinder):
    """Refuse a top-level package from this venv that the GPU machine would not have."""
    def find_spec(self, name, path, target=None):
        if path is not None or name in sys.builtin_module_names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name)
        origin = (spec.origin or "") if spec else ""
        if origin.startswith(SITE) and not {d.lower().replace("_", "-") for d in DISTS.get(name, [name])} & ALLOWED:
            raise ModuleNotFoundError(f"not on the GPU machine: {name}", name=name)
        return None

sys.meta_path.insert(0, DeviceImage())
'''


def test_the_gpu_stint_runs_with_only_the_gpu_images_packages_and_the_carried_ones(tmp_path, val_cache, kernel_cache_dir):
    """scripts/device_stint.py, as scripts/device_stint.sh runs it on a lent GPU machine: every
    package it imports is on that machine's image or carried by scripts/device_wheels.sh (here
    on the CPU, with every other package of this venv refused)."""
    import re

    root = Path(__file__).resolve().parents[1]
    wheels = (root / "scripts" / "device_wheels.sh").read_text()
    carried = set(re.search(r"^for pkg in (.+); do$", wheels, re.M).group(1).split()) | {"simpleitk", "icrp107-database"}
    stint_sh = (root / "scripts" / "device_stint.sh").read_text()
    assert all(f".whl/{a}.tar.xz" in wheels and f".whl/{a}.tar.xz" in stint_sh for a in ("simpleitk", "icrp107", "kernels"))
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_IMPORT_GUARD)
    folder = _campaign(tmp_path, val_cache)
    env = {**os.environ, "PYTHONPATH": str(guard), "OMP_NUM_THREADS": "1",
           "DEVICE_ALLOWED": ",".join(sorted({d.replace("_", "-") for d in DEVICE_IMAGE | carried}))}  # fmt: skip
    # the guard works: a package of this venv that the GPU machine lacks is refused
    refused = subprocess.run([sys.executable, "-c", "import highdicom"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "not on the GPU machine: highdicom" in refused.stderr
    run = subprocess.run([sys.executable, str(root / "scripts" / "device_stint.py"), "--campaign", str(folder), "--device", "cpu",
                          "--threads", "1", "--kernel-cache", str(kernel_cache_dir), "--max-steps", "2", "--minutes", "60"],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ledger = json.loads((folder / "ledger.json").read_text())
    (stint,) = ledger["stints"]
    assert stint["end"] == "done" and stint["seeds"] == [5000] and stint["generate_device"] == "cpu"
    assert stint["val"]["score"] is not None and (folder / "snapshots" / "stint-001.pt").is_file()


def test_a_stint_can_start_a_new_optimiser_on_the_carried_weights(tmp_path, val_cache, kernel_cache_dir):
    """fresh_optimizer_each_stint: the weights carry over, Adam's moments and step count do not."""
    folder = _campaign(tmp_path, val_cache, fresh_optimizer_each_stint=True)
    _stint(folder, 3, kernel_cache_dir)
    weights = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)["net"]
    second = _stint(folder, 2, kernel_cache_dir)
    assert _opt_steps(folder) == 2 and second["fresh_optimizer"]["lr"] > 0  # not 3 + 2
    # the second stint trained the first stint's weights, not new ones
    from spectdose.cnn.model import DblurDoseNet
    from spectdose.learning.campaign import CampaignConfig

    untrained = DblurDoseNet(CampaignConfig.from_file(folder / "config.json").network()).state_dict()
    assert any(not torch.equal(weights[k], untrained[k]) for k in weights)
    snap = torch.load(folder / "snapshots" / "stint-002.pt", map_location="cpu", weights_only=True)["state_dict"]
    params = [k for k in weights if "running_" not in k and "num_batches" not in k]  # BatchNorm statistics are recomputed
    assert max(float((snap[k] - weights[k]).abs().max()) for k in params) < 0.1
