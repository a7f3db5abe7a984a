"""DblurDoseNet: a residual CNN that corrects a DVK dose-rate map for physics and SPECT blur.

Li Z, Fessler JA, Mikell JK, Wilderman SJ, Dewaraja YK. "DblurDoseNet: A deep residual
learning network for voxel radionuclide dosimetry compensating for single-photon emission
computerized tomography imaging resolution." Med Phys 49 (2022) 1216-1230.
Layer details follow the authors' public code (github.com/ZongyuLi-umich/DblurDoseNet, MIT).

Tensors here are (batch, channel, depth, height, width) = (B, C, z, y, x).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["NetworkConfig", "DblurDoseNet", "INPUT_CHANNELS", "PAPER", "DEPTH_VALID", "TINY"]


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Architecture switches; the paper's ablations are configurations of the same code.

    stem:
      ``paper``       3D stem with depth padding and a depth max-pool (11 -> 9 -> 5 -> 3 -> 1);
      ``depth_valid`` no depth padding, no pool (11 -> 7 -> 5 -> 3, the 3 folded into channels):
                      every output depends only on its own 11 slices, so the stem can run
                      once over a whole slab and be shared by all packs;
      ``none``        the paper's "2D only" ablation: the 11 slices x 2 inputs as 22 channels.
    residual: add the DVK dose rate of the middle slice to the output (the paper's choice).
    inputs: the channels of each 11-slice pack, from ``INPUT_CHANNELS``: the paper's
      activity and density, optionally ``dvk_rr``, the DVK dose rate of the activity after a
      Richardson-Lucy deconvolution of the camera blur (``recovery`` holds its settings,
      see ``spectdose.cnn.recovery``). Weights saved before this field existed have the
      paper's two channels.
    norm: ``batch`` (the paper's BatchNorm after each convolution) or ``none`` (convolutions with
      bias, no normalisation, the last layer zero so that an untrained network returns the DVK).
      BatchNorm makes the output depend on statistics of what it normalises: trained on 64 x 64
      patches, the campaign's network in eval mode (running statistics, recomputed over training
      slabs) scored 0.459 on the validation patients against 0.311 with each slab's own statistics
      and 0.309 for DVK (issue 17, stint 4); super-resolution networks drop it for the same reason
      (EDSR: Lim et al., CVPR Workshops 2017, 136-144).
    """

    stem: Literal["paper", "depth_valid", "none"] = "depth_valid"
    residual: bool = True
    pack: int = 11
    base_filters: int = 16
    levels: int = 4
    stem_channels: tuple[int, int, int] = (8, 16, 16)
    stem_kernel_xy: int = 7
    leaky_slope: float = 0.1
    inputs: tuple[str, ...] = ("activity", "density")
    recovery: dict | None = None  # {"fwhm_mm", "iterations", "smooth_mm"} when "dvk_rr" is an input
    norm: Literal["batch", "none"] = "batch"

    def __post_init__(self) -> None:
        bad = [c for c in self.inputs if c not in INPUT_CHANNELS]
        if bad or len(self.inputs) < 1 or self.inputs[:2] != ("activity", "density"):
            raise ValueError(f"network inputs start with activity, density and come from {INPUT_CHANNELS}: {self.inputs}")
        if ("dvk_rr" in self.inputs) != (self.recovery is not None):
            raise ValueError("the dvk_rr input and the recovery settings go together")
        if self.norm not in ("batch", "none"):
            raise ValueError(f"norm is batch or none, not {self.norm!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.inputs == ("activity", "density") and self.recovery is None:
            del d["inputs"], d["recovery"]  # the paper's network: saved as before this field existed
        else:
            d["inputs"] = list(self.inputs)
        if self.norm == "batch":
            del d["norm"]  # as saved before this field existed
        return d

    @classmethod
    def from_dict(cls, data: dict) -> NetworkConfig:
        data = dict(data)
        data["stem_channels"] = tuple(data.get("stem_channels", (8, 16, 16)))
        data["inputs"] = tuple(data.get("inputs", ("activity", "density")))
        return cls(**data)

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)


