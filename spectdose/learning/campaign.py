"""A training campaign that carries over from one stint to the next (issue 17).

`spectdose train --campaign DIR` continues the campaign whose state lives in DIR (committed
in git, a few MB): ``config.json`` (network, training and data settings, the fixed
validation seeds), ``state.pt`` (weights, optimiser, scheduler, random states, the next
patient seed) and ``ledger.json`` / ``ledger.csv`` (every stint: seeds used, model-grid pixel
passes so far and toward the target, validation scores, CPU and wall time, the installation
decision). A stint:

1. loads the state (or starts the network from scratch) and makes the fixed validation
   patients (same seeds, so the same cases, every stint; cached on this machine);
2. until its time budget is spent, alternates generating patients from seeds never used
   before (``spectdose.learning.fast_cases``: several noise realisations each, in memory)
   with training on a bounded pool of the newest cases, in one process; generation takes
   about ``generation_share`` of the CPU time;
3. saves the state atomically every ``checkpoint_minutes`` (after recomputing the BatchNorm
   statistics and scoring the fixed validation patches, which drives the learning-rate plateau
   schedule) and on SIGTERM/SIGINT, so a killed stint loses minutes;
4. at the end scores the network, DVK and the installed network on the validation set and
   installs the weights only when the score beats both the campaign's best and the installed
   network's (lower is better), recording the comparison in the ledger;
5. keeps the scored weights as a snapshot (``snapshots/stint-NNN.pt``, the newest
   ``ensemble_members``) and, from two snapshots on, builds the uncertainty ensemble from them
   (a snapshot ensemble: Huang et al., "Snapshot Ensembles: Train 1, get M for free", ICLR
   2017), calibrates its sigma on the validation patients and installs it beside the network
   when its mean scores better than the installed ensemble's (``_update_ensemble``).
   ``build_campaign_ensemble`` (``spectdose train --campaign DIR --ensemble-only``) does step 5
   alone.

Score of a network on a case (normalised units): half the mean absolute relative error of
the VOI mean dose rate over kidneys, healthy liver, spleen, lumbar vertebrae and lesions,
half the NRMSE over voxels above 10 % of the case's maximum reference dose rate; averaged
over the validation cases.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from spectdose.cnn.inference import (
    SIGMA_CALIBRATION_RULE,
    Normalisation,
    TrainedModel,
    atomic_torch_save,
    ensemble_mean_sd,
    load_ensemble,
    load_model,
    save_ensemble,
    save_model,
)
from spectdose.cnn.model import DblurDoseNet, NetworkConfig
from spectdose.errors import InputError
from spectdose.learning.training import (
    TrainConfig,
    _evaluate_loss,
    _forward,
    _loss,
    _PatchSampler,
    _rng_states,
    _set_rng_states,
    calibrate_ensemble,
    predict_case,
)
from spectdose.paths import atomic_write, ensemble_path

__all__ = ["CampaignConfig", "run_stint", "build_campaign_ensemble", "score_network", "parse_until"]

_STATE_VERSION = 1
# Slabs of training patches whose BatchNorm statistics replace the running averages before the
# network is evaluated (see _precise_bn).
_PRECISE_BN_SLABS = 64


@dataclasses.dataclass
class CampaignConfig:
    """DIR/config.json: what stays fixed for the whole campaign (changing the network's
    inputs or architecture starts a new campaign)."""

    name: str = "dblurdosenet_campaign"
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields (network, patch, lr, ...)
    profile: str = "clinical"  # spectdose.phantoms.variation profile
    spacing_mm: tuple[float, float, float] = (3.0, 1.953125, 1.953125)
    first_seed: int = 300_000  # training patients: first_seed, first_seed + 1, ... (never reused)
    val_seeds: tuple[int, ...] = (290_001, 290_002)  # below first_seed
    noise_realisations: int = 4
    pool_patients: int = 6  # patients whose cases are trained on at once (memory)
    # Patients generated before a stint's first step. The pool does not survive a machine, so
    # each stint starts empty; on one patient alone the validation-patch loss of stint 2 rose
    # from 0.115 to 0.656 within 2e7 pixel passes (2026-12-07): the network fits that anatomy.
    start_patients: int = 2
    generation_share: float = 0.5  # of the CPU time
    checkpoint_minutes: float = 5.0
    end_reserve_minutes: float = 3.0  # kept at the end for scoring and saving
    target_pixel_passes: float = 1.2e10  # the paper's 200 epochs on the 1.95 mm model grid
    install: str = "../dblurdosenet.pt"  # relative to DIR
    val_cache: str | None = None  # folder for the validation cases (default: the kernel cache's campaign-val/)
    ensemble_members: int = 3  # snapshots kept in DIR/snapshots/ and combined into the uncertainty ensemble
    # A new Adam (and plateau scheduler) at the current learning rate at the start of every stint,
    # the weights carried over. Each stint starts on patients the network has never seen, and
    # Adam's second moments, left small by the end of the last stint, then make steps far larger
    # than the learning rate: every stint that continued the saved optimiser (ledger 2, 3 and the
    # first hour of 5, 2026-12-07) saw its validation-patch loss double within its first 5
    # minutes (0.12 -> 0.24 -> 0.34 in ledger 5, at lr 3e-5); of those that started one afresh,
    # ledger 4 held it (0.10-0.12) and ledger 6 rose to 0.15.
    fresh_optimizer_each_stint: bool = False

    @classmethod
    def from_file(cls, path: Path) -> CampaignConfig:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InputError(f"unknown campaign options in {path}: {sorted(unknown)}")
        cfg = cls(**data)
        cfg.spacing_mm = tuple(float(s) for s in cfg.spacing_mm)
        cfg.val_seeds = tuple(int(s) for s in cfg.val_seeds)
        if not 0.0 < cfg.generation_share < 1.0 or cfg.noise_realisations < 1 or cfg.pool_patients < 1 or cfg.start_patients < 1 or not cfg.val_seeds:
            raise InputError(f"{path}: generation_share in (0, 1), noise_realisations, pool_patients, start_patients >= 1 and val_seeds needed")
        if max(cfg.val_seeds) >= cfg.first_seed:
            raise InputError(f"{path}: validation seeds must lie below first_seed (training seeds count up from it)")
        if cfg.ensemble_members < 2:
            raise InputError(f"{path}: ensemble_members must be >= 2 (an uncertainty needs two members at least)")
        return cfg

    def train_config(self) -> TrainConfig:
        cfg = TrainConfig(**{"name": self.name, **self.train})
        cfg.check()
        return cfg

    def network(self) -> NetworkConfig:
        return NetworkConfig.from_dict(self.train_config().network)


def parse_until(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``HH:MM`` UTC -> the next such moment (tomorrow when already past)."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        h, m = (int(v) for v in text.split(":"))
        target = now.replace(hour=h, minute=m, second=0, microsecond=0)
    except ValueError as exc:
        raise InputError(f"--until takes HH:MM (UTC), not {text!r}") from exc
    return target if target > now else target + dt.timedelta(days=1)


class _Stop(Exception):
    """SIGTERM / SIGINT: save and end the stint."""


class _Signals:
    """Turns the first SIGTERM/SIGINT into _Stop, except while a file is being saved (then
    right after the save); later signals are ignored while the stint saves and ends."""

    def __init__(self) -> None:
        self.requested = self.raised = self.saving = False
        self.name = ""

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested, self.name = True, signal.Signals(signum).name
        if not self.saving:
            self.raised = True
            raise _Stop(self.name)

    @contextlib.contextmanager
    def protected(self):
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.requested and not self.raised:
            self.raised = True
            raise _Stop(self.name)


# ---------------------------------------------------------------------------------------
# Validation: fixed patients, scored alike for every network
# ---------------------------------------------------------------------------------------
def _val_patients(cfg: CampaignConfig, kernel_cache, progress, generate_device: str = "cpu") -> list:
    from spectdose.learning.fast_cases import FastPatient, fast_training_cases

    net = cfg.network()
    key = json.dumps({"v": 1, "profile": cfg.profile, "spacing": list(cfg.spacing_mm), "recovery": net.recovery}, sort_keys=True)
    folder = Path(cfg.val_cache) if cfg.val_cache else (Path(kernel_cache) if kernel_cache else Path.home() / ".cache" / "spectdose") / "campaign-val"
    out = []
    for seed in cfg.val_seeds:
        path = folder / f"val-{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    case = {k[2:]: z[k] for k in z.files if k.startswith("c_")}
                    vois = {k[2:]: z[k] for k in z.files if k.startswith("v_")}
                out.append(FastPatient(seed, [seed], [case], {}, vois, {"seed": seed, "cached": True}))
                continue
            except (OSError, ValueError):
                pass
        if progress:
            progress(f"making validation patient {seed}")
        p = fast_training_cases(seed, profile=cfg.profile, spacing_mm=cfg.spacing_mm, n_noise=1, recovery=net.recovery, kernel_cache=kernel_cache,
                                device=generate_device)  # fmt: skip
        arrays = {**{f"c_{k}": v for k, v in p.cases[0].items()}, **{f"v_{k}": v for k, v in p.vois.items()}}
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f, arrays=arrays: np.savez_compressed(f, **arrays))
        out.append(p)
    return out


def _case_score(out: np.ndarray, case: dict, vois: dict) -> dict:
    lab = case["label"].astype(np.float64)
    out = out.astype(np.float64)
    errors = {}
    for name, mask in vois.items():
        ref = float(lab[mask].mean())
        if ref > 0:
            errors[name] = abs(float(out[mask].mean()) - ref) / ref
    hot = lab > 0.1 * float(lab.max())
    nrmse = float(np.sqrt(np.mean((out[hot] - lab[hot]) ** 2)) / lab[hot].mean())
    voi = float(np.mean(list(errors.values()))) if errors else 0.0
    return {"score": 0.5 * voi + 0.5 * nrmse, "voi_abs_rel_error": voi, "nrmse": nrmse}


def _mean_score(rows: list[dict]) -> dict:
    return {k: round(float(np.mean([r[k] for r in rows])), 5) for k in rows[0]}


def score_network(model: TrainedModel | None, patients: list) -> dict:
    """Mean score (lower is better) over the validation cases; ``model`` None scores DVK."""
    return _mean_score([_case_score(case["dvk"] if model is None else predict_case(model, case), case, p.vois)
                        for p in patients for case in p.cases])  # fmt: skip


def _not_comparable(model: TrainedModel, cfg: CampaignConfig, net_cfg: NetworkConfig, channels: set[str]) -> str | None:
    """Why ``model`` cannot be scored on the campaign's validation cases (None: it can). The cases
    are on the campaign's grid, in the default normalisation, and hold the input ``channels``
    (dvk_rr made with the campaign's recovery settings)."""
    if tuple(model.spacing_mm) != tuple(cfg.spacing_mm):
        return f"{model.name}: trained at {list(model.spacing_mm)} mm, the campaign's grid is {list(cfg.spacing_mm)} mm"
    if model.normalisation != Normalisation():
        return f"{model.name}: another normalisation"
    missing = [c for c in model.config.inputs if c not in channels]
    if missing:
        return f"{model.name}: needs input channels the validation cases lack: {missing}"
    if "dvk_rr" in model.config.inputs and model.config.recovery != net_cfg.recovery:
        return f"{model.name}: dvk_rr made with other recovery settings"
    return None


def _channels(val: list) -> set[str]:
    return set.intersection(*(set(c) for p in val for c in p.cases))


def _score_installed_network(install_path: Path, cfg: CampaignConfig, net_cfg: NetworkConfig, val: list) -> dict | None:
    """Score of the network installed at ``install_path`` (None: there is none; ``score`` None with a
    ``note``: it cannot be scored on these cases)."""
    if not install_path.is_file():
        return None
    try:
        current = load_model(install_path, device="cpu")
        reason = _not_comparable(current, cfg, net_cfg, _channels(val))
        return score_network(current, val) if reason is None else {"score": None, "note": f"not comparable: {reason}"}
    except InputError as exc:
        return {"score": None, "note": str(exc)}


# ---------------------------------------------------------------------------------------
# The stint
# ---------------------------------------------------------------------------------------
def _precise_bn(net: DblurDoseNet, sampler: _PatchSampler, dev, n_slabs: int = _PRECISE_BN_SLABS) -> None:
    """Recompute the BatchNorm running statistics as plain averages over ``n_slabs`` training
    slabs (no augmentation) with the current weights ("precise BN").

    Training normalises each slab by its own statistics; the running averages (momentum 0.1)
    lag behind weights that still move fast, and the network in eval mode - as inference runs
    it - was measured 7x worse than with recomputed statistics early in the campaign (stint 1:
    validation-patch loss 9.9 -> 1.3). Only the statistics change, not the weights.
    """
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or not sampler.cases:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for _ in range(n_slabs):
            inp, dvk, _lab = sampler.sample(augment=False)
            _forward(net, inp.to(dev), dvk.to(dev))
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum


def close_lost_stints(ledger: dict) -> None:
    """A stint still "running" in the ledger was killed without its final save (SIGKILL, the
    machine or session gone): say so, so the ledger never shows two stints running at once."""
    for stint in ledger["stints"]:
        if stint.get("end") in ("running", "scoring"):
            stint["end"] = f"lost: ended without a final save; kept from its last checkpoint ({stint.get('ended_utc')})"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load_ledger(folder: Path, cfg: CampaignConfig) -> dict:
    path = folder / "ledger.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"campaign": cfg.name, "target_pixel_passes": cfg.target_pixel_passes, "pixel_passes": 0, "seeds_used": [],
            "best_score": None, "stints": []}  # fmt: skip


