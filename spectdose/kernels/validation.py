"""The kernels against published voxel S-values (Lanconelli et al., Phys Med Biol 57 (2012) 517).

`python -m spectdose.kernels.validation --validate` prints the figures of docs/kernels.md;
the tests use the same comparison.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from spectdose.kernels import (
    MGY_PER_MBQ_S_PER_MEV_PER_G,
    DoseVoxelKernel,
    _electron_radial,
    _photon_radial,
    compute_kernel,
    default_kernel_shapes,
)

__all__ = ["read_lanconelli", "voxel_class", "compare_with_lanconelli", "lanconelli_implied_electron_mev"]


def read_lanconelli(path: Path) -> dict[tuple[int, int, int], float]:
    """Read one Lanconelli 2012 S-value table: {(i, j, k): S in mGy/(MBq s)} (latin-1 text)."""
    out: dict[tuple[int, int, int], float] = {}
    for line in Path(path).read_text(encoding="latin-1").splitlines()[2:]:
        parts = line.split()
        if len(parts) == 4:
            out[(int(parts[0]), int(parts[1]), int(parts[2]))] = float(parts[3])
    return out


def voxel_class(offset: tuple[int, int, int]) -> str:
    """'self', 'face', 'edge', 'corner' for |offsets| <= 1, else 'distant'."""
    o = sorted(abs(int(x)) for x in offset)
    if o[-1] > 1:
        return "distant"
    return ("self", "face", "edge", "corner")[sum(o)]


def compare_with_lanconelli(kernel: DoseVoxelKernel, table: dict[tuple[int, int, int], float]) -> dict:
    """Per-offset % deviation (ours/theirs - 1) of the total kernel from a Lanconelli table."""
    total = kernel.total_mgy_per_mbq_s
    c = np.array(total.shape) // 2
    rows = {}
    for (i, j, k), s_ref in table.items():
        idx = (c[0] + k, c[1] + j, c[2] + i)
        if all(0 <= idx[a] < total.shape[a] for a in range(3)):
            rows[(i, j, k)] = 100.0 * (float(total[idx]) / s_ref - 1.0)
    return rows


def lanconelli_implied_electron_mev(kernel: DoseVoxelKernel, table: dict[tuple[int, int, int], float]) -> float:
    """Electron energy per decay (MeV) a Lanconelli table implies: its energy absorbed in
    the 11^3 voxels it covers minus our photon energy absorbed in the same voxels."""
    photon = kernel.photon_mgy_per_mbq_s
    c = np.array(photon.shape) // 2
    total_s = 0.0
    photon_s = 0.0
    for (i, j, k), s_ref in table.items():
        mult = 2 ** sum(1 for x in (i, j, k) if x)
        total_s += mult * s_ref
        photon_s += mult * float(photon[c[0] + k, c[1] + j, c[2] + i])
    return (total_s - photon_s) * kernel.voxel_mass_g / MGY_PER_MBQ_S_PER_MEV_PER_G


def _validate(data_dir: Path) -> None:  # pragma: no cover - prints the figures of docs/kernels.md
    """Print the validation figures quoted in docs/kernels.md."""
    print("| medium | voxel mm | emission set | self | face | edge | corner | distant mean [min, max] | implied e- MeV |")
    print("|---|---|---|---|---|---|---|---|---|")
    for medium in ("soft", "bone"):
        for mm in (2.4, 3.0, 6.0, 9.28):
            f = data_dir / f"177Lu{mm:g}mm{medium}.txt"
            if not f.exists():
                continue
            table = read_lanconelli(f)
            for es in ("beta", "all"):
                k = compute_kernel((mm, mm, mm), medium=medium, emission_set=es, beta_shape=(11, 11, 11),
                                   photon_shape=(11, 11, 11))  # fmt: skip
                by_class: dict[str, list[float]] = {}
                for off, d in compare_with_lanconelli(k, table).items():
                    by_class.setdefault(voxel_class(off), []).append(d)
                cells = [f"{np.mean(by_class[c]):+.1f} %" for c in ("self", "face", "edge", "corner")]
                dist = by_class["distant"]
                cells.append(f"{np.mean(dist):+.1f} % [{min(dist):+.1f}, {max(dist):+.1f}]")
                implied = lanconelli_implied_electron_mev(k, table)
                print(f"| {medium} | {mm:g} | {es} | " + " | ".join(cells) + f" | {implied:.4f} |")
    # first-time generation of the paper's kernel (radial Monte Carlo not yet memoised)
    _electron_radial.cache_clear()
    _photon_radial.cache_clear()
    t = time.perf_counter()
    k = compute_kernel((3.0, 0.98, 0.98))
    dt = time.perf_counter() - t
    t = time.perf_counter()
    compute_kernel((3.0, 0.98, 0.98), medium="soft", seed=0)
    dt_memo = time.perf_counter() - t
    print(
        f"\n0.98 x 0.98 x 3 mm soft, emission set 'all': beta {k.beta_mgy_per_mbq_s.shape}, photon "
        f"{k.photon_mgy_per_mbq_s.shape}: {dt:.1f} s from scratch, {dt_memo:.1f} s with the Monte Carlo "
        f"memoised; electrons absorbed {k.absorbed_energy_mev('beta'):.4f} MeV of "
        f"{k.provenance['electron_energy_per_decay_mev']:.4f}; photons absorbed "
        f"{k.absorbed_energy_mev('photon'):.4f} MeV of {k.provenance['photon_energy_per_decay_mev']:.4f}"
    )
    phys = compute_kernel((3.0, 0.98, 0.98), photon_shape=default_kernel_shapes((3.0, 0.98, 0.98), photon_extent="physical")[1])
    print(f"'physical' photon extent {phys.photon_mgy_per_mbq_s.shape}: photons absorbed {phys.absorbed_energy_mev('photon'):.4f} MeV")


if __name__ == "__main__":  # pragma: no cover
    import argparse

    parser = argparse.ArgumentParser(description="Dose voxel kernels: validation figures")
    parser.add_argument("--validate", action="store_true", help="compare with Lanconelli 2012 tables")
    parser.add_argument(
        "--data", type=Path, default=Path(
            os.environ.get(
                "SPECTDOSE_LANCONELLI_DIR", Path(__file__).resolve().parents[2] / "tests" / "data" / "lanconelli2012-lu177"
            )
        ),
    )
    args = parser.parse_args()
    if args.validate:
        _validate(args.data)
