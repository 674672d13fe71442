"""Sampler names -> configured diffusers schedulers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from library.errors import UserInputError
from library.inference import samplers
from library.inference.samplers import SAMPLER_NAMES, canonical_sampler_name, get_scheduler

SPEC_NAMES = "ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver, dpmsolver++, dpmsingle, k_lms, k_euler, k_euler_a, k_dpm_2, k_dpm_2_a"

CLASSES = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler", "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler", "dpmsingle": "DPMSolverSinglestepScheduler",
}


def test_names_are_the_spec_choices():
    assert SAMPLER_NAMES == tuple(SPEC_NAMES.split(", "))


CANONICAL = [n for n in SAMPLER_NAMES if not n.startswith("k_")]


def test_k_names_are_aliases():
    for name in SAMPLER_NAMES:
        if name.startswith("k_"):
            assert canonical_sampler_name(name) == name[2:]
            assert samplers.scheduler_class(name) is samplers.scheduler_class(name[2:])


@pytest.mark.parametrize("name", CANONICAL)
def test_every_name_constructs_with_the_sd_schedule(name):
    s = get_scheduler(name)
    assert type(s).__name__ == CLASSES[canonical_sampler_name(name)]
    cfg = s.config
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (1000, 0.00085, 0.012, "scaled_linear")
    assert cfg.prediction_type == "epsilon"
    expected = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2)
    torch.testing.assert_close(s.betas.float(), expected)
    v = get_scheduler(name, v_parameterization=True)
    assert v.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", CANONICAL)
@pytest.mark.parametrize("v_pred", [False, True])
def test_every_sampler_runs_a_short_loop(name, v_pred):
    s = get_scheduler(name, v_parameterization=v_pred)
    s.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=g) * s.init_noise_sigma
    kwargs = samplers.step_kwargs(s, eta=0.5, generator=torch.Generator().manual_seed(1))
    for t in s.timesteps:
        inp = s.scale_model_input(x, t)
        x = s.step(0.5 * inp, t, x, **kwargs).prev_sample  # a stand-in denoiser
    assert torch.isfinite(x).all()


def test_algorithm_types_and_offsets():
    assert get_scheduler("dpmsolver").config.algorithm_type == "dpmsolver"
    assert get_scheduler("dpmsolver++").config.algorithm_type == "dpmsolver++"
    assert get_scheduler("ddim").config.steps_offset == 1
    assert get_scheduler("ddim", force_zero_steps_offset=True).config.steps_offset == 0
    assert get_scheduler("ddim").config.clip_sample is False
    assert get_scheduler("EULER_A").config.prediction_type == "epsilon"  # case-insensitive


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserInputError) as e:
        get_scheduler("dpm++_2m_karras")
    assert "dpm++_2m_karras" in str(e.value) and "k_dpm_2_a" in str(e.value) and "ddim" in str(e.value)


def test_eta_goes_to_ddim_only():
    assert samplers.step_kwargs(get_scheduler("ddim"), eta=0.3) == {"eta": 0.3}
    assert "eta" not in samplers.step_kwargs(get_scheduler("euler"), eta=0.3)
    g = torch.Generator()
    assert samplers.step_kwargs(get_scheduler("euler_a"), generator=g)["generator"] is g


def test_ddim_eta_changes_the_result():
    outs = []
    for eta in (0.0, 1.0):
        s = get_scheduler("ddim")
        s.set_timesteps(4)
        x = torch.ones(1, 4, 2, 2)
        for t in s.timesteps:
            x = s.step(0.1 * x, t, x, **samplers.step_kwargs(s, eta, torch.Generator().manual_seed(0))).prev_sample
        outs.append(x)
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmsolver++"])
def test_zero_terminal_snr(name):
    s = get_scheduler(name, zero_terminal_snr=True)
    assert float(s.alphas_cumprod[-1]) < 1e-6
    s.set_timesteps(4)
    assert torch.isfinite(s.timesteps.float()).all()


def test_zero_terminal_snr_betas_formula():
    betas = samplers.zero_terminal_snr_betas().double()
    ac = torch.cumprod(1 - betas, 0)
    base = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    s, s0, sT = base.sqrt(), base[0].sqrt(), base[-1].sqrt()
    torch.testing.assert_close(ac.sqrt(), (s - sT) * s0 / (s0 - sT), atol=1e-5, rtol=1e-4)
    assert float(ac[-1]) == pytest.approx(0.0, abs=1e-12)


def test_lms_coefficients_are_exact_integrals():
    s = get_scheduler("lms")
    s.set_timesteps(10)
    sig = s.sigmas.double().numpy()
    for order in (1, 2, 3, 4):
        t = 5
        for cur in range(order):
            def basis(tau):
                out = np.ones_like(tau)
                for k in range(order):
                    if k != cur:
                        out *= (tau - sig[t - k]) / (sig[t - cur] - sig[t - k])
                return out

            grid = np.linspace(sig[t], sig[t + 1], 20001)
            numeric = np.trapezoid(basis(grid), grid)
            assert s.get_lms_coefficient(order, t, cur) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_fresh_copy_has_no_state():
    s = get_scheduler("dpmsolver++")
    s.set_timesteps(5)
    x = torch.randn(1, 4, 2, 2)
    s.step(x, s.timesteps[0], x)
    c = samplers.fresh_copy(s)
    assert type(c) is type(s) and c.config == s.config and c.step_index is None
