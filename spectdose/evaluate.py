"""Accuracy of dose-rate methods on virtual patients, against the reference from the truth.

Metrics follow Li et al. (Med Phys 49 (2022) 1216, sec. 2.6), all as absolute percentages:
mean dose-rate error |mean(est) - mean(ref)| / mean(ref); NRMSE sqrt(mean((est - ref)^2)) /
sqrt(mean(ref^2)) over the VOI; errors of DR10/30/70/90 (minimum dose rate to the hottest
10/30/70/90 % of the VOI); ensemble noise over M Poisson realisations
sqrt(mean_j var_m est_m[j]) / mean_j mean_m est_m[j] in a uniform VOI (healthy liver).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .density import hu_to_density
from .errors import InputError
from .geometry import Grid, Volume

__all__ = [
    "METRIC_COLUMNS",
    "network_inputs",
    "VOI_ORDER",
    "voi_metrics",
    "ensemble_noise_pct",
    "PhantomCase",
    "load_phantom_case",
    "evaluate",
]

METRIC_COLUMNS = [
    "patient",
    "voi",
    "method",
    "mean_error_pct",
    "nrmse_pct",
    "dr10_error_pct",
    "dr30_error_pct",
    "dr70_error_pct",
    "dr90_error_pct",
    "signed_mean_error_pct",
    "voi_ml",
    "realisation",
]
VOI_ORDER = ["healthy_liver", "kidney_left", "kidney_right", "spleen", "lumbar_vertebrae"]
# Smallest VOI that gets a row: below this a VOI holds too few CT voxels for DRx.
_MIN_VOI_VOXELS = 20


def _drx(values: np.ndarray, x_pct: float) -> float:
    """Minimum dose rate to the hottest x % of the VOI."""
    return float(np.percentile(values, 100.0 - x_pct))


def voi_metrics(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The paper's per-VOI errors (absolute %) of ``estimate`` against ``reference``."""
    est = estimate[mask].astype(np.float64)
    ref = reference[mask].astype(np.float64)
    if ref.size == 0 or ref.mean() <= 0:
        raise InputError("VOI is empty or has no reference dose rate")
    out = {
        "signed_mean_error_pct": 100.0 * (est.mean() - ref.mean()) / ref.mean(),
        "nrmse_pct": 100.0 * float(np.sqrt(np.mean((est - ref) ** 2)) / np.sqrt(np.mean(ref**2))),
    }
    out["mean_error_pct"] = abs(out["signed_mean_error_pct"])
    for x in (10, 30, 70, 90):
        r = _drx(ref, x)
        out[f"dr{x}_error_pct"] = 100.0 * abs(_drx(est, x) - r) / r if r > 0 else float("nan")
    return out


def ensemble_noise_pct(realisations: Sequence[np.ndarray], mask: np.ndarray) -> float:
    """Ensemble noise (%) over M >= 2 realisations of one method in ``mask``."""
    if len(realisations) < 2:
        raise InputError("ensemble noise needs at least two realisations")
    stack = np.stack([r[mask].astype(np.float64) for r in realisations])
    mean = stack.mean(axis=0)
    var = stack.var(axis=0, ddof=1)
    return 100.0 * float(np.sqrt(var.mean()) / mean.mean())


@dataclasses.dataclass
class PhantomCase:
    """One phantom study as written by `spectdose phantom`, with its truth."""

    path: Path
    patient: str
    realisation: int
    labels: dict[str, np.ndarray]
    activity_true: Volume
    density_true: Volume


def load_phantom_case(path: str | Path) -> PhantomCase:
    path = Path(path)
    truth_npz = path / "truth" / "truth.npz"
    meta_json = path / "truth" / "phantom.json"
    if not truth_npz.is_file() or not meta_json.is_file():
        raise InputError(f"{path} is not a phantom written by `spectdose phantom` (no truth/truth.npz, truth/phantom.json)")
    meta = json.loads(meta_json.read_text())
    with np.load(truth_npz) as t:
        grid = Grid(
            t["activity_bq_per_ml"].shape,
            tuple(t["spacing_mm"]),
            tuple(t["origin_mm"]),
            t["axes"],
            meta.get("dicom", {}).get("uids", {}).get("frame_of_reference"),
        )
        labels = {k[len("label_") :]: t[k].astype(bool) for k in t.files if k.startswith("label_")}
        activity = Volume(t["activity_bq_per_ml"].astype(np.float32), grid, "Bq/ml")
        density = Volume(t["density_g_cm3"].astype(np.float32), grid, "g/cm3")
    seed = int(meta["seed"])
    return PhantomCase(
        path=path,
        patient=f"vp{seed:04d}",
        realisation=int(meta.get("counts", {}).get("noise_seed", seed)),
        labels=labels,
        activity_true=activity,
        density_true=density,
    )


