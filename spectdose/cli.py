"""`spectdose` command line: dose, phantom, kernel, demo (+ service commands when installed).

Service commands (serve, gateway, node, worker) live in the adapter packages and register
themselves through the ``spectdose.commands`` entry-point group, so this core module
imports none of them.

Exit status (sysexits.h names): 0 done; 2 the input or output was refused (a
SpectdoseError: no usable study, a missing fact, an output path that cannot be written);
64 (EX_USAGE) bad command-line usage; 70 (EX_SOFTWARE) an internal error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import logging
import os
import sys
from pathlib import Path

import numpy as np

from spectdose import __version__
from spectdose.errors import InputError, SpectdoseError
from spectdose.paths import default_cache_dir

__all__ = ["main", "build_parser", "default_cache_dir", "EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "EXIT_INTERNAL"]

log = logging.getLogger("spectdose")

EXIT_OK = 0
EXIT_REFUSED = 2  # the input or output was refused, with a message saying why
EXIT_USAGE = 64  # EX_USAGE (sysexits.h): the command line itself is wrong
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): a bug; rerun with --debug


class _UsageParser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; here 2 means "input refused", so usage errors exit 64."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


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
    """One flag per DoseOptions field, spelled as its public name (``--`` + name with ``-``)."""
    from spectdose.pipeline import ASSUMPTIONS, DoseOptions

    defaults = DoseOptions()
    p.add_argument(
        "--method",
        choices=["dvk", "cnn", "dvk-rr"],
        default=defaults.method,
        help=f"dose-rate engine (default: {defaults.method}; see the README for why; dvk-rr: DVK on the "
        "Richardson-Lucy resolution-recovered SPECT, no learning)",
    )
    p.add_argument(
        "--time-model",
        choices=["hanscheid", "physical", "effective", "none"],
        default=defaults.time_model,
        help="time integration: hanscheid (D = Ddot*2t/ln2, default; refused outside about 48-168 h), physical "
        "(Lu-177 decay only), effective (needs --effective-half-life-h), none (the dose-rate map only, e.g. one "
        "time point of a cycle)",
    )
    p.add_argument("--effective-half-life-h", type=_positive_float, help="effective half-life in hours")
    p.add_argument(
        "--administration-time", type=_parse_datetime, help="administration date-time (ISO), replaces the header's"
    )
    p.add_argument(
        "--acquisition-time",
        type=_parse_datetime,
        help="acquisition start date-time (ISO), for a header without an Acquisition Date (de-identified)",
    )
    p.add_argument(
        "--hours-after-administration",
        type=_positive_float,
        metavar="H",
        help="hours from administration to the acquisition start, given directly (instead of both date-times)",
    )
    p.add_argument(
        "--density-curve", default=defaults.density_curve, help="CT calibration: schneider2000, bilinear, or a JSON file"
    )
    p.add_argument("--kernel-medium", default=defaults.kernel_medium, help="dose voxel kernel medium (default: soft)")
    p.add_argument("--sensitivity-cps-per-mbq", type=_positive_float, help="camera calibration for SPECT in counts")
    p.add_argument("--calibrations", type=Path, help="JSON file of camera calibrations (per camera / AE title)")
    p.add_argument(
        "--normalised", action="store_true", help="accept an uncalibrated SPECT and output dose rate per MBq in FOV"
    )
    p.add_argument("--spect-series", help="SeriesInstanceUID (or listed key) of the SPECT to use when there are several")
    p.add_argument("--ct-series", help="SeriesInstanceUID of the CT to use when there are several")
    p.add_argument(
        "--energy-window",
        type=_positive_float,
        metavar="KEV",
        help="use the SPECT whose energy window contains this energy, e.g. 208 (several windows or per-window series)",
    )
    p.add_argument(
        "--dose-grid", default=defaults.dose_grid, help="output grid: ct (default), spect, or an isotropic spacing in mm"
    )
    p.add_argument(
        "--accept",
        action="append",
        choices=sorted(ASSUMPTIONS),
        default=[],
        metavar="ASSUMPTION",
        help="allow one assumption that is refused by default (repeatable; the result carries a warning): "
        + "; ".join(f"{k}: {v}" for k, v in sorted(ASSUMPTIONS.items())),
    )
    p.add_argument("--map-precision", choices=("auto", "float32"), default=defaults.map_precision,
                   help="dose-rate maps: auto (16-bit, JPEG-LS, where the quoted means allow; else float32) or float32 "
                   "(always; dcmqi and 3D Slicer read only float Parametric Maps)")
    p.add_argument("--device", help="torch device for GPU stages (default: cuda when present, else cpu)")
    p.add_argument("--kernel-cache", type=Path, help="kernel cache folder (default: $SPECTDOSE_CACHE_DIR or ~/.cache)")
    p.add_argument("--model", type=Path, help="DblurDoseNet weights for --method cnn (default: models/dblurdosenet.pt)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the network (see the model card)")
    p.add_argument("--uncertainty", action="store_true",
                   help="with --method cnn: a calibrated 1-sigma per voxel from the deep ensemble beside the weights "
                   "(<model>_ensemble.pt), written as doserate_sigma_pm.dcm and per region")
    p.add_argument("--regions", type=Path, help="DICOM SEG or RT Structure Set on the CT: statistics, DVHs and SR per region "
                   "(without it: automatic regions, unreviewed focal hot spots, autoseg.dcm)")


def _common_flags(*, top: bool) -> argparse.ArgumentParser:
    """-v/--debug, accepted before or after the command (after it, only when given)."""
    p = argparse.ArgumentParser(add_help=False)
    default = False if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log details")
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _UsageParser(
        prog="spectdose",
        description="Lu-177 SPECT/CT voxel dosimetry",
        parents=[_common_flags(top=True)],
        epilog="exit status: 0 done, 2 input or output refused, 64 usage error, 70 internal error",
    )
    parser.add_argument("--version", action="version", version=f"spectdose {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_flags(top=False)
    add_parser = sub.add_parser

    def add_with_common(*a, **kw):
        kw.setdefault("parents", [common])
        return add_parser(*a, **kw)

    sub.add_parser = add_with_common  # every command, plugins included, takes -v/--debug after its name

    p = sub.add_parser("dose", help="compute RT Dose and dose-rate map from a SPECT/CT study (folder or zip)")
    p.add_argument(
        "study_path",
        type=Path,
        nargs="+",
        help="one study (folder or zip); or several studies of one cycle (time points), or one folder holding "
        "them (as `spectdose phantom --time-points` writes): the multi-time-point route",
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    _add_dose_options(p)
    p.add_argument(
        "--registration",
        choices=["rigid", "deformable"],
        default="rigid",
        help="several time points: CT-to-CT registration to the first time point (default rigid; deformable adds "
        "a B-spline)",
    )
    p.add_argument(
        "--integration-model",
        choices=["auto", "mono", "biexp", "trapezoid"],
        default="auto",
        help="several time points: region time-curve model (default auto: bi-exponential uptake-clearance when it "
        "fits, else mono-exponential, else trapezoid + physical decay; the reason is in the summary)",
    )
    p.set_defaults(func=_cmd_dose)

    p = sub.add_parser("phantom", help="write a virtual-patient SPECT/CT study (DICOM) with its truth")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--size", choices=["small", "clinical"], default="small")
    p.add_argument("--counts", type=_positive_float, help="total SPECT counts (default: drawn per seed, 3-20 million)")
    p.add_argument("--spect-units", choices=["Bq/ml", "counts"], default="Bq/ml")
    p.add_argument("--noise-seed", type=int, help="Poisson noise realisation (default: the patient seed)")
    p.add_argument(
        "--time-points",
        metavar="HOURS",
        help="a cycle: one study per time point (hours after the one administration, e.g. 4,24,96,168), the "
        "patient repositioned each time, with the true dose rates and cycle dose (docs/time-integration.md)",
    )
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
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=WEIGHTS",
        help="another network to compare, e.g. cnn_v1=runs/dblurdosenet_v1.pt (repeatable)",
    )
    p.add_argument("--ensemble", type=Path, help="ensemble file (default: <cnn weights>_ensemble.pt beside the CNN's)")
    p.add_argument("--dvk-rr", action="store_true",
                   help="also method dvk-rr: DVK on the Richardson-Lucy resolution-recovered SPECT (no learning)")
    p.add_argument("--device")
    p.add_argument("--kernel-cache", type=Path)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("dataset", help="generate the versioned virtual-patient training/validation/test set")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--version", default="v1", help="v1 (the shipped model's data), v2 (varied patients: docs/phantom.md), v2-test (the campaign's fixed test set: 5 patients x 3 realisations) or v2-tiny (a smoke test)")
    p.add_argument("--workers", type=int, default=1, help="phantoms made at once (one CPU thread each)")
    p.add_argument(
        "--limit",
        metavar="SPLIT=N[,SPLIT=N]",
        help="only the first N patients of these splits (e.g. train=16,val=4); the whole set later resumes onto it",
    )
    p.set_defaults(func=_cmd_dataset)

    p = sub.add_parser("train", help="train DblurDoseNet on a generated data set (resumes from checkpoints)")
    p.add_argument("--data", type=Path, help="folder written by `spectdose dataset` (with --resume: the run's)")
    p.add_argument("--config", type=Path, help="training configuration (JSON) (with --resume: the run's)")
    p.add_argument("-o", "--out", type=Path, help="run folder: checkpoints, losses, weights")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.add_argument("--seed", type=int, help="ensemble member: replaces the config's seed, adds _seed<N> to the name")
    p.add_argument("--device")
    p.add_argument("--kernel-cache", type=Path)
    p.add_argument("--install", type=Path, help="also copy the weights and a model card into this models folder")
    p.add_argument("--campaign", type=Path, metavar="DIR",
                   help="continue the training campaign in DIR (e.g. models/campaign): new patients, a time budget, "
                        "installation only on improvement")
    p.add_argument("--minutes", type=float, help="--campaign: stint length in minutes")
    p.add_argument("--until", metavar="HH:MM", help="--campaign: end the stint at this UTC time")
    p.add_argument("--threads", type=int, help="torch CPU threads (--campaign; 1 on a shared machine)")
    p.add_argument("--generate-device", help="--campaign: torch device of the patients' projection and OSEM (default cpu; "
                                              "cuda on a GPU machine, see scripts/device_stint.sh)")
    p.add_argument("--restart-from-best", action="store_true",
                   help="--campaign: start this stint from the weights of the campaign's best-scored stint (new optimiser, "
                        "current learning rate) instead of the last stint's, when the later stints scored worse")
    p.add_argument("--ensemble-only", action="store_true",
                   help="--campaign: no training; (re)build the uncertainty ensemble from the campaign's snapshots "
                        "(adding the last scored stint's weights from state.pt when it has none) and install it if better")
    p.add_argument("--recalibrate-ensemble", action="store_true",
                   help="--campaign: no training; refit the installed ensemble's sigma on the validation patients when it "
                        "was fitted by an older rule (same members and dose rate, a new file)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="make a small virtual patient and compute its dose")
    p.add_argument("out_dir", type=Path, nargs="?", default=Path("demo-out"))
    # Seed 8 is acquired 93 h after administration, inside the Hanscheid model's range (seed 1: 33 h).
    p.add_argument("--seed", type=int, default=8)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("regions", help="region statistics, DVHs and SR for a finished dose result (no dose recomputed)")
    p.add_argument("result", type=Path, help="a folder written by `spectdose dose` (or its rtdose.dcm)")
    p.add_argument("--regions", type=Path, required=True, help="DICOM SEG or RT Structure Set on the study's CT")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=_cmd_regions)

    for ep in importlib.metadata.entry_points(group="spectdose.commands"):
        try:
            ep.load()(sub)
        except ImportError as exc:  # an adapter whose dependencies are missing
            log.debug("command plugin %s unavailable: %s", ep.name, exc)
    return parser


def _dose_options(args: argparse.Namespace):
    """DoseOptions from the flags, by the public names the REST fields share (one vocabulary)."""
    from spectdose.dicom.ingest import load_calibrations
    from spectdose.pipeline import PUBLIC_NAMES, DoseOptions

    data = {name: getattr(args, name) for name in PUBLIC_NAMES.values() if hasattr(args, name)}
    return DoseOptions.from_dict(
        data,
        calibrations=tuple(load_calibrations(args.calibrations)) if args.calibrations else (),
        kernel_cache_dir=args.kernel_cache or default_cache_dir() / "kernels",
        device=args.device,
        model_path=args.model,
        regions_path=args.regions,
    )


def _print_progress(stage: str, fraction: float) -> None:
    """Progress on stderr (stdout carries the summary), without needing -v."""
    print(f"spectdose: {100 * fraction:3.0f}% {stage}", file=sys.stderr, flush=True)


def _check_out_dir(out: Path) -> None:
    """Refuse an output folder that cannot be one before any work is done."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out} is an existing file; give a folder (-o/--out)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output folder {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output folder {out}: {parent} is not writable")
    # os.access says yes to root and knows nothing of read-only mounts: create the folder and a
    # file in it now, so an unwritable -o is found before any computation (issue 18 item 10).
    created = []
    try:
        for folder in reversed([out, *out.parents]):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        probe = out / f".spectdose-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise InputError(f"output folder {out} cannot be written ({exc.strerror or exc}); give another -o/--out") from exc