def _write_ledger(folder: Path, ledger: dict) -> None:
    ledger["progress_pct"] = round(100.0 * ledger["pixel_passes"] / ledger["target_pixel_passes"], 4)
    text = json.dumps(ledger, indent=1).encode()
    atomic_write(folder / "ledger.json", lambda f: f.write(text))
    fields = ["stint", "started_utc", "ended_utc", "end", "patients", "first_seed", "last_seed", "realisations",
              "pixel_passes_stint", "pixel_passes_total", "progress_pct", "val_score", "dvk_score", "installed_score",
              "installed", "ensemble_score", "ensemble_installed", "wall_s", "cpu_train_s", "cpu_generate_s"]  # fmt: skip
    rows = []
    for s in ledger["stints"]:
        seeds = s.get("seeds", [])
        rows.append({
            "stint": s["stint"], "started_utc": s["started_utc"], "ended_utc": s.get("ended_utc"), "end": s.get("end"),
            "patients": len(seeds), "first_seed": seeds[0] if seeds else "", "last_seed": seeds[-1] if seeds else "",
            "realisations": s.get("realisations", 0), "pixel_passes_stint": s.get("pixel_passes", 0),
            "pixel_passes_total": s.get("pixel_passes_total", 0),
            "progress_pct": round(100.0 * s.get("pixel_passes_total", 0) / ledger["target_pixel_passes"], 4),
            "val_score": (s.get("val") or {}).get("score"), "dvk_score": (s.get("dvk") or {}).get("score"),
            "installed_score": (s.get("installed_network") or {}).get("score"), "installed": s.get("installed"),
            "ensemble_score": ((s.get("ensemble") or {}).get("score") or {}).get("score"),
            "ensemble_installed": (s.get("ensemble") or {}).get("installed"),
            "wall_s": s.get("wall_s"), "cpu_train_s": s.get("cpu_train_s"), "cpu_generate_s": s.get("cpu_generate_s"),
        })  # fmt: skip

    def write_csv(f) -> None:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        f.write(buf.getvalue().encode())

    atomic_write(folder / "ledger.csv", write_csv)


