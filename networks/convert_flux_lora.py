"""Convert a FLUX.1 LoRA between the sd-scripts (kohya) layout and the ai-toolkit / diffusers layout.

    # ai-toolkit / diffusers (transformer.*.lora_A/lora_B) -> sd-scripts (lora_unet_*.lora_down/lora_up/alpha)
    python networks/convert_flux_lora.py --src ai-toolkit --dst sd-scripts --src_path aitk.safetensors \\
        --dst_path kohya.safetensors
    # sd-scripts -> ai-toolkit / diffusers (loads with diffusers' FluxPipeline.load_lora_weights)
    python networks/convert_flux_lora.py --src sd-scripts --dst ai-toolkit --src_path kohya.safetensors \\
        --dst_path diffusers.safetensors

sd-scripts -> ai-toolkit: alpha/rank is folded into the two factors (no alpha keys); the fused
layers (double-block qkv, single-block linear1) are split into diffusers' to_q / to_k / to_v
(/ proj_mlp) with their rows of lora_up, each part taking its own rows of lora_down when the
module is a split_qkv one (block-diagonal lora_up) and the whole lora_down otherwise; the final
adaLN's halves are swapped. CLIP-L (lora_te1_) modules go to `text_encoder.`, T5 (lora_te3_) to
`text_encoder_2.`. ai-toolkit -> sd-scripts: the inverse; parts sharing one lora_A become one
module again, other parts are stacked with alpha = the new rank. The deltas are unchanged
(library/lora_tools/flux.py). `diffusers` and `kohya` are accepted as names of the two layouts.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402

LAYOUTS = {"ai-toolkit": "ai-toolkit", "diffusers": "ai-toolkit", "aitk": "ai-toolkit", "sd-scripts": "sd-scripts",
           "kohya": "sd-scripts", "sd_scripts": "sd-scripts"}


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a FLUX.1 LoRA between the sd-scripts and ai-toolkit layouts.")
    p.add_argument("--src", type=str, default="ai-toolkit", help="layout of --src_path: ai-toolkit (default) or sd-scripts")
    p.add_argument("--dst", type=str, default="sd-scripts", help="layout to write: sd-scripts (default) or ai-toolkit")
    p.add_argument("--src_path", type=str, default=None, help="input LoRA (.safetensors)")
    p.add_argument("--dst_path", type=str, default=None, help="output LoRA (.safetensors)")
    return p


def _layout(value: str, option: str) -> str:
    from library.errors import UserInputError

    key = str(value).strip().lower()
    if key not in LAYOUTS:
        raise UserInputError(f"{option} {value}: expected ai-toolkit or sd-scripts")
    return LAYOUTS[key]


def main(argv=None):
    args = setup_parser().parse_args(argv)

    from library.errors import UserInputError
    from library.log import setup_logging
    from library.lora_tools.cli import Stopwatch, check_inputs_exist, check_output, file_size, summary

    setup_logging()
    src, dst = _layout(args.src, "--src"), _layout(args.dst, "--dst")
    if src == dst:
        raise UserInputError(f"--src and --dst are both {src}: nothing to convert")
    if not args.src_path:
        raise UserInputError("--src_path is required: the LoRA to convert")
    check_output(args.dst_path, [("--src_path", args.src_path)], "--dst_path", extensions=(".safetensors",))
    check_inputs_exist([("--src_path", args.src_path)])
    clock = Stopwatch()

    from library.io.tensor_files import TensorFile
    from library.lora_tools import flux as fl
    from library.lora_tools import metadata as mdmod

    with TensorFile(args.src_path, "--src_path") as tf:
        keys = tf.keys()
        found = "ai-toolkit" if fl.is_diffusers_lora(keys) else "sd-scripts"
        if found != src:
            raise UserInputError(f"--src_path {args.src_path}: the keys are in the {found} layout (e.g. '{keys[0]}'), "
                                 f"not {src}; use --src {found}")
        metadata = mdmod.without_hashes(tf.metadata)
        state = {k: tf.get(k) for k in keys} if src == "ai-toolkit" else None
    if src == "ai-toolkit":
        modules = fl.diffusers_to_kohya(state, args.src_path, "--src_path")
        lf = None
    else:
        from library.lora_tools.lorafile import read_lora

        lf = read_lora(args.src_path, "--src_path")
        modules = {n: m.materialized() for n, m in lf.modules.items()}
        lf.close()
        fl.check_flux_family(lf, "--src_path")
    if dst == "sd-scripts":
        mdmod.save_lora(modules, args.dst_path, None, metadata)
        fused = sum(1 for n in modules if n.endswith(("_qkv", "_linear1")))
        what = f"{len(modules)} kohya modules ({fused} fused qkv / linear1), from {len(keys)} tensors"
    else:
        from library.io.safetensors_io import save_state_dict

        out = fl.kohya_to_diffusers(modules, f"--src_path {args.src_path}")
        save_state_dict(out, args.dst_path, metadata or None)
        what = f"{len(out)} tensors (lora_A / lora_B) from {len(modules)} kohya modules"
    summary([f"wrote {args.dst_path} ({file_size(args.dst_path)}): {src} -> {dst}, {what}; {clock.seconds():.1f} s"])
    return {"modules": modules}


if __name__ == "__main__":
    run_main(main)
