"""Normalise captions and tags inside a fine-tuning metadata JSON.

    python finetune/clean_captions_and_tags.py meta.json meta_clean.json

Tags (comma-separated, as written by taggers):

* underscores become spaces (``long_hair`` -> ``long hair``); short emoticon-like tags
  such as ``^_^`` are left alone;
* rating tags (``rating:safe``, ``rating_explicit``, ...) are dropped;
* in images with several characters (``2girls``, ``multiple boys``, ...), tags that
  describe one character's hair or eyes (``long hair``, ``blue eyes``, ...) are dropped,
  because they cannot be attributed to one person;
* duplicates are removed, order is kept.

Captions (e.g. from BLIP): whitespace is collapsed, immediately repeated words
(``anime anime``) are reduced to one, and a few captioning artefacts are rewritten
(``arafed`` / ``araffe`` -> ``a``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402

_RATING = re.compile(r"^rating[:_ ]", re.IGNORECASE)
_MULTI = re.compile(r"^(?:\d+\+?|multiple) ?(?:girls|boys|others|people)$", re.IGNORECASE)
_PER_CHARACTER = re.compile(
    r"^(?:(?:very |absurdly )?(?:long|short|medium)|[a-z]+(?:-[a-z]+)?) (?:hair|eyes)$"
    r"|^(?:hair|eyes) (?:between eyes|over one eye|ornament)$",
    re.IGNORECASE,
)
_CAPTION_FIXES = [
    (re.compile(r"\bara(?:fed|ffe|ffes|fe)\b", re.IGNORECASE), "a"),
    (re.compile(r"\b(\w+)(?: \1\b)+", re.IGNORECASE), r"\1"),
    (re.compile(r"\s+"), " "),
]


def clean_tags(tags: str) -> str:
    items = []
    for tag in tags.split(","):
        tag = tag.strip()
        if not tag or _RATING.match(tag):
            continue
        if len(tag) > 3:
            tag = tag.replace("_", " ")
        items.append(tag)
    if any(_MULTI.match(t) for t in items):
        items = [t for t in items if not _PER_CHARACTER.match(t)]
    seen = set()
    out = []
    for t in items:
        if t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    return ", ".join(out)


def clean_caption(caption: str) -> str:
    for pattern, repl in _CAPTION_FIXES:
        caption = pattern.sub(repl, caption)
    return caption.strip()


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Normalise captions and tags in a metadata JSON.")
    p.add_argument("in_json", type=str, help="input metadata JSON")
    p.add_argument("out_json", type=str, help="output metadata JSON (may be the same file)")
    p.add_argument("--debug", action="store_true", help="print every change")
    return p


def main(argv=None) -> None:
    from library.data.discovery import read_metadata_file
    from library.data.metadata_tools import save_metadata
    from library.log import setup_logging

    args = setup_parser().parse_args(argv)
    setup_logging(args)
    metadata = read_metadata_file(args.in_json)
    changed = 0
    for key, entry in metadata.items():
        for field, fn in (("tags", clean_tags), ("caption", clean_caption)):
            value = entry.get(field)
            if isinstance(value, str):
                new = fn(value)
                if new != value:
                    changed += 1
                    if args.debug:
                        print(f"{key} {field}: {value!r} -> {new!r}")
                    entry[field] = new
    save_metadata(args.out_json, metadata)
    print(f"{changed} caption/tag value(s) changed", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