def _new_optimiser(net: DblurDoseNet, tcfg, lr: float):
    """Adam and its plateau scheduler, with no moments, at ``lr``."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=tcfg.plateau_factor, patience=tcfg.plateau_patience)


def run_stint(
    folder: Path,
    *,
    deadline: float,
    kernel_cache: Path | None,
    threads: int | None = None,
    device: str | None = None,
    progress=print,
    max_steps: int | None = None,
    restart_from_best: bool = False,
    generate_device: str | None = None,
    end_reserve_minutes: float | None = None,
) -> dict:
    """One stint of the campaign in ``folder`` until ``deadline`` (time.time() seconds) or,
    for tests and smoke runs, ``max_steps`` training steps.

    ``restart_from_best``: the stint starts from the weights of the campaign's best-scored stint
    (its snapshot, or the installed network when this campaign installed it), with a new optimiser
    and scheduler at the current learning rate, instead of from state.pt's weights: for a campaign
    whose later stints scored worse than its best (the ledger records it under ``restarted_from``).

    ``generate_device``: torch device of the patients' projection and OSEM (default CPU); on a
    lent GPU machine (``scripts/device_stint.sh``) the GPU, so that generation does not starve
    the GPU's training of data. ``end_reserve_minutes`` replaces config.json's time kept for
    scoring (a GPU scores in seconds what takes the CPU minutes).

    Returns the stint's ledger record.
    """
    from spectdose.learning.fast_cases import fast_training_cases

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} holds no campaign: it needs a config.json (see models/campaign/README.md)")
    cfg = CampaignConfig.from_file(folder / "config.json")
    tcfg = cfg.train_config()
    net_cfg = cfg.network()
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or "cpu")
    net = DblurDoseNet(net_cfg).to(dev)
    opt, sched = _new_optimiser(net, tcfg, tcfg.lr)
    rng = np.random.default_rng([tcfg.seed, 17])
    state_path = folder / "state.pt"
    next_seed, best_score = cfg.first_seed, None
    ledger = _load_ledger(folder, cfg)
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("network") != net_cfg.to_dict():
            raise InputError(f"{state_path}: its network differs from config.json's; a new network is a new campaign folder")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        _set_rng_states(state["rng"], rng)
        next_seed = int(state["next_seed"])
    else:
        torch.manual_seed(tcfg.seed)
        random.seed(tcfg.seed)
    used = set(ledger["seeds_used"])
    while next_seed in used:  # never a seed that was trained on, whatever the state says
        next_seed += 1
    best_score = ledger.get("best_score")
    fresh_optimizer = cfg.fresh_optimizer_each_stint and state_path.is_file() and not restart_from_best
    if fresh_optimizer:
        lr = opt.param_groups[0]["lr"]
        opt, sched = _new_optimiser(net, tcfg, lr)
    close_lost_stints(ledger)
    record = {"stint": len(ledger["stints"]) + 1, "started_utc": _now(), "end": "running", "seeds": [], "realisations": 0,
              "pixel_passes": 0, "pixel_passes_total": ledger["pixel_passes"], "host": platform.node(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(dev),
              "generate_device": str(generate_device or "cpu")}  # fmt: skip
    if fresh_optimizer:
        record["fresh_optimizer"] = {"lr": opt.param_groups[0]["lr"], "what": "a new Adam and plateau scheduler at the current learning rate"}
    ledger["stints"].append(record)
    if restart_from_best:
        best_stint, source, best = _best_weights(folder, cfg, net_cfg, ledger, (folder / cfg.install).resolve())
        net.load_state_dict(best.net.state_dict())
        lr = opt.param_groups[0]["lr"]
        opt, sched = _new_optimiser(net, tcfg, lr)
        record["restarted_from"] = {"stint": best_stint, "file": source, "score": ledger.get("best_score"), "lr": lr,
                                    "what": "the best stint's weights; a new optimiser and scheduler at the current "
                                            "learning rate"}  # fmt: skip
        progress(f"restarting from stint {best_stint}'s weights ({source}, score {ledger.get('best_score')}), lr {lr:g}")
    t_wall0, cpu0 = time.time(), time.process_time()
    cpu_gen = cpu_train = 0.0
    passes_per_step = tcfg.batch * tcfg.slab * tcfg.patch * tcfg.patch
    sampler = _PatchSampler([], tcfg, rng, net_cfg.pack, channels=net_cfg.inputs, cases=[])
    pool: list[int] = []  # cases per patient in the sampler, oldest first
    last_gen_cpu = None

    def save(reason: str) -> None:
        record.update({"ended_utc": _now(), "wall_s": round(time.time() - t_wall0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
                       "cpu_train_s": round(cpu_train, 1), "cpu_generate_s": round(cpu_gen, 1), "lr": opt.param_groups[0]["lr"],
                       "pixel_passes_total": ledger["pixel_passes"]})  # fmt: skip
        if reason:
            record["end"] = reason
        with signals.protected():
            atomic_torch_save(
                {"version": _STATE_VERSION, "net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "rng": _rng_states(rng), "next_seed": next_seed, "network": net_cfg.to_dict()},
                state_path,
            )  # fmt: skip
            _write_ledger(folder, ledger)

    with _Signals() as signals:
        try:
            val = _val_patients(cfg, kernel_cache, progress, generate_device=str(generate_device or "cpu"))
            val_sampler = _PatchSampler([], tcfg, np.random.default_rng(12345), net_cfg.pack, channels=net_cfg.inputs,
                                        cases=[c for p in val for c in p.cases])  # fmt: skip
            val_batch = [val_sampler.sample(augment=False) for _ in range(tcfg.val_patches)]
            end_by = deadline - 60.0 * (cfg.end_reserve_minutes if end_reserve_minutes is None else end_reserve_minutes)
            last_ckpt = time.time()
            save("")
            steps = 0
            while time.time() < end_by and (max_steps is None or steps < max_steps):
                trained_enough = cpu_train >= cpu_gen * (1.0 - cfg.generation_share) / cfg.generation_share
                time_for_one = last_gen_cpu is None or time.time() + last_gen_cpu * 1.5 < end_by
                if not pool or (trained_enough and time_for_one) or (len(pool) < min(cfg.start_patients, cfg.pool_patients) and time_for_one):
                    c0 = time.process_time()
                    p = fast_training_cases(next_seed, profile=cfg.profile, spacing_mm=cfg.spacing_mm, n_noise=cfg.noise_realisations,
                                            recovery=net_cfg.recovery, kernel_cache=kernel_cache, device=str(generate_device or "cpu"))  # fmt: skip
                    last_gen_cpu = time.process_time() - c0
                    cpu_gen += last_gen_cpu
                    for case in p.cases:
                        sampler.add_case(case)
                    pool.append(len(p.cases))
                    while len(pool) > cfg.pool_patients:
                        for _ in range(pool.pop(0)):
                            sampler.drop_first()
                    record["seeds"].append(next_seed)
                    record["realisations"] += len(p.cases)
                    ledger["seeds_used"].append(next_seed)
                    next_seed += 1
                    progress(f"patient {p.seed}: {len(p.cases)} realisations in {last_gen_cpu:.0f} CPU-s ({p.info['osem']} OSEM)")
                else:
                    c0 = time.process_time()
                    net.train()
                    batch = [tuple(t.to(dev) for t in sampler.sample()) for _ in range(tcfg.batch)]
                    loss = _loss(net, batch, tcfg)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    cpu_train += time.process_time() - c0
                    steps += 1
                    ledger["pixel_passes"] += passes_per_step
                    record["pixel_passes"] += passes_per_step
                if time.time() - last_ckpt >= 60.0 * cfg.checkpoint_minutes:
                    _precise_bn(net, sampler, dev)
                    val_loss = _evaluate_loss(net, val_batch, dev, tcfg)
                    sched.step(val_loss)
                    record.setdefault("val_loss", []).append(round(val_loss, 6))
                    save("")
                    last_ckpt = time.time()
                    progress(f"checkpoint: val loss {val_loss:.5g}, {ledger['pixel_passes']:.3g} pixel passes "
                             f"({100 * ledger['pixel_passes'] / cfg.target_pixel_passes:.2f} % of the target)")  # fmt: skip
            _precise_bn(net, sampler, dev)
            save("scoring")
            net.eval()
            model = TrainedModel(net=net, config=net_cfg, normalisation=Normalisation(), spacing_mm=cfg.spacing_mm, name=cfg.name,
                                 metadata={})  # fmt: skip
            t_score = time.time()
            record["val"] = score_network(model, val)
            seconds_per_network = time.time() - t_score
            record["scoring_s_per_network"] = round(seconds_per_network, 1)
            record["dvk"] = score_network(None, val)
            install_path = (folder / cfg.install).resolve()
            installed = _score_installed_network(install_path, cfg, net_cfg, val)
            record["installed_network"] = installed
            score = record["val"]["score"]
            beats_best = best_score is None or score < best_score
            beats_installed = installed is None or (installed.get("score") is not None and score < installed["score"])
            record["installed"] = bool(beats_best and beats_installed)
            record["install_reason"] = (
                f"score {score} vs campaign best {best_score} and installed {None if installed is None else installed.get('score')}"
            )
            if beats_best:
                ledger["best_score"] = score
            meta = {"campaign": cfg.name, "stint": record["stint"], "val": record["val"], "dvk": record["dvk"],
                    "pixel_passes": ledger["pixel_passes"], "seeds_used": len(ledger["seeds_used"])}  # fmt: skip
            with signals.protected():
                # the installed network of an earlier stint joins the snapshots before this stint may replace it
                _seed_snapshots(folder, cfg, net_cfg, install_path, below=record["stint"])
                _save_snapshot(folder, cfg, net, record["stint"], meta)
                _prune_snapshots(folder, cfg.ensemble_members)
            if record["installed"]:
                with signals.protected():
                    save_model(install_path, net.cpu(), normalisation=Normalisation(), spacing_mm=cfg.spacing_mm, name=cfg.name, metadata=meta)
                    _append_card(install_path.with_suffix(".md"), record, ledger)
                net.to(dev)
            progress(f"validation score {score} (DVK {record['dvk']['score']}, installed "
                     f"{None if installed is None else installed.get('score')}); installed: {record['installed']}")  # fmt: skip
            save("done")
        except _Stop as stop:
            save(f"stopped ({stop})")
            progress(f"stopped by {stop}: state saved in {state_path}")
        if record["end"] == "done":
            # After the stint's own results are saved: a stint stopped or killed here has lost
            # nothing but the ensemble, which `--ensemble-only` then builds.
            single = record["val"] if record["installed"] else installed
            needed_s = seconds_per_network * 2 * cfg.ensemble_members  # at most: the new members and the installed ones
            try:
                if time.time() + needed_s > deadline:
                    record["ensemble"] = {"note": f"not built: about {needed_s:.0f} s needed, the stint's time is up; "
                                                  f"`spectdose train --campaign DIR --ensemble-only` builds it"}  # fmt: skip
                else:
                    record["ensemble"], install = _update_ensemble(folder, cfg, net_cfg, val, install_path, single=single,
                                                                   stint=record["stint"], device=dev, progress=progress)  # fmt: skip
                    if install is not None:
                        with signals.protected():
                            install()
                            record["ensemble"]["installed"] = True
                with signals.protected():
                    _write_ledger(folder, ledger)
            except _Stop as stop:
                if (record.get("ensemble") or {}).get("score") is None:
                    record["ensemble"] = {"note": f"not built: stopped by {stop}; `spectdose train --campaign DIR --ensemble-only` builds it"}
                _write_ledger(folder, ledger)
                progress(f"stopped by {stop} while building the ensemble")
            except InputError as exc:  # e.g. nothing to calibrate on: the stint itself is done and saved
                record["ensemble"] = {"note": f"not built: {exc}"}
                _write_ledger(folder, ledger)
                progress(f"no ensemble: {exc}")
    return record


# ---------------------------------------------------------------------------------------
# Snapshots and the uncertainty ensemble
# ---------------------------------------------------------------------------------------
_SNAPSHOT_NAME = re.compile(r"stint-(\d+)\.pt")


def _snapshots(folder: Path) -> dict[int, Path]:
    """DIR/snapshots/stint-NNN.pt by stint number."""
    out = {}
    for path in (Path(folder) / "snapshots").glob("stint-*.pt"):
        m = _SNAPSHOT_NAME.fullmatch(path.name)
        if m:
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def _save_snapshot(folder: Path, cfg: CampaignConfig, net: DblurDoseNet, stint: int, metadata: dict) -> Path:
    path = Path(folder) / "snapshots" / f"stint-{stint:03d}.pt"
    return save_model(path, net, normalisation=Normalisation(), spacing_mm=cfg.spacing_mm, name=f"{cfg.name}_stint{stint}",
                      metadata={**metadata, "campaign": cfg.name, "stint": stint})  # fmt: skip


def _prune_snapshots(folder: Path, keep: int) -> list[int]:
    """Remove all but the newest ``keep`` snapshots (they are committed with the campaign)."""
    old = list(_snapshots(folder).items())[:-keep]
    for _, path in old:
        path.unlink()
    return [stint for stint, _ in old]


def _seed_snapshots(folder: Path, cfg: CampaignConfig, net_cfg: NetworkConfig, install_path: Path, *, below: int) -> int | None:
    """A campaign without snapshots takes the installed network as one when this campaign installed
    it (its metadata names the campaign and a stint before ``below``): the stint number."""
    if _snapshots(folder) or not install_path.is_file():
        return None
    try:
        installed = load_model(install_path, device="cpu")
    except InputError:
        return None
    stint = installed.metadata.get("stint")
    if installed.metadata.get("campaign") != cfg.name or not isinstance(stint, int) or not 0 < stint < below:
        return None
    if installed.config.to_dict() != net_cfg.to_dict() or tuple(installed.spacing_mm) != tuple(cfg.spacing_mm):
        return None
    _save_snapshot(folder, cfg, installed.net, stint, {**installed.metadata, "source": install_path.name})
    return stint


def _best_weights(folder: Path, cfg: CampaignConfig, net_cfg: NetworkConfig, ledger: dict,
                  install_path: Path) -> tuple[int, str, TrainedModel]:
    """The campaign's best-scored stint, where its weights are kept, and the network: its snapshot,
    else the installed network when its metadata names this campaign and that stint."""
    scored = [r for r in ledger["stints"] if (r.get("val") or {}).get("score") is not None]
    if not scored:
        raise InputError(f"{folder}: no stint has been scored yet, so there is no best stint to restart from")
    best = min(scored, key=lambda r: r["val"]["score"])
    candidates = [p for p in (_snapshots(folder).get(best["stint"]), install_path) if p is not None and p.is_file()]
    for path in candidates:
        model = load_model(path, device="cpu")
        if model.metadata.get("campaign") != cfg.name or model.metadata.get("stint") != best["stint"]:
            continue
        if model.config.to_dict() != net_cfg.to_dict():
            raise InputError(f"{path}: its network differs from config.json's")
        where = path.relative_to(folder) if path.is_relative_to(folder) else path.name
        return best["stint"], str(where), model
    raise InputError(f"{folder}: the weights of its best stint ({best['stint']}, score {best['val']['score']}) are "
                     f"neither a snapshot nor the installed network; nothing to restart from")


def _snapshot_from_state(folder: Path, cfg: CampaignConfig, net_cfg: NetworkConfig, ledger: dict, stint: dict) -> str:
    """The weights in state.pt as the snapshot of ``stint``, the ledger's last scored stint, when
    they are still its weights (no stint came after it): what happened, in words."""
    state_path = Path(folder) / "state.pt"
    if ledger["stints"][-1] is not stint:
        return f"state.pt holds the weights of stint {ledger['stints'][-1]['stint']}, not of stint {stint['stint']}: no snapshot of it"
    if not state_path.is_file():
        return f"no state.pt: no snapshot of stint {stint['stint']}"
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    if state.get("network") != net_cfg.to_dict():
        raise InputError(f"{state_path}: its network differs from config.json's")
    net = DblurDoseNet(net_cfg)
    net.load_state_dict(state["net"])
    meta = {"val": stint.get("val"), "dvk": stint.get("dvk"), "pixel_passes": stint.get("pixel_passes_total"), "source": "state.pt"}
    _save_snapshot(folder, cfg, net.eval(), stint["stint"], meta)
    return f"stint {stint['stint']}: snapshot from state.pt"


def _ensemble_identity(ens) -> dict:
    return {"name": ens.name, "campaign": ens.metadata.get("campaign"), "member_stints": ens.metadata.get("member_stints"),
            "members": ens.metadata.get("members")}  # fmt: skip


def _score_installed_ensemble(path: Path, cfg: CampaignConfig, net_cfg: NetworkConfig, val: list, device) -> dict | None:
    """Score of the installed ensemble's mean on the validation cases (None: there is none;
    ``score`` None with a ``note``: a member cannot run on these cases). An ensemble this campaign
    installed carries its score on the same validation seeds: that is taken, not recomputed (the
    same weights on the same cases; it saves the members' passes at every stint)."""
    if not path.is_file():
        return None
    try:
        ens = load_ensemble(path, device=device)
    except InputError as exc:
        return {"score": None, "note": str(exc)}
    meta = ens.metadata
    if meta.get("campaign") == cfg.name and meta.get("val_seeds") == list(cfg.val_seeds) and isinstance(meta.get("score"), dict):
        return {**meta["score"], **_ensemble_identity(ens), "from": "its metadata"}
    channels = _channels(val)
    for member in ens.members:
        reason = _not_comparable(member, cfg, net_cfg, channels)
        if reason:
            return {"score": None, "note": f"not comparable: {reason}", **_ensemble_identity(ens)}
    rows = [_case_score(ensemble_mean_sd(predict_case(m, case) for m in ens.members)[0], case, p.vois) for p in val for case in p.cases]
    return {**_mean_score(rows), **_ensemble_identity(ens)}


def _update_ensemble(
    folder: Path,
    cfg: CampaignConfig,
    net_cfg: NetworkConfig,
    val: list,
    install_path: Path,
    *,
    single: dict | None,
    stint: int,
    device,
    progress,
) -> tuple[dict, Callable[[], None] | None]:
    """The ensemble of the newest ``cfg.ensemble_members`` snapshots, its sigma calibrated on the
    validation patients, to be installed at ``ensemble_path(install_path)`` when its mean scores
    better.

    Installation rule (lower score is better): with no ensemble installed, it is installed; when
    the installed ensemble can run on the validation cases (same grid and normalisation, inputs
    the cases hold), only if the new mean scores lower than the installed mean - the dose rate of
    a job with the uncertainty is that mean; when it cannot (another grid, inputs these cases
    lack), the two cannot be compared, and the new one replaces it only if its mean scores lower
    than the installed single network ``single`` (scored on the same cases; None: none
    installed), so that turning the uncertainty on never gives a dose rate worse than
    ``--method cnn`` by this measure. ``stint`` is the ledger stint the record belongs to.

    Returns the ledger's record of the ensemble, with ``installed`` False, and the function that
    installs it (writes the file and the card; None: it does not win). The caller sets
    ``installed`` once that has run, so that the ledger never claims an installation a signal cut
    short.
    """
    snapshots = _snapshots(folder)
    stints = list(snapshots)[-cfg.ensemble_members :]
    if len(stints) < 2:
        return {"members": stints, "note": "one snapshot so far: an ensemble needs two"}, None
    members = [load_model(snapshots[s], device=device) for s in stints]
    channels = _channels(val)
    unusable = [r for m in members if (r := _not_comparable(m, cfg, net_cfg, channels))]
    if unusable:
        return {"members": stints, "note": f"snapshots that cannot run on the validation cases: {unusable}"}, None
    progress(f"ensemble of stints {stints}: calibrating its sigma on the validation patients")
    cases = [(case, p.vois) for p in val for case in p.cases]
    calibration, means = calibrate_ensemble(members, [c for c, _ in cases], patients=[str(p.seed) for p in val])
    score = _mean_score([_case_score(mean, c, vois) for mean, (c, vois) in zip(means, cases, strict=True)])
    del means
    ens_path = ensemble_path(install_path)
    current = _score_installed_ensemble(ens_path, cfg, net_cfg, val, device)
    single_score = None if single is None else single.get("score")
    new = score["score"]
    if current is None:
        wins, reason = True, f"ensemble mean score {new}; no ensemble installed"
    elif current.get("score") is not None:
        wins, reason = new < current["score"], f"ensemble mean score {new} vs the installed ensemble's {current['score']}"
    else:
        wins = single is None or (single_score is not None and new < single_score)
        reason = (f"ensemble mean score {new}; the installed ensemble cannot be compared ({current['note']}), so vs the installed "
                  f"network's {single_score}")  # fmt: skip
    result = {"members": stints, "score": score,
              "calibration": {k: v for k, v in calibration.to_dict().items() if k != "fitted_on"},
              "installed_ensemble": current, "installed_network_score": single_score, "installed": False,
              "install_reason": reason}  # fmt: skip
    progress(f"ensemble of stints {stints}: {reason}; {'installing it' if wins else 'not installed'}")
    if not wins:
        return result, None
    meta = {"campaign": cfg.name, "stint": stint, "member_stints": stints, "members": [m.name for m in members],
            "member_files": [f"snapshots/{snapshots[s].name}" for s in stints],
            "method": f"snapshot ensemble of {len(members)} DblurDoseNets (campaign {cfg.name}, stints "
                      f"{', '.join(map(str, stints))}), sigma calibrated on validation patients",
            "score": score, "replaced": current, "installed_network_score": single_score,
            "val_seeds": list(cfg.val_seeds), "built_utc": _now()}  # fmt: skip

    def install() -> None:
        save_ensemble(ens_path, members, calibration, name=ens_path.stem, metadata=meta)
        _append_ensemble_card(install_path.with_suffix(".md"), result, ens_path, cfg, stint)

    return result, install


def _campaign_between_stints(folder: Path, then: str) -> tuple[CampaignConfig, dict]:
    """The campaign's config and ledger for a command that runs between stints; refused while
    the ledger's last stint runs (``then``: what to do after it)."""
    cfg = CampaignConfig.from_file(folder / "config.json")
    ledger = _load_ledger(folder, cfg)
    if ledger["stints"] and ledger["stints"][-1].get("end") in ("running", "scoring"):
        raise InputError(f"{folder}: stint {ledger['stints'][-1]['stint']} is running (or was killed; the next stint marks it lost): "
                         f"{then} after it")  # fmt: skip
    return cfg, ledger


def build_campaign_ensemble(
    folder: Path,
    *,
    kernel_cache: Path | None,
    threads: int | None = None,
    device: str | None = None,
    progress=print,
) -> dict:
    """`spectdose train --campaign DIR --ensemble-only`: the snapshots and the ensemble step of a
    stint without training, for the ledger's last scored stint.

    Seeds the snapshots from the installed network when the campaign has none and this campaign
    installed it; adds the weights in state.pt as the last scored stint's snapshot when it has
    none and no stint followed it; prunes to ``ensemble_members``; then builds, scores and
    maybe installs the ensemble as a stint does (``_update_ensemble``) and records it in that
    stint's ledger record. Idempotent: when the record already holds an ensemble of the same
    snapshots, nothing is computed or written again. Refused while a stint runs.

    Returns the stint's ensemble record.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "ledger.json").is_file():
        raise InputError(f"{folder} holds no campaign with a stint: it needs config.json and ledger.json")
    cfg, ledger = _campaign_between_stints(folder, "build the ensemble")
    net_cfg = cfg.network()
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or "cpu")
    scored = [s for s in ledger["stints"] if s.get("val")]
    if not scored:
        raise InputError(f"{folder}: no stint has been scored yet, so there is no snapshot to make")
    last = scored[-1]
    install_path = (folder / cfg.install).resolve()
    seeded = _seed_snapshots(folder, cfg, net_cfg, install_path, below=last["stint"] + 1)
    if seeded is not None:
        progress(f"stint {seeded}: snapshot from {install_path.name}")
    if last["stint"] not in _snapshots(folder):
        progress(_snapshot_from_state(folder, cfg, net_cfg, ledger, last))
    pruned = _prune_snapshots(folder, cfg.ensemble_members)
    if pruned:
        progress(f"snapshots of stints {pruned} removed (ensemble_members {cfg.ensemble_members})")
    stints = list(_snapshots(folder))[-cfg.ensemble_members :]
    done = last.get("ensemble") or {}
    if done.get("members") == stints and done.get("score") is not None:
        progress(f"stint {last['stint']} already has the ensemble of stints {stints} (installed: {done.get('installed')}): nothing to do")
        return done
    if len(stints) < 2:
        progress(f"snapshots of stints {stints}: an ensemble needs two")
        return {"members": stints, "note": "one snapshot so far: an ensemble needs two"}
    val = _val_patients(cfg, kernel_cache, progress)
    single = _score_installed_network(install_path, cfg, net_cfg, val)
    result, install = _update_ensemble(folder, cfg, net_cfg, val, install_path, single=single, stint=last["stint"], device=dev,
                                       progress=progress)  # fmt: skip
    if install is not None:
        install()
        result["installed"] = True
    result["built"] = f"by --ensemble-only at {_now()}"
    last["ensemble"] = result
    _write_ledger(folder, ledger)
    return result


def recalibrate_installed_ensemble(
    folder: Path,
    *,
    kernel_cache: Path | None,
    threads: int | None = None,
    device: str | None = None,
    progress=print,
) -> dict:
    """`spectdose train --campaign DIR --recalibrate-ensemble`: refit the installed ensemble's
    sigma by the current rule (``SIGMA_CALIBRATION_RULE``) on the campaign's validation patients.

    The members and their mean (the dose rate) are untouched; only sigma changes, so the file is
    rewritten (a new SHA-256, hence new results for jobs that use it) with the previous
    calibration kept in its metadata, a line on the model card and a record in the ledger.
    Nothing is done when the calibration already follows the rule. Refused while a stint runs.

    Returns the ledger's record (``"recalibrated": False`` when nothing was to do).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} holds no campaign: it needs config.json")
    cfg, ledger = _campaign_between_stints(folder, "recalibrate")
    net_cfg = cfg.network()
    install_path = (folder / cfg.install).resolve()
    ens_path = ensemble_path(install_path)
    if not ens_path.is_file():
        raise InputError(f"no ensemble installed at {ens_path}: nothing to recalibrate")
    if threads:
        torch.set_num_threads(int(threads))
    ens = load_ensemble(ens_path, device=torch.device(device or "cpu"))
    before_sha = hashlib.sha256(ens_path.read_bytes()).hexdigest()
    old = ens.calibration
    if old.rule == SIGMA_CALIBRATION_RULE:
        progress(f"{ens_path.name}: its sigma already follows the rule '{SIGMA_CALIBRATION_RULE}': nothing to do")
        return {"recalibrated": False, "sha256": before_sha}
    val = _val_patients(cfg, kernel_cache, progress)
    channels = _channels(val)
    unusable = [r for m in ens.members if (r := _not_comparable(m, cfg, net_cfg, channels))]
    if unusable:
        raise InputError(f"{ens_path.name}: members that cannot run on the campaign's validation cases: {unusable}")
    progress(f"{ens_path.name}: refitting its sigma on validation patients {list(cfg.val_seeds)}")
    calibration, _ = calibrate_ensemble(ens.members, [c for p in val for c in p.cases], patients=[str(p.seed) for p in val])
    record = {"utc": _now(), "ensemble": ens_path.name, "sha256_before": before_sha, "rule": SIGMA_CALIBRATION_RULE,
              "before": {k: v for k, v in old.to_dict().items() if k != "fitted_on"},
              "after": {k: v for k, v in calibration.to_dict().items() if k != "fitted_on"}}  # fmt: skip
    meta = dict(ens.metadata)
    meta["recalibrated"] = [*meta.get("recalibrated", []), {k: record[k] for k in ("utc", "sha256_before", "rule", "before")}]
    save_ensemble(ens_path, ens.members, calibration, name=ens.name, metadata=meta)
    record["sha256_after"] = hashlib.sha256(ens_path.read_bytes()).hexdigest()
    record["recalibrated"] = True
    b, a = record["before"], record["after"]
    _append_text(install_path.with_suffix(".md"), (
        f"\n## Uncertainty ensemble recalibrated ({record['utc']}): `{ens_path.name}` {before_sha[:12]} -> "
        f"{record['sha256_after'][:12]}\n\n"
        f"- same members and mean; sigma refitted on validation seeds {', '.join(map(str, cfg.val_seeds))} by the rule "
        f"'{SIGMA_CALIBRATION_RULE}' (before: '{b.get('rule') or 'split the +-1/+-2 sigma coverage targets'}')\n"
        f"- 1-sigma = sqrt(({a['scale']:.4g} x members' sd)^2 + ({a['rel_floor']:.4g} x mean)^2), was "
        f"({b['scale']:.4g}, {b['rel_floor']:.4g}); validation coverage +-1 sigma {a['coverage_1sigma_pct']} % "
        f"(was {b['coverage_1sigma_pct']} %), +-2 sigma {a['coverage_2sigma_pct']} % (was {b['coverage_2sigma_pct']} %)\n"
    ))  # fmt: skip
    ledger.setdefault("recalibrations", []).append(record)
    _write_ledger(folder, ledger)
    progress(f"{ens_path.name}: sigma scale {b['scale']:.4g} -> {a['scale']:.4g}, floor {b['rel_floor']:.4g} -> {a['rel_floor']:.4g}; "
             f"validation +-2 sigma {b['coverage_2sigma_pct']} -> {a['coverage_2sigma_pct']} %")  # fmt: skip
    return record


def _append_text(card: Path, text: str) -> None:
    old = card.read_text() if card.is_file() else ""
    atomic_write(card, lambda f: f.write((old + text).encode()))


def _append_ensemble_card(card: Path, result: dict, ens_path: Path, cfg: CampaignConfig, stint: int) -> None:
    """The installed network's card gains the uncertainty ensemble the campaign installed."""
    s, c = result["score"], result["calibration"]
    current = result["installed_ensemble"]
    before = "none" if current is None else (current.get("score") if current.get("score") is not None else current.get("note"))
    text = (
        f"\n## Uncertainty ensemble (campaign stint {stint}, {_now()}): `{ens_path.name}` installed\n\n"
        f"- snapshot ensemble of the campaign's stints {', '.join(map(str, result['members']))}; its mean's validation score "
        f"{s['score']} (VOI mean |rel. error| {s['voi_abs_rel_error']}, NRMSE {s['nrmse']}); previously installed ensemble: "
        f"{before}; installed network: {result['installed_network_score']}\n"
        f"- 1-sigma = sqrt(({c['scale']:.4g} x members' sd)^2 + ({c['rel_floor']:.4g} x mean)^2), fitted on validation seeds "
        f"{', '.join(map(str, cfg.val_seeds))} ({c['n_voxels']} voxels above 10 % of each case's maximum): +-1 sigma "
        f"{c['coverage_1sigma_pct']} %, +-2 sigma {c['coverage_2sigma_pct']} % (sigma fitted as the error's standard deviation)\n"
    )
    _append_text(card, text)


def _append_card(card: Path, record: dict, ledger: dict) -> None:
    """The installed network's card gains the stint that installed it."""
    v, d = record["val"], record["dvk"]
    text = (
        f"\n## Campaign stint {record['stint']} ({record['started_utc']} to {record.get('ended_utc')}): installed\n\n"
        f"- validation score {v['score']} (VOI mean |rel. error| {v['voi_abs_rel_error']}, NRMSE {v['nrmse']}); "
        f"DVK {d['score']} ({d['voi_abs_rel_error']}, {d['nrmse']}); previously installed: {record['installed_network']}\n"
        f"- {ledger['pixel_passes']:.3g} model-grid pixel passes ({100 * ledger['pixel_passes'] / ledger['target_pixel_passes']:.2f} % "
        f"of the target), {len(ledger['seeds_used'])} training patients; ledger: models/campaign/ledger.json\n"
    )
    _append_text(card, text)
