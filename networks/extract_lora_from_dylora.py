"""Cut a DyLoRA file into plain LoRAs of every rank step below its full rank.

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --unit 4 --save_to out.safetensors
    # writes out-0004.safetensors, out-0008.safetensors, ... (one per multiple of --unit below the rank)

A DyLoRA trains its components so that the first k*unit work on their own; each output keeps
the first k*unit rows of every lora_down and columns of every lora_up, alpha unchanged. Each
file keeps the input's metadata with ss_network_dim set to its rank, a note in
ss_training_comment, and its own freshly computed sshs_* hashes.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Cut a DyLoRA into fixed-rank LoRAs (one per multiple of --unit).")
    p.add_argument("--unit", type=int, default=None, help="rank step of the DyLoRA (its `unit` network arg)")
    p.add_argument("--save_to", type=str, default=None,
                   help="base output name: '-<rank, 4 digits>' goes before the extension")
    p.add_argument("--model", type=str, default=None, help="DyLoRA file")
    return p


def output_name(save_to: str, rank: int) -> str:
    stem, ext = os.path.splitext(save_to)
    return f"{stem}-{rank:04d}{ext}"


def main(argv=None):
    args = setup_parser().parse_args(argv)

    from library.errors import UserInputError
    from library.log import setup_logging
    from library.lora_tools.cli import check_output, file_size, summary

    setup_logging()
    if not args.model:
        raise UserInputError("--model is required: the DyLoRA file")
    if args.unit is None:
        raise UserInputError("--unit is required: the DyLoRA's rank step")
    check_output(args.save_to, [("--model", args.model)])

    from library.lora_tools import metadata as mdmod
    from library.lora_tools import ops
    from library.lora_tools.lorafile import read_lora

    lora = read_lora(args.model, "--model")
    try:
        parts = ops.split_dylora(lora, args.unit)
    finally:
        lora.close()
    max_rank = max(lora.ranks())
    for rank, _ in parts:  # refuse before writing anything
        check_output(output_name(args.save_to, rank), [("--model", args.model)])
    base = mdmod.without_hashes(lora.metadata)
    comment = base.get("ss_training_comment")
    written = []
    for rank, modules in parts:
        md = dict(base)
        md["ss_network_dim"] = str(rank)
        note = f"rank {rank} cut from DyLoRA of rank {max_rank} by extract_lora_from_dylora"
        md["ss_training_comment"] = f"{note}; {comment}" if comment else note
        path = output_name(args.save_to, rank)
        mdmod.save_lora(modules, path, None, md)
        written.append(path)
    summary([f"wrote {len(written)} LoRAs from {args.model} (rank {max_rank}, unit {args.unit}):"]
            + [f"  {p} ({file_size(p)})" for p in written])
    return written


if __name__ == "__main__":
    run_main(main)
