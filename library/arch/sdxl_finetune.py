"""What full fine-tuning of SDXL needs beyond SDXLArchitecture (used by sdxl_train.py).

The fine-tuning trainer (library/training/finetune_trainer.py) never names SDXL; it asks
this object:

* ``trainable_parts(args)``: which models are trained and at which learning rate
  (U-Net: ``--learning_rate``, or ``--block_lr``; text encoders with
  ``--train_text_encoder``: ``--learning_rate_te1/te2``, default ``--learning_rate``); a
  learning rate of 0 or below freezes that part;
* ``param_groups(models, parts, block_lrs)``: optimizer parameter groups, one per U-Net
  block under ``--block_lr`` (23 blocks, see ``block_lr_index``);
* ``freeze_unused(models)``: text encoder 1's last layer and final layer norm take no part
  in SDXL's conditioning (hidden_states[11] is the output of its 11th of 12 layers);
* ``save_format(args, source)`` / ``save_full_model(...)``: single file (.safetensors /
  .ckpt) or diffusers folder.

Text conditioning of a batch (token ids, weighted captions, cached outputs), the
text-encoder cache and the bucket rule come from SDXLArchitecture itself, as for LoRA
training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from library.arch.sdxl import SDXLArchitecture
from library.errors import UserInputError

logger = logging.getLogger(__name__)

BLOCK_LR_COUNT = 23
BLOCK_LR_NAMES = (
    ["time/label embedding"]
    + [f"input block {i}" for i in range(9)]
    + [f"middle block part {i}" for i in range(3)]
    + [f"output block {i}" for i in range(9)]
    + ["out"]
)


def block_lr_index(param_name: str) -> int:
    """Index (0-22) of a U-Net parameter in the 23 `--block_lr` values.

    0 time_embed / label_emb; 1-9 input_blocks.0-8; 10-12 middle_block.0-2 (res block,
    transformer, res block); 13-21 output_blocks.0-8; 22 out.
    """
    parts = param_name.split(".")
    head = parts[0]
    if head in ("time_embed", "label_emb"):
        return 0
    if head == "out":
        return 22
    base = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}.get(head)
    if base is None or len(parts) < 2 or not parts[1].isdigit():
        raise UserInputError(f"--block_lr: U-Net parameter {param_name!r} belongs to no SDXL block")
    index = base + int(parts[1])
    limit = {"input_blocks": 9, "middle_block": 12, "output_blocks": 21}[head]
    if index > limit:
        raise UserInputError(
            f"--block_lr: U-Net parameter {param_name!r} lies outside SDXL's block layout "
            f"(9 input blocks, 3 middle parts, 9 output blocks); this model cannot use --block_lr"
        )
    return index


def parse_block_lr(text) -> list[float]:
    """The 23 values of --block_lr (a comma-separated string, or a list from a TOML file)."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [x for x in str(text).replace(" ", "").split(",")]
    try:
        values = [float(x) for x in items]
    except ValueError:
        raise UserInputError(f"--block_lr {text!r}: expected {BLOCK_LR_COUNT} comma-separated numbers") from None
    if len(values) != BLOCK_LR_COUNT:
        raise UserInputError(
            f"--block_lr: expected {BLOCK_LR_COUNT} values (time/label embedding, 9 input blocks, 3 middle parts, "
            f"9 output blocks, out), got {len(values)}"
        )
    return values


@dataclass
class TrainablePart:
    key: str  # attribute of SDXLModels: unet, text_encoder1, text_encoder2
    label: str  # for logs and errors
    lr: float | None  # None: not trained

    @property
    def trained(self) -> bool:
        return self.lr is not None


def _frozen_lr(value: float | None, what: str) -> float | None:
    """A learning rate <= 0 freezes; negative values are not gradient ascent here."""
    if value is None:
        return None
    if value < 0:
        logger.warning("%s: learning rate %g is negative; %s is frozen (not trained)", what, value, what)
        return None
    return value if value > 0 else None


