"""Change the rank of a LoRA by SVD, to a fixed rank or per module from its singular values.

    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 16
    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 64 \\
        --dynamic_method sv_fro --dynamic_param 0.95 --verbose

Each module's delta `alpha/r * up @ down` is replaced by its best approximation of the new
rank (Eckart-Young); alpha is set so that alpha/rank stays the same. A module whose rank is
already at or below the target keeps its rank (its delta is reproduced exactly). The SVD
works on the factors, never on the full matrix, so a whole SDXL LoRA resizes in seconds on a
CPU. Metadata is kept, with ss_network_dim / ss_network_alpha ('Dynamic' for dynamic
methods), the conv rank in ss_network_args and a note in ss_training_comment updated; the
sshs_* hashes are recomputed on the saved tensors.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Change the rank of a LoRA by SVD (fixed, or per module from its singular values).")
    p.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                   help="dtype of the saved tensors (default: float)")
    p.add_argument("--new_rank", type=int, default=4,
                   help="rank of the output (the upper bound with --dynamic_method); default 4")
    p.add_argument("--new_conv_rank", type=int, default=None,
                   help="rank for 3x3 convolution modules (default: --new_rank)")
    p.add_argument("--save_to", type=str, default=None, help="output file (.safetensors, .ckpt, .pt)")
    p.add_argument("--model", type=str, default=None, help="LoRA file to resize")
    p.add_argument("--device", type=str, default=None, help="device for the SVDs, e.g. cuda (default: cpu)")
    p.add_argument("--verbose", action="store_true", help="print how much of each module's delta is kept")
    p.add_argument("--dynamic_method", type=str, default=None, choices=["sv_ratio", "sv_fro", "sv_cumulative"],
                   help="choose each module's rank from its singular values: sv_ratio keeps values above "
                        "max/param; sv_cumulative the smallest rank whose singular values sum to the fraction param; "
                        "sv_fro the smallest rank keeping the fraction param of the Frobenius norm")
    p.add_argument("--dynamic_param", type=float, default=None, help="the target of --dynamic_method")
    return p


def _metadata(lora, res, args):
    from library.lora_tools import metadata as mdmod

    md = mdmod.without_hashes(lora.metadata)
    old_dim = md.get("ss_network_dim") or str(max(lora.ranks()))
    dim, alpha, conv = mdmod.dims_for(res.modules)
    conv_note = ""
    if conv is not None:
        conv_note = f", conv {conv['conv_dim']}"
        args_json = mdmod.network_args_with_conv(md.get("ss_network_args"), conv["conv_dim"], conv["conv_alpha"])
        if args_json:
            md["ss_network_args"] = args_json
    if args.dynamic_method:
        md["ss_network_dim"] = "Dynamic"
        md["ss_network_alpha"] = "Dynamic"
        note = (f"resized by resize_lora from rank {old_dim}, ranks chosen by {args.dynamic_method} "
                f"{args.dynamic_param:g} (at most {args.new_rank})")
    else:
        md["ss_network_dim"] = dim if dim is not None else str(args.new_rank)
        if alpha is not None:
            md["ss_network_alpha"] = alpha
        note = f"resized by resize_lora from rank {old_dim} to {md['ss_network_dim']}{conv_note}"
    comment = md.get("ss_training_comment")
    md["ss_training_comment"] = f"{note}; {comment}" if comment else note
    return md


def main(argv=None):
    args = setup_parser().parse_args(argv)

    from library.errors import UserInputError
    from library.log import setup_logging
    from library.lora_tools.cli import Stopwatch, check_output, file_size, human_bytes, summary

    setup_logging()
    if not args.model:
        raise UserInputError("--model is required: the LoRA file to resize")
    check_output(args.save_to, [("--model", args.model)])
    clock = Stopwatch()

    from library.lora_tools import ops
    from library.lora_tools.lorafile import read_lora
    from library.lora_tools.metadata import save_lora
    from library.models.dtypes import dtype_from_precision

    ops.check_dynamic(args.dynamic_method, args.dynamic_param)
    save_dtype = dtype_from_precision(args.save_precision or "float")
    lora = read_lora(args.model, "--model")
    try:
        res = ops.resize(lora, args.new_rank, args.new_conv_rank, args.dynamic_method, args.dynamic_param,
                         args.device)
        md = _metadata(lora, res, args)
    finally:
        lora.close()
    written = save_lora(res.modules, args.save_to, save_dtype, md)

    if args.verbose:
        width = max((len(r.name) for r in res.reports), default=10)
        print(f"{'module':{width}s} | rank | sum(S) kept | Frobenius kept | S[0]/S[r-1]")
        for r in res.reports:
            ret = r.retention
            print(f"{r.name:{width}s} | {r.old_rank:>3d}->{r.new_rank:<3d} | {ret.sum_fraction:10.1%} | "
                  f"{ret.fro_fraction:13.2%} | {ret.max_ratio:8.1f}")
        fros = [r.retention.fro_fraction for r in res.reports]
        mean = sum(fros) / len(fros)
        std = (sum((f - mean) ** 2 for f in fros) / len(fros)) ** 0.5
        print(f"Frobenius norm kept: mean {mean:.2%}, std {std:.3f}, lowest {min(fros):.2%}")
        print("time by module kind and shape:")
        for line in ops.kind_breakdown(res.reports):
            print("  " + line)
    new_ranks = sorted({r.new_rank for r in res.reports})
    old_ranks = lora.ranks()
    lines = [
        f"wrote {args.save_to} ({file_size(args.save_to)}, {str(save_dtype).replace('torch.', '')}): {len(res.modules)} modules, "
        f"rank {_ranks(old_ranks)} -> {_ranks(new_ranks)}"
        + (f" ({args.dynamic_method} {args.dynamic_param:g})" if args.dynamic_method else ""),
        f"  input {args.model} ({human_bytes(lora.nbytes)} of weights); SVDs {res.seconds():.1f} s, total {clock.seconds():.1f} s",
        f"  ss_network_dim={written.get('ss_network_dim', '-')} ss_network_alpha={written.get('ss_network_alpha', '-')}",
    ]
    lines += [f"  note: {n}" for n in res.notes]
    summary(lines)
    return {"result": res, "metadata": written, "seconds": clock.seconds()}


def _ranks(ranks):
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"


if __name__ == "__main__":
    run_main(main)
