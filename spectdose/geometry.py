"""Volumes in patient space (DICOM LPS) and resampling between their grids.

Conventions used everywhere in the core:

* ``array`` is indexed ``(k, j, i)`` = (slice, row, column), i.e. numpy ``(z, y, x)``.
* ``spacing_mm`` is given in the same axis order: ``(slice, row, column)``.
* ``origin_mm`` is the LPS position (x, y, z in mm) of the *centre* of voxel ``[0, 0, 0]``.
* ``axes`` is a 3x3 array whose row ``a`` is the LPS unit vector along array axis ``a``.

So the centre of voxel ``(k, j, i)`` lies at
``origin_mm + k*spacing_mm[0]*axes[0] + j*spacing_mm[1]*axes[1] + i*spacing_mm[2]*axes[2]``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import SimpleITK as sitk

from spectdose.errors import GeometryError

__all__ = ["Volume", "Grid", "resample_to_grid", "register_rigid", "block_mean"]


@dataclasses.dataclass(frozen=True)
class Grid:
    """A voxel grid in patient space, without values."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    axes: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3)[::-1].copy())
    frame_of_reference_uid: str | None = None

    def __post_init__(self) -> None:
        axes = np.asarray(self.axes, dtype=float).reshape(3, 3)
        if not np.allclose(axes @ axes.T, np.eye(3), atol=1e-4):
            raise GeometryError("grid axes are not orthonormal (sheared or tilted volume)")
        if any(s <= 0 for s in self.spacing_mm):
            raise GeometryError(f"voxel spacing must be positive, got {self.spacing_mm} mm")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "origin_mm", tuple(float(o) for o in self.origin_mm))

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0

    def index_to_lps_mm(self, index_kji: np.ndarray) -> np.ndarray:
        """Centres in LPS mm of voxels given as ``(..., 3)`` (k, j, i) indices."""
        index = np.asarray(index_kji, dtype=float)
        return np.asarray(self.origin_mm) + (index * np.asarray(self.spacing_mm)) @ self.axes

    def lps_mm_to_index(self, points_lps_mm: np.ndarray) -> np.ndarray:
        """Fractional (k, j, i) indices of LPS points given as ``(..., 3)``."""
        rel = np.asarray(points_lps_mm, dtype=float) - np.asarray(self.origin_mm)
        return (rel @ self.axes.T) / np.asarray(self.spacing_mm)

    def corners_lps_mm(self) -> np.ndarray:
        """The 8 outer corners (voxel edges, not centres) of the grid, shape (8, 3)."""
        lo = -0.5 * np.ones(3)
        hi = np.asarray(self.shape) - 0.5
        idx = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        return self.index_to_lps_mm(idx)

    def same_as(self, other: Grid, tol_mm: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing_mm, other.spacing_mm, atol=tol_mm)
            and np.allclose(self.origin_mm, other.origin_mm, atol=tol_mm)
            and np.allclose(self.axes, other.axes, atol=1e-6)
        )

    # SimpleITK orders everything (x=column, y=row, z=slice); its direction matrix has the
    # axis unit vectors as *columns*.
    def sitk_geometry(self) -> tuple[tuple, tuple, tuple]:
        spacing = tuple(self.spacing_mm[::-1])
        direction = tuple(self.axes[::-1].T.ravel())
        return spacing, tuple(self.origin_mm), direction

    def to_sitk_reference(self) -> sitk.Image:
        img = sitk.Image([self.shape[2], self.shape[1], self.shape[0]], sitk.sitkUInt8)
        spacing, origin, direction = self.sitk_geometry()
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        img.SetDirection(direction)
        return img


@dataclasses.dataclass
class Volume:
    """A 3D array of values on a :class:`Grid`; ``units`` names what the values are."""

    array: np.ndarray
    grid: Grid
    units: str

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise GeometryError(f"a volume needs a 3D array, got {self.array.ndim}D")
        if tuple(self.array.shape) != self.grid.shape:
            raise GeometryError(f"array shape {self.array.shape} does not match grid {self.grid.shape}")

    @classmethod
    def from_sitk(cls, image: sitk.Image, units: str, frame_of_reference_uid: str | None = None) -> Volume:
        arr = sitk.GetArrayFromImage(image)
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        axes = direction.T[::-1]
        grid = Grid(arr.shape, tuple(image.GetSpacing())[::-1], tuple(image.GetOrigin()), axes, frame_of_reference_uid)
        return cls(arr, grid, units)

    def to_sitk(self) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        spacing, origin, direction = self.grid.sitk_geometry()
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        img.SetDirection(direction)
        return img


