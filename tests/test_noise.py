"""DDPM noise schedule, timestep sampling and noise options (training-math.md §2)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.errors import UserInputError
from library.training import noise as nz

T = 1000


def hand_alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of the SD schedule computed independently in float64."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    betas = [(lo + (hi - lo) * i / (T - 1)) ** 2 for i in range(T)]
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def tables():
    return nz.DDPMTables.create()


@pytest.fixture(scope="module")
def zt_tables():
    return nz.DDPMTables.create(zero_terminal_snr=True)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- schedule


def test_schedule_matches_hand_computation(tables):
    ac = hand_alphas_cumprod()
    assert tables.num_train_timesteps == T
    torch.testing.assert_close(tables.alphas_cumprod.double(), ac, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tables.snr.double(), ac / (1 - ac), rtol=1e-4, atol=0)


def test_zero_terminal_snr_rescale(tables, zt_tables):
    ac = hand_alphas_cumprod()
    zt = zt_tables.alphas_cumprod
    assert zt[-1].item() == 0.0
    assert zt[0].item() == pytest.approx(ac[0].item(), rel=1e-6)
    # √ᾱ is mapped affinely: (s - s_T) * s_0 / (s_0 - s_T)
    s = ac.sqrt()
    expected = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
    torch.testing.assert_close(zt.double(), expected, rtol=1e-4, atol=1e-7)
    assert torch.all(zt[1:] <= zt[:-1])
    # betas are consistent with the rescaled ᾱ, and the last beta is 1
    assert zt_tables.betas[-1].item() == pytest.approx(1.0)
    torch.testing.assert_close(torch.cumprod(1 - zt_tables.betas.double(), 0), zt.double(), rtol=1e-4, atol=1e-7)
    # the SNR table keeps the original betas
    torch.testing.assert_close(zt_tables.snr, tables.snr)
    assert torch.isfinite(zt_tables.snr).all() and zt_tables.snr[-1] > 0


def test_scheduler_oracle_add_noise_and_velocity(zt_tables):
    """diffusers' DDPMScheduler (rescaled in place) agrees with our x_t and v."""
    sched = nz.make_ddpm_scheduler(zero_terminal_snr=True)
    torch.testing.assert_close(sched.alphas_cumprod.float(), zt_tables.alphas_cumprod)
    x0 = torch.randn(3, 4, 5, 5, generator=gen(1))
    eps = torch.randn(3, 4, 5, 5, generator=gen(2))
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(nz.add_noise(x0, eps, t, zt_tables.alphas_cumprod), sched.add_noise(x0, eps, t))
    torch.testing.assert_close(nz.v_target(x0, eps, t, zt_tables.alphas_cumprod), sched.get_velocity(x0, eps, t))
    # at the terminal step the input is pure noise and v = -x0
    torch.testing.assert_close(nz.add_noise(x0, eps, t, zt_tables.alphas_cumprod)[2], eps[2])
    torch.testing.assert_close(nz.v_target(x0, eps, t, zt_tables.alphas_cumprod)[2], -x0[2])


