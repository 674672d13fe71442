"""Collect caption files (``<image>.caption``) into a fine-tuning metadata JSON.

    python finetune/merge_captions_to_metadata.py images/ meta.json --full_path

Each image's caption (first line of its caption file) goes to ``metadata[key]["caption"]``.
Starts from ``--in_json`` or an existing ``out_json``, so captions and tags can be merged
in any order. Keys are file stems unless ``--full_path`` is given (the training loader
understands both). The JSON is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Collect caption files into a metadata JSON.")
    p.add_argument("train_data_dir", type=str, help="image folder")
    p.add_argument("out_json", type=str, help="metadata JSON to write")
    p.add_argument("--in_json", type=str, default=None, help="metadata to start from (default: out_json if it exists)")
    p.add_argument("--caption_extention", type=str, default=None, help="old misspelled name of --caption_extension")
    p.add_argument("--caption_extension", type=str, default=".caption", help="caption file extension")
    p.add_argument("--full_path", action="store_true", help="key entries by full image path instead of file stem")
    p.add_argument("--recursive", action="store_true", help="also search sub-folders (needs --full_path)")
    p.add_argument("--debug", action="store_true", help="print every entry")
    return p


def main(argv=None) -> None:
    from library.data.metadata_tools import merge_text_files
    from library.log import setup_logging

    args = setup_parser().parse_args(argv)
    setup_logging(args)
    merge_text_files(args, "caption", ".caption")


if __name__ == "__main__":
    run_main(main)
