"""Consistency checks on parsed training options that need nothing but the options.

``verify_training_args(args)`` fixes up implied settings in place (e.g. writing
latents to disk implies caching them) and raises ``UserInputError`` naming the
options for combinations that cannot work. It reads every attribute with
``getattr`` and a default, so any script's namespace can be passed; options a
script does not have are simply treated as unset.

Standard library only (no torch): checks that need the installed torch version or
the dataset live with the code that needs those.
"""

from __future__ import annotations

import logging
from typing import Any

from library.errors import UserInputError

logger = logging.getLogger(__name__)


def _get(args: Any, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _check_legacy_optimizer_flags(args: Any) -> None:
    use_8bit_adam = bool(_get(args, "use_8bit_adam", False))
    use_lion = bool(_get(args, "use_lion_optimizer", False))
    if not (use_8bit_adam or use_lion):
        return
    optimizer_type = _get(args, "optimizer_type", "") or ""
    if use_8bit_adam and use_lion:
        raise UserInputError(
            "--use_8bit_adam and --use_lion_optimizer cannot be used together; "
            "choose one optimizer with --optimizer_type"
        )
    legacy, replacement = ("--use_8bit_adam", "AdamW8bit") if use_8bit_adam else ("--use_lion_optimizer", "Lion")
    if optimizer_type:
        raise UserInputError(
            f"{legacy} cannot be combined with --optimizer_type {optimizer_type}; "
            f"drop {legacy} (it means --optimizer_type {replacement})"
        )
    logger.warning(f"{legacy} is deprecated; use --optimizer_type {replacement} instead")
    # Normalise to the modern spelling so later code has one place to look.
    args.optimizer_type = replacement
    args.use_8bit_adam = False
    args.use_lion_optimizer = False


def verify_training_args(args: Any) -> Any:
    """Check option combinations and fill in implied values; returns ``args`` (modified in place)."""
    # Misspelled legacy option wins over the correct one when given.
    caption_extention = _get(args, "caption_extention")
    if caption_extention is not None:
        logger.warning("--caption_extention is a misspelled legacy option; use --caption_extension")
        args.caption_extension = caption_extention

    if _get(args, "cache_latents_to_disk", False) and not _get(args, "cache_latents", False):
        args.cache_latents = True

    if _get(args, "cache_text_encoder_outputs_to_disk", False) and not _get(
        args, "cache_text_encoder_outputs", False
    ):
        args.cache_text_encoder_outputs = True

    if _get(args, "adaptive_noise_scale") is not None and _get(args, "noise_offset") is None:
        raise UserInputError("--adaptive_noise_scale needs --noise_offset to be set as well")

    v_param = bool(_get(args, "v_parameterization", False))
    if _get(args, "scale_v_pred_loss_like_noise_pred", False) and not v_param:
        raise UserInputError("--scale_v_pred_loss_like_noise_pred only works together with --v_parameterization")
    if _get(args, "v_pred_like_loss") and v_param:
        raise UserInputError("--v_pred_like_loss cannot be used with --v_parameterization")

    mixed_precision = _get(args, "mixed_precision", "no") or "no"
    if _get(args, "full_fp16", False) and mixed_precision != "fp16":
        raise UserInputError(
            f"--full_fp16 needs --mixed_precision fp16 (got --mixed_precision {mixed_precision})"
        )
    if _get(args, "full_bf16", False) and mixed_precision != "bf16":
        raise UserInputError(
            f"--full_bf16 needs --mixed_precision bf16 (got --mixed_precision {mixed_precision})"
        )
    if _get(args, "fp8_base", False) and mixed_precision == "no":
        raise UserInputError("--fp8_base needs --mixed_precision fp16 or bf16 (got --mixed_precision no)")

    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        value = _get(args, name)
        if value is not None and value <= 0:
            logger.info(f"--{name} {value} is not positive; treating it as unset")
            setattr(args, name, None)

    _check_legacy_optimizer_flags(args)
    return args


__all__ = ["verify_training_args"]
