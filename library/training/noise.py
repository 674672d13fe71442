"""DDPM noising for SD 1.x/2.x and SDXL training (training-math.md §2).

Everything here is a function of tensors and explicit settings. Randomness comes from an
optional ``torch.Generator`` (the global RNG when it is ``None``), so that a resumed run
which restores the generator state draws exactly the same noise and timesteps.

What the trainer uses::

    noise_cfg = NoiseConfig.from_args(args)                 # options, checked once
    tables = DDPMTables.create(zero_terminal_snr=noise_cfg.zero_terminal_snr).to(device)
    step = prepare_ddpm_step(latents, noise_cfg, tables, generator=g)
    pred = unet(step.noisy_latents.to(weight_dtype), step.timesteps, context)
    # step.target is eps or v (noise_cfg.v_parameterization); losses.ddpm_loss does the rest.

Random draws of one step, in this order: base noise, offset strength, offset noise,
pyramid levels, timesteps, input-perturbation strength, perturbation noise. Only the
draws of enabled features happen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from library.errors import UserInputError

# The SD/SDXL training schedule (training-math.md §2.1).
BETA_START = 0.00085
BETA_END = 0.012
BETA_SCHEDULE = "scaled_linear"
NUM_TRAIN_TIMESTEPS = 1000


# --------------------------------------------------------------------------------------
# random helpers


def _rand(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """U(0,1) float32 drawn on the generator's device (or ``device`` with the global RNG)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def _randn(shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """N(0,1) drawn in float32 on the generator's device, then moved/cast to ``device``/``dtype``."""
    gen_device = generator.device if generator is not None else device
    out = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def _strength(value: float, random_strength: bool, generator, device) -> torch.Tensor | float:
    """``value`` itself, or ``U(0,1) * value`` (one draw for the whole step)."""
    if not random_strength:
        return value
    return _rand((1,), generator, device) * value


# --------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class NoiseConfig:
    """The noise/timestep options of one SD/SDXL training run (G-TRAIN group)."""

    noise_offset: Optional[float] = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: Optional[int] = None
    max_timestep: Optional[int] = None
    zero_terminal_snr: bool = False
    v_parameterization: bool = False
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self):
        timestep_bounds(self.min_timestep, self.max_timestep, self.num_train_timesteps)

    @classmethod
    def from_args(cls, args: Any) -> "NoiseConfig":
        """Read the options from a parsed namespace; missing attributes count as unset."""

        def get(name, default=None):
            value = getattr(args, name, default)
            return default if value is None else value

        return cls(
            noise_offset=getattr(args, "noise_offset", None),
            noise_offset_random_strength=bool(get("noise_offset_random_strength", False)),
            adaptive_noise_scale=getattr(args, "adaptive_noise_scale", None),
            multires_noise_iterations=getattr(args, "multires_noise_iterations", None),
            multires_noise_discount=float(get("multires_noise_discount", 0.3)),
            ip_noise_gamma=getattr(args, "ip_noise_gamma", None),
            ip_noise_gamma_random_strength=bool(get("ip_noise_gamma_random_strength", False)),
            min_timestep=getattr(args, "min_timestep", None),
            max_timestep=getattr(args, "max_timestep", None),
            zero_terminal_snr=bool(get("zero_terminal_snr", False)),
            v_parameterization=bool(get("v_parameterization", False)),
        )

    @property
    def timestep_range(self) -> tuple[int, int]:
        """Effective ``(min_t, max_t)`` with the defaults 0 and ``num_train_timesteps`` filled in."""
        lo = 0 if self.min_timestep is None else int(self.min_timestep)
        hi = self.num_train_timesteps if self.max_timestep is None else int(self.max_timestep)
        return lo, hi

    def with_fixed_timestep(self, t: int) -> "NoiseConfig":
        """A copy that puts every sample at timestep ``t`` (used by validation)."""
        return dataclasses.replace(self, min_timestep=int(t), max_timestep=int(t))


def timestep_bounds(min_timestep, max_timestep, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, int]:
    """Check ``--min_timestep``/``--max_timestep`` against the schedule length; returns the pair."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    if not 0 <= lo <= num_train_timesteps:
        raise UserInputError(f"--min_timestep {lo} is outside 0..{num_train_timesteps}")
    if not 0 <= hi <= num_train_timesteps:
        raise UserInputError(f"--max_timestep {hi} is outside 0..{num_train_timesteps}")
    if lo >= hi and hi >= num_train_timesteps:
        # Every sample would get timestep max_t, which does not exist in the schedule.
        raise UserInputError(
            f"--min_timestep {lo} >= --max_timestep {hi} puts every sample at timestep {hi}, "
            f"but timesteps run from 0 to {num_train_timesteps - 1}; lower --max_timestep"
        )
    return lo, hi


