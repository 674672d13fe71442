"""Training losses (training-math.md §1 steps 4-6, §2.5, §7, §9, §10).

One step of the pipeline, per sample ``b``::

    ℓ = L(pred, target)                 element-wise: l2 | l1 | huber | smooth_l1 (§7)
    ℓ = ℓ · weighting                   flow-matching loss weights (SD3/FLUX), if any
    ℓ = ℓ · mask                        masked loss (§9), mask resized with area interpolation
    ℓ_b = mean of ℓ over non-batch dims (not re-normalised by the mask area)
    ℓ_b = ℓ_b · w_b                     per-sample weights (prior_loss_weight for is_reg)
    ℓ_b = SNR post-processing           SD/SDXL only: min-SNR → v-scale → v-like → debiased

The trainer then takes ``.mean()`` over the batch. ``per_sample_loss`` does steps 1-5 for
any architecture, ``ddpm_loss`` adds step 6 for SD/SDXL::

    loss_cfg = LossConfig.from_args(args)
    mask = loss_mask_from_batch(batch, loss_cfg.masked_loss)
    loss = ddpm_loss(pred, step.target, step.timesteps, loss_cfg, tables,
                     noise_cfg.v_parameterization, mask=mask,
                     sample_weights=batch["loss_weights"]).mean()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from library.errors import UserInputError

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CAP = 1000.0


@dataclass(frozen=True)
class LossConfig:
    """The loss options of one training run (G-TRAIN / G-CUSTOM / G-MASK groups)."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: Optional[float] = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: Optional[float] = None
    debiased_estimation_loss: bool = False
    masked_loss: bool = False
    prior_loss_weight: float = 1.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise UserInputError(f"--loss_type {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if self.uses_huber_c:
            if self.huber_schedule not in HUBER_SCHEDULES:
                raise UserInputError(
                    f"--huber_schedule {self.huber_schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}"
                )
            if self.huber_schedule == "exponential" and not self.huber_c > 0:
                raise UserInputError(
                    f"--huber_schedule exponential needs --huber_c > 0 (got {self.huber_c}); "
                    "its decay rate is -ln(huber_c)/1000"
                )

    @classmethod
    def from_args(cls, args: Any) -> "LossConfig":
        """Read the options from a parsed namespace; missing attributes count as unset."""

        def get(name, default):
            value = getattr(args, name, None)
            return default if value is None else value

        return cls(
            loss_type=str(get("loss_type", "l2")),
            huber_schedule=str(get("huber_schedule", "snr")),
            huber_c=float(get("huber_c", 0.1)),
            huber_scale=float(get("huber_scale", 1.0)),
            min_snr_gamma=getattr(args, "min_snr_gamma", None),
            scale_v_pred_loss_like_noise_pred=bool(get("scale_v_pred_loss_like_noise_pred", False)),
            v_pred_like_loss=getattr(args, "v_pred_like_loss", None),
            debiased_estimation_loss=bool(get("debiased_estimation_loss", False)),
            masked_loss=bool(get("masked_loss", False)),
            prior_loss_weight=float(get("prior_loss_weight", 1.0)),
        )

    @property
    def uses_huber_c(self) -> bool:
        return self.loss_type in ("huber", "smooth_l1")

    def check_schedule_support(self, has_alphas_cumprod: bool) -> None:
        """Raise before training when the Huber ``snr`` schedule meets a model without ᾱ_t (SD3/FLUX)."""
        if self.uses_huber_c and self.huber_schedule == "snr" and not has_alphas_cumprod:
            raise UserInputError(
                f"--loss_type {self.loss_type} with --huber_schedule snr (the default) needs a DDPM "
                "noise schedule (SD/SDXL); use --huber_schedule constant or exponential with this model"
            )


# --------------------------------------------------------------------------------------
# §7 element-wise loss


def huber_threshold(
    timesteps: torch.Tensor,
    schedule: str,
    huber_c: float,
    huber_scale: float = 1.0,
    alphas_cumprod: Optional[torch.Tensor] = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Per-sample Huber threshold ``c`` (float32, shape of ``timesteps``).

    * ``constant``: ``huber_c · huber_scale``
    * ``exponential``: ``huber_scale · exp(−α t)`` with ``α = −ln(huber_c) / T``
    * ``snr``: ``(1 − huber_c) / (1 + σ_t)² + huber_c`` with ``σ_t = √((1 − ᾱ_t)/ᾱ_t)``
      (no scale; needs the DDPM ``alphas_cumprod`` table, integer timesteps)
    """
    t = timesteps
    if schedule == "constant":
        return torch.full(t.shape, huber_c * huber_scale, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * t.to(torch.float32)) * huber_scale
    if schedule == "snr":
        if alphas_cumprod is None:
            raise UserInputError(
                "--huber_schedule snr needs a DDPM noise schedule (SD/SDXL); "
                "use --huber_schedule constant or exponential with this model"
            )
        a = alphas_cumprod.to(t.device)[t.long()].to(torch.float32)
        sigma = ((1.0 - a) / a).sqrt()
        return (1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c
    raise UserInputError(f"--huber_schedule {schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")


def _batch_view(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) or (B, 1, ...) values reshaped to broadcast against an ``ndim`` tensor."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def elementwise_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    huber_c: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``L(pred, target)`` per element; ``huber_c`` is a per-sample (B,) tensor for huber/smooth_l1."""
    d = pred - target
    if loss_type == "l2":
        return d * d
    if loss_type == "l1":
        return d.abs()
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs per-sample huber_c values")
        c = torch.as_tensor(huber_c, device=d.device, dtype=d.dtype)
        if c.ndim > 0:
            c = _batch_view(c, d.ndim)
        smooth = 2.0 * (torch.sqrt(d * d + c * c) - c)
        return smooth * c if loss_type == "huber" else smooth
    raise UserInputError(f"--loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


# --------------------------------------------------------------------------------------
# §9 masks


def loss_mask_from_batch(batch: Mapping[str, Any], masked_loss: bool = False) -> Optional[torch.Tensor]:
    """The (B, 1, H, W) loss mask in [0, 1] of a batch, or ``None`` when masking is off.

    Masking is on with ``--masked_loss`` or whenever the batch carries alpha masks. The
    conditioning image's red channel, mapped from [-1, 1] to [0, 1], wins over alpha masks
    (ControlNet-kind datasets); alpha masks are (B, H, W) values in [0, 1].
    """
    alpha = batch.get("alpha_masks")
    if not (masked_loss or alpha is not None):
        return None
    cond = batch.get("conditioning_images")
    if cond is not None:
        return cond[:, :1].float() / 2.0 + 0.5
    if alpha is not None:
        return alpha.float().unsqueeze(1)
    return None


def apply_loss_mask(loss: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``loss · mask`` with the mask area-resized to the loss's spatial size and broadcast over channels."""
    if mask is None:
        return loss
    if mask.ndim == loss.ndim - 1:
        mask = mask.unsqueeze(1)
    mask = mask.to(device=loss.device, dtype=loss.dtype)
    if tuple(mask.shape[2:]) != tuple(loss.shape[2:]):
        mask = F.interpolate(mask, size=tuple(loss.shape[2:]), mode="area")
    return loss * mask


def mean_per_sample(loss: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return loss.reshape(loss.shape[0], -1).mean(dim=1)


def reg_sample_weights(is_reg, prior_loss_weight: float, device=None) -> torch.Tensor:
    """Per-sample weights: ``prior_loss_weight`` for regularization samples, 1 otherwise."""
    return torch.tensor([prior_loss_weight if r else 1.0 for r in is_reg], dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------
# §2.5 SNR post-processing (SD/SDXL)


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ weight: ``min(S, γ)/S`` (ε-prediction) or ``min(S, γ)/(S + 1)`` (v-prediction)."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if v_prediction else clipped / snr


def v_noise_scale(snr: torch.Tensor) -> torch.Tensor:
    """``S'/(S' + 1)`` with ``S' = min(S, 1000)``: makes a v-pred loss look like an ε-pred one."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return capped / (capped + 1.0)


def debiased_weight(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation: ``1/√S'`` (ε-prediction) or ``1/(S' + 1)`` (v-prediction)."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return 1.0 / (capped + 1.0) if v_prediction else 1.0 / capped.sqrt()


def snr_post_process(loss: torch.Tensor, snr: torch.Tensor, cfg: LossConfig, v_prediction: bool) -> torch.Tensor:
    """Apply the SNR options to per-sample losses (B,), in the order min-SNR → v-scale → v-like → debiased."""
    snr = snr.to(device=loss.device, dtype=torch.float32)
    if cfg.min_snr_gamma:
        loss = loss * min_snr_weight(snr, cfg.min_snr_gamma, v_prediction)
    if cfg.scale_v_pred_loss_like_noise_pred:
        loss = loss * v_noise_scale(snr)
    if cfg.v_pred_like_loss:
        loss = loss + cfg.v_pred_like_loss * loss / v_noise_scale(snr)
    if cfg.debiased_estimation_loss:
        loss = loss * debiased_weight(snr, v_prediction)
    return loss


# --------------------------------------------------------------------------------------
# entry points


def per_sample_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    cfg: LossConfig,
    timesteps: Optional[torch.Tensor] = None,
    *,
    huber_c: Optional[torch.Tensor] = None,
    alphas_cumprod: Optional[torch.Tensor] = None,
    num_train_timesteps: int = 1000,
    weighting: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    sample_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Steps 4-5 of the pipeline for any architecture; returns float32 losses of shape (B,).

    ``huber_c`` (B,) is computed from ``timesteps`` and ``cfg`` when not given (the ``snr``
    schedule also needs ``alphas_cumprod``). ``weighting`` is (B,) or broadcastable to the
    prediction; ``mask`` is (B, 1, H, W) or (B, H, W); ``sample_weights`` is (B,).
    """
    pred = pred.float()
    target = target.float()
    if cfg.uses_huber_c and huber_c is None:
        if timesteps is None:
            raise ValueError(f"loss_type {cfg.loss_type} needs timesteps (or huber_c)")
        huber_c = huber_threshold(
            timesteps, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale, alphas_cumprod, num_train_timesteps
        )
    loss = elementwise_loss(pred, target, cfg.loss_type, huber_c)
    if weighting is not None:
        w = weighting.to(device=loss.device, dtype=loss.dtype)
        if w.ndim == 1:
            w = _batch_view(w, loss.ndim)
        loss = loss * w
    loss = apply_loss_mask(loss, mask)
    loss = mean_per_sample(loss)
    if sample_weights is not None:
        loss = loss * sample_weights.to(device=loss.device, dtype=loss.dtype)
    return loss


def ddpm_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    cfg: LossConfig,
    tables,
    v_parameterization: bool,
    mask: Optional[torch.Tensor] = None,
    sample_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SD/SDXL per-sample loss (B,): ``per_sample_loss`` then SNR post-processing.

    ``tables`` is a ``noise.DDPMTables``: its ``alphas_cumprod`` feeds the Huber ``snr``
    schedule, its ``snr`` (from the original betas) the SNR weights.
    """
    loss = per_sample_loss(
        pred,
        target,
        cfg,
        timesteps,
        alphas_cumprod=tables.alphas_cumprod,
        num_train_timesteps=tables.num_train_timesteps,
        mask=mask,
        sample_weights=sample_weights,
    )
    snr_t = tables.snr.to(timesteps.device)[timesteps.long()]
    return snr_post_process(loss, snr_t, cfg, v_parameterization)


__all__ = [
    "HUBER_SCHEDULES",
    "LOSS_TYPES",
    "LossConfig",
    "apply_loss_mask",
    "ddpm_loss",
    "debiased_weight",
    "elementwise_loss",
    "huber_threshold",
    "loss_mask_from_batch",
    "mean_per_sample",
    "min_snr_weight",
    "per_sample_loss",
    "reg_sample_weights",
    "snr_post_process",
    "v_noise_scale",
]
