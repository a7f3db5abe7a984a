"""Per-stage time and peak memory of the DVK path on a clinical-size study (512x512x130 CT).

Usage: python bench/bench_dvk.py [--study DIR] [--seed 101] [--repeat 3]

Without --study it generates (once, cached under bench/.data/) a clinical-size virtual
patient with `spectdose.phantoms.generate`. Kernel generation is reported apart: once from
an empty cache (first run) and once from the cache. The target is <= 5 s for the whole
cached DVK path on 2 cores; the paper's DVK took 20 s on a desktop i9.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _one_run(study_dir: Path, cache: Path, out: Path):
    """One pass of the DVK path with each stage timed: (seconds per stage, study, kernel)."""
    from spectdose.constants import MGY_PER_H_PER_GY_PER_S
    from spectdose.dicom.export import write_dose_rate_map, write_rtdose
    from spectdose.dicom.ingest import load_study
    from spectdose.dose import dvk_dose_rate
    from spectdose.geometry import Volume
    from spectdose.kernels import get_kernel
    from spectdose.pipeline import prepare_inputs, stage_timer

    stages: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        stages[name] = time.perf_counter() - t0
        return result

    study = timed("ingest", load_study, study_dir)
    grid = study.ct.grid
    laps, lap = stage_timer()
    prepared = prepare_inputs(study, lap=lap)  # laps "resample" and "density"
    stages.update(laps)
    activity, density = prepared.activity_bq_per_ml, prepared.density_g_cm3.array
    kernel = timed("kernels (cached)", get_kernel, grid.spacing_mm, cache_dir=cache)

    rate = timed(
        "convolution",
        dvk_dose_rate,
        activity.array,
        density,
        kernel.total_mgy_per_mbq_s,
        grid.voxel_volume_ml,
    )

    def write():
        out.mkdir(parents=True)
        write_dose_rate_map(out / "pm.dcm", Volume(rate * MGY_PER_H_PER_GY_PER_S, grid, "mGy/h"), study, method="dvk")
        write_rtdose(out / "rtdose.dcm", Volume(rate * 1e6, grid, "Gy"), study, method="dvk", description="bench")

    timed("writing", write)
    return stages, study, kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--study", type=Path, help="a DICOM study folder (default: generate a clinical phantom)")
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions of the cached path")
    args = parser.parse_args()

    from spectdose.dicom.ingest import load_study
    from spectdose.kernels import get_kernel

    study_dir = args.study
    if study_dir is None:
        base = Path(__file__).parent / ".data" / f"clinical-{args.seed}"
        if not (base / "dicom").is_dir():
            from spectdose.phantoms import generate

            print(f"generating clinical virtual patient seed {args.seed} into {base} (once) ...", flush=True)
            t = time.perf_counter()
            generate(base, args.seed, size="clinical")
            print(f"  generated in {time.perf_counter() - t:.0f} s")
        study_dir = base / "dicom"

    print(f"cores: {os.cpu_count()}, study: {study_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "kernels"
        study = load_study(study_dir)
        spacing = study.ct.grid.spacing_mm
        t = time.perf_counter()
        get_kernel(spacing, cache_dir=cache)
        first_kernel_s = time.perf_counter() - t

        rows = []
        for rep in range(args.repeat):
            stages, study, kernel = _one_run(study_dir, cache, Path(tmp) / f"out{rep}")
            rows.append(stages)
            print(f"run {rep + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()) + f"; total {sum(stages.values()):.2f} s", flush=True)

        # Baseline in the same run: the textbook FFT convolution (scipy.signal.fftconvolve,
        # full linear padding, single-threaded) on the same activity and kernel.
        import scipy.signal

        from spectdose.dose import activity_mbq_per_voxel
        from spectdose.pipeline import prepare_inputs

        activity = prepare_inputs(study).activity_bq_per_ml
        a_mbq = activity_mbq_per_voxel(activity.array, study.ct.grid.voxel_volume_ml)
        t = time.perf_counter()
        scipy.signal.fftconvolve(a_mbq, kernel.total_mgy_per_mbq_s, mode="same")
        baseline_s = time.perf_counter() - t

    best = {k: min(r[k] for r in rows) for k in rows[0]}
    total = sum(best.values())
    print()
    print(f"CT grid {study.ct.grid.shape} at {tuple(round(s, 3) for s in spacing)} mm; kernel {kernel.total_mgy_per_mbq_s.shape}")
    print(f"{'stage':<20}{'best of ' + str(args.repeat) + ' (s)':>16}")
    for k, v in best.items():
        print(f"{k:<20}{v:>16.2f}")
    print(f"{'whole DVK path':<20}{total:>16.2f}   (target <= 5 s; paper DVK 20 s on a Core i9)")
    print(f"{'kernel, first run':<20}{first_kernel_s:>16.2f}   (empty cache: computed from physics)")
    print(
        f"convolution vs baseline scipy.signal.fftconvolve ({baseline_s:.2f} s): "
        f"{baseline_s / best['convolution']:.1f}x faster"
    )
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
