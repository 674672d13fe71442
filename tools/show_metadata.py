"""Print the metadata of a .safetensors file as JSON.

    python tools/show_metadata.py --model lora.safetensors

Only the header is read (plain json/struct, no torch), so this is instant even for
multi-gigabyte checkpoints. Values are printed as stored: strings, including those that
hold JSON themselves (ss_datasets, ss_tag_frequency, ...). A file without metadata prints
`{}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Print the metadata of a safetensors file as JSON.")
    p.add_argument("--model", type=str, required=True, help="safetensors file whose metadata is printed")
    return p


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)
    from library.io.safetensors_io import read_header

    header = read_header(args.model)  # UserInputError naming the file when unreadable
    json.dump(header.metadata, sys.stdout, indent=4, ensure_ascii=False)
    sys.stdout.write("\n")
    if not header.metadata:
        print(f"({args.model}: no metadata)", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
