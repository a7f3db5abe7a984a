"""DblurDoseNet inference on a whole volume: normalisation, 11-slice packs, masking.

The network works in normalised units so that one set of weights serves any injected
activity: activity and DVK dose rate are divided by the total activity in the field of
view (as in Li et al. 2022, where each SPECT is scaled to sum to 1) and multiplied by
constants that bring their range near that of density; the output is scaled back by the
exact inverse, so the dose rate is again in Gy/s.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .dose import LOW_DENSITY_CUTOFF_G_CM3
from .errors import InputError
from .geometry import Grid, Volume, resample_to_grid
from .network import DblurDoseNet, NetworkConfig
from .paths import MODELS_DIR, default_model_path

__all__ = [
    "Normalisation",
    "TrainedModel",
    "load_model",
    "save_model",
    "predict_dose_rate",
    "predict_on_ct_grid",
    "model_grid",
    "to_model_grid",
    "default_model_path",
    "MODELS_DIR",
]


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """activity_n = A_voxel / A_total * activity_scale; dose_n = Ddot / A_total[MBq] * dose_scale."""

    activity_scale: float = 1e6
    dose_scale_per_gy_s: float = 1e8

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainedModel:
    net: DblurDoseNet
    config: NetworkConfig
    normalisation: Normalisation
    spacing_mm: tuple[float, float, float]
    name: str
    metadata: dict


def save_model(path: Path, net: DblurDoseNet, *, normalisation: Normalisation, spacing_mm, name: str, metadata: dict) -> Path:
    """Weights plus everything needed to use them; loadable with ``weights_only=True``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "spectdose-dblurdosenet-1",
        "name": name,
        "config_json": json.dumps(net.cfg.to_dict()),
        "normalisation_json": json.dumps(normalisation.to_dict()),
        "spacing_mm": [float(s) for s in spacing_mm],
        "metadata_json": json.dumps(metadata, default=str),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model(path: Path, *, device: str | torch.device | None = None) -> TrainedModel:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no trained DblurDoseNet weights at {path}: train them with `spectdose train` or use --method dvk")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != "spectdose-dblurdosenet-1":
        raise InputError(f"{path.name} is not a spectdose DblurDoseNet weight file")
    cfg = NetworkConfig.from_dict(json.loads(payload["config_json"]))
    net = DblurDoseNet(cfg)
    net.load_state_dict(payload["state_dict"])
    net.eval()
    net.to(_device(device))
    return TrainedModel(
        net=net,
        config=cfg,
        normalisation=Normalisation(**json.loads(payload["normalisation_json"])),
        spacing_mm=tuple(payload["spacing_mm"]),
        name=payload["name"],
        metadata=json.loads(payload["metadata_json"]),
    )


