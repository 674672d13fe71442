"""Caption processing: everything that happens to a caption each time a sample is drawn.

The order (dataset-config.md section 5) is:

1. ``caption_prefix`` / ``caption_suffix`` are attached (space-separated);
2. caption dropout (``caption_dropout_rate``, ``caption_dropout_every_n_epochs``) may
   replace the whole caption with ``""`` -- nothing else happens then;
3. wildcards: with ``enable_wildcard`` one random line of a multi-line caption is
   chosen and every ``{a|b|c}`` becomes one alternative (``{{``/``}}`` are literal
   braces); without it only the first line is used;
4. only if shuffling, token warm-up or tag dropout is active: the caption is split into
   a fixed head, a flexible middle and a fixed tail (``keep_tokens`` /
   ``keep_tokens_separator``), the middle is cut for token warm-up, shuffled, thinned by
   tag dropout, and everything is re-joined with ``", "``;
5. ``secondary_separator`` is replaced by ``caption_separator``.

Prefix and suffix are attached to every line of a multi-line caption, so whichever line
the wildcard step picks carries them (the reference attaches them to the whole text,
i.e. only to the first and last line).

All randomness comes from the ``random.Random`` instance passed in, so a sample is
reproducible from (seed, epoch, index) no matter which DataLoader worker builds it.

This module also holds the parser of the prompt-weighting syntax used by
``--weighted_captions`` (``(word)``, ``[word]``, ``(word:1.3)``) and the tag counter
behind ``ss_tag_frequency``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = [
    "CaptionOptions",
    "process_caption",
    "expand_wildcards",
    "split_caption_tokens",
    "resolve_token_warmup_step",
    "parse_weighted_caption",
    "count_tags",
    "fixed_caption",
]


@dataclass(frozen=True)
class CaptionOptions:
    """Per-subset caption settings (names as in the dataset TOML)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0

    @property
    def needs_token_processing(self) -> bool:
        """True when step 4 (split / warm-up / shuffle / tag dropout) can change a caption."""
        return self.shuffle_caption or self.token_warmup_step > 0 or self.caption_tag_dropout_rate > 0

    @property
    def is_random(self) -> bool:
        """True when the processed caption can differ between two draws of one sample."""
        return (
            self.needs_token_processing
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.enable_wildcard
        )


_WILDCARD = re.compile(r"\{([^{}]*)\}")
# Private-use code points stand in for the literal braces "{{" and "}}" while expanding.
_LBRACE, _RBRACE = "\ue000", "\ue001"


