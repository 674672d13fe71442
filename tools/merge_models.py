"""Weighted average of checkpoints (.safetensors), tensor by tensor.

    python tools/merge_models.py --models a.safetensors b.safetensors --ratios 0.7 0.3 --output ab.safetensors
    python tools/merge_models.py --models a.safetensors b.safetensors c.safetensors --unet_only --output abc.safetensors

The first model defines the keys, shapes and order of the output. Each key becomes
sum_i ratio_i * model_i[key] (default ratios: 1/n each). A key that some model lacks takes the
first model's value for that model's share; keys only other models have are skipped
(--show_skipped lists them). With --unet_only the VAE and text-encoder tensors are the first
model's. Integer tensors (e.g. position ids) are taken from the first model unchanged. Old SD1
files whose text-encoder keys lack the `text_model.` level are matched with new ones.

Inputs are read one tensor at a time and the output is streamed to disk (written atomically),
so memory stays at a few tensors whatever the model size.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402

NON_UNET_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Weighted average of checkpoints (.safetensors).")
    p.add_argument("--models", type=str, nargs="+", default=None, help="checkpoints to merge; the first defines the keys")
    p.add_argument("--output", type=str, default=None, help="output file (.safetensors is added when missing)")
    p.add_argument("--ratios", type=float, nargs="+", default=None, help="weight per model (default: 1/n each)")
    p.add_argument("--unet_only", action="store_true", help="merge only the U-Net; VAE and text encoder from the first model")
    p.add_argument("--device", type=str, default="cpu", help="device for the arithmetic (default cpu)")
    p.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                   help="dtype of the arithmetic (default float)")
    p.add_argument("--saving_precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                   help="dtype of the saved floating-point tensors (default float)")
    p.add_argument("--show_skipped", action="store_true", help="list keys that are not in the first model")
    return p


def is_unet_key(key: str) -> bool:
    return not key.startswith(NON_UNET_PREFIXES)


def main(argv=None):
    args = setup_parser().parse_args(argv)

    import logging

    from library.errors import UserInputError
    from library.log import setup_logging
    from library.lora_tools.cli import Stopwatch, check_inputs_exist, check_output, file_size, summary

    setup_logging()
    logger = logging.getLogger("merge_models")
    if not args.models:
        raise UserInputError("--models: give the checkpoints to merge")
    if not args.output:
        raise UserInputError("--output is required: the file to write")
    output = args.output if args.output.lower().endswith(".safetensors") else args.output + ".safetensors"
    inputs = [("--models", m) for m in args.models]
    check_inputs_exist(inputs)
    for _, m in inputs:
        if not m.lower().endswith(".safetensors") or os.path.isdir(m):
            raise UserInputError(f"--models {m}: only .safetensors checkpoints can be merged (convert it first)")
    check_output(output, inputs, "--output", (".safetensors",))
    n = len(args.models)
    if args.ratios is None:
        ratios = [1.0 / n] * n
    elif len(args.ratios) != n:
        raise UserInputError(f"--ratios: {len(args.ratios)} values for {n} --models; give one ratio per model")
    else:
        ratios = list(args.ratios)
    if abs(sum(ratios) - 1.0) > 1e-6:
        logger.warning("the ratios sum to %g, not 1: the merged weights are scaled by that much", sum(ratios))
    clock = Stopwatch()

    import torch

    from library.io import modelspec
    from library.lora_tools.cli import progress
    from library.io.tensor_files import StreamingSafetensorsWriter, TensorFile
    from library.models.dtypes import dtype_from_precision
    from library.models.sd.config import normalize_clip_keys

    calc_dtype = dtype_from_precision(args.precision, "--precision")
    save_dtype = dtype_from_precision(args.saving_precision, "--saving_precision")
    files = [TensorFile(m, "--models") for m in args.models]
    try:
        # normalised key -> stored key, per file
        names = [normalize_clip_keys({k: k for k in f.keys()}) for f in files]
        first, first_names = files[0], names[0]
        specs, plan = [], []
        missing: dict[str, list[str]] = {}
        for key, stored in first_names.items():
            shape, dtype = first.shape(stored), first.dtype(stored)
            floating = dtype.is_floating_point
            merge = floating and (is_unet_key(key) or not args.unet_only)
            for f, nm in zip(files[1:], names[1:]):
                other = nm.get(key)
                if other is None:
                    if merge:
                        missing.setdefault(f.path, []).append(key)
                    continue
                if merge and f.shape(other) != shape:
                    raise UserInputError(f"--models {f.path}: '{key}' has shape {f.shape(other)}, but {shape} in "
                                         f"{first.path}; these checkpoints are not the same architecture")
            specs.append((key, save_dtype if floating else dtype, shape))
            plan.append((key, merge))
        skipped = sorted({k for nm in names[1:] for k in nm if k not in first_names})
        for path, keys in missing.items():
            logger.warning("%s lacks %d tensors of the first model (e.g. %s); the first model's values stand in for them",
                           path, len(keys), keys[0])
        if skipped:
            logger.info("%d tensors of later models are not in the first one and are skipped", len(skipped))
            if args.show_skipped:
                for k in skipped:
                    print(f"skipped: {k}")

        metadata = None
        spec_md = {k: v for k, v in first.metadata.items() if k.startswith("modelspec.")}
        if spec_md:
            import time

            titles = [f.metadata.get("modelspec.title") or os.path.splitext(os.path.basename(f.path))[0] for f in files]
            spec_md["modelspec.title"] = os.path.splitext(os.path.basename(output))[0]
            spec_md["modelspec.merged_from"] = ", ".join(titles)
            spec_md["modelspec.date"] = modelspec.format_date(time.time())
            spec_md["modelspec.implementation_version"] = modelspec.implementation_version()
            metadata = spec_md

        merged = copied = 0
        with torch.no_grad(), StreamingSafetensorsWriter(output, specs, metadata) as writer:
            for (key, merge), (_, out_dtype, _) in progress(list(zip(plan, specs)), desc="merging", unit="tensor"):
                if not merge:
                    value = first.get(first_names[key])
                    writer.write(key, value.to(out_dtype) if value.dtype.is_floating_point else value)
                    copied += 1
                    continue
                acc = None
                base = None
                for f, nm, r in zip(files, names, ratios):
                    stored = nm.get(key)
                    if stored is None:  # this model's share goes to the first model's value
                        if base is None:
                            base = first.get(first_names[key]).to(args.device, calc_dtype)
                        t = base
                    else:
                        t = f.get(stored).to(args.device, calc_dtype)
                        if f is first:
                            base = t
                    acc = t * r if acc is None else acc + t * r
                writer.write(key, acc.to("cpu", out_dtype))
                merged += 1
    finally:
        for f in files:
            f.close()

    lines = [
        f"wrote {output} ({file_size(output)}, {args.saving_precision}): {merged} tensors merged, {copied} taken from "
        f"the first model{' (--unet_only)' if args.unet_only else ''}, in {clock.seconds():.1f} s",
        "  " + ", ".join(f"{m} x{r:g}" for m, r in zip(args.models, ratios)),
    ]
    for path, keys in missing.items():
        lines.append(f"  {path}: {len(keys)} tensors missing, first model's values used for its share")
    if skipped:
        lines.append(f"  {len(skipped)} tensors not in the first model skipped")
    summary(lines)
    return {"merged": merged, "copied": copied, "skipped": skipped, "missing": missing}


if __name__ == "__main__":
    run_main(main)
