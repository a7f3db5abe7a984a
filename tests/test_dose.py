import math

import numpy as np
import pytest
import scipy.signal

from spectdose.constants import LU177_HALF_LIFE_H
from spectdose.dose import (
    dvk_dose_rate,
    fft_convolve,
    outside_model_range,
    time_integration_factor_s,
)
from spectdose.errors import InputError


@pytest.mark.parametrize("shape,kshape", [((9, 10, 11), (5, 3, 7)), ((6, 30, 28), (21, 21, 21)), ((3, 4, 40), (9, 9, 5))])
def test_fft_convolution_equals_direct_linear_convolution(shape, kshape):
    rng = np.random.default_rng(1)
    a = rng.random(shape).astype(np.float32)
    k = rng.random(kshape).astype(np.float32)
    ref = scipy.signal.convolve(a.astype(np.float64), k.astype(np.float64), mode="same", method="direct")
    np.testing.assert_allclose(fft_convolve(a, k, backend="scipy"), ref, rtol=0, atol=1e-5 * ref.max())
    np.testing.assert_allclose(fft_convolve(a, k, backend="torch", device="cpu"), ref, rtol=0, atol=1e-5 * ref.max())


def test_even_kernel_refused():
    with pytest.raises(InputError, match="odd"):
        fft_convolve(np.ones((4, 4, 4)), np.ones((2, 3, 3)))


def _point_kernel():
    k = np.zeros((5, 5, 5), np.float32)
    k[2, 2, 2] = 2.0  # mGy/(MBq s) self
    k[2, 2, 3] = k[2, 2, 1] = 0.5
    return k


def test_all_zero_activity_gives_all_zero_dose():
    rho = np.full((8, 8, 8), 1.04, np.float32)
    out = dvk_dose_rate(np.zeros((8, 8, 8), np.float32), rho, _point_kernel(), 0.001)
    assert out.shape == (8, 8, 8) and not np.any(out)


def test_units_density_scaling_and_low_density_mask():
    act = np.zeros((7, 7, 7), np.float32)
    act[3, 3, 3] = 1e6  # 1e6 Bq/ml in a 1 ml voxel = 1 MBq
    rho = np.full(act.shape, 1.04, np.float32)
    rho[3, 3, 4] = 2.08  # bone-like: half the soft-tissue dose
    rho[3, 3, 2] = 0.05  # air: zero
    out = dvk_dose_rate(act, rho, _point_kernel(), 1.0)
    assert out[3, 3, 3] == pytest.approx(2.0e-3)  # 2 mGy/s = 2e-3 Gy/s
    assert out[3, 3, 4] == pytest.approx(0.25e-3)
    assert out[3, 3, 2] == 0.0


def test_nan_activity_refused():
    act = np.zeros((4, 4, 4), np.float32)
    act[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        dvk_dose_rate(act, np.ones_like(act), _point_kernel(), 1.0)


def test_hanscheid_is_2t_over_ln2():
    t_h = 96.0
    assert time_integration_factor_s("hanscheid", t_h) == pytest.approx(2 * t_h * 3600 / math.log(2))


def test_physical_decay_model_integrates_exponential_from_administration():
    t_h = 24.0
    lam = math.log(2) / LU177_HALF_LIFE_H
    # Ddot(t) = Ddot0 exp(-lam t) -> integral Ddot0 / lam = Ddot(t) exp(lam t) / lam.
    assert time_integration_factor_s("physical", t_h) == pytest.approx(math.exp(lam * t_h) / lam * 3600)


def test_effective_half_life_between_and_checked():
    t_h = 72.0
    f_eff = time_integration_factor_s("effective", t_h, effective_half_life_h=60.0)
    assert time_integration_factor_s("hanscheid", t_h) < time_integration_factor_s("physical", t_h)
    assert f_eff < time_integration_factor_s("physical", t_h)
    with pytest.raises(InputError, match="half-life"):
        time_integration_factor_s("effective", t_h)
    with pytest.raises(InputError, match="exceeds"):
        time_integration_factor_s("effective", t_h, effective_half_life_h=500.0)
    with pytest.raises(InputError, match="unknown"):
        time_integration_factor_s("hanscheid", None)
    with pytest.raises(InputError, match="positive"):
        time_integration_factor_s("hanscheid", -3.0)


def test_negative_activity_refused_and_round_off_never_negative():
    act = np.zeros((4, 4, 4), np.float32)
    act[1, 1, 1] = -5.0
    with pytest.raises(InputError, match="negative"):
        dvk_dose_rate(act, np.ones_like(act), _point_kernel(), 1.0)
    # A hot point next to a large empty region: FFT round-off must not leave values below 0.
    act = np.zeros((30, 40, 40), np.float32)
    act[15, 20, 20] = 1e9
    k = np.random.default_rng(0).random((21, 21, 21)).astype(np.float32) * 1e-6
    k[10, 10, 10] = 10.0
    out = dvk_dose_rate(act, np.full(act.shape, 1.04, np.float32), k, 0.001)
    assert out.min() >= 0.0


def test_hanscheid_refused_outside_its_validated_range_unless_accepted():
    """Hanscheid et al., J Nucl Med 59 (2018) 75: the single-time-point formula holds for about 48-168 h."""
    for t_h in (48.0, 100.0, 168.0):
        assert time_integration_factor_s("hanscheid", t_h) == pytest.approx(2 * t_h * 3600 / math.log(2))
    for t_h in (8.9, 24.0, 47.5, 168.5, 240.0):
        with pytest.raises(InputError, match=r"validated for about 48-168 h.*--accept time_outside_model_range"):
            time_integration_factor_s("hanscheid", t_h)
        factor = time_integration_factor_s("hanscheid", t_h, allow_outside_model_range=True)
        assert factor == pytest.approx(2 * t_h * 3600 / math.log(2))
        assert outside_model_range("hanscheid", t_h)
    # The other models have no such range: physical decay is an upper bound at any time.
    assert time_integration_factor_s("physical", 24.0) > 0
    assert outside_model_range("physical", 24.0) is None