# --------------------------------------------------------------------------------------
# schedule


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last cumulative alpha is exactly 0 while the first one is unchanged.

    The square roots of the cumulative alphas are shifted so the last one becomes 0 and
    stretched so the first keeps its value; betas are then read back from the ratios of
    consecutive cumulative alphas. Computed in float64, returned in the input dtype.
    """
    b = betas.to(torch.float64)
    root = torch.cumprod(1.0 - b, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    cum = root**2
    alphas = torch.cat([cum[:1], cum[1:] / cum[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def make_ddpm_scheduler(zero_terminal_snr: bool = False):
    """The diffusers ``DDPMScheduler`` of SD/SDXL training, rescaled in place when asked."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule=BETA_SCHEDULE,
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        clip_sample=False,
    )
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(scheduler.betas)
        scheduler.betas = betas
        scheduler.alphas = 1.0 - betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``SNR_t = ᾱ_t / (1 - ᾱ_t)``."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


@dataclass(frozen=True)
class DDPMTables:
    """Per-timestep tables of the training schedule.

    ``alphas_cumprod`` is the schedule actually used for noising, v targets and the Huber
    ``snr`` schedule (rescaled with ``--zero_terminal_snr``). ``snr`` is always computed
    from the original betas: with a zero terminal SNR the rescaled table would hold 0 at
    the last step, which the SNR-based loss weights divide by.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    snr: torch.Tensor
    zero_terminal_snr: bool = False

    @classmethod
    def create(cls, zero_terminal_snr: bool = False) -> "DDPMTables":
        original = make_ddpm_scheduler(zero_terminal_snr=False)
        snr = snr_from_alphas_cumprod(original.alphas_cumprod.to(torch.float64)).to(torch.float32)
        scheduler = make_ddpm_scheduler(zero_terminal_snr=zero_terminal_snr) if zero_terminal_snr else original
        return cls(
            betas=scheduler.betas.to(torch.float32),
            alphas_cumprod=scheduler.alphas_cumprod.to(torch.float32),
            snr=snr,
            zero_terminal_snr=zero_terminal_snr,
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def to(self, device) -> "DDPMTables":
        return dataclasses.replace(
            self,
            betas=self.betas.to(device),
            alphas_cumprod=self.alphas_cumprod.to(device),
            snr=self.snr.to(device),
        )


# --------------------------------------------------------------------------------------
# noise pieces


def sample_timesteps(
    batch_size: int,
    min_timestep: Optional[int] = None,
    max_timestep: Optional[int] = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    device=None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Integer timesteps ``~ U{min_t, ..., max_t - 1}``; all equal to ``max_t`` when ``min_t >= max_t``."""
    lo, hi = timestep_bounds(min_timestep, max_timestep, num_train_timesteps)
    device = torch.device("cpu") if device is None else device
    if lo >= hi:
        return torch.full((batch_size,), hi, dtype=torch.long, device=device)
    gen_device = generator.device if generator is not None else device
    t = torch.randint(lo, hi, (batch_size,), generator=generator, device=gen_device, dtype=torch.long)
    return t.to(device)


