"""Wall and CPU seconds of each stage of one whole job, the regions and report stages above all.

Usage: OMP_NUM_THREADS=1 python bench/bench_regions.py STUDY OUT [--repeat N]

``summary.json``'s ``timings_s`` are wall seconds, which a shared machine inflates; this runs
``spectdose.pipeline.run`` in-process with its stage timer also reading the process CPU clock,
so the regions and report stages (issue 20: <= 3 s together at clinical size) can be compared
before and after a change on a loaded machine. Prints one JSON line per repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectdose import pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("out")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    cpu: dict[str, float] = {}

    def stage_timer():
        timings: dict[str, float] = {}
        t0, c0 = time.perf_counter(), time.process_time()

        def lap(name: str) -> None:
            nonlocal t0, c0
            now, cnow = time.perf_counter(), time.process_time()
            timings[name] = round(timings.get(name, 0.0) + now - t0, 3)
            cpu[name] = round(cpu.get(name, 0.0) + cnow - c0, 3)
            t0, c0 = now, cnow

        return timings, lap

    pipeline.stage_timer = stage_timer
    for _ in range(args.repeat):
        cpu.clear()
        result = pipeline.run(args.study, args.out)
        wall = result.summary["timings_s"]
        print(json.dumps({"wall_s": wall, "cpu_s": dict(cpu),
                          "regions_plus_report_wall_s": round(wall.get("regions", 0) + wall.get("report", 0), 3),
                          "regions_plus_report_cpu_s": round(cpu.get("regions", 0) + cpu.get("report", 0), 3),
                          "n_regions": len(result.summary.get("regions") or [])}), flush=True)


if __name__ == "__main__":
    main()