# Channels a network may read, per slice: normalised activity, density (g/cm3), and the
# normalised DVK dose rate of the resolution-recovered activity.
INPUT_CHANNELS = ("activity", "density", "dvk_rr")


PAPER = NetworkConfig(stem="paper")
DEPTH_VALID = NetworkConfig(stem="depth_valid")
# For tests: same topology, a fraction of the cost.
TINY = NetworkConfig(stem="depth_valid", base_filters=4, levels=2, stem_channels=(2, 4, 4), stem_kernel_xy=3)


def _norm(cfg: NetworkConfig, channels: int, dims: int) -> nn.Module:
    """BatchNorm (the paper) or nothing; an Identity keeps the layer indices of saved weights."""
    if cfg.norm == "none":
        return nn.Identity()
    return nn.BatchNorm3d(channels) if dims == 3 else nn.BatchNorm2d(channels)


class _StemPaper(nn.Module):
    """The public code's 3D stem: depth 11 -> 9 (pad 1) -> pool 5 -> 3 -> 1."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.stem_channels
        k, p = cfg.stem_kernel_xy, cfg.stem_kernel_xy // 2
        self.block = nn.Sequential(
            nn.Conv3d(cfg.n_inputs, c1, (5, k, k), padding=(1, p, p), bias=cfg.norm == "none"),
            _norm(cfg, c1, 3),
            nn.LeakyReLU(cfg.leaky_slope),
            nn.MaxPool3d((2, 1, 1), ceil_mode=True),
            nn.Conv3d(c1, c2, (3, k, k), padding=(0, p, p), bias=cfg.norm == "none"),
            _norm(cfg, c2, 3),
            nn.LeakyReLU(cfg.leaky_slope),
            nn.Conv3d(c2, c3, (3, k, k), padding=(0, p, p), bias=True),
        )
        self.out_channels = c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 11, H, W) -> (B, c3, H, W)
        y = self.block(x)
        if y.shape[2] != 1:
            raise ValueError(f"paper stem expects packs of 11 slices, left depth {y.shape[2]}")
        return y[:, :, 0]


class _StemDepthValid(nn.Module):
    """No depth padding: depth n -> n - 8; three depth features per output slice."""

    depth_loss = 8  # (5 - 1) + (3 - 1) + (3 - 1)

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.stem_channels
        k, p = cfg.stem_kernel_xy, cfg.stem_kernel_xy // 2
        self.block = nn.Sequential(
            nn.Conv3d(cfg.n_inputs, c1, (5, k, k), padding=(0, p, p), bias=cfg.norm == "none"),
            _norm(cfg, c1, 3),
            nn.LeakyReLU(cfg.leaky_slope),
            nn.Conv3d(c1, c2, (3, k, k), padding=(0, p, p), bias=cfg.norm == "none"),
            _norm(cfg, c2, 3),
            nn.LeakyReLU(cfg.leaky_slope),
            nn.Conv3d(c2, c3, (3, k, k), padding=(0, p, p), bias=True),
        )
        self.fold = cfg.pack - self.depth_loss  # 3 for packs of 11
        self.out_channels = c3 * self.fold

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem features for a slab: (B, C, n, H, W) -> (B, c3, n - 8, H, W)."""
        return self.block(x)

    def fold_packs(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, c3, m, H, W) -> (B*(m - fold + 1), c3*fold, H, W): one item per output slice."""
        b, c, m, h, w = feats.shape
        windows = feats.unfold(2, self.fold, 1)  # (B, c, m-fold+1, H, W, fold)
        windows = windows.permute(0, 2, 1, 5, 3, 4)  # (B, n_out, c, fold, H, W)
        return windows.reshape(b * (m - self.fold + 1), c * self.fold, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 11, H, W) -> (B, 3*c3, H, W)
        return self.fold_packs(self.features(x))


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, act: nn.Module, cfg: NetworkConfig, mid: int | None = None) -> None:
        mid = mid or cout
        bias = cfg.norm == "none"
        super().__init__(
            nn.Conv2d(cin, mid, 3, padding=1, bias=bias),
            _norm(cfg, mid, 2),
            act,
            nn.Conv2d(mid, cout, 3, padding=1, bias=bias),
            _norm(cfg, cout, 2),
            act,
        )


class _UNet2D(nn.Module):
    """U-Net with nearest up-sampling: filters f, 2f, ..., bottom halved (public code)."""

    def __init__(self, cin: int, cfg: NetworkConfig) -> None:
        super().__init__()
        f = [cfg.base_filters * 2**i for i in range(cfg.levels + 1)]  # 16 32 64 128 256
        leaky = nn.LeakyReLU(cfg.leaky_slope)
        self.inc = _DoubleConv(cin, f[0], leaky, cfg)
        self.down = nn.ModuleList()
        for i in range(cfg.levels):
            cout = f[i + 1] if i < cfg.levels - 1 else f[i + 1] // 2
            self.down.append(_DoubleConv(f[i], cout, leaky, cfg))
        self.up = nn.ModuleList()
        for i in reversed(range(cfg.levels)):
            cin_up = f[i + 1]  # skip f[i] + upsampled f[i] (bottom halved)
            cout = f[i] // 2 if i > 0 else f[0]
            self.up.append(_DoubleConv(cin_up, cout, nn.ReLU(), cfg, mid=cin_up // 2 if i > 0 else None))
        self.outc = nn.Conv2d(f[0], 1, 1)
        if cfg.norm == "none":  # start from the DVK (residual zero): no normalisation to tame a random output
            nn.init.zeros_(self.outc.weight)
            nn.init.zeros_(self.outc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for block in self.up:
            skip = skips.pop()
            y = F.interpolate(y, scale_factor=2, mode="nearest")
            dy, dx = skip.shape[-2] - y.shape[-2], skip.shape[-1] - y.shape[-1]
            y = F.pad(y, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
            y = block(torch.cat([skip, y], dim=1))
        return self.outc(y)


class DblurDoseNet(nn.Module):
    """Activity + density packs (and the DVK middle slice) -> dose rate of the middle slice.

    Inputs and outputs are in the network's normalised units (see ``spectdose.cnn.inference``): the
    mask of low density is applied by the caller, which knows the physical density.
    """

    def __init__(self, cfg: NetworkConfig = DEPTH_VALID) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "paper":
            self.stem: nn.Module | None = _StemPaper(cfg)
            cin = self.stem.out_channels
        elif cfg.stem == "depth_valid":
            self.stem = _StemDepthValid(cfg)
            cin = self.stem.out_channels
        elif cfg.stem == "none":
            self.stem = None
            cin = cfg.n_inputs * cfg.pack
        else:
            raise ValueError(f"unknown stem {cfg.stem!r}")
        self.unet = _UNet2D(cin, cfg)

    def forward(self, packs: torch.Tensor, dvk_mid: torch.Tensor | None = None) -> torch.Tensor:
        """packs (B, C, 11, H, W); dvk_mid (B, 1, H, W) -> (B, 1, H, W)."""
        x = packs.flatten(1, 2) if self.stem is None else self.stem(packs)  # (B, C, H, W)
        y = self.unet(x)
        if self.cfg.residual:
            y = y + dvk_mid
        return y

    def forward_slab(self, slab: torch.Tensor, dvk_mids: torch.Tensor | None = None) -> torch.Tensor:
        """All packs of a depth-padded slab at once, sharing the stem (depth_valid only).

        slab (1, 2, n + 10, H, W) -> (n, 1, H, W), identical to calling ``forward`` per pack.
        """
        if not isinstance(self.stem, _StemDepthValid):
            raise ValueError("forward_slab needs the depth_valid stem")
        x = self.stem.fold_packs(self.stem.features(slab))
        y = self.unet(x)
        if self.cfg.residual:
            y = y + dvk_mids
        return y
