"""CT numbers (HU) to mass density (g/cm^3) by piecewise-linear calibration curves.

A curve is a list of (HU, density) breakpoints, interpolated linearly and held constant
beyond the ends. Scanners differ: a site should measure its own curve (e.g. with a
density phantom) and pass it in; the built-in curves are documented starting points.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from spectdose.errors import InputError

__all__ = ["CalibrationCurve", "DEFAULT_DENSITY_CURVE", "SCHNEIDER_2000", "BILINEAR", "CURVES", "hu_to_density", "density_to_hu", "load_curve"]


@dataclasses.dataclass(frozen=True)
class CalibrationCurve:
    name: str
    source: str
    hu: tuple[float, ...]
    density_g_cm3: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.hu) != len(self.density_g_cm3) or len(self.hu) < 2:
            raise InputError(f"calibration curve {self.name!r}: need >= 2 (HU, density) pairs of equal length")
        if np.any(np.diff(self.hu) <= 0):
            raise InputError(f"calibration curve {self.name!r}: HU breakpoints must increase strictly")
        if min(self.density_g_cm3) < 0:
            raise InputError(f"calibration curve {self.name!r}: densities must be >= 0")

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "hu": list(self.hu), "density_g_cm3": list(self.density_g_cm3)}


# Schneider W, Bortfeld T, Schlegel W. Phys Med Biol 45 (2000) 459-478, as tabulated in
# GATE's Schneider2000DensitiesTable.txt: air/lung, adipose-to-soft-tissue and bone lines.
# Bone line between 100 and 1600 HU: rho = 1.0164 + 0.000592 * HU (-> 1.964 at 1600).
SCHNEIDER_2000 = CalibrationCurve(
    name="schneider2000",
    source="Schneider et al., Phys Med Biol 45 (2000) 459; GATE Schneider2000DensitiesTable",
    hu=(-1000.0, -98.0, 14.0, 100.0, 101.0, 1600.0, 3000.0),
    density_g_cm3=(0.00121, 0.93, 1.03, 1.12, 1.0164 + 0.000592 * 101.0, 1.0164 + 0.000592 * 1600.0, 2.8),
)

# The common bilinear model: rho = 1 + HU/1000 below water, 1 + 0.0006*HU above
# (e.g. as used for attenuation maps; see Brown et al., Med Phys 35 (2008) 1301 for the
# bilinear CT-to-mu idea). Clipped at -1000 HU (air) and 3000 HU.
BILINEAR = CalibrationCurve(
    name="bilinear",
    source="bilinear water/bone model: rho = 1 + HU/1000 (HU <= 0), 1 + 0.0006 HU (HU > 0)",
    hu=(-1000.0, 0.0, 3000.0),
    density_g_cm3=(0.0, 1.0, 2.8),
)

CURVES = {c.name: c for c in (SCHNEIDER_2000, BILINEAR)}
DEFAULT_DENSITY_CURVE = SCHNEIDER_2000.name

# Values at or below this are scanner padding (e.g. -2048 outside the reconstruction
# circle), not tissue: they are mapped to air rather than interpolated.
_PADDING_HU = -1050.0


def hu_to_density(hu: np.ndarray, curve: CalibrationCurve = SCHNEIDER_2000) -> np.ndarray:
    """Mass density in g/cm^3 for CT numbers ``hu`` (any shape), float32."""
    hu = np.asarray(hu, dtype=np.float32)
    rho = np.empty(hu.shape, dtype=np.float32)
    # Slab by slab: np.interp returns float64, a full-size copy twice the volume's size on a clinical CT.
    flat_hu, flat_rho = hu.reshape(-1), rho.reshape(-1)
    step = 1 << 22
    for start in range(0, flat_hu.size, step):
        part = flat_hu[start:start + step]
        flat_rho[start:start + step] = np.interp(part, curve.hu, curve.density_g_cm3)
    rho[hu <= _PADDING_HU] = curve.density_g_cm3[0]
    return rho


def density_to_hu(density_g_cm3: np.ndarray, curve: CalibrationCurve = SCHNEIDER_2000) -> np.ndarray:
    """Inverse of :func:`hu_to_density` on the curve's range (for generating virtual CTs)."""
    rho = np.asarray(density_g_cm3, dtype=np.float64)
    # Schneider's curve steps down at 100/101 HU (soft-tissue line to bone line), so it is
    # not invertible everywhere: sample it finely and keep the points that raise the running
    # maximum, which takes the lowest HU for each density.
    hu = np.arange(curve.hu[0], curve.hu[-1] + 0.25, 0.25)
    d = np.interp(hu, curve.hu, curve.density_g_cm3)
    keep = np.concatenate([[True], d[1:] > np.maximum.accumulate(d)[:-1]])
    return np.interp(rho, d[keep], hu[keep]).astype(np.float32)


def load_curve(spec: str | Path) -> CalibrationCurve:
    """A built-in curve by name, or a JSON file ``{"name", "source", "hu", "density_g_cm3"}``."""
    if str(spec) in CURVES:
        return CURVES[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"unknown CT calibration curve {str(spec)!r}: use one of {sorted(CURVES)} or a JSON file")
    try:
        data = json.loads(path.read_text())
        return CalibrationCurve(
            name=str(data.get("name", path.stem)),
            source=str(data.get("source", str(path))),
            hu=tuple(float(v) for v in data["hu"]),
            density_g_cm3=tuple(float(v) for v in data["density_g_cm3"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"CT calibration file {path.name}: expected keys 'hu' and 'density_g_cm3' ({exc})") from exc