def resample_to_grid(
    volume: Volume,
    target: Grid,
    *,
    quantity: Literal["intensive", "extensive"] = "intensive",
    interpolation: Literal["linear", "nearest", "bspline"] = "linear",
    fill_value: float = 0.0,
    transform: sitk.Transform | None = None,
) -> Volume:
    """Resample ``volume`` onto ``target`` in patient coordinates.

    An *intensive* quantity (a concentration, Bq/ml; a density) is interpolated as is. An
    *extensive* one (Bq per voxel) is first turned into a concentration and back, so that
    totals are conserved as well as the interpolation allows.

    ``transform`` maps points of the target space into the source space (the SimpleITK
    convention), e.g. the result of a rigid registration.
    """
    src = volume
    if quantity == "extensive":
        src = Volume(volume.array / volume.grid.voxel_volume_ml, volume.grid, volume.units + "/ml")
    interp = {
        "linear": sitk.sitkLinear,
        "nearest": sitk.sitkNearestNeighbor,
        "bspline": sitk.sitkBSpline,
    }[interpolation]
    image = src.to_sitk()
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64) and interpolation != "nearest":
        image = sitk.Cast(image, sitk.sitkFloat32)
    out = sitk.Resample(
        image,
        target.to_sitk_reference(),
        transform if transform is not None else sitk.Transform(),
        interp,
        float(fill_value),
        image.GetPixelID(),
    )
    arr = sitk.GetArrayFromImage(out)
    if quantity == "extensive":
        arr = arr * target.voxel_volume_ml
    return Volume(arr, target, volume.units)


def register_rigid(fixed_ct: Volume, moving_spect: Volume) -> tuple[sitk.Transform, float]:
    """Rigid transform (CT space -> SPECT space) aligning a SPECT to its CT.

    Used only when the two do not share a frame of reference. The CT is reduced to a body
    map (soft tissue and above) and the SPECT to its own grid; Mattes mutual information
    copes with their unrelated intensities. Starts from the geometric centres' alignment.
    """
    fixed = sitk.Cast(fixed_ct.to_sitk(), sitk.sitkFloat32)
    # Work on a coarse CT (about the SPECT's voxel size) for speed and robustness; clamp
    # bone so the body outline and lungs, which the SPECT also shows, dominate.
    shrink = [max(1, int(round(moving_spect.grid.spacing_mm[2 - a] / fixed_ct.grid.spacing_mm[2 - a]))) for a in range(3)]
    fixed = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, 0.5), shrink)
    fixed = sitk.Clamp(fixed, sitk.sitkFloat32, -1000.0, 200.0)
    # Log-compress the SPECT: hot organs would otherwise hide the faint body background,
    # which carries most of the shape information.
    moving = sitk.SmoothingRecursiveGaussian(sitk.Cast(moving_spect.to_sitk(), sitk.sitkFloat32), 1.0)
    values = np.clip(sitk.GetArrayFromImage(moving), 0.0, None)
    positive = values[values > 0]
    scale = float(np.median(positive)) if positive.size else 1.0
    compressed = sitk.GetImageFromArray(np.log1p(values / scale).astype(np.float32))
    compressed.CopyInformation(moving)
    moving = compressed

    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    reg = sitk.ImageRegistrationMethod()
    # All voxels (no random sampling): deterministic, and the coarse grids are small.
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=4.0, minStep=0.01, numberOfIterations=200, relaxationFactor=0.6
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    try:
        transform = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise GeometryError(f"SPECT-to-CT registration failed: {exc}") from exc
    return transform, reg.GetMetricValue()


def block_mean(array: np.ndarray, factors) -> np.ndarray:
    """Mean over blocks of ``factors`` (z, y, x) voxels, float32 (summed in float64); the far
    edges are padded by repetition, so a partial block is the mean of what it holds."""
    factors = tuple(int(f) for f in factors)
    if factors == (1, 1, 1):
        return np.ascontiguousarray(array, dtype=np.float32)
    pads = [(0, (-n) % f) for n, f in zip(array.shape, factors, strict=True)]
    a = np.pad(array, pads, mode="edge") if any(p[1] for p in pads) else array
    # The block's voxels added one strided slice at a time, in the order a reduction over the
    # block axes takes them: a third of the time of ``reshape(...).mean(axis=(1, 3, 5))`` on a
    # flipped (non-contiguous) clinical CT, the same sums.
    total = None
    for dz in range(factors[0]):
        for dy in range(factors[1]):
            for dx in range(factors[2]):
                part = a[dz::factors[0], dy::factors[1], dx::factors[2]]
                if total is None:
                    total = part.astype(np.float64)
                else:
                    total += part
    total /= float(np.prod(factors))
    return total.astype(np.float32)
