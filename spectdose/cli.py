"""`spectdose` command line: dose, phantom, kernel, demo (+ service commands when installed).

Service commands (serve, gateway, node, worker) live in the adapter packages and register
themselves through the ``spectdose.commands`` entry-point group, so this core module
imports none of them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import logging
import os
import sys
from pathlib import Path

import numpy as np

from .errors import SpectdoseError

__all__ = ["main", "build_parser", "default_cache_dir"]

log = logging.getLogger("spectdose")


def default_cache_dir() -> Path:
    """Kernel cache: $SPECTDOSE_CACHE_DIR, else $XDG_CACHE_HOME/spectdose, else ~/.cache/spectdose."""
    env = os.environ.get("SPECTDOSE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spectdose"


def _parse_datetime(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO date-time (e.g. 2026-11-20T09:30): {text!r}") from exc


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_dose_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["dvk", "cnn"], default="dvk", help="dose-rate engine (default: dvk)")
    p.add_argument(
        "--time-model",
        choices=["hanscheid", "physical", "effective"],
        default="hanscheid",
        help="time integration: hanscheid (D = Ddot*2t/ln2, default), physical (Lu-177 decay only), "
        "effective (needs --effective-half-life-h)",
    )
    p.add_argument("--effective-half-life-h", type=_positive_float, help="effective half-life in hours")
    p.add_argument("--administration-time", type=_parse_datetime, help="override the administration date-time (ISO)")
    p.add_argument(
        "--density-curve", default="schneider2000", help="CT calibration: schneider2000, bilinear, or a JSON file"
    )
    p.add_argument("--sensitivity-cps-per-mbq", type=_positive_float, help="camera calibration for SPECT in counts")
    p.add_argument("--calibrations", type=Path, help="JSON file of camera calibrations (per camera / AE title)")
    p.add_argument(
        "--normalised", action="store_true", help="accept an uncalibrated SPECT and output dose rate per MBq in FOV"
    )
    p.add_argument("--spect-series", help="SeriesInstanceUID of the SPECT to use when there are several")
    p.add_argument("--ct-series", help="SeriesInstanceUID of the CT to use when there are several")
    p.add_argument("--device", help="torch device for GPU stages (default: cuda when present, else cpu)")
    p.add_argument("--kernel-cache", type=Path, help="kernel cache folder (default: $SPECTDOSE_CACHE_DIR or ~/.cache)")
    p.add_argument("--model", type=Path, help="DblurDoseNet weights for --method cnn (default: models/dblurdosenet.pt)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the network (see the model card)")
    p.add_argument("--regions", type=Path, help="DICOM SEG on the CT: dose statistics per segment in the summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectdose", description="Lu-177 SPECT/CT voxel dosimetry")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dose", help="compute RT Dose and dose-rate map from a SPECT/CT study (folder or zip)")
    p.add_argument("study_path", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    _add_dose_options(p)
    p.set_defaults(func=_cmd_dose)

    p = sub.add_parser("phantom", help="write a virtual-patient SPECT/CT study (DICOM) with its truth")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--size", choices=["small", "clinical"], default="small")
    p.add_argument("--counts", type=_positive_float, help="total SPECT counts (default: drawn per seed, 3-20 million)")
    p.add_argument("--spect-units", choices=["Bq/ml", "counts"], default="Bq/ml")
    p.add_argument("--noise-seed", type=int, help="Poisson noise realisation (default: the patient seed)")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("kernel", help="write a dose voxel kernel (total beta + photon) as .npy, axes (z, y, x)")
    p.add_argument("--nuclide", default="Lu-177")
    p.add_argument("--voxel-mm", type=_positive_float, nargs=3, metavar=("X", "Y", "Z"), required=True)
    p.add_argument("--medium", default="soft")
    p.add_argument("-o", "--out", type=Path, required=True, help="output .npy (mGy/(MBq s) per voxel)")
    p.add_argument("--kernel-cache", type=Path)
    p.set_defaults(func=_cmd_kernel)

    p = sub.add_parser("evaluate", help="compare dose-rate methods with the reference on phantom studies")
    p.add_argument("phantom_dirs", type=Path, nargs="+", help="folders written by `spectdose phantom`")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--models-dir", type=Path, help="folder with dblurdosenet*.pt (default: the shipped models/)")
    p.add_argument("--device")
    p.add_argument("--kernel-cache", type=Path)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("dataset", help="generate the versioned virtual-patient training/validation/test set")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--version", default="v1")
    p.add_argument("--workers", type=int, default=1, help="phantoms made at once (one CPU thread each)")
    p.set_defaults(func=_cmd_dataset)

    p = sub.add_parser("train", help="train DblurDoseNet on a generated data set (resumes from checkpoints)")
    p.add_argument("--data", type=Path, required=True, help="folder written by `spectdose dataset`")
    p.add_argument("--config", type=Path, required=True, help="training configuration (JSON)")
    p.add_argument("-o", "--out", type=Path, required=True, help="run folder: checkpoints, losses, weights")
    p.add_argument("--device")
    p.add_argument("--kernel-cache", type=Path)
    p.add_argument("--install", type=Path, help="also copy the weights and a model card into this models folder")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="make a small virtual patient and compute its dose")
    p.add_argument("out_dir", type=Path, nargs="?", default=Path("demo-out"))
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=_cmd_demo)

    for ep in importlib.metadata.entry_points(group="spectdose.commands"):
        try:
            ep.load()(sub)
        except ImportError as exc:  # an adapter whose dependencies are missing
            log.debug("command plugin %s unavailable: %s", ep.name, exc)
    return parser


def _dose_options(args: argparse.Namespace):
    from .ingest import load_calibrations
    from .pipeline import DoseOptions

    return DoseOptions(
        method=args.method,
        time_model=args.time_model,
        effective_half_life_h=args.effective_half_life_h,
        administration_datetime=args.administration_time,
        density_curve=args.density_curve,
        sensitivity_cps_per_mbq=args.sensitivity_cps_per_mbq,
        calibrations=tuple(load_calibrations(args.calibrations)) if args.calibrations else (),
        allow_normalised=args.normalised,
        spect_series_uid=args.spect_series,
        ct_series_uid=args.ct_series,
        kernel_cache_dir=args.kernel_cache or default_cache_dir() / "kernels",
        device=args.device,
        model_path=args.model,
        autocast_bf16=args.bf16,
        regions_path=args.regions,
    )


def _print_progress(stage: str, fraction: float) -> None:
    log.info("%3.0f%% %s", 100 * fraction, stage)


def _cmd_dose(args: argparse.Namespace) -> int:
    from .pipeline import run

    if args.method == "dvk" and args.time_model == "effective" and args.effective_half_life_h is None:
        raise SpectdoseError("--time-model effective needs --effective-half-life-h")
    result = run(args.study_path, args.out, _dose_options(args), progress=_print_progress)
    print((args.out / "summary.txt").read_text(), end="")
    print(f"Written to {args.out.resolve()}")
    return 0 if result.outputs else 1


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import generate

    info = generate(
        args.out_dir,
        args.seed,
        size=args.size,
        total_counts=args.counts,
        spect_units=args.spect_units,
        noise_seed=args.noise_seed,
    )
    print(f"Virtual patient seed {args.seed} ({args.size}) written to {args.out_dir.resolve()}")
    for key, value in info.items():
        if isinstance(value, str | Path):
            print(f"  {key}: {value}")
    return 0


def _cmd_kernel(args: argparse.Namespace) -> int:
    from .kernels import get_kernel

    x, y, z = args.voxel_mm
    kernel = get_kernel(
        (z, y, x),
        nuclide=args.nuclide,
        medium=args.medium,
        cache_dir=args.kernel_cache or default_cache_dir() / "kernels",
    )
    total = kernel.total_mgy_per_mbq_s.astype(np.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, total)
    print(
        f"{args.nuclide} {args.medium} kernel {total.shape} (z, y, x) for voxels {x} x {y} x {z} mm, "
        f"self S = {total[tuple(n // 2 for n in total.shape)]:.4g} mGy/(MBq s) -> {args.out}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .cnn import MODELS_DIR
    from .evaluate import evaluate

    models_dir = args.models_dir or MODELS_DIR
    models = {
        "cnn": models_dir / "dblurdosenet.pt",
        "cnn_no_residual": models_dir / "dblurdosenet_no_residual.pt",
        "cnn_2d": models_dir / "dblurdosenet_2d.pt",
    }
    result = evaluate(
        args.phantom_dirs,
        args.out,
        models=models,
        kernel_cache=args.kernel_cache or default_cache_dir() / "kernels",
        device=args.device,
        progress=lambda m: print(m, flush=True),
    )
    print(result["table"], end="")
    print(f"Written to {args.out.resolve()}: metrics.csv, metrics.md, profiles.png, drvh.png")
    return 0


def _cmd_dataset(args: argparse.Namespace) -> int:
    from .training import generate_dataset

    manifest = generate_dataset(args.out_dir, args.version, workers=args.workers, progress=lambda m: print(m, flush=True))
    print(f"data set {args.version} complete: {manifest}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import json
    import shutil

    from .training import TrainConfig, model_card, prepare_dataset, train

    cfg = TrainConfig.from_file(args.config)
    manifest_path = args.data / "manifest.json"
    if not manifest_path.is_file():
        raise SpectdoseError(f"{args.data} has no manifest.json: generate it with `spectdose dataset`")
    manifest = json.loads(manifest_path.read_text())
    kernel_cache = args.kernel_cache or default_cache_dir() / "kernels"
    files = prepare_dataset(args.data, args.data / "prepared", kernel_cache=kernel_cache, progress=lambda m: print(m, flush=True))
    prepared = {split: [f for f in files if f.parent.name == split] for split in ("train", "val")}
    summary = train(prepared, args.out, cfg, device=args.device)
    card = model_card(summary, data_version=manifest["version"])
    (args.out / f"{cfg.name}.md").write_text(card)
    print(card)
    if args.install:
        args.install.mkdir(parents=True, exist_ok=True)
        shutil.copy2(args.out / f"{cfg.name}.pt", args.install / f"{cfg.name}.pt")
        (args.install / f"{cfg.name}.md").write_text(card)
        print(f"installed {cfg.name}.pt and {cfg.name}.md into {args.install}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .phantom import generate
    from .pipeline import DoseOptions, run

    study_dir = args.out_dir / "study"
    dose_dir = args.out_dir / "dose"
    print(f"1/2 Writing a small virtual patient (seed {args.seed}) to {study_dir} ...", flush=True)
    generate(study_dir, args.seed, size="small")
    print(f"2/2 Computing its Lu-177 dose (DVK) into {dose_dir} ...", flush=True)
    run(study_dir / "dicom", dose_dir, DoseOptions(kernel_cache_dir=default_cache_dir() / "kernels"))
    print((dose_dir / "summary.txt").read_text(), end="")
    print(f"\nStudy (DICOM): {(study_dir / 'dicom').resolve()}\nTruth: {(study_dir / 'truth').resolve()}")
    print(f"RT Dose: {(dose_dir / 'rtdose.dcm').resolve()}\nDose-rate map: {(dose_dir / 'doserate_pm.dcm').resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except SpectdoseError as exc:
        print(f"spectdose {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: a message, not only a traceback
        if args.debug:
            raise
        print(
            f"spectdose {args.command}: internal error ({type(exc).__name__}: {exc}); rerun with --debug for details",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
