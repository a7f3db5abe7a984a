"""DblurDoseNet inference time for a clinical-size study (130 x 512 x 512 CT grid).

Usage: python bench/bench_cnn.py [--slices 16] [--device cpu|cuda] [--skip-paper] [--study PHANTOM_DIR]
                               [--members K] [--uncertainty-slices N] [--only-uncertainty]

Times, on the same machine and in the same run:
  * the paper's network at the CT grid (depth-padded stem, pack by pack),
  * the depth-valid variant at the CT grid (stem shared over a slab of packs),
  * the shipped model (models/dblurdosenet.pt) on its own grid, end to end through
    `spectdose.cnn.inference.predict_on_ct_grid` (resampling both ways included),
each extrapolated from ``--slices`` output slices to 130 (the work is the same per slice),
with GMAC per slice counted from the layers. With ``--study`` (a clinical-size phantom from
`spectdose phantom`), the shipped model's bf16 output is compared with its fp32 output on
that study: bf16 is only recommended where that deviation is small. With ``--members K``, the
cost of the uncertainty (a deep ensemble of K members through
`spectdose.cnn.inference.predict_with_uncertainty`) is timed on an N-slice 512x512 study made of K copies
of the shipped weights (the cost does not depend on the weights) and extrapolated linearly to
130 slices, next to the single model on the same slices: a field of view filled with tissue, the
worst case. With ``--study`` as well, the same is timed on the whole study, whose air around the
body the network skips (it runs on the body's box, as in training). Targets: with the uncertainty
<= 30 s fp32 on this 2-core CPU (issue 17), <= 0.5 s on an H100 (paper: about 20 min CPU, 20 s on a V100).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from spectdose.cnn.model import DEPTH_VALID, PAPER, DblurDoseNet

NZ, NY, NX = 130, 512, 512


def gmac_per_slice(net: DblurDoseNet, h: int, w: int) -> float:
    """Multiply-accumulates for one output slice of a pack-by-pack forward pass (GMAC)."""
    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        k = int(np.prod(mod.kernel_size)) * (mod.in_channels // mod.groups)
        macs += k * out.numel()

    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
    with torch.no_grad():
        net(torch.zeros(1, 2, net.cfg.pack, h, w), torch.zeros(1, 1, h, w))
    for hk in hooks:
        hk.remove()
    return macs / 1e9


def time_network(net: DblurDoseNet, n_out: int, device: torch.device, bf16: bool, h=NY, w=NX) -> float:
    """Seconds for ``n_out`` output slices (best of two)."""
    net = net.to(device).eval()
    slab = torch.randn(1, 2, n_out + 10, h, w, device=device)
    mids = torch.randn(n_out, 1, h, w, device=device)
    best = float("inf")
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode(), amp:
            if net.cfg.stem == "depth_valid":
                net.forward_slab(slab, mids)
            else:
                for b in range(0, n_out, 4):
                    packs = torch.cat([slab[:, :, z : z + 11] for z in range(b, min(n_out, b + 4))])
                    net(packs, mids[b : b + packs.shape[0]])
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=16, help="output slices timed (extrapolated to 130)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-paper", action="store_true", help="skip the slow pack-by-pack paper network")
    parser.add_argument("--study", help="phantom folder: measure the shipped model's bf16 deviation on it")
    parser.add_argument("--members", type=int, default=0, help="time the uncertainty of a K-member ensemble")
    parser.add_argument("--uncertainty-slices", type=int, default=16, help="CT slices of the uncertainty timing")
    parser.add_argument("--only-uncertainty", action="store_true", help="skip everything but the uncertainty timing")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    if args.only_uncertainty:
        uncertainty_cost(device, args.members or 4, args.uncertainty_slices)
        if args.study:
            uncertainty_cost_on_study(device, args.members or 4, args.study)
        return
    nets = [("depth-valid (shared stem)", DblurDoseNet(DEPTH_VALID))]
    if not args.skip_paper:
        nets.insert(0, ("paper (per pack)", DblurDoseNet(PAPER)))
    print(f"{'network at 512x512':<28}{'GMAC/slice':>11}{'fp32 s/130':>12}{'bf16 s/130':>12}")
    for name, net in nets:
        g = gmac_per_slice(net, NY, NX) if net.cfg.stem == "paper" else _shared_gmac(net)
        t32 = time_network(net, args.slices, device, False) * NZ / args.slices
        t16 = time_network(net, args.slices, device, True) * NZ / args.slices
        print(f"{name:<28}{g:>11.1f}{t32:>12.1f}{t16:>12.1f}")

    from spectdose.cnn.inference import MODELS_DIR, load_model, predict_on_ct_grid
    from spectdose.geometry import Grid, Volume

    path = MODELS_DIR / "dblurdosenet.pt"
    if not path.is_file():
        print(f"(no shipped model at {path}; end-to-end timing skipped)")
        return
    model = load_model(path, device=device)
    grid = Grid((NZ, NY, NX), (3.0, 0.9766, 0.9766), (0.0, 0.0, 0.0))
    rng = np.random.default_rng(0)
    act = Volume(rng.gamma(2.0, 5e3, size=grid.shape).astype(np.float32), grid, "Bq/ml")
    rho = Volume(np.full(grid.shape, 1.04, np.float32), grid, "g/cm3")
    dvk = Volume((act.array * 1e-9).astype(np.float32), grid, "Gy/s")
    for bf16 in (False, True):
        t = time.perf_counter()
        predict_on_ct_grid(model, act, rho, dvk, autocast_bf16=bf16)
        print(f"shipped model {model.config.stem} at {model.spacing_mm} mm, whole 130x512x512 study "
              f"({'bf16' if bf16 else 'fp32'}): {time.perf_counter() - t:.1f} s")
    if args.study:
        bf16_deviation(model, args.study)
    if args.members:
        uncertainty_cost(device, args.members, args.uncertainty_slices)
        if args.study:
            uncertainty_cost_on_study(device, args.members, args.study)


def _timed_with_and_without_sigma(device: torch.device, k: int, act, rho, dvk):
    """(precision, s with sigma, s without) for fp32 and bf16: a K-member ensemble of copies of
    the shipped weights (the cost does not depend on the weights) and the single model, after
    one untimed run that fills the kernel cache of the model grid (the dvk_rr input's DVK)."""
    from spectdose.cli import default_cache_dir
    from spectdose.cnn.inference import (
        MODELS_DIR,
        Ensemble,
        SigmaCalibration,
        load_model,
        predict_on_ct_grid,
        predict_with_uncertainty,
    )

    model = load_model(MODELS_DIR / "dblurdosenet.pt", device=device)
    ens = Ensemble([model] * k, SigmaCalibration(scale=2.0, rel_floor=0.05), "bench", {})
    cache = default_cache_dir() / "kernels"
    predict_on_ct_grid(model, act, rho, dvk, kernel_cache_dir=cache)
    for bf16 in (False, True):
        t = time.perf_counter()
        predict_on_ct_grid(model, act, rho, dvk, autocast_bf16=bf16, kernel_cache_dir=cache)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        predict_with_uncertainty(ens, act, rho, dvk, autocast_bf16=bf16, kernel_cache_dir=cache)
        yield ("bf16" if bf16 else "fp32"), time.perf_counter() - t, t1


def uncertainty_cost(device: torch.device, k: int, n_slices: int) -> None:
    """Seconds for mean + sigma of a K-member ensemble on an n-slice 512x512 field filled with
    tissue (the worst case), and the single model, both extrapolated linearly to 130 slices."""
    from spectdose.geometry import Grid, Volume

    grid = Grid((n_slices, NY, NX), (3.0, 0.9766, 0.9766), (0.0, 0.0, 0.0))
    rng = np.random.default_rng(0)
    act = Volume(rng.gamma(2.0, 5e3, size=grid.shape).astype(np.float32), grid, "Bq/ml")
    rho = Volume(np.full(grid.shape, 1.04, np.float32), grid, "g/cm3")
    dvk = Volume((act.array * 1e-9).astype(np.float32), grid, "Gy/s")
    scale = NZ / n_slices
    for kind, tk, t1 in _timed_with_and_without_sigma(device, k, act, rho, dvk):
        print(f"uncertainty, {k} members ({kind}): measured on {n_slices} slices {tk:.1f} s (single model {t1:.1f} s); "
              f"EXTRAPOLATED to 130x512x512: {tk * scale:.0f} s with sigma, {t1 * scale:.0f} s without")


def uncertainty_cost_on_study(device: torch.device, k: int, phantom_dir: str) -> None:
    """Seconds for mean + sigma of a K-member ensemble on a whole study, not extrapolated.

    The network runs on the body's box (``spectdose.cnn.inference.body_box_yx``), so a
    patient's study costs less than the full-field worst case of ``uncertainty_cost``; this
    prints the box's share of the plane beside the time."""
    from pathlib import Path

    from spectdose.cli import default_cache_dir
    from spectdose.cnn.inference import (
        MODELS_DIR,
        body_box_yx,
        load_model,
        model_grid,
        to_model_grid,
    )
    from spectdose.pipeline import network_inputs

    act, rho, dvk = network_inputs(Path(phantom_dir) / "dicom", default_cache_dir() / "kernels")
    grid, block = model_grid(rho.grid, load_model(MODELS_DIR / "dblurdosenet.pt").spacing_mm)
    ys, xs = body_box_yx(to_model_grid(rho, grid, block).array)
    share = (ys.stop - ys.start) * (xs.stop - xs.start) / (grid.shape[1] * grid.shape[2])
    print(f"study {phantom_dir}: CT {'x'.join(map(str, rho.grid.shape))}, model grid {'x'.join(map(str, grid.shape))}, "
          f"body box {ys.stop - ys.start}x{xs.stop - xs.start} = {100 * share:.0f} % of the plane")
    for kind, tk, t1 in _timed_with_and_without_sigma(device, k, act, rho, dvk):
        print(f"uncertainty on the study, {k} members ({kind}): {tk:.1f} s with sigma, {t1:.1f} s without (whole study, measured)")


def bf16_deviation(model, phantom_dir: str) -> None:
    """How far bf16 autocast moves the shipped model's dose rate on a real study."""
    from pathlib import Path

    from spectdose.cli import default_cache_dir
    from spectdose.cnn.inference import predict_on_ct_grid
    from spectdose.pipeline import network_inputs

    act, rho, dvk = network_inputs(Path(phantom_dir) / "dicom", default_cache_dir() / "kernels")
    fp32 = predict_on_ct_grid(model, act, rho, dvk).array.astype(np.float64)
    bf16 = predict_on_ct_grid(model, act, rho, dvk, autocast_bf16=True).array.astype(np.float64)
    hot = fp32 > 0.1 * fp32.max()
    rel = np.abs(bf16[hot] - fp32[hot]) / fp32[hot]
    nrmse = np.sqrt(np.mean((bf16[hot] - fp32[hot]) ** 2)) / fp32[hot].mean()
    print(f"bf16 vs fp32 on {phantom_dir} (voxels above 10 % of max): total {100 * (bf16.sum() / fp32.sum() - 1):+.2f} %, "
          f"NRMSE {100 * nrmse:.2f} %, median |dev| {100 * np.median(rel):.2f} %, 99th pct {100 * np.percentile(rel, 99):.2f} %")


def _shared_gmac(net: DblurDoseNet) -> float:
    """Depth-valid: per output slice the stem runs once per input slice, then the U-Net."""
    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        k = int(np.prod(mod.kernel_size)) * (mod.in_channels // mod.groups)
        macs += k * out.numel()

    n = 32
    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
    with torch.no_grad():
        net.forward_slab(torch.zeros(1, 2, n + 10, NY // 4, NX // 4), torch.zeros(n, 1, NY // 4, NX // 4))
    for hk in hooks:
        hk.remove()
    return macs / n * 16 / 1e9


if __name__ == "__main__":
    main()
