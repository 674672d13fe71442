"""Rectified-flow sampling and weighting helpers (training-math.md §3.2, §4, §5)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.errors import UserInputError
from library.training import flow_matching as fm


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shift_formula():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(fm.shift_sigmas(s, 1.0), s)
    out = fm.shift_sigmas(s, 3.0)
    expected = [0.0, 0.75 / 1.5, 1.5 / 2.0, 1.0]
    assert out.tolist() == [pytest.approx(e) for e in expected]
    assert torch.all(out >= s)  # shift > 1 moves toward noise


def test_shifted_grid_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    grid = fm.shifted_sigma_grid(3.0)
    assert grid.shape == (1000,)
    torch.testing.assert_close(grid, sched.timesteps.float() / 1000)
    assert grid[0].item() == pytest.approx(1.0)
    tau = 0.001  # k = 999
    assert grid[-1].item() == pytest.approx(3 * tau / (1 + 2 * tau))


def test_flux_mu_line_and_time_shift():
    assert fm.flux_mu(256) == pytest.approx(0.5)
    assert fm.flux_mu(4096) == pytest.approx(1.15)
    assert fm.flux_mu(1024) == pytest.approx(0.5 + (1024 - 256) * 0.65 / 3840)
    s = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(fm.exp_time_shift(s, 0.0), s)
    mu = 1.15
    expected = [math.exp(mu) / (math.exp(mu) + (1 / x - 1)) for x in s.tolist()]
    assert fm.exp_time_shift(s, mu).tolist() == [pytest.approx(e) for e in expected]


def test_density_uniform_and_logit_normal():
    u = fm.sample_density("uniform", 5000, generator=gen(1))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02
    torch.testing.assert_close(fm.sample_density("none", 8, generator=gen(2)), torch.rand(8, generator=gen(2)))
    ln = fm.sample_density("logit_normal", 8, logit_mean=0.5, logit_std=2.0, generator=gen(3))
    torch.testing.assert_close(ln, torch.sigmoid(torch.randn(8, generator=gen(3)) * 2.0 + 0.5))
    many = fm.sample_density("logit_normal", 20000, logit_mean=1.0, generator=gen(4))
    assert many.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.02)


def test_density_mode():
    u = torch.rand(16, generator=gen(5))
    out = fm.sample_density("mode", 16, mode_scale=1.29, generator=gen(5))
    expected = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(fm.sample_density("mode", 16, mode_scale=0.0, generator=gen(5)), 1 - u)
    assert out.min() >= 0 and out.max() <= 1


def test_flux_sigma_sampling_uses_grid():
    cfg = fm.FlowMatchConfig(timestep_sampling="sigma", discrete_flow_shift=3.0)
    sig, t = fm.sample_flux_sigmas(cfg, 64, image_seq_len=1024, generator=gen(6))
    grid = fm.shifted_sigma_grid(3.0)
    u = torch.rand(64, generator=gen(6))
    torch.testing.assert_close(sig, grid[(u * 1000).long()])
    torch.testing.assert_close(t, sig * 1000)
    # logit_normal u near 1 cannot index past the grid
    cfg = fm.FlowMatchConfig(weighting_scheme="logit_normal", logit_mean=30.0)
    sig, _ = fm.sample_flux_sigmas(cfg, 4, 1024, generator=gen(7))
    assert torch.all(sig == grid[-1])


def test_flux_other_samplings():
    n = torch.randn(32, generator=gen(8))
    base = torch.sigmoid(2.0 * n)
    sig, t = fm.sample_flux_sigmas(fm.FlowMatchConfig(timestep_sampling="sigmoid", sigmoid_scale=2.0), 32, 1, gen(8))
    torch.testing.assert_close(sig, base)
    torch.testing.assert_close(t, base * 1000)
    sig, _ = fm.sample_flux_sigmas(
        fm.FlowMatchConfig(timestep_sampling="shift", sigmoid_scale=2.0, discrete_flow_shift=3.1582), 32, 1, gen(8))
    torch.testing.assert_close(sig, 3.1582 * base / (1 + 2.1582 * base))
    sig, _ = fm.sample_flux_sigmas(fm.FlowMatchConfig(timestep_sampling="flux_shift", sigmoid_scale=2.0), 32, 4096, gen(8))
    e = math.exp(1.15)
    torch.testing.assert_close(sig, e / (e + (1 / base - 1)))
    sig, t = fm.sample_flux_sigmas(fm.FlowMatchConfig(timestep_sampling="uniform"), 1000, 1, gen(9))
    assert sig.min() >= 0 and sig.max() < 1
    torch.testing.assert_close(sig, torch.rand(1000, generator=gen(9)))


def test_sd3_sampling_range_and_shift():
    cfg = fm.FlowMatchConfig(training_shift=3.0, min_timestep=100, max_timestep=300)
    sig, t = fm.sample_sd3_sigmas(cfg, 2000, generator=gen(10))
    assert t.min() >= 100 and t.max() < 300
    assert torch.all(t == t.floor()) and t.dtype == torch.float32
    torch.testing.assert_close(sig, t / 1000)
    u = torch.rand(2000, generator=gen(10))
    u = 3.0 * u / (1 + 2.0 * u)
    torch.testing.assert_close(t, torch.floor(u * 200 + 100))
    # defaults: [0, 1000)
    sig, t = fm.sample_sd3_sigmas(fm.FlowMatchConfig(), 2000, generator=gen(11))
    assert t.min() >= 0 and t.max() <= 999


def test_loss_weighting():
    s = torch.tensor([0.25, 0.5, 1.0])
    torch.testing.assert_close(fm.loss_weighting("sigma_sqrt", s), torch.tensor([16.0, 4.0, 1.0]))
    cos = fm.loss_weighting("cosmap", s)
    assert cos[1].item() == pytest.approx(4 / math.pi)
    assert cos[0].item() == pytest.approx(2 / (math.pi * (1 - 0.5 + 0.125)))
    for scheme in ("none", "uniform", "logit_normal", "mode"):
        assert fm.loss_weighting(scheme, s).tolist() == [1.0, 1.0, 1.0]


def test_noisy_input():
    x0 = torch.randn(3, 2, 4, 4, generator=gen(12))
    eps = torch.randn(3, 2, 4, 4, generator=gen(13))
    s = torch.tensor([0.0, 0.3, 1.0])
    out = fm.noisy_input(x0, eps, s)
    torch.testing.assert_close(out[0], x0[0])
    torch.testing.assert_close(out[1], 0.7 * x0[1] + 0.3 * eps[1])
    torch.testing.assert_close(out[2], eps[2])


def test_config_from_args_and_errors():
    args = argparse.Namespace(weighting_scheme="logit_normal", logit_mean=0.2, logit_std=1.5, mode_scale=1.29,
                              timestep_sampling="flux_shift", sigmoid_scale=1.0, discrete_flow_shift=3.0)
    cfg = fm.FlowMatchConfig.from_args(args)
    assert cfg.weighting_scheme == "logit_normal" and cfg.logit_std == 1.5 and cfg.timestep_sampling == "flux_shift"
    assert cfg.training_shift == 1.0 and cfg.min_timestep is None
    assert fm.FlowMatchConfig.from_args(argparse.Namespace()) == fm.FlowMatchConfig()
    with pytest.raises(UserInputError, match="weighting_scheme"):
        fm.FlowMatchConfig(weighting_scheme="snr")
    with pytest.raises(UserInputError, match="timestep_sampling"):
        fm.FlowMatchConfig(timestep_sampling="beta")
    with pytest.raises(UserInputError, match="discrete_flow_shift"):
        fm.FlowMatchConfig(discrete_flow_shift=0.0)
