"""Per-stage time of a clinical-size 4-time-point cycle with DVK (512x512x130 CTs).

Usage: python bench/bench_cycle.py [--cycle DIR] [--seed 101] [--time-points 4,24,96,168]
                                   [--camera ideal|simulated] [--registration rigid|deformable]

Without --cycle it generates (once, cached under bench/.data/) a clinical-size virtual
patient over the time points with `spectdose.phantoms.cycle.generate_cycle`. The default
camera is "ideal" (the truth on the SPECT grid): the benchmark times the dose route, which
does not depend on how the SPECT was made, and a simulated clinical SPECT costs ~6 min per
time point on 2 cores. Kernel generation is excluded (warmed once before timing). Target
(issue 12): the whole cycle in <= 3 min on this CPU.

Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cycle", type=Path, help="a folder written by `spectdose phantom --time-points`"
    )
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--time-points", default="4,24,96,168")
    parser.add_argument("--camera", choices=["ideal", "simulated"], default="ideal")
    parser.add_argument("--registration", choices=["rigid", "deformable"], default="rigid")
    parser.add_argument(
        "--kernel-cache", type=Path, default=Path(__file__).parent / ".data" / "kernels"
    )
    args = parser.parse_args()

    from spectdose.cycle import cycle_study_paths, run_cycle
    from spectdose.dicom.ingest import load_study
    from spectdose.kernels import get_kernel
    from spectdose.phantoms.cycle import generate_cycle, parse_time_points
    from spectdose.pipeline import DoseOptions

    cycle = args.cycle
    if cycle is None:
        hours = parse_time_points(args.time_points)
        cycle = (
            Path(__file__).parent
            / ".data"
            / f"cycle-clinical-{args.seed}-{args.camera}-{'-'.join(f'{h:g}' for h in hours)}"
        )
        if not (cycle / "cycle.json").is_file():
            t0 = time.perf_counter()
            print(f"generating {cycle} ...", flush=True)
            generate_cycle(
                cycle,
                args.seed,
                "clinical",
                hours,
                camera=args.camera,
                truth_engine="dvk",
                kernel_cache_dir=args.kernel_cache,
            )
            print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
    paths = cycle_study_paths(cycle)
    first = load_study(paths[0])
    get_kernel(first.ct.grid.spacing_mm, cache_dir=args.kernel_cache)  # warm the cache, untimed
    del first

    stages: dict[str, float] = {}

    def progress(stage: str, fraction: float) -> None:
        now = time.perf_counter()
        stages[stage] = now
        print(f"  {100 * fraction:3.0f}% {stage}", flush=True)

    options = DoseOptions(kernel_cache_dir=args.kernel_cache)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_cycle(
            paths, Path(tmp) / "out", options, registration=args.registration, progress=progress
        )
        total = time.perf_counter() - t0
    timings = result.summary["timings_s"]
    print(
        f"\nclinical cycle, {len(paths)} time points, DVK, {args.registration} registration: {total:.1f} s "
        f"(target <= 180 s); peak RSS {peak_rss_mib():.0f} MiB"
    )
    for name, seconds in timings.items():
        print(f"  {name:<26}{seconds:8.1f} s  {100 * seconds / total:5.1f} %")
    reg = [tp["registration"] for tp in result.summary["time_points"][1:]]
    print(
        "  registrations: "
        + json.dumps([{k: r[k] for k in ("ct_correlation", "rigid_translation_mm")} for r in reg])
    )


if __name__ == "__main__":
    main()
