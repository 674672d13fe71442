"""FLUX training step (training-math.md §3): timestep sampling distributions against the
formulas, noising and target, prediction types and loss weighting, conditioning, caches.

Distribution checks draw 20000 σ with a fixed seed through the architecture object (the
path training takes) and compare the empirical CDF with the CDF the formula implies
(Kolmogorov-Smirnov distance below 0.015; the 1% critical value for n = 20000 is 0.0115,
and with the fixed seed the measured distances are printed).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from library.errors import UserInputError

N = 20000
KS_MAX = 0.015


def _arch(**opts):
    from library.arch.flux import FluxArchitecture
    from library.models.flux.config import FluxConfig

    defaults = dict(model_type="flux", timestep_sampling="sigma", sigmoid_scale=1.0, discrete_flow_shift=3.0,
                    weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                    model_prediction_type="sigma_scaled", guidance_scale=3.5, apply_t5_attn_mask=False,
                    t5xxl_max_token_length=None, loss_type="l2", huber_schedule="snr", huber_c=0.1, huber_scale=1.0)
    defaults.update(opts)
    args = SimpleNamespace(**defaults)
    arch = FluxArchitecture.from_args(args)
    arch.config = FluxConfig(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=4)
    arch.prepare_training(args, "cpu")
    return arch


def _sigmas(arch, latent_hw=(32, 32), seed=0):
    """σ of N samples as noise_and_target draws them (sorted), checked against t = 1000 σ."""
    g = torch.Generator().manual_seed(seed)
    sig, t = arch.sample_sigmas(N, (latent_hw[0] // 2) * (latent_hw[1] // 2), "cpu", generator=g)
    torch.testing.assert_close(t, sig * 1000)
    return sig.double().sort().values


def _phi(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _logit(s):
    return torch.log(s) - torch.log1p(-s)


def _ks(sorted_samples, cdf):
    n = sorted_samples.numel()
    f = cdf(sorted_samples.clamp(1e-12, 1 - 1e-12))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).abs().max().item(), (f - (i - 1) / n).abs().max().item())


def test_uniform():
    d = _ks(_sigmas(_arch(timestep_sampling="uniform")), lambda s: s)
    print(f"uniform KS {d:.4f}")
    assert d < KS_MAX


@pytest.mark.parametrize("c", [1.0, 2.5])
def test_sigmoid(c):
    d = _ks(_sigmas(_arch(timestep_sampling="sigmoid", sigmoid_scale=c)), lambda s: _phi(_logit(s) / c))
    print(f"sigmoid c={c} KS {d:.4f}")
    assert d < KS_MAX


def test_shift():
    c, s = 1.5, 3.1582

    def cdf(x):  # invert x = s σ / (1 + (s - 1) σ)
        sigma = x / (s - (s - 1) * x)
        return _phi(_logit(sigma) / c)

    d = _ks(_sigmas(_arch(timestep_sampling="shift", sigmoid_scale=c, discrete_flow_shift=s)), cdf)
    print(f"shift KS {d:.4f}")
    assert d < KS_MAX


@pytest.mark.parametrize("latent_hw", [(32, 32), (128, 96)])
def test_flux_shift_uses_the_packed_length(latent_hw):
    n_tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    m = 0.65 / 3840
    mu = m * n_tokens + 0.5 - 256 * m

    def cdf(x):  # invert x = e^mu / (e^mu + 1/σ - 1)
        sigma = 1.0 / (1.0 + math.exp(mu) * (1.0 / x - 1.0))
        return _phi(_logit(sigma))

    samples = _sigmas(_arch(timestep_sampling="flux_shift"), latent_hw)
    d = _ks(samples, cdf)
    print(f"flux_shift {latent_hw} (mu {mu:.3f}) KS {d:.4f}")
    assert d < KS_MAX


def test_sigma_is_the_shifted_scheduler_grid():
    s = 3.0
    grid = torch.tensor([s * (1000 - k) / 1000 / (1 + (s - 1) * (1000 - k) / 1000) for k in range(1000)],
                        dtype=torch.float64)
    samples = _sigmas(_arch(timestep_sampling="sigma", discrete_flow_shift=s))
    # every sample is a grid value, and each of the 1000 values is equally likely
    nearest = (samples[:, None] - grid[None, :]).abs().min(dim=1).values
    assert nearest.max() < 1e-6
    d = _ks(samples, lambda x: (grid[None, :] <= x[:, None] + 1e-9).double().mean(dim=1))
    print(f"sigma (uniform scheme) KS {d:.4f}")
    assert d < KS_MAX


def test_sigma_with_logit_normal_density():
    mean, std, s = 0.3, 0.8, 3.0
    grid = torch.tensor([s * (1000 - k) / 1000 / (1 + (s - 1) * (1000 - k) / 1000) for k in range(1000)],
                        dtype=torch.float64)

    def cdf(x):  # σ_k <= x  <=>  k >= k*  <=>  u >= k*/1000 with u = sigmoid(N(mean, std))
        kstar = (grid[None, :] > x[:, None] + 1e-9).sum(dim=1).double()
        u = (kstar / 1000).clamp(1e-12, 1 - 1e-12)
        return 1 - _phi((_logit(u) - mean) / std)

    samples = _sigmas(_arch(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=mean,
                            logit_std=std))
    d = _ks(samples, cdf)
    print(f"sigma (logit_normal) KS {d:.4f}")
    assert d < KS_MAX


def test_noising_target_and_prediction_types():
    arch = _arch(timestep_sampling="uniform")
    x0 = torch.randn(3, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(5)
    noisy, target, t, extras = arch.noise_and_target(x0, generator=g)
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(x0.shape, generator=g)
    sig = torch.rand(3, generator=g)
    torch.testing.assert_close(extras["sigmas"], sig)
    torch.testing.assert_close(t, sig * 1000)
    s = sig.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(target, eps - x0)
    o = torch.randn_like(x0)
    for kind, want in (("raw", o), ("additive", o + noisy), ("sigma_scaled", noisy - s * o)):
        arch.model_prediction_type = kind
        torch.testing.assert_close(arch.apply_prediction_type(o, noisy, sig), want)
    # loss weighting (§5.2): only with sigma_scaled
    pred = torch.zeros_like(target)
    for scheme, w in (("sigma_sqrt", sig ** -2), ("cosmap", 2 / (math.pi * (1 - 2 * sig + 2 * sig ** 2))),
                      ("logit_normal", torch.ones(3))):
        arch = _arch(weighting_scheme=scheme)
        loss = arch.loss(pred, target, t, torch.ones(3), None, extras)
        torch.testing.assert_close(loss, target.pow(2).mean(dim=(1, 2, 3)) * w)
        arch.model_prediction_type = "raw"
        torch.testing.assert_close(arch.loss(pred, target, t, torch.ones(3), None, extras),
                                   target.pow(2).mean(dim=(1, 2, 3)))
    # validation fixes the timestep
    arch.fixed_timestep = 400
    _, _, t, extras = arch.noise_and_target(x0)
    assert torch.all(t == 400) and torch.allclose(extras["sigmas"], torch.full((3,), 0.4))


def test_option_errors():
    with pytest.raises(UserInputError, match="chroma"):
        _arch(model_type="chroma")
    with pytest.raises(UserInputError, match="--timestep_sampling"):
        _arch(timestep_sampling="cosine")
    with pytest.raises(UserInputError, match="huber_schedule"):
        _arch(loss_type="huber")  # the snr schedule needs a DDPM model
    _arch(loss_type="huber", huber_schedule="exponential")


def test_t5_length_defaults_by_variant():
    from library.models.flux.config import FluxConfig

    arch = _arch()
    assert arch.t5_max_length == 512
    arch.config = FluxConfig(guidance_embed=False)
    assert arch.t5_max_length == 256
    assert _arch(t5xxl_max_token_length=77).t5_max_length == 77
