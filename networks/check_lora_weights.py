"""Print what a LoRA file holds: per-tensor statistics and a summary with warnings.

    python networks/check_lora_weights.py lora.safetensors          # lora_down / lora_up tensors
    python networks/check_lora_weights.py lora.safetensors -s       # every tensor

One CSV line per tensor: `key,shape,mean|w|,min|w|,max|w|` (shape written like (4-320-1-1));
the first four columns are those sd-scripts prints. Then a summary: the model the LoRA is for
(from its key names), module counts, ranks, alphas, dtypes, and warnings for tensors that are
all zero (a lora_up that never trained), or hold NaN/Inf. Tensors are read one at a time.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Print LoRA tensor statistics and a summary.")
    p.add_argument("file", type=str, help="LoRA file to inspect")
    p.add_argument("-s", "--show_all_keys", action="store_true", help="print every tensor, not only lora_down / lora_up")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)

    import torch

    from library.errors import UserInputError
    from library.lora_tools import arch
    from library.lora_tools.lorafile import parse_modules
    from library.io.tensor_files import TensorFile

    src = TensorFile(args.file, "file")
    try:
        shapes = {k: src.shape(k) for k in src.keys()}
        dtypes = {k: src.dtype(k) for k in src.keys()}
        modules, problem = None, None
        try:
            modules = parse_modules(shapes, dtypes, src.get, args.file, "file")
        except UserInputError as e:
            problem = str(e)
        keys = [k for k in shapes if ".lora_up." in k or ".lora_down." in k]
        if args.show_all_keys or modules is None:
            keys = list(shapes)
        print(f"{args.file}: {len(shapes)} tensors")
        print("key,shape,mean|w|,min|w|,max|w|")
        zero, bad = [], []
        with torch.no_grad():
            for key in keys:
                v = src.get(key)
                a = v.float().abs()
                shape = str(tuple(v.shape)).replace(", ", "-").replace(",)", ")")
                if a.numel() == 0:
                    print(f"{key},{shape},,,")
                    continue
                print(f"{key},{shape},{float(a.mean()):.6g},{float(a.min()):.6g},{float(a.max()):.6g}")
                if not bool(torch.isfinite(a).all()):
                    bad.append(key)
                elif float(a.max()) == 0.0 and v.dim() > 0:
                    zero.append(key)
        print()
        if modules is None:
            print(f"not a plain LoRA: {problem}")
        else:
            family = arch.detect_family(modules, args.file)
            te = sum(1 for n in modules if n.startswith("lora_te"))
            kinds = {}
            for m in modules.values():
                kinds[m.kind] = kinds.get(m.kind, 0) + 1
            ranks = sorted({m.rank for m in modules.values()})
            alphas = sorted({m.alpha for m in modules.values()})
            print(f"LoRA for {arch.family_label(family)} (by key names): {len(modules)} modules "
                  f"({te} text encoder, {len(modules) - te} U-Net/transformer; "
                  + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")")
            print(f"ranks {ranks}, alphas {[f'{a:g}' for a in alphas]}, dtypes "
                  f"{sorted({str(d).replace('torch.', '') for d in dtypes.values()})}")
            for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                        "modelspec.architecture"):
                if key in src.metadata:
                    print(f"{key}: {src.metadata[key]}")
        if zero:
            print(f"warning: {len(zero)} tensors are all zero (untrained?), e.g. {zero[0]}")
        if bad:
            print(f"warning: {len(bad)} tensors hold NaN or Inf, e.g. {bad[0]}")
    finally:
        src.close()
    return {"zero": zero, "nonfinite": bad, "modules": modules}


if __name__ == "__main__":
    run_main(main)
