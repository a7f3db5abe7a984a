"""CPU seconds of OSEM with PyTomography's own SPECT system matrix and with ``_fast_system_matrix``.

The training data's largest cost is OSEM (`bench/bench_dataset_v2.py --fast`). This times the two
system matrices on one varied patient's SPECT grid, one torch thread, in one process: the
projections are Poisson counts of the fast matrix's forward projection of the true activity (the
timing does not depend on them), then ``--iterations`` OSEM iterations with PyTomography's matrix
(attenuation recomputed every view, as PyTomography ships it), with the fast matrix on a first
realisation (its attenuation cache filled on the way) and on a second (caches filled). Prints
CPU seconds and the largest difference of the images relative to their maximum.

    python bench/bench_osem.py [--seed 2018] [--resolution-recovery] [--iterations 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from spectdose.geometry import resample_to_grid
    from spectdose.learning.fast_cases import model_grid_settings
    from spectdose.phantoms import spect_sim as ss
    from spectdose.phantoms.variation import draw_settings, make_varied_patient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2018, help="varied patient (default vp2018, the median-cost v2 patient)")
    parser.add_argument("--resolution-recovery", action="store_true", help="model the collimator-detector response")
    parser.add_argument("--iterations", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    settings = model_grid_settings(draw_settings(args.seed, "clinical"), (3.0, 1.953125, 1.953125))
    patient, _, _ = make_varied_patient(settings)
    sg, n_subsets = patient.spect_grid, settings.n_subsets
    angles = np.arange(settings.n_views) * 360.0 / settings.n_views
    mu = ss.mu_map_from_hu(patient.hu, sg).array
    psf = ss._psf_sigma_params(ss.PHOTOPEAK_KEV, settings.collimator, settings.intrinsic_fwhm_140kev_mm / 10.0)
    psf = psf if args.resolution_recovery else None
    radius_mm = 300.0
    fast = ss.OsemReconstructor(mu, sg, angles, radius_mm, psf, "cpu", cache_attenuation=True)
    truth = resample_to_grid(patient.activity_bq_per_ml, sg).array
    obj = torch.from_numpy(np.ascontiguousarray(np.clip(truth, 0, None).transpose(2, 1, 0).astype(np.float32)))
    with torch.no_grad():
        expected = fast.system.forward(obj).numpy()
    scale = 2e6 / float(expected.sum())
    rng = np.random.default_rng(0)
    counts = [rng.poisson(np.clip(expected * scale, 0.0, None)).astype(np.float32) for _ in range(2)]  # FFT round-off can dip below 0

    pt = ss._import_pytomography()
    theirs = ss.OsemReconstructor(mu, sg, angles, radius_mm, psf, "cpu")
    transforms = [pt.SPECTAttenuationTransform(attenuation_map=torch.from_numpy(np.ascontiguousarray(mu.transpose(2, 1, 0))))]
    if psf is not None:
        transforms.append(ss._fft_psf_transform(pt.Transform, psf, radius_mm / 10.0))
    theirs.system = pt.SPECTSystemMatrix(obj2obj_transforms=transforms, proj2proj_transforms=[], object_meta=theirs.system.object_meta,
                                         proj_meta=theirs.system.proj_meta)  # fmt: skip

    def timed(recon, c):
        t0 = time.process_time()
        image = recon(c, args.iterations, n_subsets)
        return image, time.process_time() - t0

    ref, t_ref = timed(theirs, counts[0])
    first, t_first = timed(fast, counts[0])
    ref2, t_ref2 = timed(theirs, counts[1])
    second, t_second = timed(fast, counts[1])
    print(f"patient {args.seed}: SPECT {sg.shape}, {settings.n_views} views, {args.iterations} x {n_subsets} OSEM, "
          f"collimator response {'on' if psf is not None else 'off'}; CPU s, one thread")  # fmt: skip
    print(f"  PyTomography SPECTSystemMatrix: {t_ref:.1f} (first realisation), {t_ref2:.1f} (second)")
    print(f"  _fast_system_matrix:            {t_first:.1f} (first, filling its caches), {t_second:.1f} (second): "
          f"{t_ref2 / t_second:.2f}x faster with the caches filled")  # fmt: skip
    for name, a, b in (("first", ref, first), ("second", ref2, second)):
        print(f"  {name} image: max |difference| / max = {float(np.abs(a - b).max() / np.abs(a).max()):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
