"""Merge several LoRAs (any ranks, conv modules included) into one LoRA of a chosen rank.

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.8 0.5 \\
        --new_rank 32 --new_conv_rank 16 --save_to merged.safetensors
    # LoRA Block Weight: one list per model (17 or 26 values for SD1.x/2.x, 12 or 20 for SDXL)
    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 1 1 \\
        --lbws "[1,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1]" "[1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0]" ...

For every module, the deltas ratio_i * lbw_i(block) * alpha_i/r_i * up_i @ down_i are summed
and the sum is factorised by SVD at --new_rank (3x3 convolutions at --new_conv_rank):
the result is the best approximation of that rank of the summed deltas, alpha = rank. The
SVD runs on the stacked factors, never on full matrices, one module at a time: memory stays
near the size of the output. Works for SD1.x/2.x, SDXL, FLUX and SD3 LoRAs alike (the inputs
must be for the same model).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge LoRAs by summing their deltas and re-factorising with SVD at a new rank.")
    p.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                   help="dtype of the saved tensors (default: --precision)")
    p.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                   help="precision of the merge result (the SVD itself always runs in float32); default float")
    p.add_argument("--save_to", type=str, default=None, help="output file (.safetensors, .ckpt, .pt)")
    p.add_argument("--models", type=str, nargs="*", help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", help="multiplier per LoRA (default 1.0 each)")
    p.add_argument("--lbws", type=str, nargs="*",
                   help="LoRA Block Weight list per model, e.g. '[1,0,0,1,...]': 17 or 26 values for SD1.x/2.x, "
                        "12 or 20 for SDXL; the first value (BASE) weights the text encoder")
    p.add_argument("--new_rank", type=int, default=4, help="rank of the merged LoRA (default 4)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank for 3x3 convolutions (default: --new_rank)")
    p.add_argument("--device", type=str, default=None, help="device for the SVDs, e.g. cuda (default: cpu)")
    p.add_argument("--no_metadata", action="store_true",
                   help="write only the minimum ss_* metadata (no modelspec.*)")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)

    from library.errors import UserInputError
    from library.log import setup_logging
    from library.lora_tools.cli import Stopwatch, check_inputs_exist, check_output, file_size, human_bytes, ratios_for, summary

    setup_logging()
    ratios = ratios_for(args.models, args.ratios)
    inputs = [("--models", m) for m in args.models]
    check_output(args.save_to, inputs)
    check_inputs_exist(inputs)
    if args.lbws and len(args.lbws) != len(args.models):
        raise UserInputError(f"--lbws: {len(args.lbws)} lists for {len(args.models)} --models; give one per model")
    clock = Stopwatch()

    from library.lora_tools import arch, ops
    from library.lora_tools import metadata as mdmod
    from library.lora_tools.lorafile import LoraModule, read_lora
    from library.models.dtypes import dtype_from_precision

    lbw_values = [arch.parse_lbw(t) for t in args.lbws] if args.lbws else None
    merge_dtype = dtype_from_precision(args.precision, "--precision")
    save_dtype = dtype_from_precision(args.save_precision) or merge_dtype
    loras = [read_lora(m, "--models") for m in args.models]
    try:
        families = [lf.family for lf in loras]
        known = {f for f in families if f != "unknown"}
        if len(known) > 1:
            detail = ", ".join(f"{lf.path}: {arch.family_label(f)}" for lf, f in zip(loras, families))
            raise UserInputError(f"--models are LoRAs for different models ({detail})")
        family = known.pop() if known else "unknown"
        lbws = [arch.lbw_weights(v, family, lf.path) for v, lf in zip(lbw_values, loras)] if lbw_values else None
        weights = ops.lbw_weight_fn(loras, ratios, lbws, [family] * len(loras))
        res = ops.svd_merge(loras, weights, args.new_rank, args.new_conv_rank, args.device)
    finally:
        for lf in loras:
            lf.close()

    first = loras[0]
    info = mdmod.arch_info(first.metadata, family, arch.sd_version_hint(first.modules) if family == "sd" else None)
    dim, alpha, conv = mdmod.dims_for(res.modules)
    md = mdmod.minimum_network_metadata(info, "networks.lora", dim, alpha, conv)
    if not args.no_metadata:
        md.update(mdmod.lora_modelspec(info, mdmod.file_title(args.save_to), mdmod.merged_from(lf.title for lf in loras)))
    # cast to the merge precision first: the result is what a merge at that precision gives
    out = [LoraModule(m.name, m.down.to(merge_dtype), m.up.to(merge_dtype), m.alpha) for m in res.modules.values()]
    written = mdmod.save_lora(out, args.save_to, save_dtype, md)

    lines = [
        f"wrote {args.save_to} ({file_size(args.save_to)}, {str(save_dtype).replace('torch.', '')}): {len(res.modules)} modules "
        f"at rank {written.get('ss_network_dim', dim)}" + (f", conv rank {conv['conv_dim']}" if conv else ""),
        "  from " + ", ".join(f"{lf.path} (x{r:g}, rank {'/'.join(map(str, lf.ranks()))})" for lf, r in zip(loras, ratios)),
        f"  family {arch.family_label(family)}; {human_bytes(sum(lf.nbytes for lf in loras))} of input weights; "
        f"SVDs {res.seconds():.1f} s, total {clock.seconds():.1f} s",
    ]
    if res.reports:
        worst = min(res.reports, key=lambda r: r.retention.fro_fraction)
        lines.append(f"  Frobenius norm kept: lowest {worst.retention.fro_fraction:.2%} ({worst.name})")
    if res.skipped:
        lines.append(f"  {len(res.skipped)} modules left out: every weight for them is 0 (e.g. {res.skipped[0]})")
    summary(lines)
    return {"result": res, "metadata": written, "seconds": clock.seconds()}


if __name__ == "__main__":
    run_main(main)