def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def normalised_inputs(
    activity_bq_per_ml: np.ndarray, density_g_cm3: np.ndarray, dvk_gy_per_s: np.ndarray, voxel_volume_ml: float, norm: Normalisation
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(activity_n, density, dvk_n, total_mbq) as float32 arrays; total 0 means all zero."""
    activity_mbq = activity_bq_per_ml.astype(np.float64) * voxel_volume_ml * 1e-6
    total_mbq = float(activity_mbq.sum())
    if total_mbq <= 0:
        return np.zeros_like(activity_bq_per_ml, np.float32), density_g_cm3.astype(np.float32), np.zeros_like(dvk_gy_per_s, np.float32), 0.0
    a = (activity_mbq / total_mbq * norm.activity_scale).astype(np.float32)
    d = (dvk_gy_per_s.astype(np.float64) / total_mbq * norm.dose_scale_per_gy_s).astype(np.float32)
    return a, density_g_cm3.astype(np.float32), d, total_mbq


def predict_dose_rate(
    model: TrainedModel,
    activity_bq_per_ml: np.ndarray,
    density_g_cm3: np.ndarray,
    dvk_gy_per_s: np.ndarray,
    voxel_volume_ml: float,
    *,
    slab: int = 8,
    autocast_bf16: bool = False,
) -> np.ndarray:
    """Dose rate in Gy/s (float32, same grid) from activity, density and the DVK map.

    Arrays are (z, y, x) on the grid the model was trained at. Packs of ``cfg.pack``
    slices slide over z with the end slices replicated, as in the paper.
    """
    if not (activity_bq_per_ml.shape == density_g_cm3.shape == dvk_gy_per_s.shape):
        raise InputError("activity, density and DVK dose rate must share one grid")
    a, rho, dvk_n, total_mbq = normalised_inputs(activity_bq_per_ml, density_g_cm3, dvk_gy_per_s, voxel_volume_ml, model.normalisation)
    if total_mbq == 0.0:
        return np.zeros(activity_bq_per_ml.shape, np.float32)  # zero activity is zero dose
    cfg, net = model.config, model.net
    device = next(net.parameters()).device
    half = cfg.pack // 2
    nz = a.shape[0]
    # (2, nz + 2*half, H, W) with replicated edge slices
    stacked = np.stack([a, rho])
    padded = np.concatenate([np.repeat(stacked[:, :1], half, axis=1), stacked, np.repeat(stacked[:, -1:], half, axis=1)], axis=1)
    inputs = torch.from_numpy(np.ascontiguousarray(padded)).to(device)
    dvk_t = torch.from_numpy(dvk_n).to(device)
    out = np.empty(a.shape, np.float32)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_bf16)
    with torch.inference_mode(), amp:
        for z0 in range(0, nz, slab):
            z1 = min(nz, z0 + slab)
            mids = dvk_t[z0:z1, None]
            if cfg.stem == "depth_valid":
                y = net.forward_slab(inputs[None, :, z0 : z1 + 2 * half], mids)
            else:
                packs = torch.stack([inputs[:, z : z + cfg.pack] for z in range(z0, z1)])
                y = net(packs, mids)
            out[z0:z1] = y[:, 0].float().cpu().numpy()
    out = np.clip(out, 0.0, None) * np.float32(total_mbq / model.normalisation.dose_scale_per_gy_s)
    out[density_g_cm3 < LOW_DENSITY_CUTOFF_G_CM3] = 0.0
    return out.astype(np.float32)


def model_grid(ct_grid: Grid, spacing_mm) -> tuple[Grid, tuple[int, int, int] | None]:
    """The grid a model runs on: its training spacing, covering the CT's field of view.

    Returns the grid and, when every axis is an integer multiple of the CT spacing, the
    block factors (then the grid's voxels are exact blocks of CT voxels).
    """
    spacing = np.asarray(spacing_mm, dtype=float)
    ct_spacing = np.asarray(ct_grid.spacing_mm)
    ratio = spacing / ct_spacing
    factors = np.rint(ratio).astype(int)
    if np.all(np.abs(ratio - factors) < 0.02 * ratio) and np.all(factors >= 1):
        spacing = factors * ct_spacing
        shape = tuple(int(-(-n // f)) for n, f in zip(ct_grid.shape, factors, strict=True))
        block: tuple[int, int, int] | None = tuple(int(f) for f in factors)
    else:
        extent = np.asarray(ct_grid.shape) * ct_spacing
        shape = tuple(int(np.ceil(e / s)) for e, s in zip(extent, spacing, strict=True))
        block = None
    # First voxel centre half a model voxel inside the CT's outer corner.
    corner = np.asarray(ct_grid.origin_mm) - (0.5 * ct_spacing[:, None] * ct_grid.axes).sum(0)
    origin = corner + (0.5 * spacing[:, None] * ct_grid.axes).sum(0)
    grid = Grid(shape, tuple(spacing), tuple(origin), ct_grid.axes, ct_grid.frame_of_reference_uid)
    return grid, block


def _block_mean(arr: np.ndarray, block: tuple[int, int, int]) -> np.ndarray:
    pads = [(0, (-n) % f) for n, f in zip(arr.shape, block, strict=True)]
    a = np.pad(arr, pads, mode="edge") if any(p[1] for p in pads) else arr
    z, y, x = (n // f for n, f in zip(a.shape, block, strict=True))
    return a.reshape(z, block[0], y, block[1], x, block[2]).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def to_model_grid(volume: Volume, grid: Grid, block: tuple[int, int, int] | None) -> Volume:
    """Average (not sample) a CT-grid volume onto the model grid, so totals are kept."""
    if block is not None:
        return Volume(_block_mean(volume.array, block), grid, volume.units)
    # Anti-aliasing: a Gaussian whose FWHM makes up the difference between the voxel sizes
    # (a tiny floor where there is none: the filter refuses sigma 0).
    sigma_mm = [
        max(1e-3, max(0.0, s_m**2 - s_c**2) ** 0.5 / 2.355)
        for s_m, s_c in zip(grid.spacing_mm, volume.grid.spacing_mm, strict=True)
    ]
    smooth = sitk.SmoothingRecursiveGaussian(volume.to_sitk(), sigma_mm[::-1])
    return resample_to_grid(Volume.from_sitk(smooth, volume.units, volume.grid.frame_of_reference_uid), grid)


def predict_on_ct_grid(
    model: TrainedModel,
    activity_bq_per_ml: Volume,
    density_g_cm3: Volume,
    dvk_gy_per_s: Volume,
    *,
    autocast_bf16: bool = False,
) -> Volume:
    """CNN dose rate (Gy/s) on the CT grid: resample to the model's spacing and back.

    Only the learned correction (CNN minus DVK on the model grid) is interpolated back
    and added to the full-resolution DVK map, so a model trained at a coarser spacing
    keeps the DVK map's fine detail. Models without the residual return their own output.
    """
    ct_grid = activity_bq_per_ml.grid
    grid, block = model_grid(ct_grid, model.spacing_mm)
    same = grid.same_as(ct_grid)
    act = activity_bq_per_ml if same else to_model_grid(activity_bq_per_ml, grid, block)
    rho = density_g_cm3 if same else to_model_grid(density_g_cm3, grid, block)
    dvk = dvk_gy_per_s if same else to_model_grid(dvk_gy_per_s, grid, block)
    out = predict_dose_rate(model, act.array, rho.array, dvk.array, grid.voxel_volume_ml, autocast_bf16=autocast_bf16)
    if same:
        return Volume(out, ct_grid, "Gy/s")
    if model.config.residual:
        correction = resample_to_grid(Volume(out - dvk.array, grid, "Gy/s"), ct_grid, fill_value=0.0).array
        full = dvk_gy_per_s.array + correction
    else:
        full = resample_to_grid(Volume(out, grid, "Gy/s"), ct_grid, fill_value=0.0).array
    full = np.clip(full, 0.0, None).astype(np.float32)
    full[density_g_cm3.array < LOW_DENSITY_CUTOFF_G_CM3] = 0.0
    return Volume(full, ct_grid, "Gy/s")
