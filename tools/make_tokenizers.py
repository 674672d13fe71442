"""Build a --tokenizer_cache_dir folder offline (no Hugging Face Hub access needed).

    python tools/make_tokenizers.py --out tokenizers
    python train_network.py ... --tokenizer_cache_dir tokenizers

Writes one sub-folder per tokenizer, named after its hub id with '/' replaced by '_'.
The CLIP tokenizers are exact (built from the BPE data shipped with open_clip_torch); the
T5 one is a small stand-in, see docs/tokenizers.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402  (light imports only)

TARGET_NAMES = ("clip-l", "sd2", "clip-g", "t5")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Build the tokenizers used for training into a folder usable as --tokenizer_cache_dir, offline."
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=TARGET_NAMES,
        default=None,
        help="build only these (default: all). clip-l: openai/clip-vit-large-patch14; sd2: "
        "stabilityai/stable-diffusion-2; clip-g: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k; "
        "t5: google/t5-v1_1-xxl (small stand-in vocabulary)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="also overwrite target folders that do not look like saved tokenizers "
        "(existing tokenizer folders are always replaced)",
    )
    return p


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)
    from library.tokenizer_builder import build_tokenizer_cache

    out = os.path.abspath(args.out)
    print(f"building tokenizers into {out}", flush=True)
    written = build_tokenizer_cache(out, targets=args.only, force=args.force, log=lambda m: print(m, flush=True))
    print(f"done: {len(written)} tokenizer folder(s). Use them with --tokenizer_cache_dir {out}")
    if "t5" in written:
        print(
            "note: the T5 folder is a small stand-in vocabulary for tests and smoke runs; it does not match real "
            "T5-XXL weights (see docs/tokenizers.md)"
        )


if __name__ == "__main__":
    run_main(main)