def offset_noise(
    latents: torch.Tensor,
    noise: torch.Tensor,
    noise_offset: float | torch.Tensor,
    adaptive_noise_scale: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``noise + o * n`` with ``n ~ N(0,1)`` of shape (B, C, 1, ..., 1).

    With ``adaptive_noise_scale a`` the strength becomes per (sample, channel):
    ``o_bc = max(0, o + a * |mean over spatial dims of latents_bc|)``.
    """
    b, c = latents.shape[:2]
    ones = (1,) * (latents.ndim - 2)
    strength = noise_offset
    if adaptive_noise_scale is not None:
        spatial = tuple(range(2, latents.ndim))
        mean_abs = latents.float().mean(dim=spatial, keepdim=True).abs()
        strength = torch.clamp(strength + adaptive_noise_scale * mean_abs, min=0.0)
    n = _randn((b, c) + ones, generator, noise.device)
    return noise + (strength * n).to(noise.dtype)


def pyramid_noise(
    noise: torch.Tensor,
    iterations: int,
    discount: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Multi-resolution noise: add coarse noise levels, then rescale to unit std.

    Level ``i`` draws N(0,1) at ``(max(1, ⌊H/r^i⌋), max(1, ⌊W/r^i⌋))`` with a fresh
    ``r ~ U(2, 4)`` (H, W: the full size), upsamples it bilinearly to (H, W) and adds it
    with weight ``discount^i``. The loop ends after the first level with a side of 1.
    The result is divided by its standard deviation over the whole tensor.
    """
    b, c, h, w = noise.shape
    out = noise.float()
    for i in range(int(iterations)):
        r = 2.0 + 2.0 * float(_rand((1,), generator, noise.device).item())
        hi_, wi_ = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = _randn((b, c, hi_, wi_), generator, noise.device)
        out = out + F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * (discount**i)
        if hi_ == 1 or wi_ == 1:
            break
    return (out / out.std()).to(noise.dtype)


def _per_sample(values: torch.Tensor, t: torch.Tensor, ndim: int, dtype) -> torch.Tensor:
    """``values[t]`` shaped (B, 1, ..., 1) for broadcasting against an ``ndim`` tensor."""
    picked = values.to(t.device)[t].to(dtype)
    return picked.reshape(picked.shape + (1,) * (ndim - 1))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε``."""
    a = _per_sample(alphas_cumprod, timesteps, latents.ndim, torch.float32)
    x = a.sqrt() * latents.float() + (1.0 - a).sqrt() * noise.float()
    return x.to(latents.dtype)


def v_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``v = √ᾱ_t · ε − √(1 − ᾱ_t) · x0``."""
    a = _per_sample(alphas_cumprod, timesteps, latents.ndim, torch.float32)
    v = a.sqrt() * noise.float() - (1.0 - a).sqrt() * latents.float()
    return v.to(latents.dtype)


def validation_timesteps(min_timestep=None, max_timestep=None, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The 4 fixed validation timesteps: inner points of ``linspace(min_t, max_t, 6)`` as ints."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    return [int(t) for t in np.linspace(lo, hi, 6)[1:-1]]


# --------------------------------------------------------------------------------------
# the per-step entry point


class DDPMStep(NamedTuple):
    noisy_latents: torch.Tensor  # x_t, dtype of the latents
    target: torch.Tensor  # ε, or v with v-parameterization
    timesteps: torch.Tensor  # (B,) long
    noise: torch.Tensor  # ε after offset/pyramid noise (what the target is built from)


def make_noise(
    latents: torch.Tensor, cfg: NoiseConfig, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """ε for one step: N(0, I), then noise offset, then pyramid noise (as configured)."""
    noise = _randn(latents.shape, generator, latents.device, latents.dtype)
    if cfg.noise_offset:
        strength = _strength(cfg.noise_offset, cfg.noise_offset_random_strength, generator, latents.device)
        noise = offset_noise(latents, noise, strength, cfg.adaptive_noise_scale, generator)
    if cfg.multires_noise_iterations:
        noise = pyramid_noise(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, generator)
    return noise


def prepare_ddpm_step(
    latents: torch.Tensor,
    cfg: NoiseConfig,
    tables: DDPMTables,
    generator: Optional[torch.Generator] = None,
    timesteps: Optional[torch.Tensor] = None,
) -> DDPMStep:
    """Noise, timesteps, noisy input and target for one SD/SDXL step (training-math.md §2.3-2.4).

    ``timesteps`` overrides sampling (for callers that choose them); otherwise they are
    drawn from ``[min_t, max_t)`` of ``cfg``. With ``--ip_noise_gamma`` the model input is
    noised with ``ε + γξ`` while the target is built from ``ε`` alone.
    """
    device = latents.device
    noise = make_noise(latents, cfg, generator)
    if timesteps is None:
        lo, hi = cfg.timestep_range
        timesteps = sample_timesteps(latents.shape[0], lo, hi, tables.num_train_timesteps, device, generator)
    else:
        timesteps = timesteps.to(device=device, dtype=torch.long)

    noise_in = noise
    if cfg.ip_noise_gamma:
        gamma = _strength(cfg.ip_noise_gamma, cfg.ip_noise_gamma_random_strength, generator, device)
        xi = _randn(latents.shape, generator, device, latents.dtype)
        noise_in = noise + (gamma * xi).to(noise.dtype)

    noisy = add_noise(latents, noise_in, timesteps, tables.alphas_cumprod)
    if cfg.v_parameterization:
        target = v_target(latents, noise, timesteps, tables.alphas_cumprod)
    else:
        target = noise
    return DDPMStep(noisy, target, timesteps, noise)


__all__ = [
    "BETA_END",
    "BETA_SCHEDULE",
    "BETA_START",
    "DDPMStep",
    "DDPMTables",
    "NUM_TRAIN_TIMESTEPS",
    "NoiseConfig",
    "add_noise",
    "make_ddpm_scheduler",
    "make_noise",
    "offset_noise",
    "prepare_ddpm_step",
    "pyramid_noise",
    "rescale_zero_terminal_snr",
    "sample_timesteps",
    "snr_from_alphas_cumprod",
    "timestep_bounds",
    "v_target",
    "validation_timesteps",
]
