"""Architecture-neutral rectified-flow helpers for SD3 and FLUX (training-math.md §3.2, §4, §5).

Only timestep/sigma sampling and loss weighting live here; packing, model calls and
prediction types belong to the architecture modules. Conventions: ``σ ∈ [0, 1]`` is the
noise level (``x_σ = (1 − σ)·x0 + σ·ε``), the model timestep is ``t = 1000·σ``.

    fm_cfg = FlowMatchConfig.from_args(args)
    sigmas, timesteps = sample_flux_sigmas(fm_cfg, B, image_seq_len=h*w, generator=g)   # FLUX
    sigmas, timesteps = sample_sd3_sigmas(fm_cfg, B, generator=g)                       # SD3
    x = noisy_input(x0, noise, sigmas)
    weighting = loss_weighting(fm_cfg.weighting_scheme, sigmas)    # -> losses.per_sample_loss
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from library.errors import UserInputError

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class FlowMatchConfig:
    """Sampling/weighting options shared by the SD3 and FLUX trainers (G-DIT, G-FLUX, G-SD3)."""

    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    timestep_sampling: str = "sigma"  # FLUX only
    sigmoid_scale: float = 1.0  # FLUX only
    discrete_flow_shift: float = 3.0  # FLUX only
    training_shift: float = 1.0  # SD3 only
    min_timestep: Optional[int] = None  # SD3 only
    max_timestep: Optional[int] = None  # SD3 only
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserInputError(
                f"--weighting_scheme {self.weighting_scheme!r} is not one of {', '.join(WEIGHTING_SCHEMES)}"
            )
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise UserInputError(
                f"--timestep_sampling {self.timestep_sampling!r} is not one of {', '.join(TIMESTEP_SAMPLINGS)}"
            )
        for name in ("discrete_flow_shift", "training_shift"):
            if not getattr(self, name) > 0:
                raise UserInputError(f"--{name} must be > 0 (got {getattr(self, name)})")

    @classmethod
    def from_args(cls, args: Any) -> "FlowMatchConfig":
        """Read the options from a parsed namespace; missing attributes take the defaults."""

        def get(name, default):
            value = getattr(args, name, None)
            return default if value is None else value

        return cls(
            weighting_scheme=str(get("weighting_scheme", "uniform")),
            logit_mean=float(get("logit_mean", 0.0)),
            logit_std=float(get("logit_std", 1.0)),
            mode_scale=float(get("mode_scale", 1.29)),
            timestep_sampling=str(get("timestep_sampling", "sigma")),
            sigmoid_scale=float(get("sigmoid_scale", 1.0)),
            discrete_flow_shift=float(get("discrete_flow_shift", 3.0)),
            training_shift=float(get("training_shift", 1.0)),
            min_timestep=getattr(args, "min_timestep", None),
            max_timestep=getattr(args, "max_timestep", None),
        )


def _draw(kind: str, shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    device = torch.device("cpu") if device is None else device
    gen_device = generator.device if generator is not None else device
    fn = torch.rand if kind == "rand" else torch.randn
    return fn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


# --------------------------------------------------------------------------------------
# §5.1 density of u, shifts


def sample_density(
    scheme: str,
    batch_size: int,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """``u ∈ [0, 1]`` per sample from the ``--weighting_scheme`` density.

    ``logit_normal``: ``sigmoid(N(logit_mean, logit_std))``; ``mode``:
    ``1 − u − mode_scale·(cos²(πu/2) − 1 + u)`` of a uniform ``u``; any other scheme: ``U(0, 1)``.
    """
    if scheme == "logit_normal":
        return torch.sigmoid(_draw("randn", (batch_size,), generator, device) * logit_std + logit_mean)
    u = _draw("rand", (batch_size,), generator, device)
    if scheme == "mode":
        return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    return u


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``s·σ / (1 + (s − 1)·σ)``: moves mass toward high noise for ``s > 1``; identity at ``s = 1``."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """``μ`` on the line through ``(256, 0.5)`` and ``(4096, 1.15)`` at the packed sequence length."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return m * image_seq_len + (base_shift - m * base_seq_len)


