"""Issue 17's fixed test set: generate it (resumable), evaluate every method, check the criteria.

The test set is data set ``v2-test`` (five varied patients, three noise realisations each, none
of them used in training or selection; ``spectdose.learning.training.DATASETS``). Each study
goes through ingest like a clinical one (``spectdose evaluate``). Methods: DVK, DVK on the
Richardson-Lucy recovered SPECT (``dvk-rr``), the installed network (``cnn``), the installed
ensemble's mean (``cnn_ensemble``, with the coverage of its sigma), and any ``--also NAME=WEIGHTS``.
Writes the evaluation's tables and plots to OUT and ``acceptance.md`` / ``acceptance.json``:
each of the issue's criteria for ``cnn`` and ``cnn_ensemble`` (the paper's margins against DVK
for lesions >= 4 ml and kidneys, beating DVK in every other group and in healthy-liver noise,
+-2 sigma coverage 90-98 %), with the SHA-256 of the weights evaluated. Not run in CI: about
25 CPU-minutes to generate the set on one thread (the three realisations of a patient share
one projection), then about 1 minute per study to evaluate.

    python bench/eval_testset.py --data /work/data/v2-test -o OUT [--also stint3=models/campaign/snapshots/stint-003.pt]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from spectdose.learning.evaluation import acceptance, acceptance_md, evaluate
    from spectdose.learning.training import dataset_members, generate_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of data set v2-test (made or completed here)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=WEIGHTS", help="another network to evaluate")
    parser.add_argument("--workers", type=int, default=1, help="patients generated at once")
    parser.add_argument("--patients", type=int, help="only the first N patients (all their realisations): a partial check, not the acceptance")
    parser.add_argument("--kernel-cache", type=Path, default=Path.home() / ".cache" / "spectdose" / "kernels")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    limit = None if args.patients is None else {"test": args.patients}
    generate_dataset(args.data, "v2-test", workers=args.workers, limit=limit, progress=lambda m: print(m, flush=True))
    t_gen = time.perf_counter() - t0
    studies = [args.data / split / name for split, name, _, _ in dataset_members("v2-test", limit)]
    models = {"cnn": args.models_dir / "dblurdosenet.pt"}
    for item in args.also:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            parser.error(f"--also takes NAME=WEIGHTS with an existing file, not {item!r}")
        models[name] = Path(path)
    ensemble = args.models_dir / "dblurdosenet_ensemble.pt"
    t1 = time.perf_counter()
    result = evaluate(studies, args.out, models=models, ensemble=ensemble if ensemble.is_file() else None, recovered=True,
                      kernel_cache=args.kernel_cache, progress=lambda m: print(m, flush=True))  # fmt: skip
    t_eval = time.perf_counter() - t1

    weights = {name: {"path": str(p), "sha256": _sha256(Path(p))} for name, p in models.items() if Path(p).is_file()}
    if ensemble.is_file():
        weights["cnn_ensemble"] = {"path": str(ensemble), "sha256": _sha256(ensemble)}
    report = {"data_set": "v2-test", "studies": len(studies), "weights": weights,
              "generate_s": round(t_gen, 1), "evaluate_s": round(t_eval, 1), "acceptance": {}}  # fmt: skip
    partial = "" if args.patients is None else f"; PARTIAL: the first {args.patients} patients only, not the acceptance"
    md = [f"# Issue 17 acceptance on the fixed test set (v2-test, {len(studies)} studies{partial})", ""]
    for method in [m for m in result["methods"] if m not in ("dvk", "dvk-rr")]:
        checks = acceptance(result["rows"], result["noise"], result["uncertainty"] if method == "cnn_ensemble" else (), method=method)
        report["acceptance"][method] = {"checks": checks, "all_passed": all(c["passed"] for c in checks)}
        sha = weights.get(method, {}).get("sha256", "")
        md += [f"## `{method}` (sha256 {sha[:12]})", "", acceptance_md(checks, method)]
    checks = acceptance(result["rows"], result["noise"], method="dvk-rr")
    report["acceptance"]["dvk-rr"] = {"checks": checks, "all_passed": all(c["passed"] for c in checks)}
    md += ["## `dvk-rr` (no learning)", "", acceptance_md(checks, "dvk-rr")]
    md += ["## All metrics", "", result["table"]]
    (args.out / "acceptance.md").write_text("\n".join(md))
    (args.out / "acceptance.json").write_text(json.dumps(report, indent=2))
    print("\n".join(md))
    print(f"generation {t_gen:.0f} s, evaluation {t_eval:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