def _attach_prefix_suffix(caption: str, opts: CaptionOptions) -> str:
    if opts.caption_prefix is None and opts.caption_suffix is None:
        return caption

    def one(line: str) -> str:
        if opts.caption_prefix is not None:
            line = opts.caption_prefix + " " + line
        if opts.caption_suffix is not None:
            line = line + " " + opts.caption_suffix
        return line

    if "\n" in caption and opts.enable_wildcard:
        return "\n".join(one(line) for line in caption.split("\n"))
    return one(caption)


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Pick one non-empty line, then replace each ``{a|b}`` by one alternative."""
    lines = [line for line in caption.split("\n") if line.strip()]
    if not lines:
        return ""
    line = lines[0] if len(lines) == 1 else rng.choice(lines)
    line = line.replace("{{", _LBRACE).replace("}}", _RBRACE)
    line = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), line)
    return line.replace(_LBRACE, "{").replace(_RBRACE, "}")


def split_caption_tokens(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """Split a caption into (fixed head, flexible tokens, fixed tail)."""
    sep = opts.caption_separator
    marker = opts.keep_tokens_separator
    if marker and marker in caption:
        head, _, rest = caption.partition(marker)
        flex, found, tail = rest.partition(marker)

        def toks(text: str) -> list[str]:
            return [t.strip() for t in text.split(sep) if t.strip()]

        return toks(head), toks(flex), (toks(tail) if found else [])
    tokens = [t.strip() for t in caption.split(sep)]
    keep = max(opts.keep_tokens, 0)
    return tokens[:keep], tokens[keep:], []


def resolve_token_warmup_step(token_warmup_step: float, max_train_steps: Optional[int]) -> float:
    """A warm-up below 1 is a fraction of the whole run: floor(fraction x max_train_steps)."""
    if 0 < token_warmup_step < 1:
        if not max_train_steps:
            return 0
        return math.floor(token_warmup_step * max_train_steps)
    return token_warmup_step


def process_caption(
    caption: str,
    opts: CaptionOptions,
    rng: random.Random,
    epoch: int = 1,
    step: int = 0,
    token_warmup_step: Optional[float] = None,
) -> str:
    """Apply all caption options, in order, to one caption.

    ``epoch`` counts from 1. ``token_warmup_step`` is the resolved warm-up length in
    steps (see :func:`resolve_token_warmup_step`); by default the option's own value.
    """
    caption = _attach_prefix_suffix(caption, opts)

    if opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate:
        return ""
    if opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0:
        return ""

    if opts.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n", 1)[0]

    warmup = opts.token_warmup_step if token_warmup_step is None else token_warmup_step
    if opts.shuffle_caption or warmup > 0 or opts.caption_tag_dropout_rate > 0:
        head, flex, tail = split_caption_tokens(caption, opts)
        if warmup > 0 and step < warmup:
            keep = math.floor(step * (len(flex) - opts.token_warmup_min) / warmup) + opts.token_warmup_min
            flex = flex[: max(keep, 0)]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            rate = opts.caption_tag_dropout_rate
            flex = [t for t in flex if rng.random() >= rate]
        caption = ", ".join(head + flex + tail)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def fixed_caption(caption: str, opts: CaptionOptions, rng: Optional[random.Random] = None) -> str:
    """The caption used when text-encoder outputs are cached (computed once per image).

    Only the deterministic steps apply: prefix/suffix, first line (or one wildcard
    expansion drawn from ``rng``), secondary separator.
    """
    caption = _attach_prefix_suffix(caption, opts)
    if opts.enable_wildcard:
        caption = expand_wildcards(caption, rng or random.Random(0))
    else:
        caption = caption.split("\n", 1)[0]
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


# --------------------------------------------------------------------------------------
# Prompt weighting: "(a)" x1.1, "[a]" /1.1, "(a:1.5)" explicit, backslash escapes.

_WEIGHT_TOKEN = re.compile(
    r"""
    \\[\\()\[\]]          # escaped bracket or backslash
  | \(                    # open round
  | \[                    # open square
  | :\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*\)   # ":1.5)" closes a round bracket with a weight
  | \)                    # close round
  | \]                    # close square
  | [^\\()\[\]:]+         # plain text
  | :                     # a lone colon is text
  | \\                    # a lone backslash is text
    """,
    re.VERBOSE,
)


def parse_weighted_caption(text: str) -> list[tuple[str, float]]:
    """Parse the attention syntax into ``[(text, weight), ...]``.

    ``(x)`` multiplies by 1.1, ``[x]`` by 1/1.1, ``(x:w)`` by ``w``; nesting multiplies;
    unclosed brackets apply to the rest; ``\\(`` etc. are literal. Adjacent pieces with
    equal weight are merged; an empty prompt gives ``[("", 1.0)]``.
    """
    pieces: list[list] = []
    round_starts: list[int] = []
    square_starts: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _WEIGHT_TOKEN.finditer(text):
        tok = m.group(0)
        if tok.startswith("\\") and len(tok) == 2:
            pieces.append([tok[1], 1.0])
        elif tok == "(":
            round_starts.append(len(pieces))
        elif tok == "[":
            square_starts.append(len(pieces))
        elif tok.startswith(":") and tok.endswith(")") and round_starts:
            scale(round_starts.pop(), float(tok[1:-1].strip()))
        elif tok.startswith(":") and tok.endswith(")"):
            pieces.append([tok, 1.0])
        elif tok == ")" and round_starts:
            scale(round_starts.pop(), 1.1)
        elif tok == "]" and square_starts:
            scale(square_starts.pop(), 1 / 1.1)
        else:
            pieces.append([tok, 1.0])
    for start in round_starts:
        scale(start, 1.1)
    for start in square_starts:
        scale(start, 1 / 1.1)

    merged: list[list] = []
    for piece in pieces:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    if not merged:
        return [("", 1.0)]
    return [(t, w) for t, w in merged]


def count_tags(captions: Iterable[str]) -> dict[str, int]:
    """Tag frequency as in ``ss_tag_frequency``: split at ',', stripped, lower-cased."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
