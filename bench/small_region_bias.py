"""Small-region bias rows for ``spectdose.regions.SMALL_REGION_BIAS`` from evaluations.

A region under 5 ml carries the bias the evaluation measured for its size, method and
network (docs/regions.md). This turns the lesion rows of one or more ``spectdose evaluate`` /
``bench/eval_testset.py`` outputs into those rows, so a new network gets its own figures
instead of its predecessor's: per volume bin (< 2 ml, 2-5 ml) and method, the number of
lesion measurements (lesions x noise realisations), their mean signed error of the mean dose
rate, and the 10th-90th percentile range that becomes the expected bias. Methods that learn
nothing (dvk, dvk-rr) pool every evaluation given (a study's lesion measured in two of them
counts once); a learned method is reported per weights
file, whose SHA-256 an evaluation names in ``acceptance.json`` (its ``weights``); a learned
method of an evaluation without one is skipped, since its figure could not be tied to weights.

    python bench/small_region_bias.py models/dblurdosenet-eval-campaign/v2test=v2-test [more DIR=LABEL ...]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

# Bins of docs/regions.md: below 2 ml recovery is lost almost entirely, 2-5 ml partly
# (a 5.6 ml sphere is two SPECT FWHM across; Soret et al., J Nucl Med 2007, 48:932).
BINS_ML = ((0.0, 2.0), (2.0, 5.0))
UNLEARNED = ("dvk", "dvk-rr")


def _lesion_rows(eval_dir: Path) -> list[dict]:
    with open(eval_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["voi"].startswith("lesion_")]


def _weights(eval_dir: Path) -> dict[str, str]:
    path = eval_dir / "acceptance.json"
    if not path.is_file():
        return {}
    return {m: w["sha256"] for m, w in json.loads(path.read_text()).get("weights", {}).items()}


def bias_rows(evaluations: list[tuple[Path, str]]) -> list[dict]:
    """One row per (bin, method, network): n, mean and 10th/90th percentile signed error (%)."""
    groups: dict[tuple, dict] = {}
    seen: set[tuple] = set()  # the same study's lesion in two evaluations counts once
    for eval_dir, label in evaluations:
        shas = _weights(eval_dir)
        for r in _lesion_rows(eval_dir):
            method, ml = r["method"], float(r["voi_ml"])
            if method not in UNLEARNED and method not in shas:
                continue
            key = (r["patient"], r.get("realisation", ""), r["voi"], method, None if method in UNLEARNED else shas[method])
            if key in seen:
                continue
            seen.add(key)
            network = None if method in UNLEARNED else shas[method][:12]
            # The service names the ensemble's mean "cnn" (a CNN job with --uncertainty).
            service_method = "cnn" if method == "cnn_ensemble" else method
            for lo, hi in BINS_ML:
                if lo <= ml < hi:
                    g = groups.setdefault((lo, hi, service_method, network), {"errors": [], "sources": {}, "measured_as": method})
                    g["errors"].append(float(r["signed_mean_error_pct"]))
                    g["sources"][label] = g["sources"].get(label, 0) + 1
    rows = []
    for (lo, hi, method, network), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3] or "")):
        e = np.asarray(g["errors"])
        p10, p90 = np.percentile(e, [10, 90])
        rows.append({"lo_ml": lo, "hi_ml": hi, "method": method, "network": network, "measured_as": g["measured_as"],
                     "n": len(e), "mean_pct": float(e.mean()), "low_pct": round(float(p10)), "high_pct": round(float(p90)),
                     "sources": g["sources"]})  # fmt: skip
    return rows


def _source_text(row: dict) -> str:
    where = ", ".join(f"{label} n={n}" for label, n in row["sources"].items())
    as_ = f" ({row['measured_as']})" if row["measured_as"] != row["method"] else ""
    return (f"{where}{as_}: mean {row['mean_pct']:+.0f} %, 10th-90th percentile {row['low_pct']:+d} to "
            f"{row['high_pct']:+d} % over lesions x realisations")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluations", nargs="+", metavar="DIR=LABEL", help="an evaluation's output folder and a short name for it")
    args = parser.parse_args(argv)
    evaluations = []
    for item in args.evaluations:
        path, _, label = item.partition("=")
        if not (Path(path) / "metrics.csv").is_file():
            parser.error(f"{path} holds no metrics.csv")
        evaluations.append((Path(path), label or Path(path).name))
    rows = bias_rows(evaluations)
    print("# regions.SMALL_REGION_BIAS")
    for r in rows:
        network = "None" if r["network"] is None else repr(r["network"])
        print(f"    ({r['lo_ml']}, {r['hi_ml']}, {r['method']!r}, {network}, {float(r['low_pct'])}, {float(r['high_pct'])},\n"
              f"     {_source_text(r)!r}),")  # fmt: skip
    print("\n# docs/regions.md")
    print("| volume | method (weights) | expected bias | n | mean |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        weights = "" if r["network"] is None else f" (`{r['network']}…`, as {r['measured_as']})"
        print(f"| {r['lo_ml']:g}–{r['hi_ml']:g} ml | {r['method']}{weights} | {r['low_pct']:+d} to {r['high_pct']:+d} % | "
              f"{r['n']} | {r['mean_pct']:+.1f} % |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
