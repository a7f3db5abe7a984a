import json

import numpy as np
import pytest

from spectdose.density import BILINEAR, SCHNEIDER_2000, density_to_hu, hu_to_density, load_curve
from spectdose.errors import InputError


def test_schneider_reference_points():
    # Breakpoints of Schneider et al., Phys Med Biol 45 (2000) 459, as shipped with GATE.
    hu = np.array([-1000.0, -98.0, 14.0, 100.0, 1600.0, 3000.0])
    expected = [0.00121, 0.93, 1.03, 1.12, 1.0164 + 0.000592 * 1600, 2.8]
    np.testing.assert_allclose(hu_to_density(hu), expected, rtol=1e-4)


def test_water_and_soft_tissue_near_one():
    rho = hu_to_density(np.array([0.0, 40.0]))
    assert 0.98 < rho[0] < 1.03
    assert 1.03 < rho[1] < 1.08


def test_padding_values_are_air_not_bone():
    # -2048 / -3024 are the usual "outside the reconstruction circle" values.
    rho = hu_to_density(np.array([-3024.0, -2048.0, -1024.0]))
    assert np.all(rho < 0.01)


def test_bilinear_curve():
    np.testing.assert_allclose(hu_to_density(np.array([-500.0, 0.0, 1000.0]), BILINEAR), [0.5, 1.0, 1.6], rtol=1e-6)


def test_inverse_round_trip_on_monotone_parts():
    rho = np.array([0.3, 0.95, 1.05, 1.5, 1.9])
    np.testing.assert_allclose(hu_to_density(density_to_hu(rho)), rho, rtol=1e-4)


def test_custom_curve_from_json(tmp_path):
    f = tmp_path / "scanner.json"
    f.write_text(json.dumps({"name": "site-A", "source": "phantom 2026-01", "hu": [-1000, 0, 1000], "density_g_cm3": [0, 1, 1.5]}))
    curve = load_curve(f)
    assert curve.name == "site-A"
    assert hu_to_density(np.array([500.0]), curve)[0] == pytest.approx(1.25)


def test_bad_curves_refused(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"hu": [0, -100], "density_g_cm3": [1, 0.9]}))
    with pytest.raises(InputError, match="increase"):
        load_curve(f)
    with pytest.raises(InputError, match="unknown CT calibration"):
        load_curve("no-such-curve")
    assert load_curve("schneider2000") is SCHNEIDER_2000
