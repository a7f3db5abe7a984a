"""Precision and recall of the automatic regions (spectdose.lesions) against the truth lesions of
virtual patients (docs/regions.md, issue 18 item 7).

    python bench/eval_autoregions.py PHANTOM_DIR [PHANTOM_DIR ...] [--min-ml 2] [--cache DIR] [--no-rules]

Each PHANTOM_DIR is what ``spectdose phantom DIR --seed N`` wrote (DICOM under ./dicom, truth
labels on the CT grid under ./truth/truth.npz). The activity and density on the CT grid come
from the pipeline's own chain (ingest, resampling, HU -> density), cached per phantom.

Matching: an automatic region is a true positive when it overlaps a true lesion with Dice >= 0.3
or lies >= 50 % inside one; a region matching only lesions under ``--min-ml`` counts neither way.
A true lesion of >= ``--min-ml`` is found when some region overlaps it with Dice >= 0.3 or holds
>= 50 % of it. A false positive is named by the truth label holding most of its volume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from spectdose.geometry import Grid, Volume
from spectdose.lesions import LesionMethod, find_hot_spots

DICE_FOUND = 0.3
INSIDE_FOUND = 0.5


def _inputs(phantom: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, Grid]:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{phantom.name}.npz"
    if path.is_file():
        d = np.load(path)
        grid = Grid(tuple(d["shape"]), tuple(d["spacing"]), tuple(d["origin"]), d["axes"])
        return d["activity"], d["density"], grid
    from spectdose.dicom.ingest import load_study
    from spectdose.pipeline import prepare_inputs

    study = load_study(phantom / "dicom", accepted_assumptions=("time_outside_model_range",))
    prepared = prepare_inputs(study, warnings=[])
    g = study.ct.grid
    np.savez_compressed(path, activity=prepared.activity_bq_per_ml.array, density=prepared.density_g_cm3.array,
                        shape=np.array(g.shape), spacing=np.array(g.spacing_mm), origin=np.array(g.origin_mm),
                        axes=g.axes)
    return prepared.activity_bq_per_ml.array, prepared.density_g_cm3.array, g


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def evaluate(phantom: Path, cache: Path, min_ml: float, method: LesionMethod) -> dict:
    activity, density, grid = _inputs(phantom, cache)
    truth = np.load(phantom / "truth" / "truth.npz")
    voxel_ml = grid.voxel_volume_ml
    spots = find_hot_spots(activity, grid, density, method, measure_all=True)
    masks = [s.mask for s in spots if s.excluded is None]
    lesions = {k[6:]: truth[k].astype(bool) for k in truth.files
               if k.startswith("label_lesion_") and truth[k].any()}
    big = {n: m for n, m in lesions.items() if m.sum() * voxel_ml >= min_ml}
    organs = [k for k in truth.files if k.startswith("label_") and k not in ("label_body", "label_lesions",
                                                                              "label_liver", "label_spine")
              and not k.startswith("label_lesion_")]
    regions, tp, fp = [], 0, 0
    for n, spot in enumerate(spots, start=1):
        m = spot.mask
        match = None
        for name, lesion in lesions.items():
            if _dice(m, lesion) >= DICE_FOUND or (m & lesion).sum() >= INSIDE_FOUND * m.sum():
                match = name
                break
        where = max(organs, key=lambda k: int((truth[k] & m).sum()))
        inside = (truth[where] & m).sum() / m.sum()
        row = {"n": n, "ml": round(float(m.sum() * voxel_ml), 1), "match": match,
               "truth_label": f"{where[6:]} {inside:.0%}" if inside > 0 else "background",
               "location": spot.location, "contrast": round(spot.contrast, 2), "excluded": spot.excluded}
        regions.append(row)
        if spot.excluded:
            continue
        if match in big:
            tp += 1
        elif match is None:
            fp += 1
    found = {n: any(_dice(m, lesion) >= DICE_FOUND or (m & lesion).sum() >= INSIDE_FOUND * lesion.sum()
                    for m in masks) for n, lesion in big.items()}
    return {"phantom": phantom.name, "regions": regions, "true_positive_regions": tp, "false_positive_regions": fp,
            "lesions_ge_min": {n: {"ml": round(float(m.sum() * voxel_ml), 1), "found": found[n]} for n, m in big.items()},
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": sum(found.values()) / len(found) if found else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phantoms", nargs="+", type=Path)
    parser.add_argument("--min-ml", type=float, default=2.0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/spectdose-autoregions-cache"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-rules", action="store_true", help="the candidates alone (issue 11's method)")
    args = parser.parse_args(argv)
    method = LesionMethod(exclude_physiological=not args.no_rules)
    results = [evaluate(p, args.cache, args.min_ml, method) for p in args.phantoms]
    tp = sum(r["true_positive_regions"] for r in results)
    fp = sum(r["false_positive_regions"] for r in results)
    lesions = [v for r in results for v in r["lesions_ge_min"].values()]
    total = {"precision": tp / (tp + fp) if tp + fp else None,
             "recall": sum(v["found"] for v in lesions) / len(lesions) if lesions else None,
             "regions": tp + fp, "true_positive_regions": tp, "false_positive_regions": fp,
             "lesions": len(lesions), "found": sum(v["found"] for v in lesions)}
    for r in results:
        print(f"{r['phantom']}: precision {r['precision']}, recall {r['recall']}")
        for row in r["regions"]:
            print("   ", row)
        print("    lesions:", r["lesions_ge_min"])
    print("ALL:", total)
    if args.json:
        args.json.write_text(json.dumps({"method": method.describe(), "total": total, "patients": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["evaluate", "Volume"]
