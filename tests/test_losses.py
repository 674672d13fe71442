"""Loss functions, Huber schedules, masks, per-sample weights and SNR weighting
(training-math.md §1, §2.5, §7, §9, §10)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.errors import UserInputError
from library.training import losses as ls
from library.training.noise import DDPMTables

T = 1000


def hand_alphas_cumprod() -> list[float]:
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    out, acc = [], 1.0
    for i in range(T):
        acc *= 1.0 - (lo + (hi - lo) * i / (T - 1)) ** 2
        out.append(acc)
    return out


AC = hand_alphas_cumprod()


def snr(t: int) -> float:
    return AC[t] / (1.0 - AC[t])


@pytest.fixture(scope="module")
def tables():
    return DDPMTables.create()


def approx(x, rel=1e-4):
    return pytest.approx(x, rel=rel)


# --------------------------------------------------------------------------- §7 Huber thresholds


def test_huber_c_constant():
    c = ls.huber_threshold(torch.tensor([0, 500, 999]), "constant", 0.1, 2.0)
    assert c.tolist() == [approx(0.2)] * 3


def test_huber_c_exponential():
    h, k = 0.1, 3.0
    c = ls.huber_threshold(torch.tensor([0, 500, 999, 1000]), "exponential", h, k)
    alpha = -math.log(h) / 1000
    assert c.tolist() == [approx(k), approx(k * math.exp(-alpha * 500)), approx(k * math.exp(-alpha * 999)), approx(k * h)]
    assert c[1].item() == approx(k * math.sqrt(h))


def test_huber_c_snr(tables):
    h = 0.1
    t = torch.tensor([0, 500, 999])
    c = ls.huber_threshold(t, "snr", h, huber_scale=5.0, alphas_cumprod=tables.alphas_cumprod)
    for i, ti in enumerate(t.tolist()):
        sigma = math.sqrt((1 - AC[ti]) / AC[ti])
        assert c[i].item() == approx((1 - h) / (1 + sigma) ** 2 + h)  # no huber_scale
    # at t=0 the threshold is close to 1, at the end close to h
    assert c[0] > 0.9 and c[2] < 0.2


def test_huber_c_snr_with_zero_terminal_snr_is_finite():
    zt = DDPMTables.create(zero_terminal_snr=True)
    c = ls.huber_threshold(torch.tensor([999]), "snr", 0.1, alphas_cumprod=zt.alphas_cumprod)
    assert c.item() == approx(0.1)


def test_huber_c_snr_needs_ddpm_schedule():
    with pytest.raises(UserInputError, match="huber_schedule"):
        ls.huber_threshold(torch.tensor([1.0]), "snr", 0.1)
    cfg = ls.LossConfig(loss_type="huber")
    with pytest.raises(UserInputError, match="constant or exponential"):
        cfg.check_schedule_support(has_alphas_cumprod=False)
    cfg.check_schedule_support(has_alphas_cumprod=True)
    ls.LossConfig(loss_type="huber", huber_schedule="constant").check_schedule_support(False)
    ls.LossConfig(loss_type="l2").check_schedule_support(False)


# --------------------------------------------------------------------------- §7 element-wise loss


def test_l1_l2():
    p = torch.tensor([[1.0, -2.0, 0.5]])
    t = torch.tensor([[0.0, 1.0, 0.5]])
    assert ls.elementwise_loss(p, t, "l2").tolist() == [[1.0, 9.0, 0.0]]
    assert ls.elementwise_loss(p, t, "l1").tolist() == [[1.0, 3.0, 0.0]]


def test_huber_and_smooth_l1_formulas_and_relation():
    d = torch.tensor([[0.0, 0.01, 0.3, 5.0], [0.0, -0.01, -0.3, -5.0]])
    c = torch.tensor([0.1, 0.5])
    hub = ls.elementwise_loss(d, torch.zeros_like(d), "huber", c)
    sm = ls.elementwise_loss(d, torch.zeros_like(d), "smooth_l1", c)
    for b in range(2):
        cb = c[b].item()
        for j in range(4):
            x = d[b, j].item()
            assert sm[b, j].item() == pytest.approx(2 * (math.sqrt(x * x + cb * cb) - cb), rel=1e-5, abs=1e-7)
            assert hub[b, j].item() == pytest.approx(2 * cb * (math.sqrt(x * x + cb * cb) - cb), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(hub, sm * c.view(2, 1))
    # huber behaves like d² for |d| << c and like 2c|d| for |d| >> c
    assert hub[0, 1].item() == pytest.approx(0.01**2, rel=1e-2)
    assert hub[1, 3].item() == pytest.approx(2 * 0.5 * 5.0, rel=0.15)
    assert sm[1, 3].item() == pytest.approx(2 * 5.0, rel=0.15)


def test_huber_c_broadcasts_over_4d():
    pred = torch.randn(2, 3, 4, 4)
    c = torch.tensor([0.1, 1.0])
    out = ls.elementwise_loss(pred, torch.zeros_like(pred), "huber", c)
    torch.testing.assert_close(out[1], 2 * 1.0 * (torch.sqrt(pred[1] ** 2 + 1.0) - 1.0))


def test_loss_config_errors():
    with pytest.raises(UserInputError, match="loss_type"):
        ls.LossConfig(loss_type="l3")
    with pytest.raises(UserInputError, match="huber_schedule"):
        ls.LossConfig(loss_type="huber", huber_schedule="cosine")
    with pytest.raises(UserInputError, match="huber_c"):
        ls.LossConfig(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.0)
    ls.LossConfig(loss_type="l2", huber_schedule="exponential", huber_c=0.0)  # unused for l2


def test_loss_config_from_args():
    args = argparse.Namespace(loss_type="huber", huber_schedule="exponential", huber_c=0.2, huber_scale=2.0,
                              min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=False, v_pred_like_loss=None,
                              debiased_estimation_loss=True, masked_loss=True, prior_loss_weight=0.5)
    cfg = ls.LossConfig.from_args(args)
    assert cfg == ls.LossConfig("huber", "exponential", 0.2, 2.0, 5.0, False, None, True, True, 0.5)
    assert ls.LossConfig.from_args(argparse.Namespace()) == ls.LossConfig()


# --------------------------------------------------------------------------- §9 masks, reduction, §10 weights


def test_masked_loss_removes_region_without_renormalising():
    pred = torch.randn(2, 4, 8, 8)
    target = torch.zeros_like(pred)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :4] = 0  # left half ignored
    cfg = ls.LossConfig()
    base = ls.per_sample_loss(pred, target, cfg, mask=mask)
    changed = pred.clone()
    changed[:, :, :, :4] += 100.0
    torch.testing.assert_close(ls.per_sample_loss(changed, target, cfg, mask=mask), base)
    # mean over all positions, masked ones count as zeros
    expected = (pred[:, :, :, 4:] ** 2).sum(dim=(1, 2, 3)) / (4 * 8 * 8)
    torch.testing.assert_close(base, expected)


def test_mask_area_resize():
    loss = torch.ones(1, 2, 2, 2)
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0, 0] = 1.0  # one pixel of the top-left 2x2 block
    mask[0, 0, 2:, 2:] = 1.0  # the whole bottom-right block
    out = ls.apply_loss_mask(loss, mask)
    assert out[0, 0].tolist() == [[0.25, 0.0], [0.0, 1.0]]
    assert out[0, 1].tolist() == out[0, 0].tolist()  # broadcast over channels
    # a (B, H, W) mask works too
    torch.testing.assert_close(ls.apply_loss_mask(loss, mask[:, 0]), out)


def test_loss_mask_from_batch():
    alpha = torch.rand(2, 8, 8)
    assert ls.loss_mask_from_batch({"alpha_masks": None, "conditioning_images": None}) is None
    assert ls.loss_mask_from_batch({"alpha_masks": None}, masked_loss=True) is None
    torch.testing.assert_close(ls.loss_mask_from_batch({"alpha_masks": alpha}), alpha.unsqueeze(1))
    cond = torch.rand(2, 3, 8, 8) * 2 - 1
    m = ls.loss_mask_from_batch({"alpha_masks": alpha, "conditioning_images": cond}, masked_loss=True)
    torch.testing.assert_close(m, (cond[:, :1] + 1) / 2)
    # conditioning images alone do not switch masking on
    assert ls.loss_mask_from_batch({"conditioning_images": cond}) is None


def test_weighting_and_sample_weights():
    pred = torch.ones(3, 2, 2, 2)
    target = torch.zeros_like(pred)
    out = ls.per_sample_loss(pred, target, ls.LossConfig(), weighting=torch.tensor([1.0, 2.0, 3.0]),
                             sample_weights=torch.tensor([1.0, 1.0, 0.5]))
    assert out.tolist() == [1.0, 2.0, 1.5]
    w = ls.reg_sample_weights([False, True], 0.25)
    assert w.tolist() == [1.0, 0.25]


def test_per_sample_loss_huber_from_timesteps_flow():
    """Flow-matching callers: float timesteps, exponential schedule, no ᾱ table."""
    pred = torch.full((2, 1, 2, 2), 0.5)
    cfg = ls.LossConfig(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.1)
    t = torch.tensor([0.0, 1000.0])
    out = ls.per_sample_loss(pred, torch.zeros_like(pred), cfg, t)
    for i, c in enumerate([1.0, 0.1]):
        assert out[i].item() == approx(2 * (math.sqrt(0.25 + c * c) - c))
    with pytest.raises(UserInputError):
        ls.per_sample_loss(pred, torch.zeros_like(pred), ls.LossConfig(loss_type="huber"), t)


# --------------------------------------------------------------------------- §2.5 SNR weights


@pytest.mark.parametrize("t", [1, 100, 500, 999])
def test_min_snr_weights_eps_and_v(tables, t):
    s = snr(t)
    ts = torch.tensor([t])
    eps = ls.min_snr_weight(tables.snr[ts], 5.0, v_prediction=False).item()
    v = ls.min_snr_weight(tables.snr[ts], 5.0, v_prediction=True).item()
    assert eps == approx(min(s, 5.0) / s)
    assert v == approx(min(s, 5.0) / (s + 1))


def test_min_snr_known_values(tables):
    # SNR at t=0 is huge (>1000): weights γ/S; at t=999 it is tiny (<γ): weight 1 (eps), S/(S+1) (v)
    assert snr(0) > 1000 and snr(999) < 5
    w = ls.min_snr_weight(tables.snr[torch.tensor([0, 999])], 5.0, False)
    assert w[0].item() == approx(5.0 / snr(0)) and w[1].item() == approx(1.0)


@pytest.mark.parametrize("t", [0, 250, 999])
def test_debiased_eps_and_v(tables, t):
    s = min(snr(t), 1000.0)
    x = tables.snr[torch.tensor([t])]
    assert ls.debiased_weight(x, v_prediction=False).item() == approx(1 / math.sqrt(s))
    assert ls.debiased_weight(x, v_prediction=True).item() == approx(1 / (s + 1))


def test_v_scale_and_v_like(tables):
    t = torch.tensor([0, 400, 999])
    loss = torch.tensor([1.0, 2.0, 3.0])
    cfg = ls.LossConfig(scale_v_pred_loss_like_noise_pred=True)
    out = ls.snr_post_process(loss, tables.snr[t], cfg, v_prediction=True)
    cfg2 = ls.LossConfig(v_pred_like_loss=0.3)
    out2 = ls.snr_post_process(loss, tables.snr[t], cfg2, v_prediction=False)
    for i, ti in enumerate(t.tolist()):
        s = min(snr(ti), 1000.0)
        assert out[i].item() == approx(loss[i].item() * s / (s + 1))
        assert out2[i].item() == approx(loss[i].item() + 0.3 * loss[i].item() * (s + 1) / s)


def test_all_snr_options_combined(tables):
    t = torch.tensor([3, 600])
    loss = torch.tensor([0.7, 1.3])
    cfg = ls.LossConfig(min_snr_gamma=2.0, scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True)
    out = ls.snr_post_process(loss, tables.snr[t], cfg, v_prediction=True)
    for i, ti in enumerate(t.tolist()):
        s, sc = snr(ti), min(snr(ti), 1000.0)
        expected = loss[i].item() * (min(s, 2.0) / (s + 1)) * (sc / (sc + 1)) * (1 / (sc + 1))
        assert out[i].item() == approx(expected)
    assert torch.equal(ls.snr_post_process(loss, tables.snr[t], ls.LossConfig(), True), loss)


# --------------------------------------------------------------------------- the SD/SDXL entry point


def test_ddpm_loss_pipeline(tables):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 800])
    mask = torch.ones(2, 16, 16)
    mask[1] = 0.5
    cfg = ls.LossConfig(loss_type="huber", huber_schedule="snr", huber_c=0.2, min_snr_gamma=5.0,
                        debiased_estimation_loss=True)
    out = ls.ddpm_loss(pred, target, t, cfg, tables, v_parameterization=False, mask=mask,
                       sample_weights=torch.tensor([1.0, 0.5]))
    assert out.shape == (2,)
    for i, ti in enumerate(t.tolist()):
        c = (1 - 0.2) / (1 + math.sqrt((1 - AC[ti]) / AC[ti])) ** 2 + 0.2
        d = (pred[i] - target[i]).double()
        el = 2 * c * (torch.sqrt(d * d + c * c) - c)
        m = 1.0 if i == 0 else 0.5
        w = 1.0 if i == 0 else 0.5
        s = snr(ti)
        expected = (el * m).mean().item() * w * (min(s, 5.0) / s) / math.sqrt(min(s, 1000.0))
        assert out[i].item() == approx(expected)


def test_ddpm_loss_half_precision_inputs(tables):
    pred = torch.randn(2, 4, 4, 4).half()
    out = ls.ddpm_loss(pred, torch.zeros_like(pred), torch.tensor([1, 2]), ls.LossConfig(), tables, False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (pred.float() ** 2).mean(dim=(1, 2, 3)))
