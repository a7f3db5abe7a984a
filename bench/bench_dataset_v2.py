"""Time and disk size of data set v2 members, extrapolated to the whole set.

Usage: nice python bench/bench_dataset_v2.py OUT_DIR [--members 3] [--version v2] [--quantiles Q ...]
       nice python bench/bench_dataset_v2.py OUT_DIR --fast 4 [--quantiles 0.5]   (issue 17)
       nice python bench/bench_dataset_v2.py OUT_DIR --prepare-only SPLIT/NAME   (labels of a written member)

``--fast N``: the same members made by the training campaign's fast path instead
(``spectdose.learning.fast_cases``: no DICOM, everything on the model grid, N noise
realisations sharing one projection and the attenuation, inputs including the recovered-DVK
channel), CPU seconds per stage and per noise realisation. ``--prepare-only``: CPU seconds
of ``prepare_case`` (labels, DVK, resampling to the model grid: what a DICOM member costs
before training can use it) on a member already written, in a fresh process (kernels of
its CT voxel size computed unless cached: ``--kernel-cache``).

Makes ``--members`` members of the data set (one worker, one torch thread, exactly as
`spectdose dataset --workers 1` does, through the same ``_generate_member``), chosen at the
25th, 50th and 75th percentile (and evenly between for other counts) of a cost proxy over
the whole member list, so the sample spans cheap and dear patients. Cost is counted in CPU
seconds of the member's process (its wall time, also printed, depends on what else runs). The cost of a member
scales with its SPECT voxels x (OSEM iterations + the projection's cost in iterations) and
with its CT voxels (painting, DICOM, truth); both coefficients are fitted to the measured
members (least squares) and applied to every member of the set. Disk size is fitted the
same way. Prints per member: settings, seconds, MB, peak RSS; then the extrapolated totals
for W parallel workers on this machine and on a 16-core machine (members in parallel; a
member never uses more than one core). Writes ``OUT_DIR/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
from pathlib import Path

import numpy as np

from spectdose.learning.training import DATASETS, _generate_member, dataset_members
from spectdose.phantoms.variation import draw_settings

# Projection of the 2x finer grid over 128 views, in units of one OSEM iteration on the
# SPECT grid: clinical v1 seed 1, 116 s projection vs 197 s for 8 iterations (docs/phantom.md).
PROJECTION_ITERATIONS = 116.0 / (197.0 / 8.0)


def features(seed: int) -> tuple[float, float]:
    s = draw_settings(seed)
    spect = float(np.prod(s.spect_shape)) * (s.n_iters + PROJECTION_ITERATIONS)
    return spect, float(np.prod(s.ct_shape))


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _child(job):
    name, seconds = _generate_member(job)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return name, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def _fast_child(seed: int, n_noise: int, kernel_cache: str | None):
    from spectdose.cnn.recovery import DEFAULT_RECOVERY
    from spectdose.learning.fast_cases import fast_training_cases

    p = fast_training_cases(seed, n_noise=n_noise, recovery=DEFAULT_RECOVERY, kernel_cache=kernel_cache)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return p.cpu_s, p.info, len(p.cases), usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def _prepare_child(member_dir: str, kernel_cache: str | None):
    from spectdose.learning.training import prepare_case

    prepare_case(Path(member_dir), kernel_cache=Path(kernel_cache) if kernel_cache else None)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def _in_child(fn, *args):
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--version", default="v2")
    ap.add_argument("--quantiles", type=float, nargs="+", help="cost quantiles of the members to make (default by --members)")
    ap.add_argument("--fast", type=int, metavar="N", help="fast path with N noise realisations per patient")
    ap.add_argument("--prepare-only", metavar="SPLIT/NAME", help="CPU seconds of prepare_case on this written member")
    ap.add_argument("--kernel-cache", help="kernel cache folder (default: none, kernels computed as on a fresh machine)")
    args = ap.parse_args(argv)
    if args.prepare_only:
        cpu_s, rss = _in_child(_prepare_child, str(args.out_dir / args.prepare_only), args.kernel_cache)
        print(json.dumps({"member": args.prepare_only, "prepare_cpu_seconds": round(cpu_s, 1), "peak_rss_mb": round(rss)}))
        return 0
    spec = DATASETS[args.version]
    members = dataset_members(args.version)
    feats = np.array([features(seed) for _, _, seed, _ in members])
    proxy = feats[:, 0] / feats[:, 0].mean() + feats[:, 1] / feats[:, 1].mean()
    order = np.argsort(proxy)
    qs = [0.25, 0.5, 0.75] if args.members == 3 else list(np.linspace(0.1, 0.9, args.members))
    qs = args.quantiles or qs
    picks = sorted({int(order[min(len(order) - 1, int(round(q * (len(order) - 1))))]) for q in qs})
    rows = []
    if args.fast:
        for i in picks:
            seed = members[i][2]
            cpu_stages, info, n_cases, cpu_s, rss = _in_child(_fast_child, seed, args.fast, args.kernel_cache)
            row = {"member": members[i][1], "seed": seed, "noise_realisations": n_cases, "cpu_seconds": round(cpu_s, 1),
                   "cpu_seconds_per_realisation": round(cpu_s / max(1, n_cases), 1),
                   "stages_cpu_seconds": {k: round(v, 1) for k, v in cpu_stages.items()}, "peak_rss_mb": round(rss), **info}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "bench_fast.json").write_text(json.dumps(rows, indent=2))
        return 0
    for i in picks:
        split, name, seed, noise = members[i]
        split_dir = args.out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        job = (str(split_dir), split, [(name, noise)], seed, spec["size"], args.version)  # as generate_dataset queues one
        # a fresh process per member, as a pool worker is: its peak RSS is the member's
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            label, seconds, cpu_s, rss_mb = pool.apply(_child, (job,))
        s = draw_settings(seed)
        row = {
            "member": label,
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_s, 1),
            "load_average_1min": os.getloadavg()[0],
            "mb": round(du_mb(split_dir / name), 1),
            "peak_rss_mb": round(rss_mb),
            "spect_shape": list(s.spect_shape),
            "osem": f"{s.n_iters}x{s.n_subsets}",
            "ct_shape": list(s.ct_shape),
            "features": list(feats[i]),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    x = np.array([r["features"] for r in rows])
    # CPU seconds: what the member costs one core of this machine unshared (the wall time
    # depends on what else runs; both are reported)
    t = np.array([r["cpu_seconds"] for r in rows])
    mb = np.array([r["mb"] for r in rows])
    coef_t = np.linalg.lstsq(x, t, rcond=None)[0]
    coef_mb = np.linalg.lstsq(x, mb, rcond=None)[0]
    per_member_s = np.clip(feats @ coef_t, t.min() * 0.5, None)
    per_member_mb = np.clip(feats @ coef_mb, mb.min() * 0.5, None)
    total_s, total_mb = float(per_member_s.sum()), float(per_member_mb.sum())

    def wall(workers: int) -> float:
        # longest-first onto ``workers`` queues
        queues = [0.0] * workers
        for v in sorted(per_member_s, reverse=True):
            queues[queues.index(min(queues))] += float(v)
        return max(queues)

    out = {
        "version": args.version,
        "n_members": len(members),
        "measured": rows,
        "fit_seconds_per_feature": list(coef_t),
        "fit_mb_per_feature": list(coef_mb),
        "mean_cpu_seconds_per_member_measured": float(t.mean()),
        "mean_wall_seconds_per_member_measured": float(np.mean([r["seconds"] for r in rows])),
        "mean_mb_per_member_measured": float(mb.mean()),
        "extrapolated_cpu_hours_one_worker": total_s / 3600.0,
        "extrapolated_hours_2_workers": wall(2) / 3600.0,
        "extrapolated_hours_16_workers": wall(16) / 3600.0,
        "extrapolated_gb": total_mb / 1000.0,
        "cpu_count_here": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    (args.out_dir / "bench.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "measured"}, indent=2))
    print(f"members: {len(members)}; one worker ~{math.ceil(total_s / 60)} min; 2 workers ~{wall(2) / 3600:.1f} h; "
          f"16 workers ~{wall(16) / 3600:.2f} h; disk ~{total_mb / 1000:.1f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