@dataclass
class SDXLFineTuneArchitecture(SDXLArchitecture):
    """SDXLArchitecture plus the pieces of a full fine-tune."""

    name = "sdxl"

    # ------------------------------------------------------------------ checks
    def check_finetune_args(self, args) -> list[float] | None:
        """Option rules of sdxl_train.py that need no model; returns the --block_lr values."""
        block_lrs = parse_block_lr(args.block_lr) if getattr(args, "block_lr", None) else None
        if getattr(args, "train_text_encoder", False) and getattr(args, "cache_text_encoder_outputs", False):
            raise UserInputError(
                "--cache_text_encoder_outputs cannot be used with --train_text_encoder: the outputs of text encoders "
                "being trained change every step; drop one of them"
            )
        if not getattr(args, "train_text_encoder", False):
            for opt in ("learning_rate_te1", "learning_rate_te2"):
                if getattr(args, opt, None) is not None:
                    logger.warning("--%s has no effect without --train_text_encoder", opt)
        return block_lrs

    # ------------------------------------------------------------------ what is trained
    def trainable_parts(self, args, block_lrs=None) -> list[TrainablePart]:
        lr = args.learning_rate
        if block_lrs is not None:
            unet_lr = max(block_lrs) if max(block_lrs) > 0 else None  # the blocks carry their own values
        else:
            unet_lr = _frozen_lr(lr, "U-Net (--learning_rate)")
        parts = [TrainablePart("unet", "U-Net", unet_lr)]
        for i, opt in ((1, "learning_rate_te1"), (2, "learning_rate_te2")):
            te_lr = None
            if getattr(args, "train_text_encoder", False):
                value = getattr(args, opt, None)
                te_lr = _frozen_lr(lr if value is None else value, f"text encoder {i} (--{opt})")
            parts.append(TrainablePart(f"text_encoder{i}", f"text encoder {i}", te_lr))
        return parts

    @staticmethod
    def freeze_unused(models, parts) -> None:
        """Text encoder 1 feeds SDXL from hidden_states[11]: its last layer and final norm get no gradient."""
        if not any(p.key == "text_encoder1" and p.trained for p in parts):
            return
        te1 = models.text_encoder1
        inner = getattr(te1, "text_model", te1)
        inner.encoder.layers[-1].requires_grad_(False)
        inner.final_layer_norm.requires_grad_(False)

    def param_groups(self, models, parts, block_lrs=None) -> list[dict]:
        """Optimizer groups: {"params", "lr", "name"}; frozen blocks/parts are left out."""
        groups: list[dict] = []
        for part in parts:
            if not part.trained:
                continue
            module = getattr(models, part.key)
            if part.key == "unet" and block_lrs is not None:
                per_block: list[list] = [[] for _ in range(BLOCK_LR_COUNT)]
                for name, p in module.named_parameters():
                    per_block[block_lr_index(name)].append(p)
                for i, (value, params) in enumerate(zip(block_lrs, per_block)):
                    if value < 0:
                        logger.warning("--block_lr: %s has learning rate %g; it is frozen", BLOCK_LR_NAMES[i], value)
                    if value > 0 and params:
                        groups.append({"params": params, "lr": value, "name": f"unet block{i}"})
                    else:
                        for p in params:
                            p.requires_grad_(False)
                continue
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": part.lr, "name": part.key})
        return groups

    # ------------------------------------------------------------------ saving
    @staticmethod
    def save_format(args, source_path: str) -> str:
        """--save_model_as, else the kind of the loaded model (a single .ckpt stays .ckpt
        unless --use_safetensors; a diffusers folder stays a folder)."""
        import os

        use_st = bool(getattr(args, "use_safetensors", False))
        if getattr(args, "save_model_as", None):
            fmt = args.save_model_as.lower()
            if use_st and fmt in ("ckpt", "diffusers"):  # --use_safetensors asks for safetensors storage
                fmt = "safetensors" if fmt == "ckpt" else "diffusers_safetensors"
            return fmt
        if os.path.isdir(source_path):
            return "diffusers_safetensors" if use_st else "diffusers"
        if source_path.lower().endswith(".ckpt") and not use_st:
            return "ckpt"
        return "safetensors"

    @staticmethod
    def model_file_suffix(fmt: str) -> str:
        return {"safetensors": ".safetensors", "ckpt": ".ckpt"}.get(fmt, "")

    def save_full_model(self, models, path: str, fmt: str, save_dtype=None, metadata=None, tokenizers=None,
                        epoch: int = 0, global_step: int = 0) -> str:
        from library.models.sdxl.saving import save_sdxl_model

        save_sdxl_model(models, path, fmt, save_dtype, metadata, v_parameterization=self.v_parameterization,
                        tokenizers=tokenizers, epoch=epoch, global_step=global_step)
        return path

    def modelspec_kwargs(self) -> dict:
        return {"sdxl": True}


__all__ = [
    "BLOCK_LR_COUNT",
    "BLOCK_LR_NAMES",
    "SDXLFineTuneArchitecture",
    "TrainablePart",
    "block_lr_index",
    "parse_block_lr",
]
