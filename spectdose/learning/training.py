"""Training data and training loop for DblurDoseNet on the project's virtual patients.

Data: a versioned, seeded set of clinical-size virtual patients (``DATASETS``), split by
patient into train / validation / test, with extra Poisson realisations for some test
patients. Each phantom is turned into four arrays on the model grid (activity, density,
DVK dose rate from the SPECT, reference dose rate from the truth), normalised per patient
as the network expects (``spectdose.cnn.inference.Normalisation``).

Training: MSE on the middle-slice dose rate of 11-slice packs (Li et al. 2022), Adam at
1e-3 with ReduceLROnPlateau, patches in-plane so it runs on a CPU; slabs of packs share the
depth-valid stem. Patches are drawn by a configurable mixture that favours lesions, organ
edges and bone marrow (low-dose tissue plain MSE ignores). Checkpoints every epoch hold
everything a continued run needs (model, optimiser, scheduler, RNG states, best so far), so
``spectdose train --resume RUN_DIR`` gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from spectdose.cnn.inference import (
    Normalisation,
    SigmaCalibration,
    TrainedModel,
    atomic_torch_save,
    body_box_yx,
    ensemble_mean_sd,
    fit_sigma_calibration,
    model_grid,
    normalised_inputs,
    predict_normalised,
    save_model,
    to_model_grid,
)
from spectdose.cnn.model import DblurDoseNet, NetworkConfig
from spectdose.constants import LOW_DENSITY_CUTOFF_G_CM3
from spectdose.errors import InputError
from spectdose.geometry import Volume
from spectdose.paths import atomic_write

__all__ = [
    "DATASETS",
    "TrainConfig",
    "generate_dataset",
    "member_complete",
    "prepare_case",
    "train",
    "train_command",
    "build_ensemble",
    "calibrate_ensemble",
    "predict_case",
    "SAMPLING_CATEGORIES",
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
    # Varied patients (spectdose.phantoms.variation): anatomy, lesions, time point, counts,
    # camera, reconstruction and grids drawn per patient from its seed; two more noise
    # realisations of two test patients for ensemble noise.
    "v2": {
        "size": "varied",
        "train": list(range(2001, 2041)),
        "val": list(range(2101, 2111)),
        "test": list(range(2201, 2206)),
        "test_realisations": {2201: [72201, 82201], 2202: [72202, 82202]},
    },
    # The training campaign's fixed test set (issue 17): five varied patients (the profile of
    # v2 and of the campaign's patients) never used in training or selection, three noise
    # realisations each (mean error, NRMSE and the noise across realisations).
    "v2-test": {
        "size": "varied",
        "train": [],
        "val": [],
        "test": list(range(2301, 2306)),
        "test_realisations": {s: [70000 + s, 80000 + s] for s in range(2301, 2306)},
    },
    # The v2 generator on coarse grids (seconds per patient): tests and smoke runs only.
    "v2-tiny": {"size": "varied-tiny", "train": [2001], "val": [2101], "test": [], "test_realisations": {}},
}
# Phantom sizes of the varied generator -> its profile (spectdose.phantoms.variation.PROFILES).
_VARIED_PROFILES = {"varied": "clinical", "varied-tiny": "tiny"}

MODEL_SPACING_MM = (3.0, 1.953125, 1.953125)  # CT slices, 2 x the paper's 0.98 mm in-plane


def dataset_members(version: str, limit: dict[str, int] | None = None) -> list[tuple[str, str, int, int | None]]:
    """(split, folder name, patient seed, noise seed or None) of every study in a version.

    ``limit`` ({"train": 16, ...}) keeps the first N patients of a split (with their noise
    realisations): a subset made where the whole set does not fit the time, which the whole
    set later completes (the same seeds, so its members are skipped as complete).
    """
    if version not in DATASETS:
        raise InputError(f"unknown data set version {version!r}: one of {sorted(DATASETS)}")
    bad = set(limit or {}) - {"train", "val", "test"}
    if bad or any(n < 0 for n in (limit or {}).values()):
        raise InputError(f"a limit is SPLIT=N with SPLIT one of train, val, test and N >= 0, not {limit}")
    spec = DATASETS[version]
    out = []
    for split in ("train", "val", "test"):
        seeds = spec[split] if limit is None or split not in limit else spec[split][: limit[split]]
        for seed in seeds:
            out.append((split, f"vp{seed:04d}", seed, None))
            for noise in spec["test_realisations"].get(seed, []) if split == "test" else []:
                out.append((split, f"vp{seed:04d}-r{noise}", seed, noise))
    return out


def member_complete(member_dir: Path, seed: int, noise_seed: int | None = None) -> bool:
    """Whether ``member_dir`` holds the whole study of patient ``seed`` (and noise realisation).

    phantom.json is written last and atomically, so one that parses, names this patient and
    realisation, and whose CT slice count, NM file and truth.npz (a readable zip) are all
    there means the member is complete; anything else is redone.
    """
    member_dir = Path(member_dir)
    try:
        meta = json.loads((member_dir / "truth" / "phantom.json").read_text())
        n_ct = int(meta["grids"]["ct"]["shape"][0])
        same = int(meta["seed"]) == seed and int(meta["counts"]["noise_seed"]) == (seed if noise_seed is None else noise_seed)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    if not same or len(list((member_dir / "dicom" / "CT").glob("CT_*.dcm"))) != n_ct:
        return False
    nm, npz = member_dir / "dicom" / "NM" / "NM_SPECT.dcm", member_dir / "truth" / "truth.npz"
    if not nm.is_file() or nm.stat().st_size == 0:
        return False
    try:
        with zipfile.ZipFile(npz) as z:
            return len(z.namelist()) > 0
    except (OSError, zipfile.BadZipFile):
        return False


def _generate_member(job: tuple) -> tuple[str, float]:
    """Make the missing realisations of one patient, each in a temporary folder next to its
    member, then move each into place whole. Varied patients share one projection and
    system matrix across their realisations (:func:`generate_varied_realisations`)."""
    from spectdose.phantoms import generate
    from spectdose.phantoms.variation import generate_varied_realisations

    split_dir, split, names_noise, seed, size, version = job
    split_dir = Path(split_dir)
    t0 = time.perf_counter()
    tmps = {name: Path(tempfile.mkdtemp(dir=split_dir, prefix=f".{name}.", suffix=".partial")) for name, _ in names_noise}
    try:
        if size in _VARIED_PROFILES:
            info = {noise: {"dataset_member": {"version": version, "split": split, "name": name}} for name, noise in names_noise}
            dirs = {noise: tmps[name] for name, noise in names_noise}
            generate_varied_realisations(dirs, seed, _VARIED_PROFILES[size], extra_truth_info=info)
        else:
            for name, noise in names_noise:
                generate(tmps[name], seed, size=size, noise_seed=noise)
        for name, _ in names_noise:
            target = split_dir / name
            tmps[name].chmod(0o755)  # mkdtemp makes it private; the member is as readable as any folder
            if target.exists():  # an incomplete member left by an older or interrupted run
                shutil.rmtree(target)
            os.replace(tmps[name], target)
    except BaseException:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ", ".join(f"{split}/{name}" for name, _ in names_noise), time.perf_counter() - t0


def _patient_jobs(out_dir: Path, members, spec: dict, version: str) -> list[tuple]:
    """One job per patient with its incomplete members (realisations) in the order listed."""
    jobs: dict[tuple[str, int], tuple] = {}
    for split, name, seed, noise in members:
        if member_complete(out_dir / split / name, seed, noise):
            continue
        job = jobs.setdefault((split, seed), (str(out_dir / split), split, [], seed, spec["size"], version))
        job[2].append((name, noise))
    return list(jobs.values())


@contextlib.contextmanager
def _exclusive(folder: Path):
    """One generator per data set folder: a second one would remove the first one's work."""
    import fcntl

    with open(folder / ".generate.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise InputError(f"another `spectdose dataset` is writing {folder}") from exc
        yield


def generate_dataset(
    out_dir: Path,
    version: str = "v1",
    *,
    workers: int = 1,
    limit: dict[str, int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write every phantom of ``version`` and a manifest; resumable.

    A member whose study is complete (:func:`member_complete`) is skipped; a missing or
    incomplete one is made again, in a temporary folder renamed into place when whole, so
    an interrupted run leaves no half member under a member's name. ``workers`` members are
    made at once (each simulation uses one CPU thread); the time of each is reported.
    """
    out_dir = Path(out_dir)
    members = dataset_members(version, limit)
    spec = DATASETS[version]
    for split in ("train", "val", "test"):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        for stale in [*out_dir.glob("*/.*.partial"), *out_dir.glob("*/*.partial")]:  # interrupted runs
            shutil.rmtree(stale, ignore_errors=True)
        jobs = _patient_jobs(out_dir, members, spec, version)
        n_todo = sum(len(job[2]) for job in jobs)
        if progress:
            progress(f"data set {version}: {len(members) - n_todo} of {len(members)} members complete, {n_todo} to make")
        t0 = time.perf_counter()

        def report(done: int, name: str, seconds: float) -> None:
            if progress:
                progress(f"generated {name} in {seconds:.0f} s ({done}/{len(jobs)}, {time.perf_counter() - t0:.0f} s elapsed)")

        if workers > 1 and len(jobs) > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for done, (name, seconds) in enumerate(pool.imap_unordered(_generate_member, jobs), 1):
                    report(done, name, seconds)
        else:
            for done, job in enumerate(jobs, 1):
                report(done, *_generate_member(job))
        manifest = {
            "version": version,
            "size": spec["size"],
            "limit": limit,  # null: the whole version
            "members": [{"split": s, "name": n, "seed": p, "noise_seed": q} for s, n, p, q in members],
        }
        text = json.dumps(manifest, indent=2).encode()
        atomic_write(out_dir / "manifest.json", lambda f: f.write(text))
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
    from spectdose.phantoms.study_io import load_phantom_case
    from spectdose.pipeline import network_inputs
    from spectdose.reference import reference_dose_rate

    normalisation = normalisation or Normalisation()
    case = load_phantom_case(phantom_dir)
    activity, density, dvk = network_inputs(Path(phantom_dir) / "dicom", kernel_cache)
    ref, _ = reference_dose_rate(case.activity_true, case.density_true, cache_dir=kernel_cache)
    grid, block = model_grid(activity.grid, spacing_mm)
    a, rho, d, r = (to_model_grid(v, grid, block).array for v in (activity, density, dvk, ref))
    regions = sampling_regions(case.labels, activity.grid, grid, block)
    a_n, rho_n, d_n, total_mbq = normalised_inputs(a, rho, d, grid.voxel_volume_ml, normalisation)
    label = (r.astype(np.float64) / total_mbq * normalisation.dose_scale_per_gy_s).astype(np.float32)
    crop = (slice(None), *body_box_yx(rho))  # the field inference runs the network on
    return {
        "activity": a_n[crop],
        "density": rho_n[crop],
        "dvk": d_n[crop],
        "label": label[crop],
        "regions": regions[crop],
        "total_mbq": np.float64(total_mbq),
        "spacing_mm": np.asarray(grid.spacing_mm),
    }


# Bit flags of the ``regions`` array of a prepared case (model grid): where patches are drawn.
REGION_LESION, REGION_EDGE, REGION_MARROW = 1, 2, 4
# Structures whose boundaries are organ edges (partial volume, interfaces of density and uptake).
_EDGE_LABELS = ("liver", "spleen", "kidney_left", "kidney_right", "kidney_cortex", "lungs", "spine",
                "lesions", "heart", "stomach", "aorta", "bowel")  # fmt: skip
# Bone marrow: the trabecular spine (marrow + trabecular bone), else the lumbar vertebrae.
_MARROW_LABELS = ("spine_trabecular", "lumbar_vertebrae")


def sampling_regions(labels: dict[str, np.ndarray], ct_grid, grid, block) -> np.ndarray:
    """uint8 flags on the model grid: lesion (any lesion voxel in the model voxel), organ
    edge (within one model voxel of a structure's boundary), bone marrow."""
    from scipy import ndimage

    def down(mask: np.ndarray) -> np.ndarray:  # fraction of the model voxel inside the mask
        return to_model_grid(Volume(mask.astype(np.float32), ct_grid, "1"), grid, block).array

    out = np.zeros(grid.shape, np.uint8)
    lesions = labels.get("lesions")
    if lesions is None:
        lesions = np.any([m for k, m in labels.items() if k.startswith("lesion_")] or [np.zeros(ct_grid.shape, bool)], axis=0)
    out[down(lesions) > 0.01] |= REGION_LESION
    edge = np.zeros(grid.shape, bool)
    for name in _EDGE_LABELS:
        if name in labels and labels[name].any():
            inside = down(labels[name]) > 0.5
            edge |= ndimage.binary_dilation(inside) & ~ndimage.binary_erosion(inside)
    out[edge] |= REGION_EDGE
    for name in _MARROW_LABELS:
        if name in labels and labels[name].any():
            out[down(labels[name]) > 0.5] |= REGION_MARROW
            break
    return out


def prepare_dataset(
    data_dir: Path, cache_dir: Path, *, kernel_cache: Path | None, progress=None, splits=("train", "val")
) -> list[Path]:
    """``prepare_case`` for every phantom under ``data_dir/<split>`` of ``splits``, cached as npz.

    Training reads train and val only; the test patients are evaluated from their DICOM
    studies (``spectdose evaluate``), so preparing them would be wasted time. A cached case
    from before the sampling regions existed is prepared again.
    """
    out = []
    phantoms = [p.parent.parent for split in splits for p in Path(data_dir).glob(f"{split}/*/truth/phantom.json")]
    for phantom in sorted(phantoms):
        target = Path(cache_dir) / phantom.parent.name / f"{phantom.name}.npz"
        if not target.is_file() or not _has_regions(target):
            if progress:
                progress(f"preparing {phantom.parent.name}/{phantom.name}")
            arrays = prepare_case(phantom, kernel_cache=kernel_cache)
            atomic_write(target, lambda f, arrays=arrays: np.savez(f, **arrays))
        out.append(target)
    return out


def _has_regions(npz: Path) -> bool:
    try:
        with np.load(npz) as z:
            return "regions" in z.files
    except (OSError, ValueError):
        return False


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
    # Mixture of patch centres, weights of SAMPLING_CATEGORIES (normalised; a category a case
    # lacks passes its weight to the others). None: {"dose": hot_fraction, "uniform": rest}.
    sampling: dict | None = None
    low_dose_fraction: float = 0.05  # "low_dose": tissue below this fraction of the case's 99.9th pct
    # Augmentation: probabilities of in-plane flips; "intensity_scale" [lo, hi] multiplies
    # activity, DVK and label by one log-uniform factor per slab (count-level scaling: the
    # dose rate is linear in activity, and per-patient normalisation leaves the network
    # values of different magnitude from patient to patient).
    augment: dict = dataclasses.field(default_factory=lambda: {"flip_x": 0.5, "flip_y": 0.5, "intensity_scale": None})
    val_patches: int = 48
    seed: int = 0
    threads: int | None = None
    max_minutes: float | None = None  # wall-clock cap of one sitting; `--resume` continues the run
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
        cfg = cls(**data)
        cfg.check()
        return cfg

    def check(self) -> None:
        bad = set(self.sampling or {}) - set(SAMPLING_CATEGORIES)
        if bad or any(w < 0 for w in (self.sampling or {}).values()) or (self.sampling is not None and sum(self.sampling.values()) <= 0):
            raise InputError(f"sampling weights must be >= 0, not all 0, of {list(SAMPLING_CATEGORIES)}: {self.sampling}")
        bad = set(self.augment) - {"flip_x", "flip_y", "intensity_scale"}
        if bad:
            raise InputError(f"unknown augmentation options {sorted(bad)}")
        scale = self.augment.get("intensity_scale")
        if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
            raise InputError(f"intensity_scale must be [lo, hi] with 0 < lo <= hi, not {scale}")

    def sampling_weights(self) -> dict[str, float]:
        w = self.sampling if self.sampling is not None else {"dose": self.hot_fraction, "uniform": 1.0 - self.hot_fraction}
        return {k: float(w.get(k, 0.0)) for k in SAMPLING_CATEGORIES}


# Where a patch is centred: anywhere; in proportion to the reference dose rate; in a lesion;
# on an organ edge; in bone marrow; in tissue of low reference dose rate.
SAMPLING_CATEGORIES = ("uniform", "dose", "lesion", "edge", "marrow", "low_dose")


class _PatchSampler:
    """Random slabs of packs from prepared cases (float32 arrays held in memory).

    A patch centre is drawn in two steps: a category by the configured weights (among those
    the case has voxels of), then a voxel of that category (uniformly, or for ``dose`` in
    proportion to the reference dose rate).
    """

    def __init__(
        self,
        files: list[Path],
        cfg: TrainConfig,
        rng: np.random.Generator,
        pack: int,
        *,
        channels: tuple[str, ...] = ("activity", "density"),
        cases: list[dict] | None = None,
    ):
        self.cfg, self.rng, self.half, self.channels = cfg, rng, pack // 2, tuple(channels)
        self.cases: list[dict] = []
        self.pools: list[dict[str, np.ndarray]] = []  # flat voxel indices (or the dose CDF) per category
        self.probs: list[tuple[list[str], np.ndarray]] = []
        for f in files:
            with np.load(f) as z:
                case = {k: z[k] for k in ("activity", "density", "dvk", "label", *channels[2:])}
                case["regions"] = z["regions"] if "regions" in z.files else np.zeros(case["label"].shape, np.uint8)
            self.add_case(case)
        for case in cases or []:
            self.add_case(case)
        if not self.cases and cases is None:
            raise InputError("no prepared training cases")

    def add_case(self, c: dict) -> None:
        """A case joins the draw. Noise realisations of one patient (``spectdose.learning.fast_cases``)
        share one density array and share the voxel pools too: their labels differ only by the
        normalisation's factor, and every pool is invariant to it."""
        weights = self.cfg.sampling_weights()
        shared = next((i for i, other in enumerate(self.cases) if other["density"] is c["density"]), None)
        if shared is not None:
            pools = self.pools[shared]
        else:
            lab, reg = c["label"].ravel(), c["regions"].ravel()
            tissue = c["density"].ravel() >= LOW_DENSITY_CUTOFF_G_CM3
            pools = {}
            w = np.clip(lab, 0, None).astype(np.float64)
            if w.sum() > 0:
                pools["dose"] = np.cumsum(w) / w.sum()
            pools["lesion"] = np.flatnonzero(reg & REGION_LESION)
            pools["edge"] = np.flatnonzero(reg & REGION_EDGE)
            pools["marrow"] = np.flatnonzero(reg & REGION_MARROW)
            cut = self.cfg.low_dose_fraction * float(np.percentile(lab[tissue], 99.9)) if tissue.any() else 0.0
            pools["low_dose"] = np.flatnonzero(tissue & (lab < cut))
        names = [k for k in SAMPLING_CATEGORIES if weights[k] > 0 and (k == "uniform" or (k in pools and pools[k].size))]
        if not names:
            names = ["uniform"]
        p = np.array([weights[k] for k in names])
        p = p if p.sum() > 0 else np.ones(len(names))
        self.cases.append(c)
        self.pools.append(pools)
        self.probs.append((names, p / p.sum()))

    def drop_first(self) -> None:
        """The oldest case leaves the draw (a campaign's pool of cases is bounded)."""
        del self.cases[0], self.pools[0], self.probs[0]

    def centre(self, ci: int) -> tuple[str, tuple[int, int, int]]:
        """The category drawn and the (z, y, x) centre of a patch of case ``ci``."""
        rng, shape = self.rng, self.cases[ci]["label"].shape
        names, p = self.probs[ci]
        cat = names[int(rng.choice(len(names), p=p))] if len(names) > 1 else names[0]
        if cat == "uniform":
            flat = int(rng.integers(int(np.prod(shape))))
        elif cat == "dose":
            cdf = self.pools[ci]["dose"]
            flat = min(int(np.searchsorted(cdf, rng.random(), side="right")), cdf.size - 1)
        else:
            pool = self.pools[ci][cat]
            flat = int(pool[int(rng.integers(pool.size))])
        return cat, tuple(int(v) for v in np.unravel_index(flat, shape))

    def sample(self, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs (1, C, slab + 2*half, P, P), dvk (slab, 1, P, P), label (slab, 1, P, P))."""
        cfg, rng, half = self.cfg, self.rng, self.half
        ci = int(rng.integers(len(self.cases)))
        c = self.cases[ci]
        nz, ny, nx = c["label"].shape
        p, s = cfg.patch, min(cfg.slab, nz)
        _, (k, j, i) = self.centre(ci)
        z0 = int(np.clip(k - s // 2, 0, nz - s))
        y0 = int(np.clip(j - p // 2, 0, max(0, ny - p)))
        x0 = int(np.clip(i - p // 2, 0, max(0, nx - p)))
        zs = np.clip(np.arange(z0 - half, z0 + s + half), 0, nz - 1)  # replicated edge slices
        ysl, xsl = slice(y0, y0 + p), slice(x0, x0 + p)
        inp = np.stack([c[k][zs][:, ysl, xsl] for k in self.channels])
        dvk = c["dvk"][z0 : z0 + s, ysl, xsl][:, None]
        lab = c["label"][z0 : z0 + s, ysl, xsl][:, None]
        inp, dvk, lab = (_pad_to(a, p) for a in (inp, dvk, lab))
        if augment:
            aug = cfg.augment
            if rng.random() < aug.get("flip_x", 0.0):
                inp, dvk, lab = inp[..., ::-1], dvk[..., ::-1], lab[..., ::-1]
            if rng.random() < aug.get("flip_y", 0.0):
                inp, dvk, lab = inp[..., ::-1, :], dvk[..., ::-1, :], lab[..., ::-1, :]
            if aug.get("intensity_scale"):
                lo, hi = aug["intensity_scale"]
                f = np.float32(np.exp(rng.uniform(np.log(lo), np.log(hi))))
                inp = np.stack([ch if k == "density" else ch * f for k, ch in zip(self.channels, inp, strict=True)])  # not density
                dvk, lab = dvk * f, lab * f
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
        tissue = (inp[:, 1, half : half + dvk.shape[0]] >= LOW_DENSITY_CUTOFF_G_CM3).reshape(-1, 1, *inp.shape[-2:])
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
    """Train, or continue from ``out_dir/checkpoint.pt``; writes checkpoints, ``losses.csv``,
    ``losses.png`` and the final weights ``<name>.pt``. Returns a summary for the model card.

    The checkpoint holds model, optimiser, scheduler, epoch, history, the best epoch so far
    and every random state, so a continued run reproduces an uninterrupted one (on the CPU,
    bit for bit). ``max_minutes`` caps one sitting, not the whole run.
    """
    from tqdm import tqdm

    cfg.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    net_cfg = NetworkConfig.from_dict(cfg.network)
    net = DblurDoseNet(net_cfg).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    ckpt = out_dir / "checkpoint.pt"
    best_path = out_dir / "best.pt"  # weights of the epoch with the lowest validation loss
    train_sampler = _PatchSampler(prepared["train"], cfg, np.random.default_rng(cfg.seed), net_cfg.pack)
    start_epoch, history, elapsed = 0, [], 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("network", net_cfg.to_dict()) != net_cfg.to_dict():
            raise InputError(f"{ckpt}: its network configuration differs from this run's; use another run folder")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch, history, elapsed = state["epoch"], state["history"], state.get("elapsed_s", 0.0)
        if "rng" in state:
            _set_rng_states(state["rng"], train_sampler.rng)
        else:  # checkpoints from before the RNG states were kept: a fresh, epoch-seeded stream
            train_sampler.rng = np.random.default_rng([cfg.seed, start_epoch])
    elif cfg.init_from:
        from spectdose.cnn.inference import load_model

        init = load_model(Path(cfg.init_from), device="cpu")
        if init.config.to_dict() != net_cfg.to_dict():
            raise InputError(f"{cfg.init_from}: its network configuration differs from this run's")
        net.load_state_dict(init.net.state_dict())
    val_batch = _fixed_batch(prepared["val"], cfg, net_cfg.pack)
    sitting_start = time.perf_counter()

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
        # best.pt first: a crash between the two writes leaves the old checkpoint, which
        # repeats this epoch and rewrites the same best.pt.
        if val_loss <= min(h["val_loss"] for h in history) or not best_path.is_file():
            atomic_torch_save({"net": net.state_dict(), "epoch": epoch + 1, "val_loss": val_loss}, best_path)
        atomic_torch_save(
            {"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch + 1,
             "history": history, "elapsed_s": elapsed, "network": net_cfg.to_dict(),
             "best_epoch": min(history, key=lambda h: h["val_loss"])["epoch"], "rng": _rng_states(train_sampler.rng)},
            ckpt,
        )  # fmt: skip
        _write_history(out_dir, history)
        if cfg.max_minutes is not None and (time.perf_counter() - sitting_start) / 60 >= cfg.max_minutes:
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


def _rng_states(sampler_rng: np.random.Generator) -> dict:
    """Every random stream a training step draws from (the sampler's, torch's, Python's)."""
    return {
        "sampler": sampler_rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_states(states: dict, sampler_rng: np.random.Generator) -> None:
    sampler_rng.bit_generator.state = states["sampler"]
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])


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


def model_card(
    summary: dict, *, data_version: str, eval_table: str | None = None, notes: str = "", patients: dict | None = None
) -> str:
    """Markdown model card for a trained weight file.

    ``patients`` ({"train": [...], "val": [...], "test": [...]}): the studies actually used,
    which for a subset (``spectdose dataset --limit``) are fewer than the version lists.
    """
    cfg = summary["config"]
    spec = DATASETS.get(data_version, {})
    if patients is not None:
        used = (
            f"train {patients.get('train')}, validation {patients.get('val')}, test {patients.get('test')} "
            f"(never seen in training) - a subset of the version"
        )
    else:
        used = f"train seeds {spec.get('train')}, validation seeds {spec.get('val')}, test seeds {spec.get('test')} (never seen in training)"
    loss = "MSE loss"
    if cfg.get("rel_loss_weight"):
        loss += f" + {cfg['rel_loss_weight']} x relative term ((out - label) / (label + {cfg['rel_loss_floor']}))^2"
    lines = [
        f"# {cfg['name']}",
        "",
        "DblurDoseNet (Li et al., Med Phys 49 (2022) 1216) trained by spectdose on its own virtual patients.",
        "",
        "## Data",
        f"- data set `{data_version}` ({spec.get('size', '?')} phantoms): {used}; "
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


def train_command(
    *,
    data: Path | None,
    config: Path | None,
    out: Path | None,
    resume: Path | None = None,
    seed: int | None = None,
    device: str | None = None,
    kernel_cache: Path,
    install: Path | None = None,
) -> int:
    """`spectdose train`: a new run (``--data``, ``--config``, ``-o``) or ``--resume RUN_DIR``,
    which reads the run's own ``config.json`` and ``run.json`` (the data folder) and continues
    from its last checkpoint. ``--seed`` makes an ensemble member: the config's seed replaced
    and ``_seed<N>`` added to the name."""
    import shutil

    if resume is not None:
        out = Path(resume)
        if not (out / "checkpoint.pt").is_file() or not (out / "config.json").is_file():
            raise InputError(f"{out} holds no run to resume (no checkpoint.pt / config.json from `spectdose train`)")
        cfg = TrainConfig.from_file(config or out / "config.json")
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        data = data or (Path(run["data"]) if run.get("data") else None)
        if data is None:
            raise InputError(f"{out}/run.json does not name the data set: give --data")
    else:
        if data is None or config is None or out is None:
            raise InputError("a new training run needs --data, --config and -o (or --resume RUN_DIR)")
        cfg = TrainConfig.from_file(config)
        if seed is not None:
            cfg = dataclasses.replace(cfg, seed=seed, name=f"{cfg.name}_seed{seed}")
    data = Path(data)
    manifest_path = data / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{data} has no manifest.json: generate it with `spectdose dataset`")
    manifest = json.loads(manifest_path.read_text())
    files = prepare_dataset(data, data / "prepared", kernel_cache=kernel_cache, progress=lambda m: print(m, flush=True))
    prepared = {split: [f for f in files if f.parent.name == split] for split in ("train", "val")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"data": str(data.resolve()), "data_version": manifest["version"]}, indent=2))
    summary = train(prepared, out, cfg, device=device)
    patients = {split: [f.stem for f in prepared[split]] for split in ("train", "val")}
    patients["test"] = [m["name"] for m in manifest.get("members", []) if m.get("split") == "test"]
    card = model_card(summary, data_version=manifest["version"], patients=patients if manifest.get("limit") else None)
    (out / f"{cfg.name}.md").write_text(card)
    print(card)
    if install:
        install.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / f"{cfg.name}.pt", install / f"{cfg.name}.pt")
        (install / f"{cfg.name}.md").write_text(card)
        print(f"installed {cfg.name}.pt and {cfg.name}.md into {install}")
    return 0


def predict_case(model: TrainedModel, case: dict[str, np.ndarray]) -> np.ndarray:
    """The network on a case of normalised model-grid arrays ("activity", "density", "dvk" and
    any further input channel the network takes, e.g. "dvk_rr"): dose rate in normalised units."""
    extra = {k: case[k] for k in model.config.inputs[2:] if k in case}  # a missing one: predict_normalised names it
    return predict_normalised(model, case["activity"], case["density"], case["dvk"], extra=extra)


def calibrate_ensemble(
    members: list[TrainedModel], cases: list[dict[str, np.ndarray]], *, patients: list[str] | tuple[str, ...] = ()
) -> tuple[SigmaCalibration, list[np.ndarray]]:
    """Sigma calibration of ``members`` fitted on ``cases`` (normalised model-grid arrays with the
    reference dose rate "label"), and the members' mean on each case (normalised units, the
    estimate the calibration is for), so a caller can score the ensemble without a second pass.

    Coverage does not depend on the unit, so normalised units serve; one member's output is in
    memory at a time (``ensemble_mean_sd``).
    """
    if not cases:
        raise InputError("calibrating the uncertainty needs validation cases")
    means, sds, refs = [], [], []
    for case in cases:
        mean, sd = ensemble_mean_sd(predict_case(m, case) for m in members)
        means.append(mean)
        sds.append(sd)
        refs.append(case["label"])
    return fit_sigma_calibration(means, sds, refs, patients=patients), means


def build_ensemble(member_weights: list[Path], val_files: list[Path], out_path: Path, *, name: str = "dblurdosenet_ensemble"):
    """An ensemble file from trained members, its sigma calibrated on the validation cases.

    Calibration runs on the prepared cases (model grid, normalised units). Returns the
    ``spectdose.cnn.inference.Ensemble``.
    """
    from spectdose.cnn.inference import Ensemble, load_model, save_ensemble

    members = [load_model(Path(w), device="cpu") for w in member_weights]
    if not val_files:
        raise InputError("calibrating the uncertainty needs prepared validation cases")
    wanted = {"activity", "density", "dvk", "label"}.union(*(m.config.inputs for m in members))
    cases = []
    for f in val_files:
        with np.load(f) as z:
            cases.append({k: z[k] for k in z.files if k in wanted})
    calibration, _ = calibrate_ensemble(members, cases, patients=[Path(f).stem for f in val_files])
    metadata = {"members": [m.name for m in members], "member_files": [Path(w).name for w in member_weights]}
    save_ensemble(out_path, members, calibration, name=name, metadata=metadata)
    return Ensemble(members=members, calibration=calibration, name=name, metadata=metadata)


def ensemble_card(ensemble) -> str:
    """Model-card section of an ensemble: members and the fitted calibration."""
    c = ensemble.calibration
    return "\n".join(
        [
            f"## Uncertainty: `{ensemble.name}`",
            "",
            f"- deep ensemble of {len(ensemble.members)} members: {', '.join(ensemble.metadata.get('members', []))}",
            f"- 1-sigma = sqrt(({c.scale:.4g} x members' sd)^2 + ({c.rel_floor:.4g} x mean)^2), fitted on validation "
            f"cases {', '.join(c.fitted_on)} ({c.n_voxels} voxels above 10 % of each case's maximum)",
            f"- fitted as the error's standard deviation; coverage on those voxels: +-1 sigma {c.coverage_1sigma_pct} %, "
            f"+-2 sigma {c.coverage_2sigma_pct} % (about 75 / 95 % for heavy-tailed errors, 68.3 / 95.4 % for Gaussian ones)",
            "",
        ]
    )


def _main(argv: list[str] | None = None) -> int:
    """`python -m spectdose.learning.training ensemble OUT.pt --data D --members A.pt B.pt ...`"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m spectdose.learning.training")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ensemble", help="combine trained members and calibrate their sigma on the validation split")
    p.add_argument("out", type=Path, help="ensemble weights, e.g. models/dblurdosenet_ensemble.pt")
    p.add_argument("--data", type=Path, required=True, help="data set folder (its prepared/val cases are used)")
    p.add_argument("--members", type=Path, nargs="+", required=True)
    args = parser.parse_args(argv)
    val = sorted((args.data / "prepared" / "val").glob("*.npz"))
    ens = build_ensemble(args.members, val, args.out, name=args.out.stem)
    card = ensemble_card(ens)
    args.out.with_suffix(".md").write_text(card)
    print(card)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