def _cmd_dose(args: argparse.Namespace) -> int:
    from spectdose.cycle import cycle_study_paths
    from spectdose.pipeline import run

    options = _dose_options(args)
    _check_out_dir(args.out)
    paths = args.study_path
    cycle = paths if len(paths) > 1 else cycle_study_paths(paths[0])
    if cycle:
        return _cmd_dose_cycle(args, options, cycle)
    return _run_and_report(lambda: run(paths[0], args.out, options, progress=_print_progress), args.out)


def _run_and_report(compute, out: Path) -> int:
    """Run a dose computation, print its summary; a file the system refused (permissions, full
    disk) is an input error with the file named, not a bug."""
    try:
        result = compute()
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise InputError(f"file system error{where}: {exc.strerror or exc}") from exc
    print((out / "summary.txt").read_text(), end="")
    print(f"Written to {out.resolve()}")
    return EXIT_OK if result.outputs else EXIT_INTERNAL


def _cmd_regions(args: argparse.Namespace) -> int:
    from spectdose.region_report import region_report

    _check_out_dir(args.out)
    outputs = region_report(args.result, args.regions, args.out)
    print("Written to " + str(args.out.resolve()) + ": " + ", ".join(sorted(p.name for p in outputs.values())))
    return EXIT_OK


