"""`--sampler` / `--sample_sampler` names -> configured diffusers schedulers (SD1/2, SDXL).

Every scheduler gets the SD training schedule (training-math.md §2.1: betas
scaled_linear from 0.00085 to 0.012 over 1000 steps) and the model's prediction type
(`epsilon`, or `v_prediction` with `--v_parameterization`). The `k_*` names are aliases
of the names without the prefix.

Settings beyond the schedule (what a diffusers `StableDiffusionPipeline` would also do to a
scheduler it is given): `steps_offset=1` (0 with `--force_scheduler_zero_steps_offset`) and
`clip_sample=False`. Other settings keep the diffusers defaults of each class.

`--ddim_eta` is not a scheduler setting: it is passed to `DDIMScheduler.step` by the
sampling loop (`step_kwargs`).

`--zero_terminal_snr` uses the classes' own `rescale_betas_zero_snr` where they have it;
other classes get the rescaled betas of training-math.md §2.1 as `trained_betas`, with the
final cumulative alpha floored at 2**-24 so that sigma-based samplers stay finite.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from typing import Optional

from library.errors import UserInputError

logger = logging.getLogger(__name__)

BETA_START = 0.00085
BETA_END = 0.012
BETA_SCHEDULE = "scaled_linear"
NUM_TRAIN_TIMESTEPS = 1000

# name -> (diffusers class name, extra constructor settings)
_SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers accepts only final_sigmas_type "sigma_min" with the first-generation algorithm
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}

# The choices of --sampler / --sample_sampler, in the spec's order.
SAMPLER_NAMES = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)


def canonical_sampler_name(name: str) -> str:
    """Lower-cased name with `k_` aliases resolved; UserInputError for an unknown name."""
    key = (name or "").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _SAMPLERS:
        raise UserInputError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)}")
    return key


@functools.lru_cache(maxsize=None)
def _lms_class():
    """diffusers' LMS scheduler, with its coefficient integral done exactly (no scipy).

    diffusers integrates the Lagrange basis polynomial numerically with scipy, which is not
    a dependency of this project; the polynomial's integral is exact in closed form.
    """
    import numpy as np
    from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

    class ExactLMSDiscreteScheduler(LMSDiscreteScheduler):
        def get_lms_coefficient(self, order, t, current_order):
            sig = [float(s) for s in self.sigmas]
            poly = np.polynomial.Polynomial([1.0])
            for k in range(order):
                if k == current_order:
                    continue
                root = sig[t - k]
                poly = poly * np.polynomial.Polynomial([-root, 1.0]) / (sig[t - current_order] - root)
            antiderivative = poly.integ()
            return float(antiderivative(sig[t + 1]) - antiderivative(sig[t]))

    ExactLMSDiscreteScheduler.__name__ = "LMSDiscreteScheduler"
    ExactLMSDiscreteScheduler.__qualname__ = "LMSDiscreteScheduler"
    return ExactLMSDiscreteScheduler


def scheduler_class(name: str):
    key = canonical_sampler_name(name)
    cls_name = _SAMPLERS[key][0]
    if cls_name == "LMSDiscreteScheduler":
        return _lms_class()
    import diffusers

    return getattr(diffusers, cls_name)


def zero_terminal_snr_betas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, floor: float = 0.0):
    """Betas of the SD schedule rescaled to zero terminal SNR (training-math.md §2.1).

    `floor` > 0 keeps the final cumulative alpha at that value instead of exactly 0.
    """
    import torch

    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    alphas_cumprod = s**2
    if floor > 0:
        alphas_cumprod[-1] = floor
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (1.0 - alphas).float()


def get_scheduler(
    name: str,
    v_parameterization: bool = False,
    zero_terminal_snr: bool = False,
    force_zero_steps_offset: bool = False,
):
    """A fresh diffusers scheduler for a `--sampler` / `--sample_sampler` name."""
    key = canonical_sampler_name(name)
    cls = scheduler_class(key)
    params = inspect.signature(cls.__init__).parameters
    kwargs = dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule=BETA_SCHEDULE,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )
    kwargs.update(_SAMPLERS[key][1])
    if "steps_offset" in params:
        kwargs["steps_offset"] = 0 if force_zero_steps_offset else 1
    if "clip_sample" in params:
        kwargs["clip_sample"] = False
    if zero_terminal_snr:
        if "rescale_betas_zero_snr" in params:
            kwargs["rescale_betas_zero_snr"] = True
        else:
            kwargs["trained_betas"] = zero_terminal_snr_betas(floor=2.0**-24).tolist()
    with warnings.catch_warnings():
        # diffusers marks algorithm_type "dpmsolver" as deprecated; it is what --sampler dpmsolver means
        warnings.filterwarnings("ignore", message=".*dpmsolver.*", category=FutureWarning)
        return cls(**kwargs)


def step_kwargs(scheduler, eta: float = 0.0, generator=None) -> dict:
    """Extra arguments for `scheduler.step`: `eta` (DDIM) and the noise generator(s)."""
    params = inspect.signature(scheduler.step).parameters
    out = {}
    if "eta" in params:
        out["eta"] = eta
    elif eta:
        logger.debug("eta=%s has no effect on %s", eta, type(scheduler).__name__)
    if "generator" in params and generator is not None:
        out["generator"] = generator
    return out


def fresh_copy(scheduler):
    """A new scheduler with the same settings and no state from an earlier run."""
    return type(scheduler).from_config(scheduler.config)


def describe(scheduler) -> str:
    cfg = scheduler.config
    extra: Optional[str] = cfg.get("algorithm_type")
    return f"{type(scheduler).__name__}({cfg.prediction_type}{', ' + extra if extra else ''})"
