"""Where the maximum lies (spectdose/maxima.py), on a synthetic lung-spleen interface (fast)."""

from __future__ import annotations

import numpy as np
import pytest

from spectdose.dose_grid import average_onto_grid, output_grid
from spectdose.geometry import Grid, Volume
from spectdose.maxima import describe, maxima_summary, tissue_class
from spectdose.regions import Region, RegionSet

SHAPE = (20, 30, 40)
SPACING_MM = (2.0, 2.0, 2.0)


def _scene():
    """Lung (0.26 g/cm3) for x < 20, spleen (1.05) for x >= 20; a hot lung voxel 1 voxel from the
    spleen (spill-over) and a warm spleen; a second hot lung voxel far (>10 mm) from soft tissue."""
    grid = Grid(SHAPE, SPACING_MM, (0.0, 0.0, 0.0), np.eye(3)[::-1], "1.2.3")
    density = np.full(SHAPE, 0.26, np.float32)
    density[:, :, 20:] = 1.05
    dose = np.full(SHAPE, 1.0, np.float32)
    dose[10, 15, 19] = 30.0  # lung, next to the spleen
    dose[10, 15, 25] = 12.0  # spleen
    lungs = np.zeros(SHAPE, bool)
    lungs[:, :, :20] = True
    spleen = ~lungs
    regions = RegionSet([Region("lungs", lungs, 1), Region("spleen", spleen, 2)], "SEG")
    return Volume(dose, grid, "Gy"), Volume(density, grid, "g/cm3"), regions


def test_a_lung_maximum_at_the_spleen_is_called_spill_over_and_the_soft_tissue_maximum_heads():
    dose, density, regions = _scene()
    m = maxima_summary(dose, density, regions, grid_name="CT")
    where = m["max_location"]
    assert m["max"] == 30.0 and where["tissue"] == "lung/low-density" and where["region"] == "lungs"
    assert where["density_g_cm3"] == pytest.approx(0.26)
    assert where["interface"] == {"distance_mm": 2.0, "soft_tissue_region": "spleen"}
    assert "spill-over" in m["max_location_text"] and "not a dose to quote" in m["max_location_text"]
    assert m["max_in_soft_tissue"] == 12.0 and m["max_in_soft_tissue_location"]["region"] == "spleen"
    assert m["max_in_soft_tissue_location"]["tissue"] == "soft tissue"


def test_a_maximum_deep_in_lung_is_flagged_without_an_interface():
    dose, density, regions = _scene()
    dose.array[10, 15, 19] = 1.0
    dose.array[10, 15, 5] = 40.0  # 30 mm from the spleen
    where = maxima_summary(dose, density, regions, grid_name="CT")["max_location"]
    assert where["interface"] is None and "check before quoting" in describe(where)


def test_on_a_coarser_grid_the_maxima_are_the_delivered_grids():
    dose, density, regions = _scene()
    coarse = average_onto_grid(dose, output_grid(dose.grid, (4.0, 4.0, 4.0)))
    m = maxima_summary(coarse, density, regions, grid_name="4x4x4 mm")
    assert m["max"] == pytest.approx(float(coarse.array.max())) and m["max"] < 30.0
    assert m["grid"] == "4x4x4 mm" and m["max_location"]["region"] in ("lungs", "spleen")


@pytest.mark.parametrize("rho, kind", [(0.0012, "air"), (0.26, "lung/low-density"), (0.95, "soft tissue"),
                                       (1.06, "soft tissue"), (1.92, "bone")])
def test_tissue_classes(rho, kind):
    assert tissue_class(rho) == kind
