"""Convert an SD1.x/2.x model between a diffusers folder and an LDM single file.

    python tools/convert_diffusers20_original_sd.py model.safetensors out_folder --use_safetensors
    python tools/convert_diffusers20_original_sd.py diffusers_folder model.safetensors --fp16

The direction follows the paths: a folder is read as diffusers, a file as a single file;
an output with an extension (.ckpt/.safetensors) is written as a single file, otherwise
as a diffusers folder. Version (v1/v2) and every size are read from the model itself.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert SD1.x/2.x between diffusers folders and LDM single files.")
    p.add_argument("--v1", action="store_true", help="the input is SD 1.x (checked against the weights)")
    p.add_argument("--v2", action="store_true", help="the input is SD 2.x (checked against the weights)")
    p.add_argument("--unet_use_linear_projection", action="store_true",
                   help="accepted for compatibility: linear projections are detected from the weights")
    p.add_argument("--fp16", action="store_true", help="load a diffusers input in fp16 and save the single file in fp16")
    p.add_argument("--bf16", action="store_true", help="save the single file in bf16")
    p.add_argument("--float", action="store_true", help="save the single file in float32")
    p.add_argument("--save_precision_as", type=str, default="no", choices=["fp16", "bf16", "float"],
                   help="precision of the saved weights (alternative to --fp16/--bf16/--float)")
    p.add_argument("--epoch", type=int, default=0, help="epoch number stored in a .ckpt output")
    p.add_argument("--global_step", type=int, default=0, help="global_step stored in a .ckpt output")
    p.add_argument("--metadata", type=str, default=None,
                   help="safetensors metadata as a Python dict literal, e.g. \"{'name': 'my model'}\"")
    p.add_argument("--variant", type=str, default=None, help="diffusers weight variant to read (e.g. fp16)")
    p.add_argument("--reference_model", type=str, default=None,
                   help="diffusers model (folder or hub id) whose scheduler and tokenizer go into a diffusers output")
    p.add_argument("--use_safetensors", action="store_true", help="write diffusers weights as .safetensors")
    p.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="where to find the tokenizer for a diffusers output when no --reference_model is given")
    p.add_argument("model_to_load", type=str, default=None, help="input: single file or diffusers folder")
    p.add_argument("model_to_save", type=str, default=None, help="output: file with extension, or a folder")
    return p


def _save_dtype(args):
    from library.errors import UserInputError
    from library.models.dtypes import dtype_from_precision

    chosen = [name for name in ("fp16", "bf16", "float") if getattr(args, name)]
    if args.save_precision_as != "no":
        chosen = [args.save_precision_as]
    if len(chosen) > 1:
        raise UserInputError(f"choose one save precision, got --{' and --'.join(chosen)}")
    return dtype_from_precision(chosen[0] if chosen else None, "--save_precision_as")


def _parse_metadata(text):
    import ast

    from library.errors import UserInputError

    if text is None:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise UserInputError(f"--metadata: not a Python dict literal ({e})") from None
    if not isinstance(value, dict):
        raise UserInputError("--metadata: expected a dict literal like \"{'key': 'value'}\"")
    return {str(k): str(v) for k, v in value.items()}


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)

    from library.errors import UserInputError
    from library.log import setup_logging

    setup_logging()
    logger = __import__("logging").getLogger("convert")
    if args.v1 and args.v2:
        raise UserInputError("--v1 and --v2 contradict each other")
    src, dst = args.model_to_load, args.model_to_save
    if not os.path.exists(src):
        raise UserInputError(f"model_to_load {src}: not found")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise UserInputError(f"model_to_save {dst}: same as the input; choose another path")
    to_single_file = bool(os.path.splitext(dst)[1])
    if to_single_file and not dst.lower().endswith((".ckpt", ".safetensors")):
        raise UserInputError(f"model_to_save {dst}: a single file must end in .ckpt or .safetensors")
    metadata = _parse_metadata(args.metadata)
    save_dtype = _save_dtype(args)

    import torch

    from library.models.sd.loading import load_sd_models
    from library.models.sd.saving import save_diffusers, save_ldm_checkpoint

    v2_flag = True if args.v2 else (False if args.v1 else None)
    if os.path.isdir(src) and args.variant:
        models = _load_diffusers_variant(src, args.variant, torch.float16 if args.fp16 else None)
    else:
        models = load_sd_models(src, v2=v2_flag, dtype=torch.float16 if (args.fp16 and os.path.isdir(src)) else None)
    if v2_flag is not None and v2_flag != models.v2:
        logger.warning("--%s given but the model is %s; converting it as what it is", "v2" if args.v2 else "v1", "SD2.x" if models.v2 else "SD1.x")

    if to_single_file:
        save_ldm_checkpoint(models, dst, save_dtype, metadata, args.epoch, args.global_step)
    else:
        tokenizer, v_pred = _reference_parts(args, models.v2, logger)
        save_diffusers(models, dst, save_dtype, args.use_safetensors, v_pred, tokenizer)
        if args.reference_model and os.path.isdir(os.path.join(args.reference_model, "scheduler")):
            import shutil

            shutil.copytree(os.path.join(args.reference_model, "scheduler"), os.path.join(dst, "scheduler"), dirs_exist_ok=True)
    print(f"converted {src} -> {dst} ({'SD2.x' if models.v2 else 'SD1.x'})")


def _load_diffusers_variant(path, variant, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from library.models.sd.loading import SDModels

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, torch_dtype=dtype)
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, torch_dtype=dtype)
    return SDModels(te, vae, unet, te.config.hidden_act == "gelu", path, "diffusers")


def _reference_parts(args, v2, logger):
    """Tokenizer and prediction type for a diffusers output."""
    import json

    tokenizer, v_pred = None, False
    if args.reference_model:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(args.reference_model, subfolder="tokenizer")
        sched = os.path.join(args.reference_model, "scheduler", "scheduler_config.json")
        if os.path.exists(sched):
            with open(sched) as f:
                v_pred = json.load(f).get("prediction_type") == "v_prediction"
        return tokenizer, v_pred
    try:
        from library.tokenizers import load_sd_tokenizer

        tokenizer = load_sd_tokenizer(v2, args.tokenizer_cache_dir)
    except Exception as e:  # noqa: BLE001 - a folder without tokenizer is still useful
        logger.warning("no tokenizer written into the diffusers folder (%s); pass --reference_model or --tokenizer_cache_dir", e)
    return tokenizer, v_pred


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