def _cmd_dose_cycle(args: argparse.Namespace, options, paths: list[Path]) -> int:
    """Several time points of one cycle: registered, integrated (spectdose.cycle)."""
    from spectdose.cycle import run_cycle

    return _run_and_report(
        lambda: run_cycle(
            paths,
            args.out,
            options,
            registration=args.registration,
            integration_model=args.integration_model,
            progress=_print_progress,
        ),
        args.out,
    )


def _cmd_phantom(args: argparse.Namespace) -> int:
    from spectdose.phantoms import generate

    if args.time_points:
        from spectdose.phantoms.cycle import generate_cycle, parse_time_points

        if args.counts or args.noise_seed is not None or args.spect_units != "Bq/ml":
            raise InputError("--counts, --noise-seed and --spect-units apply to a single study, not to --time-points")
        info = generate_cycle(
            args.out_dir,
            args.seed,
            size=args.size,
            time_points_h=parse_time_points(args.time_points),
            kernel_cache_dir=default_cache_dir() / "kernels",
        )
        print(f"Virtual patient seed {args.seed} ({args.size}), {len(info['studies'])} time points, written to "
              f"{args.out_dir.resolve()}")
        for path in info["studies"]:
            print(f"  {path}")
        print(f"  manifest: {info['manifest']}")
        return 0

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
    from spectdose.kernels import get_kernel

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
    from spectdose.cnn.inference import MODELS_DIR
    from spectdose.learning.evaluation import evaluate

    models_dir = args.models_dir or MODELS_DIR
    models = {
        "cnn": models_dir / "dblurdosenet.pt",
        "cnn_no_residual": models_dir / "dblurdosenet_no_residual.pt",
        "cnn_2d": models_dir / "dblurdosenet_2d.pt",
    }
    for entry in args.also:
        name, sep, weights = entry.partition("=")
        if not sep or not name.strip() or name.strip() in models or name.strip() in ("dvk", "dvk-rr", "cnn_ensemble"):
            raise InputError(f"--also is NAME=WEIGHTS with a new method name, not {entry!r}")
        if not Path(weights).is_file():
            raise InputError(f"--also {entry}: no weights file {weights}")
        models[name.strip()] = Path(weights)
    if args.ensemble is not None and not args.ensemble.is_file():
        raise InputError(f"--ensemble: no ensemble file {args.ensemble}")
    result = evaluate(
        args.phantom_dirs,
        args.out,
        models=models,
        ensemble=args.ensemble,
        recovered=args.dvk_rr,
        kernel_cache=args.kernel_cache or default_cache_dir() / "kernels",
        device=args.device,
        progress=lambda m: print(m, flush=True),
    )
    print(result["table"], end="")
    print(f"Written to {args.out.resolve()}: metrics.csv, metrics.md, profiles.png, drvh.png")
    return 0


