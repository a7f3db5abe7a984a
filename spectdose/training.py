"""Training data and training loop for DblurDoseNet on the project's virtual patients.

Data: a versioned, seeded set of clinical-size virtual patients (``DATASETS``), split by
patient into train / validation / test, with extra Poisson realisations for some test
patients. Each phantom is turned into four arrays on the model grid (activity, density,
DVK dose rate from the SPECT, reference dose rate from the truth), normalised per patient
as the network expects (``spectdose.cnn.Normalisation``).

Training: MSE on the middle-slice dose rate of 11-slice packs (Li et al. 2022), Adam at
1e-3 with ReduceLROnPlateau, patches in-plane so it runs on a CPU; slabs of packs share the
depth-valid stem. Checkpoints every epoch (resumable), loss curves to CSV and PNG.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .cnn import Normalisation, model_grid, normalised_inputs, save_model, to_model_grid
from .errors import InputError
from .geometry import Volume
from .network import DblurDoseNet, NetworkConfig

__all__ = [
    "DATASETS",
    "TrainConfig",
    "generate_dataset",
    "prepare_case",
    "train",
]

# Versioned data sets: patient seeds per split (never reused across splits) and the extra
# noise realisations (noise seeds) of test patients for ensemble noise. Generated, not
# committed: `spectdose dataset OUT --version v1` rebuilds the same studies bit for bit.
DATASETS: dict[str, dict] = {
    "v1": {
        "size": "clinical",
        "train": [101, 102, 103, 104, 105, 106, 107, 108],
        "val": [151, 152],
        "test": [201, 202, 203],
        "test_realisations": {201: [7201, 8201]},
    },
    # For tests and smoke runs: the same pipeline on small phantoms.
    "tiny": {"size": "small", "train": [11, 12], "val": [13], "test": [14], "test_realisations": {}},
}

MODEL_SPACING_MM = (3.0, 1.953125, 1.953125)  # CT slices, 2 x the paper's 0.98 mm in-plane


def dataset_members(version: str) -> list[tuple[str, str, int, int | None]]:
    """(split, folder name, patient seed, noise seed or None) of every study in a version."""
    if version not in DATASETS:
        raise InputError(f"unknown data set version {version!r}: one of {sorted(DATASETS)}")
    spec = DATASETS[version]
    out = []
    for split in ("train", "val", "test"):
        for seed in spec[split]:
            out.append((split, f"vp{seed:04d}", seed, None))
            for noise in spec["test_realisations"].get(seed, []) if split == "test" else []:
                out.append((split, f"vp{seed:04d}-r{noise}", seed, noise))
    return out


def _generate_member(job: tuple[str, str, int, int | None, str]) -> str:
    from .phantom import generate

    out_dir, name, seed, noise, size = job
    target = Path(out_dir) / name
    tmp = target.with_name(target.name + ".partial")
    generate(tmp, seed, size=size, noise_seed=noise)
    tmp.rename(target)
    return name


def generate_dataset(
    out_dir: Path, version: str = "v1", *, workers: int = 1, progress: Callable[[str], None] | None = None
) -> Path:
    """Write every phantom of ``version`` (skipping finished ones) and a manifest.

    ``workers`` phantoms are made at once (each simulation uses one CPU thread).
    """
    out_dir = Path(out_dir)
    spec = DATASETS.get(version) or {}
    members = dataset_members(version)
    jobs = [
        (str(out_dir / split), name, seed, noise, spec["size"])
        for split, name, seed, noise in members
        if not (out_dir / split / name / "truth" / "phantom.json").is_file()
    ]
    for split in ("train", "val", "test"):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for name in pool.imap_unordered(_generate_member, jobs):
                if progress:
                    progress(f"generated {name}")
    else:
        for job in jobs:
            _generate_member(job)
            if progress:
                progress(f"generated {job[1]}")
    manifest = {
        "version": version,
        "size": spec["size"],
        "members": [{"split": s, "name": n, "seed": p, "noise_seed": q} for s, n, p, q in members],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir / "manifest.json"


def prepare_case(
    phantom_dir: Path,
    *,
    spacing_mm=MODEL_SPACING_MM,
    normalisation: Normalisation | None = None,
    kernel_cache: Path | None = None,
) -> dict[str, np.ndarray]:
    """Normalised network inputs and label of one phantom, on the model grid.

    Returns float32 arrays ``activity``, ``density``, ``dvk``, ``label`` (z, y, x) and the
    scalar ``total_mbq``; the volume is cropped in-plane to the body's bounding box.
    """
    from .density import hu_to_density
    from .evaluate import load_phantom_case
    from .ingest import load_study
    from .pipeline import DoseOptions, compute_dose_rate, spect_on_ct_grid
    from .reference import reference_dose_rate

    normalisation = normalisation or Normalisation()
    case = load_phantom_case(phantom_dir)
    study = load_study(Path(phantom_dir) / "dicom")
    activity, _ = spect_on_ct_grid(study, [])
    density = Volume(hu_to_density(study.ct.array), study.ct.grid, "g/cm3")
    dvk, _ = compute_dose_rate(activity, density, options=DoseOptions(kernel_cache_dir=kernel_cache))
    ref, _ = reference_dose_rate(case.activity_true, case.density_true, cache_dir=kernel_cache)
    grid, block = model_grid(study.ct.grid, spacing_mm)
    a, rho, d, r = (to_model_grid(v, grid, block).array for v in (activity, density, dvk, ref))
    a_n, rho_n, d_n, total_mbq = normalised_inputs(a, rho, d, grid.voxel_volume_ml, normalisation)
    label = (r.astype(np.float64) / total_mbq * normalisation.dose_scale_per_gy_s).astype(np.float32)
    body = np.any(rho > 0.5, axis=0)
    ys, xs = np.nonzero(body)
    pad = 8
    y0, y1 = max(0, ys.min() - pad), min(body.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(body.shape[1], xs.max() + pad + 1)
    crop = (slice(None), slice(y0, y1), slice(x0, x1))
    return {
        "activity": a_n[crop],
        "density": rho_n[crop],
        "dvk": d_n[crop],
        "label": label[crop],
        "total_mbq": np.float64(total_mbq),
        "spacing_mm": np.asarray(grid.spacing_mm),
    }


def prepare_dataset(data_dir: Path, cache_dir: Path, *, kernel_cache: Path | None, progress=None) -> list[Path]:
    """``prepare_case`` for every phantom under ``data_dir/{train,val,test}``, cached as npz."""
    out = []
    for phantom in sorted(p.parent.parent for p in Path(data_dir).glob("*/*/truth/phantom.json")):
        target = Path(cache_dir) / phantom.parent.name / f"{phantom.name}.npz"
        if not target.is_file():
            if progress:
                progress(f"preparing {phantom.parent.name}/{phantom.name}")
            arrays = prepare_case(phantom, kernel_cache=kernel_cache)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.stem + ".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.rename(target)
        out.append(target)
    return out


@dataclasses.dataclass
class TrainConfig:
    """A training run; saved beside the checkpoints and in the model card."""

    name: str = "dblurdosenet"
    network: dict = dataclasses.field(default_factory=lambda: NetworkConfig().to_dict())
    patch: int = 64
    slab: int = 8  # output slices per sample (depth_valid shares the stem across them)
    batch: int = 4  # slabs per step
    steps_per_epoch: int = 200
    epochs: int = 20
    lr: float = 1e-3
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    hot_fraction: float = 0.6  # patches centred on voxels drawn by reference dose rate
    val_patches: int = 48
    seed: int = 0
    threads: int | None = None
    max_minutes: float | None = None
    # Plain MSE is blind to errors in low-dose tissue (bone marrow is ~1 % of a lesion's dose
    # rate, so a 100 % error there adds ~1e-4 to a loss of ~0.05). A relative term,
    # ((out - label) / (label + floor))^2 with floor in normalised units, weighs it in.
    rel_loss_weight: float = 0.0
    rel_loss_floor: float = 0.02
    init_from: str | None = None  # start (not resume) from these weights (.pt from `spectdose train`)

    @classmethod
    def from_file(cls, path: Path) -> TrainConfig:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InputError(f"unknown training options in {Path(path).name}: {sorted(unknown)}")
        return cls(**data)


class _PatchSampler:
    """Random slabs of packs from prepared cases (float32 arrays held in memory)."""

    def __init__(self, files: list[Path], cfg: TrainConfig, rng: np.random.Generator, pack: int):
        self.cases = []
        for f in files:
            with np.load(f) as z:
                self.cases.append({k: z[k] for k in ("activity", "density", "dvk", "label")})
        if not self.cases:
            raise InputError("no prepared training cases")
        self.cfg, self.rng, self.half = cfg, rng, pack // 2
        self.hot = []
        for c in self.cases:
            w = np.clip(c["label"], 0, None).ravel().astype(np.float64)
            self.hot.append(w / w.sum() if w.sum() > 0 else None)

    def sample(self, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs (1, 2, slab + 2*half, P, P), dvk (slab, 1, P, P), label (slab, 1, P, P))."""
        cfg, rng, half = self.cfg, self.rng, self.half
        ci = int(rng.integers(len(self.cases)))
        c = self.cases[ci]
        nz, ny, nx = c["label"].shape
        p, s = cfg.patch, min(cfg.slab, nz)
        if self.hot[ci] is not None and rng.random() < cfg.hot_fraction:
            k, j, i = np.unravel_index(int(rng.choice(self.hot[ci].size, p=self.hot[ci])), (nz, ny, nx))
        else:
            k, j, i = int(rng.integers(nz)), int(rng.integers(ny)), int(rng.integers(nx))
        z0 = int(np.clip(k - s // 2, 0, nz - s))
        y0 = int(np.clip(j - p // 2, 0, max(0, ny - p)))
        x0 = int(np.clip(i - p // 2, 0, max(0, nx - p)))
        zs = np.clip(np.arange(z0 - half, z0 + s + half), 0, nz - 1)  # replicated edge slices
        ysl, xsl = slice(y0, y0 + p), slice(x0, x0 + p)
        inp = np.stack([c["activity"][zs][:, ysl, xsl], c["density"][zs][:, ysl, xsl]])
        dvk = c["dvk"][z0 : z0 + s, ysl, xsl][:, None]
        lab = c["label"][z0 : z0 + s, ysl, xsl][:, None]
        inp, dvk, lab = (_pad_to(a, p) for a in (inp, dvk, lab))
        if augment:
            if rng.random() < 0.5:
                inp, dvk, lab = inp[..., ::-1], dvk[..., ::-1], lab[..., ::-1]
            if rng.random() < 0.5:
                inp, dvk, lab = inp[..., ::-1, :], dvk[..., ::-1, :], lab[..., ::-1, :]
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        return as_t(inp)[None], as_t(dvk), as_t(lab)


def _pad_to(a: np.ndarray, p: int) -> np.ndarray:
    pads = [(0, 0)] * (a.ndim - 2) + [(0, max(0, p - a.shape[-2])), (0, max(0, p - a.shape[-1]))]
    return np.pad(a, pads) if any(x[1] for x in pads[-2:]) else a


def _forward(net: DblurDoseNet, inp: torch.Tensor, dvk: torch.Tensor) -> torch.Tensor:
    """All output slices of a batch of slabs: inp (B, 2, S + 10, P, P), dvk (B*S, 1, P, P)."""
    if net.cfg.stem == "depth_valid":
        return net.forward_slab(inp, dvk)
    pack, s = net.cfg.pack, dvk.shape[0] // inp.shape[0]
    packs = torch.stack([inp[b, :, z : z + pack] for b in range(inp.shape[0]) for z in range(s)])
    return net(packs, dvk)


def _loss(net, batch, cfg: TrainConfig) -> torch.Tensor:
    """MSE (+ the relative term) over tissue voxels, one slab at a time (BatchNorm statistics per slab)."""
    half = net.cfg.pack // 2
    losses = []
    for inp, dvk, lab in batch:
        out = _forward(net, inp, dvk)
        tissue = (inp[:, 1, half : half + dvk.shape[0]] >= 0.1).reshape(-1, 1, *inp.shape[-2:])
        loss = ((out - lab) ** 2 * tissue).mean()
        if cfg.rel_loss_weight:
            rel = (out - lab) / (lab.clamp(min=0) + cfg.rel_loss_floor)
            loss = loss + cfg.rel_loss_weight * (rel**2 * tissue).mean()
        losses.append(loss)
    return torch.stack(losses).mean()


def train(
    prepared: dict[str, list[Path]],
    out_dir: Path,
    cfg: TrainConfig,
    *,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume) a network; writes checkpoints, ``losses.csv``, ``losses.png`` and
    the final weights ``<name>.pt``. Returns a summary for the model card."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    net_cfg = NetworkConfig.from_dict(cfg.network)
    net = DblurDoseNet(net_cfg).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    ckpt = out_dir / "checkpoint.pt"
    best_path = out_dir / "best.pt"  # weights of the epoch with the lowest validation loss
    start_epoch, history, elapsed = 0, [], 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch, history, elapsed = state["epoch"], state["history"], state.get("elapsed_s", 0.0)
    elif cfg.init_from:
        from .cnn import load_model

        init = load_model(Path(cfg.init_from), device="cpu")
        if init.config.to_dict() != net_cfg.to_dict():
            raise InputError(f"{cfg.init_from}: its network configuration differs from this run's")
        net.load_state_dict(init.net.state_dict())
    train_sampler = _PatchSampler(prepared["train"], cfg, np.random.default_rng([cfg.seed, start_epoch]), net_cfg.pack)
    val_batch = _fixed_batch(prepared["val"], cfg, net_cfg.pack)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        run_loss = 0.0
        bar = tqdm(range(cfg.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for _ in bar:
            batch = [tuple(t.to(dev) for t in train_sampler.sample()) for _ in range(cfg.batch)]
            loss = _loss(net, batch, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += float(loss.detach())
            bar.set_postfix(loss=f"{run_loss / (bar.n + 1):.4g}")
        train_loss = run_loss / cfg.steps_per_epoch
        val_loss = _evaluate_loss(net, val_batch, dev, cfg)
        sched.step(val_loss)
        elapsed += time.perf_counter() - t0
        history.append(
            {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1)}
        )
        if progress:
            print(f"epoch {epoch + 1}: train {train_loss:.5g}, val {val_loss:.5g}, lr {opt.param_groups[0]['lr']:.2g}, {elapsed / 60:.1f} min", flush=True)
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch + 1,
                    "history": history, "elapsed_s": elapsed}, ckpt.with_suffix(".tmp"))  # fmt: skip
        ckpt.with_suffix(".tmp").replace(ckpt)
        if val_loss <= min(h["val_loss"] for h in history) or not best_path.is_file():
            torch.save({"net": net.state_dict(), "epoch": epoch + 1, "val_loss": val_loss}, best_path.with_suffix(".tmp"))
            best_path.with_suffix(".tmp").replace(best_path)
        _write_history(out_dir, history)
        if cfg.max_minutes is not None and elapsed / 60 >= cfg.max_minutes:
            break

    # Ship the epoch that generalised best (early stopping on the validation loss).
    best_epoch = len(history)
    if best_path.is_file():
        best = torch.load(best_path, map_location=dev, weights_only=True)
        net.load_state_dict(best["net"])
        best_epoch = int(best["epoch"])
    net.eval()
    chosen = history[best_epoch - 1] if history else {}
    summary = {
        "epochs_run": len(history),
        "selected_epoch": best_epoch,
        "final_train_loss": chosen.get("train_loss", math.nan),
        "final_val_loss": chosen.get("val_loss", math.nan),
        "training_minutes": round(elapsed / 60, 1),
        "device": str(dev) + ("" if dev.type != "cpu" else f" ({torch.get_num_threads()} threads)"),
        "config": dataclasses.asdict(cfg),
    }
    save_model(
        out_dir / f"{cfg.name}.pt",
        net.cpu(),
        normalisation=Normalisation(),
        spacing_mm=MODEL_SPACING_MM,
        name=cfg.name,
        metadata=summary,
    )
    return summary


def _fixed_batch(files: list[Path], cfg: TrainConfig, pack: int) -> list:
    sampler = _PatchSampler(files, cfg, np.random.default_rng(12345), pack)
    return [sampler.sample(augment=False) for _ in range(cfg.val_patches)]


def _evaluate_loss(net, batch, dev, cfg: TrainConfig) -> float:
    net.eval()
    with torch.no_grad():
        total = sum(float(_loss(net, [tuple(t.to(dev) for t in item)], cfg)) for item in batch)
    net.train()
    return total / len(batch)


def _write_history(out_dir: Path, history: list[dict]) -> None:
    with (out_dir / "losses.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [h["epoch"] for h in history]
    ax.semilogy(ep, [h["train_loss"] for h in history], label="train")
    ax.semilogy(ep, [h["val_loss"] for h in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (normalised dose rate)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "losses.png", dpi=100)
    plt.close(fig)


def model_card(summary: dict, *, data_version: str, eval_table: str | None = None, notes: str = "") -> str:
    """Markdown model card for a trained weight file."""
    cfg = summary["config"]
    spec = DATASETS.get(data_version, {})
    loss = "MSE loss"
    if cfg.get("rel_loss_weight"):
        loss += f" + {cfg['rel_loss_weight']} x relative term ((out - label) / (label + {cfg['rel_loss_floor']}))^2"
    lines = [
        f"# {cfg['name']}",
        "",
        "DblurDoseNet (Li et al., Med Phys 49 (2022) 1216) trained by spectdose on its own virtual patients.",
        "",
        "## Data",
        f"- data set `{data_version}` ({spec.get('size', '?')} phantoms): train seeds {spec.get('train')}, "
        f"validation seeds {spec.get('val')}, test seeds {spec.get('test')} (never seen in training); "
        f"`spectdose dataset OUT --version {data_version}` regenerates them",
        "- inputs: SPECT (OSEM, attenuation and resolution modelling) on the CT grid, CT-derived density, DVK dose rate;"
        " labels: reference dose rate of the true activity (`spectdose.reference`, multi-medium kernel superposition)",
        f"- model grid spacing (z, y, x) mm: {list(MODEL_SPACING_MM)}; the pipeline resamples to it and adds the"
        " interpolated correction to the full-resolution DVK map",
        "",
        "## Architecture and training",
        f"- network: `{json.dumps(cfg['network'])}`",
        f"- patches {cfg['patch']}x{cfg['patch']} px, {cfg['slab']} output slices per slab, {cfg['batch']} slabs per step, "
        f"{cfg['steps_per_epoch']} steps per epoch, Adam lr {cfg['lr']} with ReduceLROnPlateau "
        f"(factor {cfg['plateau_factor']}, patience {cfg['plateau_patience']}), {loss}, seed {cfg['seed']}"
        + (f"; started from the weights `{cfg['init_from']}`" if cfg.get("init_from") else ""),
        f"- {summary['epochs_run']} epochs in {summary['training_minutes']} min on {summary['device']}; shipped weights "
        f"from epoch {summary.get('selected_epoch', summary['epochs_run'])} (lowest validation loss)",
        f"- losses of that epoch (normalised units): train {summary['final_train_loss']:.5g}, "
        f"validation {summary['final_val_loss']:.5g}",
    ]
    if eval_table:
        lines += ["", "## Evaluation on held-out virtual patients", "", eval_table.strip()]
    if notes:
        lines += ["", "## Notes", "", notes.strip()]
    return "\n".join(lines) + "\n"