def _vois(labels: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    names = [v for v in VOI_ORDER if v in labels]
    lesions = sorted((k for k in labels if k.startswith("lesion_") and k[7:].isdigit()), key=lambda k: int(k[7:]))
    out = [(n, labels[n]) for n in names[:1] + lesions + names[1:]]
    return [(n, m) for n, m in out if int(m.sum()) >= _MIN_VOI_VOXELS]


def network_inputs(study_dir: Path, kernel_cache: Path | None, device=None) -> tuple[Volume, Volume, Volume]:
    """Activity (Bq/ml), density (g/cm3) and DVK dose rate (Gy/s) on the CT grid of a study:
    what every method starts from (the pipeline's stages with default options)."""
    from .ingest import load_study
    from .pipeline import DoseOptions, compute_dose_rate, spect_on_ct_grid

    study = load_study(Path(study_dir))
    activity, _ = spect_on_ct_grid(study, [])
    density = Volume(hu_to_density(study.ct.array), study.ct.grid, "g/cm3")
    dvk, _ = compute_dose_rate(activity, density, options=DoseOptions(kernel_cache_dir=kernel_cache, device=device))
    return activity, density, dvk


def _method_dose_rates(case: PhantomCase, methods: dict[str, Path | None], kernel_cache: Path | None, device):
    """Dose rate (Gy/s, CT grid) of each method from the case's SPECT, plus the DVK map."""
    from .cnn import load_model, predict_on_ct_grid

    activity, density, dvk = network_inputs(case.path / "dicom", kernel_cache, device)
    if not activity.grid.same_as(case.activity_true.grid, tol_mm=0.01):
        raise InputError(f"{case.path}: the CT grid of the study differs from the truth grid")
    rates = {"dvk": dvk.array}
    for name, weights in methods.items():
        if name == "dvk" or weights is None:
            continue
        model = load_model(weights, device=device)
        rates[name] = predict_on_ct_grid(model, activity, density, dvk).array
    return rates


def evaluate(
    phantom_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    models: dict[str, Path | None] | None = None,
    kernel_cache: Path | None = None,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run every method on every phantom, compare with the reference, write tables and plots.

    ``models`` maps method names (``cnn``, ``cnn_no_residual``, ``cnn_2d``) to weight files;
    methods whose weights are missing are left out. Writes ``metrics.csv``, ``metrics.md``,
    ``noise.csv`` (when a patient has several realisations), ``profiles.png`` and ``drvh.png``.
    """
    from .reference import reference_dose_rate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods: dict[str, Path | None] = {"dvk": None}
    for name, path in (models or {}).items():
        if path is not None and Path(path).is_file():
            methods[name] = Path(path)
    say = progress or (lambda _m: None)
    rows: list[dict] = []
    by_patient: dict[str, list[tuple[PhantomCase, dict[str, np.ndarray], np.ndarray]]] = {}
    plots = []
    for d in phantom_dirs:
        case = load_phantom_case(d)
        say(f"{case.patient} (realisation {case.realisation}): reference dose rate from the truth")
        ref, _ = reference_dose_rate(case.activity_true, case.density_true, cache_dir=kernel_cache, device=device)
        say(f"{case.patient}: methods {', '.join(methods)}")
        rates = _method_dose_rates(case, methods, kernel_cache, device)
        for voi, mask in _vois(case.labels):
            for method, est in rates.items():
                m = voi_metrics(est, ref.array, mask)
                rows.append(
                    {
                        "patient": case.patient,
                        "voi": voi,
                        "method": method,
                        **{k: round(v, 3) for k, v in m.items()},
                        "voi_ml": round(float(mask.sum()) * case.activity_true.grid.voxel_volume_ml, 2),
                        "realisation": case.realisation,
                    }
                )
        by_patient.setdefault(case.patient, []).append((case, rates, ref.array))
        if len(plots) < 3:
            plots.append((case, rates, ref.array))

    _write_csv(out_dir / "metrics.csv", rows, METRIC_COLUMNS)
    noise_rows = []
    for patient, items in by_patient.items():
        if len(items) < 2:
            continue
        mask = items[0][0].labels.get("healthy_liver")
        if mask is None:
            continue
        for method in items[0][1]:
            noise_rows.append(
                {
                    "patient": patient,
                    "voi": "healthy_liver",
                    "method": method,
                    "ensemble_noise_pct": round(ensemble_noise_pct([r[method] for _, r, _ in items], mask), 3),
                    "realisations": len(items),
                }
            )
    if noise_rows:
        _write_csv(out_dir / "noise.csv", noise_rows, ["patient", "voi", "method", "ensemble_noise_pct", "realisations"])
    table = summary_table(rows, noise_rows)
    (out_dir / "metrics.md").write_text(table)
    _plot(plots, out_dir)
    return {"rows": rows, "noise": noise_rows, "table": table, "methods": list(methods)}


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _group(voi: str) -> str:
    if voi.startswith("lesion_"):
        return "lesions"
    if voi.startswith("kidney_"):
        return "kidneys"
    return voi


def summary_table(rows: list[dict], noise_rows: list[dict] | None = None) -> str:
    """Markdown: mean over VOIs of each group, per method, plus the CNN's change vs DVK."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((_group(r["voi"]), r["method"]), []).append(r)
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "dvk", m))
    order = ["lesions", "kidneys", "healthy_liver", "spleen", "lumbar_vertebrae"]
    lines = [
        "| VOI group | method | n | mean error % | NRMSE % | DR10 % | DR30 % | DR70 % | DR90 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    means: dict[tuple[str, str], dict[str, float]] = {}
    for g in order:
        for m in methods:
            rs = groups.get((g, m))
            if not rs:
                continue
            avg = {k: float(np.mean([r[k] for r in rs])) for k in METRIC_COLUMNS[3:9]}
            means[(g, m)] = avg
            lines.append(
                f"| {g} | {m} | {len(rs)} | "
                + " | ".join(f"{avg[k]:.1f}" for k in METRIC_COLUMNS[3:9])
                + " |"
            )
    changes = []
    for g in order:
        base = means.get((g, "dvk"))
        for m in methods:
            if m == "dvk" or base is None or (g, m) not in means:
                continue
            cur = means[(g, m)]
            d_mean = 100.0 * (cur["mean_error_pct"] - base["mean_error_pct"]) / base["mean_error_pct"]
            d_nrmse = 100.0 * (cur["nrmse_pct"] - base["nrmse_pct"]) / base["nrmse_pct"]
            changes.append(f"| {g} | {m} | {d_mean:+.0f} % | {d_nrmse:+.0f} % |")
    if changes:
        lines += ["", "Change against DVK (negative = better; paper: mean error -55 % lesions, -66 % kidneys; NRMSE -18 % / -10 %):", ""]
        lines += ["| VOI group | method | mean error | NRMSE |", "|---|---|---|---|", *changes]
    if noise_rows:
        lines += ["", "Ensemble noise in the healthy liver (paper: -21 % CNN vs DVK):", "", "| patient | method | noise % | realisations |", "|---|---|---|---|"]
        lines += [f"| {r['patient']} | {r['method']} | {r['ensemble_noise_pct']:.2f} | {r['realisations']} |" for r in noise_rows]
    return "\n".join(lines) + "\n"


def _plot(plots, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not plots:
        return
    fig, axes = plt.subplots(len(plots), 1, figsize=(9, 3.2 * len(plots)), squeeze=False)
    for ax, (case, rates, ref) in zip(axes[:, 0], plots, strict=True):
        # Profile along x through the hottest lesion (or the hottest voxel of the reference).
        lesion = case.labels.get("lesion_1")
        centre = np.argwhere(lesion).mean(0).round().astype(int) if lesion is not None and lesion.any() else np.array(np.unravel_index(np.argmax(ref), ref.shape))
        k, j, _ = centre
        x_mm = np.arange(ref.shape[2]) * case.activity_true.grid.spacing_mm[2]
        ax.plot(x_mm, ref[k, j] * 3.6e6, "k-", lw=2, label="reference (truth)")
        for name, est in rates.items():
            ax.plot(x_mm, est[k, j] * 3.6e6, label=name)
        ax.set_title(f"{case.patient}: profile through lesion_1 (slice {k}, row {j})")
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("dose rate (mGy/h)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "profiles.png", dpi=110)
    plt.close(fig)

    case, rates, ref = plots[0]
    vois = [v for v in ("lesion_1", "kidney_left", "healthy_liver", "lumbar_vertebrae") if v in case.labels and case.labels[v].any()]
    fig, axes = plt.subplots(1, len(vois), figsize=(3.6 * len(vois), 3.2), squeeze=False)
    for ax, voi in zip(axes[0], vois, strict=True):
        mask = case.labels[voi]
        for name, arr in [("reference", ref), *rates.items()]:
            vals = np.sort(arr[mask] * 3.6e6)[::-1]
            frac = 100.0 * np.arange(1, vals.size + 1) / vals.size
            ax.plot(vals, frac, "k-" if name == "reference" else "-", lw=2 if name == "reference" else 1, label=name)
        ax.set_title(voi)
        ax.set_xlabel("dose rate (mGy/h)")
        ax.set_ylabel("volume (%)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "drvh.png", dpi=110)
    plt.close(fig)