def exp_time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """``e^μ / (e^μ + (1/σ − 1))`` (resolution-dependent shift of FLUX)."""
    e = math.exp(mu)
    return e / (e + (1.0 / sigmas - 1.0))


def shifted_sigma_grid(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The scheduler grid ``σ_k = shift_sigmas(τ_k)``, ``τ_k = (T − k)/T``, k = 0 … T−1 (descending)."""
    tau = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
    return shift_sigmas(tau, shift)


# --------------------------------------------------------------------------------------
# sigma sampling per architecture


def sample_flux_sigmas(
    cfg: FlowMatchConfig,
    batch_size: int,
    image_seq_len: int,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX ``(σ, t)`` per sample by ``--timestep_sampling`` (§3.2); ``t = 1000·σ``.

    ``image_seq_len`` is the packed token count ``(H/16)·(W/16)``, used by ``flux_shift``.
    ``--min_timestep``/``--max_timestep`` do not apply.
    """
    T = cfg.num_train_timesteps
    kind = cfg.timestep_sampling
    if kind == "sigma":
        u = sample_density(cfg.weighting_scheme, batch_size, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                           generator, device)
        k = torch.clamp((u * T).long(), 0, T - 1)
        grid = shifted_sigma_grid(cfg.discrete_flow_shift, T).to(u.device)
        sigmas = grid[k]
    elif kind == "uniform":
        sigmas = _draw("rand", (batch_size,), generator, device)
    else:
        sigmas = torch.sigmoid(cfg.sigmoid_scale * _draw("randn", (batch_size,), generator, device))
        if kind == "shift":
            sigmas = shift_sigmas(sigmas, cfg.discrete_flow_shift)
        elif kind == "flux_shift":
            sigmas = exp_time_shift(sigmas, flux_mu(image_seq_len))
    return sigmas, sigmas * T


def sample_sd3_sigmas(
    cfg: FlowMatchConfig,
    batch_size: int,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 ``(σ, t)`` per sample (§4): shifted density sample mapped into ``[t_min, t_max)``.

    ``u ← shift_sigmas(u, --training_shift)``, ``t = ⌊u·(t_max − t_min) + t_min⌋`` (float
    values), ``σ = t / 1000``.
    """
    T = cfg.num_train_timesteps
    t_min = 0 if cfg.min_timestep is None else int(cfg.min_timestep)
    t_max = T if cfg.max_timestep is None else int(cfg.max_timestep)
    u = sample_density(cfg.weighting_scheme, batch_size, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                       generator, device)
    u = shift_sigmas(u, cfg.training_shift)
    timesteps = torch.floor(u * (t_max - t_min) + t_min)
    return timesteps / T, timesteps


# --------------------------------------------------------------------------------------
# §5.2 loss weighting, noisy input


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight: ``σ^−2`` (sigma_sqrt), ``2/(π(1 − 2σ + 2σ²))`` (cosmap), else 1."""
    s = sigmas.to(torch.float32)
    if scheme == "sigma_sqrt":
        return s ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s * s))
    return torch.ones_like(s)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_σ = (1 − σ)·x0 + σ·ε`` with per-sample ``σ`` (B,) broadcast over the other dims."""
    s = sigmas.to(device=x0.device, dtype=torch.float32).reshape(-1, *([1] * (x0.ndim - 1)))
    return ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)


__all__ = [
    "FlowMatchConfig",
    "TIMESTEP_SAMPLINGS",
    "WEIGHTING_SCHEMES",
    "exp_time_shift",
    "flux_mu",
    "loss_weighting",
    "noisy_input",
    "sample_density",
    "sample_flux_sigmas",
    "sample_sd3_sigmas",
    "shift_sigmas",
    "shifted_sigma_grid",
]