def _cmd_dataset(args: argparse.Namespace) -> int:
    from spectdose.learning.training import generate_dataset

    limit = None
    if args.limit:
        try:
            limit = {k.strip(): int(v) for k, v in (part.split("=", 1) for part in args.limit.split(","))}
        except ValueError as exc:
            raise InputError(f"--limit is SPLIT=N[,SPLIT=N], not {args.limit!r}") from exc
    manifest = generate_dataset(args.out_dir, args.version, workers=args.workers, limit=limit, progress=lambda m: print(m, flush=True))
    print(f"data set {args.version} complete: {manifest}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from spectdose.learning.training import train_command

    if args.restart_from_best and args.campaign is None:
        raise InputError("--restart-from-best goes with --campaign DIR")
    if args.recalibrate_ensemble:
        if args.campaign is None or args.minutes is not None or args.until is not None or args.restart_from_best or args.ensemble_only:
            raise InputError("--recalibrate-ensemble goes with --campaign DIR alone (it trains nothing)")
        from spectdose.learning.campaign import recalibrate_installed_ensemble

        recalibrate_installed_ensemble(args.campaign, kernel_cache=args.kernel_cache or default_cache_dir() / "kernels",
                                       threads=args.threads, device=args.device, progress=lambda m: print(m, flush=True))  # fmt: skip
        return 0
    if args.ensemble_only:
        if args.campaign is None or args.minutes is not None or args.until is not None or args.restart_from_best:
            raise InputError("--ensemble-only goes with --campaign DIR and without a time budget (it trains nothing)")
        from spectdose.learning.campaign import build_campaign_ensemble

        build_campaign_ensemble(args.campaign, kernel_cache=args.kernel_cache or default_cache_dir() / "kernels", threads=args.threads,
                                device=args.device, progress=lambda m: print(m, flush=True))  # fmt: skip
        return 0
    if args.campaign is not None:
        import time

        from spectdose.learning.campaign import parse_until, run_stint

        if (args.minutes is None) == (args.until is None):
            raise InputError("a campaign stint needs its time budget: --minutes N or --until HH:MM (one of them)")
        if args.minutes is not None and args.minutes <= 0:
            raise InputError(f"--minutes must be > 0, not {args.minutes}")
        deadline = time.time() + 60.0 * args.minutes if args.minutes is not None else parse_until(args.until).timestamp()
        record = run_stint(args.campaign, deadline=deadline, kernel_cache=args.kernel_cache or default_cache_dir() / "kernels",
                           threads=args.threads, device=args.device, progress=lambda m: print(m, flush=True),
                           restart_from_best=args.restart_from_best, generate_device=args.generate_device)
        return 0 if record.get("end") in ("done",) or str(record.get("end", "")).startswith("stopped") else 1
    return train_command(
        data=args.data,
        config=args.config,
        out=args.out,
        resume=args.resume,
        seed=args.seed,
        device=args.device,
        kernel_cache=args.kernel_cache or default_cache_dir() / "kernels",
        install=args.install,
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from spectdose.phantoms import generate
    from spectdose.pipeline import DoseOptions, run

    study_dir = args.out_dir / "study"
    dose_dir = args.out_dir / "dose"
    print(f"1/2 Writing a small virtual patient (seed {args.seed}) to {study_dir} ...", flush=True)
    generate(study_dir, args.seed, size="small")
    print(f"2/2 Computing its Lu-177 dose (DVK) into {dose_dir} ...", flush=True)
    run(study_dir / "dicom", dose_dir, DoseOptions(kernel_cache_dir=default_cache_dir() / "kernels"), progress=_print_progress)
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
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: a message, not only a traceback
        if args.debug:
            raise
        print(
            f"spectdose {args.command}: internal error ({type(exc).__name__}: {exc}); rerun with --debug for details",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