def test_v_target_formula(tables):
    x0 = torch.randn(2, 4, 3, 3, generator=gen(3))
    eps = torch.randn(2, 4, 3, 3, generator=gen(4))
    t = torch.tensor([10, 700])
    ac = hand_alphas_cumprod()
    for i in range(2):
        a = ac[t[i]].item()
        expected = math.sqrt(a) * eps[i] - math.sqrt(1 - a) * x0[i]
        torch.testing.assert_close(nz.v_target(x0, eps, t, tables.alphas_cumprod)[i], expected, rtol=1e-5, atol=1e-6)
        expected_x = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i]
        torch.testing.assert_close(nz.add_noise(x0, eps, t, tables.alphas_cumprod)[i], expected_x, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- timesteps


def test_timesteps_respect_range():
    t = nz.sample_timesteps(4000, 100, 110, generator=gen())
    assert t.dtype == torch.long
    assert t.min().item() == 100 and t.max().item() == 109
    t = nz.sample_timesteps(4000, generator=gen())
    assert t.min().item() >= 0 and t.max().item() <= 999


def test_timesteps_min_not_below_max_gives_max():
    assert nz.sample_timesteps(5, 300, 300).tolist() == [300] * 5
    assert nz.sample_timesteps(3, 700, 400).tolist() == [400] * 3


@pytest.mark.parametrize("lo,hi", [(-1, None), (None, 1001), (1000, 1000), (1000, None)])
def test_timestep_bounds_errors(lo, hi):
    with pytest.raises(UserInputError):
        nz.sample_timesteps(2, lo, hi)
    with pytest.raises(UserInputError):
        nz.NoiseConfig(min_timestep=lo, max_timestep=hi)


def test_validation_timesteps():
    assert nz.validation_timesteps() == [200, 400, 600, 800]
    assert nz.validation_timesteps(None, None) == [200, 400, 600, 800]
    assert nz.validation_timesteps(100, 600) == [200, 300, 400, 500]
    assert nz.validation_timesteps(0, 999) == [199, 399, 599, 799]


def test_fixed_timestep_config(tables):
    cfg = nz.NoiseConfig().with_fixed_timestep(600)
    step = nz.prepare_ddpm_step(torch.zeros(3, 4, 4, 4), cfg, tables, generator=gen())
    assert step.timesteps.tolist() == [600, 600, 600]


# --------------------------------------------------------------------------- noise options


def test_offset_noise_shape_component():
    latents = torch.randn(2, 3, 4, 5, generator=gen(5))
    out = nz.offset_noise(latents, torch.zeros_like(latents), 0.1, generator=gen(6))
    n = torch.randn(2, 3, 1, 1, generator=gen(6))
    torch.testing.assert_close(out, (0.1 * n).expand(2, 3, 4, 5))
    # constant over the spatial dims, one value per (sample, channel)
    assert torch.all(out == out[:, :, :1, :1])


def test_adaptive_noise_scale_formula():
    latents = torch.randn(2, 3, 4, 4, generator=gen(7)) + torch.tensor([0.5, -1.0, 0.0]).view(1, 3, 1, 1)
    out = nz.offset_noise(latents, torch.zeros_like(latents), 0.05, adaptive_noise_scale=0.2, generator=gen(8))
    n = torch.randn(2, 3, 1, 1, generator=gen(8))
    strength = torch.clamp(0.05 + 0.2 * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0)
    torch.testing.assert_close(out, (strength * n).expand_as(out))
    # the strength never goes below zero
    out = nz.offset_noise(latents, torch.zeros_like(latents), -10.0, adaptive_noise_scale=0.2, generator=gen(8))
    assert torch.all(out == 0)


def test_make_noise_random_offset_strength_draw_order():
    latents = torch.randn(2, 4, 3, 3, generator=gen(9))
    cfg = nz.NoiseConfig(noise_offset=0.2, noise_offset_random_strength=True)
    out = nz.make_noise(latents, cfg, gen(10))
    g = gen(10)
    eps = torch.randn(2, 4, 3, 3, generator=g)
    u = torch.rand(1, generator=g)
    n = torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(out, eps + u * 0.2 * n)


def test_pyramid_noise_unit_std_and_stops_at_size_one(monkeypatch):
    sizes = []
    real = torch.nn.functional.interpolate

    def spy(x, *a, **k):
        sizes.append(tuple(x.shape[2:]))
        return real(x, *a, **k)

    monkeypatch.setattr(nz.F, "interpolate", spy)
    noise = torch.randn(2, 4, 32, 48, generator=gen(11))
    out = nz.pyramid_noise(noise, iterations=50, discount=0.8, generator=gen(12))
    assert out.shape == noise.shape
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
    assert sizes[0] == (32, 48)
    assert 1 in sizes[-1] and all(1 not in s for s in sizes[:-1])
    assert len(sizes) < 50
    # level i has size floor(H / r^i) with r ~ U(2, 4) drawn per level
    g = gen(12)
    for i, s in enumerate(sizes):
        r = 2 + 2 * torch.rand(1, generator=g).item()
        assert s == (max(1, int(32 / r**i)), max(1, int(48 / r**i)))
        torch.randn(2, 4, *s, generator=g)


def test_pyramid_noise_hand_computation():
    noise = torch.randn(1, 2, 8, 8, generator=gen(13))
    out = nz.pyramid_noise(noise, iterations=2, discount=0.3, generator=gen(14))
    g = gen(14)
    acc = noise.clone()
    for i in range(2):
        r = 2 + 2 * torch.rand(1, generator=g).item()
        h = w = max(1, int(8 / r**i))
        level = torch.randn(1, 2, h, w, generator=g)
        acc = acc + torch.nn.functional.interpolate(level, size=(8, 8), mode="bilinear") * 0.3**i
    torch.testing.assert_close(out, acc / acc.std())


def test_ip_noise_changes_input_not_target(tables):
    latents = torch.randn(2, 4, 6, 6, generator=gen(15))
    plain = nz.prepare_ddpm_step(latents, nz.NoiseConfig(), tables, generator=gen(16))
    cfg = nz.NoiseConfig(ip_noise_gamma=0.1)
    ip = nz.prepare_ddpm_step(latents, cfg, tables, generator=gen(16))
    torch.testing.assert_close(ip.target, plain.target)
    torch.testing.assert_close(ip.timesteps, plain.timesteps)
    assert not torch.allclose(ip.noisy_latents, plain.noisy_latents)
    # reproduce: eps, timesteps, xi; input noised with eps + 0.1 xi
    g = gen(16)
    eps = torch.randn(2, 4, 6, 6, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    xi = torch.randn(2, 4, 6, 6, generator=g)
    torch.testing.assert_close(ip.noisy_latents, nz.add_noise(latents, eps + 0.1 * xi, t, tables.alphas_cumprod))


def test_ip_noise_random_strength(tables):
    latents = torch.randn(2, 4, 6, 6, generator=gen(17))
    cfg = nz.NoiseConfig(ip_noise_gamma=0.5, ip_noise_gamma_random_strength=True, v_parameterization=True)
    step = nz.prepare_ddpm_step(latents, cfg, tables, generator=gen(18))
    g = gen(18)
    eps = torch.randn(2, 4, 6, 6, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    gamma = torch.rand(1, generator=g) * 0.5
    xi = torch.randn(2, 4, 6, 6, generator=g)
    torch.testing.assert_close(step.noisy_latents, nz.add_noise(latents, eps + gamma * xi, t, tables.alphas_cumprod))
    # v target is built from eps alone
    torch.testing.assert_close(step.target, nz.v_target(latents, eps, t, tables.alphas_cumprod))


def test_prepare_step_deterministic_and_eps_target(tables):
    latents = torch.randn(3, 4, 8, 8, generator=gen(19))
    cfg = nz.NoiseConfig(noise_offset=0.05, multires_noise_iterations=3, ip_noise_gamma=0.1, min_timestep=50, max_timestep=60)
    a = nz.prepare_ddpm_step(latents, cfg, tables, generator=gen(20))
    b = nz.prepare_ddpm_step(latents, cfg, tables, generator=gen(20))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a.target is a.noise
    assert a.timesteps.min() >= 50 and a.timesteps.max() < 60
    # global RNG path works as well
    torch.manual_seed(0)
    c = nz.prepare_ddpm_step(latents, cfg, tables)
    torch.manual_seed(0)
    d = nz.prepare_ddpm_step(latents, cfg, tables)
    assert torch.equal(c.noisy_latents, d.noisy_latents)


def test_noise_config_from_args():
    args = argparse.Namespace(
        noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=None,
        multires_noise_iterations=6, multires_noise_discount=0.3, ip_noise_gamma=None,
        ip_noise_gamma_random_strength=False, min_timestep=None, max_timestep=900,
        zero_terminal_snr=True, v_parameterization=True,
    )
    cfg = nz.NoiseConfig.from_args(args)
    assert cfg.noise_offset == 0.1 and cfg.noise_offset_random_strength
    assert cfg.multires_noise_iterations == 6 and cfg.zero_terminal_snr and cfg.v_parameterization
    assert cfg.timestep_range == (0, 900)
    # a namespace without these options gives the defaults
    assert nz.NoiseConfig.from_args(argparse.Namespace()) == nz.NoiseConfig()
