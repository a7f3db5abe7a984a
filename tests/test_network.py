"""DblurDoseNet: shapes, the paper's ablations as configurations, depth-valid slab sharing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectdose.cnn.inference import (
    Normalisation,
    TrainedModel,
    load_model,
    predict_dose_rate,
    save_model,
)
from spectdose.cnn.model import DEPTH_VALID, PAPER, TINY, DblurDoseNet, NetworkConfig
from spectdose.errors import InputError


@pytest.mark.parametrize(
    "cfg",
    [
        PAPER,
        DEPTH_VALID,
        NetworkConfig(stem="none"),
        NetworkConfig(residual=False),
        TINY,
    ],
    ids=["paper", "depth_valid", "2d_only", "no_residual", "tiny"],
)
@pytest.mark.parametrize("hw", [(32, 32), (40, 36)])
def test_pack_in_middle_slice_out(cfg, hw):
    torch.manual_seed(0)
    net = DblurDoseNet(cfg).eval()
    packs = torch.randn(2, 2, 11, *hw)
    dvk = torch.randn(2, 1, *hw)
    with torch.no_grad():
        out = net(packs, dvk)
    assert out.shape == (2, 1, *hw)


def test_paper_stem_consumes_depth_exactly():
    net = DblurDoseNet(PAPER).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="11 slices"):
        net(torch.randn(1, 2, 13, 16, 16), torch.zeros(1, 1, 16, 16))


def test_paper_unet_filters_and_stem_kernels():
    net = DblurDoseNet(PAPER)
    convs3d = [m for m in net.stem.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [tuple(c.kernel_size) for c in convs3d] == [(5, 7, 7), (3, 7, 7), (3, 7, 7)]
    assert [c.out_channels for c in convs3d] == [8, 16, 16]
    convs2d = [m for m in net.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(c.out_channels for c in convs2d) == 128 and convs2d[0].out_channels == 16


def test_residual_is_added_and_ablation_ignores_it():
    torch.manual_seed(0)
    packs = torch.randn(1, 2, 11, 16, 16)
    dvk = torch.randn(1, 1, 16, 16)
    with_res = DblurDoseNet(TINY).eval()
    no_res = DblurDoseNet(NetworkConfig(**{**TINY.to_dict(), "residual": False})).eval()
    no_res.load_state_dict(with_res.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(with_res(packs, dvk) - no_res(packs, dvk), dvk)


def test_depth_valid_slab_equals_per_pack():
    torch.manual_seed(1)
    net = DblurDoseNet(DEPTH_VALID).eval()
    slab = torch.randn(1, 2, 16, 24, 20)  # 6 output slices
    mids = torch.randn(6, 1, 24, 20)
    with torch.no_grad():
        shared = net.forward_slab(slab, mids)
        single = torch.cat([net(slab[:, :, i : i + 11], mids[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(shared, single, rtol=1e-4, atol=1e-5)


def _model(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    net = DblurDoseNet(cfg).eval()
    return TrainedModel(net, cfg, Normalisation(), (3.0, 2.0, 2.0), "test", {})


def test_zero_activity_gives_zero_dose():
    rho = np.ones((12, 16, 16), np.float32)
    zero = np.zeros_like(rho)
    out = predict_dose_rate(_model(), zero, rho, zero, 0.012)
    assert out.shape == rho.shape and not np.any(out)


def test_volume_prediction_masks_air_scales_with_activity_and_matches_paper_packing():
    rng = np.random.default_rng(0)
    act = rng.gamma(2.0, 1e4, size=(14, 16, 16)).astype(np.float32)
    rho = np.full(act.shape, 1.0, np.float32)
    rho[:, :, :3] = 0.05
    dvk = (act * 1e-9).astype(np.float32)
    model = _model()
    out = predict_dose_rate(model, act, rho, dvk, 0.012)
    assert np.all(out >= 0) and not np.any(out[:, :, :3])
    # Normalisation is exact: doubling the activity (and so the DVK map) doubles the output.
    out2 = predict_dose_rate(model, 2 * act, rho, 2 * dvk, 0.012)
    np.testing.assert_allclose(out2, 2 * out, rtol=1e-4, atol=1e-12)
    # Slab sharing (depth_valid) gives the same volume as one pack at a time.
    np.testing.assert_allclose(predict_dose_rate(model, act, rho, dvk, 0.012, slab=1), out, rtol=1e-4, atol=1e-12)
    # The paper's stem runs pack by pack on the same interface.
    paper = _model(NetworkConfig(**{**TINY.to_dict(), "stem": "paper"}))
    assert predict_dose_rate(paper, act, rho, dvk, 0.012).shape == act.shape


def test_the_dose_in_the_body_does_not_depend_on_how_much_air_the_field_of_view_holds():
    """The network runs on the body's box, as in training: a CT reconstructed with a 500 mm
    field of view gives the same dose as one framed tightly, and air costs no compute."""
    rng = np.random.default_rng(1)
    nz, body_yx = 14, (20, 26)
    act_body = rng.gamma(2.0, 1e4, size=(nz, *body_yx)).astype(np.float32)
    rho_body = np.full(act_body.shape, 1.0, np.float32)
    rho_body[:, 5:9, 4:12] = 0.3  # lung inside the body stays in the network's field

    def framed(margin_y, margin_x, shape):
        act, rho = np.zeros((nz, *shape), np.float32), np.full((nz, *shape), 0.001, np.float32)
        body = (slice(None), slice(margin_y, margin_y + body_yx[0]), slice(margin_x, margin_x + body_yx[1]))
        act[body], rho[body] = act_body, rho_body
        return act, rho, (act * 1e-9).astype(np.float32), body

    model = _model()
    torch.nn.init.normal_(model.net.unet.outc.weight, std=500.0)  # untrained, yet a correction of a few % of DVK
    tight_act, tight_rho, tight_dvk, tight_body = framed(9, 10, (38, 46))
    wide_act, wide_rho, wide_dvk, wide_body = framed(23, 41, (80, 110))
    tight = predict_dose_rate(model, tight_act, tight_rho, tight_dvk, 0.012)
    wide = predict_dose_rate(model, wide_act, wide_rho, wide_dvk, 0.012)
    # The network's correction to the DVK map, the part the framing could change.
    tight_correction = tight[tight_body] - tight_dvk[tight_body]
    wide_correction = wide[wide_body] - wide_dvk[wide_body]
    scale = np.abs(tight_correction).max()
    assert scale > 1e-3 * tight_dvk.max()  # the network did act
    np.testing.assert_allclose(wide_correction, tight_correction, rtol=0, atol=1e-4 * scale)
    assert not np.any(wide[wide_rho < 0.1])  # air: no dose


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    path = save_model(tmp_path / "m.pt", model.net, normalisation=Normalisation(), spacing_mm=(3.0, 2.0, 2.0), name="t", metadata={"seed": 1})
    back = load_model(path, device="cpu")
    assert back.config == TINY and back.spacing_mm == (3.0, 2.0, 2.0) and back.metadata == {"seed": 1}
    for a, b in zip(model.net.state_dict().values(), back.net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(InputError, match="no trained"):
        load_model(tmp_path / "missing.pt")
