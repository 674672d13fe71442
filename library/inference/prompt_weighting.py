"""Prompt weighting: `(text)`, `[text]`, `(text:1.3)` and escapes (formats.md §f.4).

Used by gen_img.py, sample images during training and `--weighted_captions`.

1. `parse_prompt_attention(text)` -> [(piece, weight), ...]:
   `(x)` multiplies the weight of x by 1.1, `[x]` by 1/1.1, `(x:w)` by w; nesting
   multiplies; `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; a closing bracket with
   nothing open is literal text; brackets left open apply to the rest of the prompt;
   neighbouring pieces of equal weight are merged. Whitespace around the number of `(x:w)`
   is allowed.
2. `tokenize_weighted(tokenizer, prompts, max_token_length)` tokenizes every piece on its
   own and lays the tokens out exactly as the tokenizer pads a caption of n*75+2 tokens
   (BOS, content, EOS, padding), with a weight per position; BOS, EOS and padding weigh
   1.0. The ids go to `SDArchitecture.encode_tokens`, which handles the 77-token windows.
3. `apply_token_weights(hidden, weights, normalize)` multiplies each position's hidden
   state by its weight. `normalize="none"` is the rule for training samples and weighted
   captions; gen_img's `--emb_normalize_mode original` (its default) then rescales each
   prompt so the mean of its hidden states is what it was before weighting, and `abs` does
   the same with the mean absolute value.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

CHUNK = 75  # content tokens per CLIP window
ROUND = 1.1
SQUARE = 1 / 1.1
NORMALIZE_MODES = ("none", "original", "abs")

_WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")
_ESCAPABLE = "()[]\\"


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces.

    >>> parse_prompt_attention("a (cat:1.5) on [a mat]")
    [('a ', 1.0), ('cat', 1.5), (' on ', 1.0), ('a mat', 0.9090909090909091)]
    """
    pieces: list[list] = []  # [text, weight]
    round_open: list[int] = []
    square_open: list[int] = []
    literal: list[str] = []

    def flush():
        if literal:
            pieces.append(["".join(literal), 1.0])
            literal.clear()

    def multiply(start: int, factor: float):
        for p in pieces[start:]:
            p[1] *= factor

    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
            literal.append(text[i + 1])
            i += 2
            continue
        if ch == "(":
            flush()
            round_open.append(len(pieces))
        elif ch == "[":
            flush()
            square_open.append(len(pieces))
        elif ch == ":" and round_open and (m := _WEIGHT.match(text, i)):
            flush()
            multiply(round_open.pop(), float(m.group(1)))
            i = m.end()
            continue
        elif ch == ")" and round_open:
            flush()
            multiply(round_open.pop(), ROUND)
        elif ch == "]" and square_open:
            flush()
            multiply(square_open.pop(), SQUARE)
        else:
            literal.append(ch)
        i += 1
    flush()
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)

    merged: list[tuple[str, float]] = []
    for t, w in pieces:
        if not t:
            continue
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + t, w)
        else:
            merged.append((t, w))
    return merged or [("", 1.0)]


@dataclass
class WeightedTokens:
    input_ids: "torch.Tensor"  # (B, n*75+2) long
    weights: "torch.Tensor"  # (B, n*75+2) float32, 1.0 at BOS/EOS/padding
    truncated: list[int]  # content tokens dropped per prompt

    @property
    def windows(self) -> int:
        return (self.input_ids.shape[1] - 2) // CHUNK


def _content_tokens(tokenizer, prompt: str, parse: bool = True) -> tuple[list[int], list[float]]:
    pieces = parse_prompt_attention(prompt) if parse else [(prompt, 1.0)]
    texts = [t for t, _ in pieces]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False).input_ids if any(texts) else [[] for _ in texts]
    ids: list[int] = []
    weights: list[float] = []
    for (_, w), toks in zip(pieces, encoded):
        ids.extend(toks)
        weights.extend([w] * len(toks))
    return ids, weights


def tokenize_weighted(
    tokenizer,
    prompts: list[str] | str,
    max_token_length: Optional[int] = None,
    fit_to_longest: bool = False,
    warn_truncation: bool = False,
    parse: bool = True,
) -> WeightedTokens:
    """Token ids and per-token weights, (B, n*75+2) each.

    `max_token_length` 75/150/225 (None = 75) gives n = 1, 2, 3 windows, as
    `SDArchitecture.tokenize` does for plain captions. `fit_to_longest` uses only as many
    windows as the longest prompt needs (at most n), as inference does. `parse=False`
    reads the prompts as plain text (all weights 1.0, brackets literal).
    """
    import torch

    if isinstance(prompts, str):
        prompts = [prompts]
    max_windows = max(1, (max_token_length or CHUNK) // CHUNK)
    contents = [_content_tokens(tokenizer, p, parse) for p in prompts]
    windows = max_windows
    if fit_to_longest:
        longest = max((len(ids) for ids, _ in contents), default=0)
        windows = min(max_windows, max(1, -(-longest // CHUNK)))
    capacity = windows * CHUNK
    length = capacity + 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    all_ids, all_weights, truncated = [], [], []
    for prompt, (ids, weights) in zip(prompts, contents):
        dropped = max(0, len(ids) - capacity)
        truncated.append(dropped)
        if dropped and warn_truncation:
            logger.warning("prompt is %d tokens too long for %d tokens; the end is dropped: %.60s...", dropped, capacity, prompt)
        ids, weights = ids[:capacity], weights[:capacity]
        row = [bos] + ids + [eos]
        w = [1.0] + weights + [1.0]
        row += [pad] * (length - len(row))
        w += [1.0] * (length - len(w))
        all_ids.append(row)
        all_weights.append(w)
    return WeightedTokens(
        torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_weights, dtype=torch.float32), truncated
    )


def apply_token_weights(hidden, weights, normalize: str = "none"):
    """Multiply each position's hidden state by its weight: (B, L, D) x (B, L) -> (B, L, D).

    normalize: "none" (training samples, weighted captions), "original" (restore each
    prompt's mean hidden value) or "abs" (restore its mean absolute value).
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"emb_normalize_mode must be one of {NORMALIZE_MODES}, not {normalize!r}")
    if hidden.shape[:2] != weights.shape:
        raise ValueError(f"weights {tuple(weights.shape)} do not match hidden states {tuple(hidden.shape)}")
    x = hidden.float()
    w = weights.to(device=x.device, dtype=x.dtype).unsqueeze(-1)
    if normalize == "none":
        out = x * w
    else:
        before = (x.abs() if normalize == "abs" else x).mean(dim=(1, 2), keepdim=True)
        out = x * w
        after = (out.abs() if normalize == "abs" else out).mean(dim=(1, 2), keepdim=True)
        out = out * (before / after)
    return out.to(hidden.dtype)


def encode_weighted(
    arch,
    text_encoder,
    tokenizer,
    prompts: list[str] | str,
    max_token_length: Optional[int] = None,
    clip_skip: Optional[int] = None,
    normalize: str = "none",
    fit_to_longest: bool = False,
    warn_truncation: bool = False,
):
    """Weighted prompts -> U-Net context (B, n*75+2, width), via `arch.encode_tokens`."""
    tokens = tokenize_weighted(tokenizer, prompts, max_token_length, fit_to_longest, warn_truncation)
    hidden = arch.encode_tokens(text_encoder, tokens.input_ids, tokenizer, clip_skip=clip_skip)
    if bool((tokens.weights == 1.0).all()):
        return hidden
    return apply_token_weights(hidden, tokens.weights, normalize)
