"""Prompt files and prompt-line options, shared by training previews and gen_img.py.

One prompt becomes one `PromptSpec`. Sources (formats.md §f):

* `.txt`: one prompt per line; blank lines and lines whose first character is `#` are
  skipped. Each line may carry inline options after the prompt: `a cat --w 768 --n ugly`.
* `.toml`: `[prompt]` holds defaults, every `[[prompt.subset]]` table is merged over them.
* `.json`: a list whose items are prompt tables or prompt strings (strings are parsed
  like `.txt` lines).

A line is split on the literal `" --"`; the first piece is the prompt and every other piece
is `<key> <value>`. Keys are case-insensitive. Training samples and gen_img use different
subsets of the keys (`OPTIONS` below marks which); every key is read in both contexts, and
one that has no effect in the current context is reported once. An unknown key or a value
that is not a valid number is reported with a warning naming it; the prompt is still used.

Dynamic prompts (`{a|b}`, `{2$$a|b|c}`, `{1-3$$ and $$a|b}`, `{e$$a|b}`) are expanded by
`expand_dynamic_prompts`, which gen_img applies to a raw line before the options are read.

Nothing here imports torch: reading a prompt file is cheap.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

from library.errors import UserInputError

logger = logging.getLogger(__name__)

SAMPLE = "sample"  # previews during training (--sample_prompts)
GEN = "gen"  # gen_img.py prompt lines
CONTEXTS = (SAMPLE, GEN)

MAX_STEPS = 1000


@dataclass
class PromptSpec:
    """One prompt and its per-prompt settings; None means "use the default of the caller".

    The dict keys of `.toml`/`.json` prompt tables are these field names.
    """

    prompt: str = ""
    negative_prompt: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    seed: Optional[int] = None  # first of `seeds`
    seeds: Optional[list[int]] = None  # gen_img: `--d 1,2,3` gives one seed per image
    sample_steps: Optional[int] = None
    scale: Optional[float] = None  # classifier-free guidance scale
    sample_sampler: Optional[str] = None
    guidance_scale: Optional[float] = None  # FLUX embedded guidance
    controlnet_image: Optional[str] = None
    cfg_trunc_ratio: Optional[float] = None
    renorm_cfg: Optional[float] = None
    flow_shift: Optional[str] = None  # kept as written
    # gen_img only
    original_width: Optional[int] = None
    original_height: Optional[int] = None
    original_width_negative: Optional[int] = None
    original_height_negative: Optional[int] = None
    crop_top: Optional[int] = None
    crop_left: Optional[int] = None
    negative_scale: Union[float, str, None] = None  # a number, or "none" to switch it off for this prompt
    strength: Optional[float] = None  # img2img
    clip_prompt: Optional[str] = None
    network_multipliers: Optional[list[float]] = None
    file_name: Optional[str] = None
    ds_depth_1: Optional[int] = None
    ds_timesteps_1: Optional[int] = None
    ds_depth_2: Optional[int] = None
    ds_timesteps_2: Optional[int] = None
    ds_ratio: Optional[float] = None
    gradual_latent_timesteps: Optional[int] = None
    gradual_latent_ratio: Optional[float] = None
    gradual_latent_every_n_steps: Optional[int] = None
    gradual_latent_ratio_step: Optional[float] = None
    gradual_latent_s_noise: Optional[float] = None
    gradual_latent_unsharp_params: Optional[str] = None
    enum: int = 0  # index in the file (used in sample file names)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown table keys, kept as given

    def replace(self, **changes) -> "PromptSpec":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- values
def _int(value: str) -> int:
    return int(value.strip())


def _float(value: str) -> float:
    return float(value.strip())


def _text(value: str) -> str:
    return value.strip()


def _steps(value: str) -> int:
    return max(1, min(MAX_STEPS, _int(value)))


def _int_list(value: str) -> list[int]:
    items = [v for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError("empty list")
    return [_int(v) for v in items]


def _float_list(value: str) -> list[float]:
    items = [v for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError("empty list")
    return [_float(v) for v in items]


def _negative_scale(value: str) -> Union[float, str]:
    return "none" if value.strip().lower() == "none" else _float(value)


@dataclass(frozen=True)
class Option:
    key: str  # as written after " --"
    field: str  # PromptSpec field
    parse: Callable[[str], Any]
    contexts: tuple[str, ...]  # where the option has an effect
    kind: str  # value description for messages


_BOTH = (SAMPLE, GEN)
OPTIONS: dict[str, Option] = {
    o.key: o
    for o in (
        Option("w", "width", _int, _BOTH, "an integer"),
        Option("h", "height", _int, _BOTH, "an integer"),
        Option("d", "seeds", _int_list, _BOTH, "an integer seed (gen_img: a comma list)"),
        Option("s", "sample_steps", _steps, _BOTH, "an integer"),
        Option("l", "scale", _float, _BOTH, "a number"),
        Option("n", "negative_prompt", _text, _BOTH, "text"),
        Option("g", "guidance_scale", _float, (SAMPLE,), "a number"),
        Option("ss", "sample_sampler", _text, (SAMPLE,), "a sampler name"),
        Option("cn", "controlnet_image", _text, (SAMPLE,), "a path"),
        Option("ctr", "cfg_trunc_ratio", _float, (SAMPLE,), "a number"),
        Option("rcfg", "renorm_cfg", _float, (SAMPLE,), "a number"),
        Option("fs", "flow_shift", _text, (SAMPLE,), "a value"),
        Option("ow", "original_width", _int, (GEN,), "an integer"),
        Option("oh", "original_height", _int, (GEN,), "an integer"),
        Option("nw", "original_width_negative", _int, (GEN,), "an integer"),
        Option("nh", "original_height_negative", _int, (GEN,), "an integer"),
        Option("ct", "crop_top", _int, (GEN,), "an integer"),
        Option("cl", "crop_left", _int, (GEN,), "an integer"),
        Option("nl", "negative_scale", _negative_scale, (GEN,), "a number or 'none'"),
        Option("t", "strength", _float, (GEN,), "a number"),
        Option("c", "clip_prompt", _text, (GEN,), "text"),
        Option("am", "network_multipliers", _float_list, (GEN,), "a comma list of numbers"),
        Option("f", "file_name", _text, (GEN,), "a file name"),
        Option("dsd1", "ds_depth_1", _int, (GEN,), "an integer"),
        Option("dst1", "ds_timesteps_1", _int, (GEN,), "an integer"),
        Option("dsd2", "ds_depth_2", _int, (GEN,), "an integer"),
        Option("dst2", "ds_timesteps_2", _int, (GEN,), "an integer"),
        Option("dsr", "ds_ratio", _float, (GEN,), "a number"),
        Option("glt", "gradual_latent_timesteps", _int, (GEN,), "an integer"),
        Option("glr", "gradual_latent_ratio", _float, (GEN,), "a number"),
        Option("gle", "gradual_latent_every_n_steps", _int, (GEN,), "an integer"),
        Option("gls", "gradual_latent_ratio_step", _float, (GEN,), "a number"),
        Option("glsn", "gradual_latent_s_noise", _float, (GEN,), "a number"),
        Option("glus", "gradual_latent_unsharp_params", _text, (GEN,), "ksize,sigma,strength,target-x"),
    )
}
_BY_FIELD = {o.field: o for o in OPTIONS.values()}

# Table keys (.toml/.json) that are not inline options.
_TABLE_ONLY = {"prompt": _text, "seed": _int, "enum": _int}
TABLE_KEYS = tuple(sorted(set(_BY_FIELD) | set(_TABLE_ONLY)))


def _check_context(context: str) -> None:
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, not {context!r}")


def _note_context(opt: Option, context: str, where: str) -> None:
    if context not in opt.contexts:
        other = "gen_img.py" if opt.contexts == (GEN,) else "training sample images"
        logger.warning("%s: prompt option --%s is used by %s only; it has no effect here", where, opt.key, other)


def _set(spec: PromptSpec, fieldname: str, value: Any) -> None:
    setattr(spec, fieldname, value)
    if fieldname == "seeds":
        spec.seed = value[0]
    elif fieldname == "seed":
        spec.seeds = [value]


# ---------------------------------------------------------------------------- lines
def parse_prompt_line(line: str, context: str = SAMPLE, where: str = "prompt") -> PromptSpec:
    """`"a cat --w 768 --n ugly"` -> PromptSpec(prompt="a cat", width=768, negative_prompt="ugly").

    `where` names the source in warnings (e.g. "prompts.txt line 3").
    """
    _check_context(context)
    pieces = line.strip().split(" --")
    spec = PromptSpec(prompt=pieces[0].strip())
    for piece in pieces[1:]:
        piece = piece.strip()
        key, _, value = piece.partition(" ")
        key = key.lower()
        opt = OPTIONS.get(key)
        if opt is None:
            logger.warning("%s: unknown prompt option --%s ignored (known: %s)", where, key or "", ", ".join("--" + k for k in OPTIONS))
            continue
        if not value.strip():
            logger.warning("%s: prompt option --%s needs %s; ignored", where, key, opt.kind)
            continue
        try:
            parsed = opt.parse(value)
        except ValueError:
            logger.warning("%s: prompt option --%s expects %s, got %r; ignored", where, key, opt.kind, value.strip())
            continue
        if key == "d" and context == SAMPLE and len(parsed) > 1:
            logger.warning("%s: training samples use one seed; --d %s uses %d", where, value.strip(), parsed[0])
            parsed = parsed[:1]
        _note_context(opt, context, where)
        _set(spec, opt.field, parsed)
    return spec


def spec_from_table(table: dict, context: str = SAMPLE, where: str = "prompt") -> PromptSpec:
    """A `.toml`/`.json` prompt table (keys are PromptSpec field names) -> PromptSpec.

    The prompt text is taken as written (inline options are not read from tables).
    """
    _check_context(context)
    if not isinstance(table, dict):
        raise UserInputError(f"{where}: a prompt entry must be a table or a string, not {type(table).__name__}")
    if "prompt" not in table:
        raise UserInputError(f"{where}: prompt entry has no 'prompt' key (keys: {', '.join(map(str, table)) or 'none'})")
    spec = PromptSpec()
    for key, value in table.items():
        name = str(key)
        opt = _BY_FIELD.get(name)
        conv = opt.parse if opt is not None else _TABLE_ONLY.get(name)
        if conv is None:
            logger.warning("%s: unknown prompt key %r kept but not used (known: %s)", where, name, ", ".join(TABLE_KEYS))
            spec.extra[name] = value
            continue
        if value is None:
            continue
        try:
            if isinstance(value, (list, tuple)) and name in ("seeds", "network_multipliers"):
                parsed = conv(",".join(str(v) for v in value))
            elif isinstance(value, bool):
                raise ValueError(value)
            else:
                parsed = conv(str(value)) if name not in ("prompt", "negative_prompt") else str(value)
        except ValueError:
            logger.warning("%s: prompt key %r has an invalid value %r; ignored", where, name, value)
            continue
        if opt is not None:
            _note_context(opt, context, where)
        _set(spec, name, parsed)
    return spec


# ---------------------------------------------------------------------------- files
def read_prompt_file(path: str, context: str = SAMPLE) -> list[PromptSpec]:
    """Read a `.txt`, `.toml` or `.json` prompt file into PromptSpecs (enum = index)."""
    _check_context(context)
    if not os.path.isfile(path):
        raise UserInputError(f"prompt file {path}: not found")
    ext = os.path.splitext(path)[1].lower()
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"prompt file {path}: cannot read it ({e})") from None
    if ext == ".toml":
        specs = _from_toml(text, path, context)
    elif ext == ".json":
        specs = _from_json(text, path, context)
    else:
        if ext != ".txt":
            logger.info("prompt file %s: reading it as text (one prompt per line)", path)
        specs = []
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip() or raw.startswith("#"):
                continue
            specs.append(parse_prompt_line(raw, context, f"{name} line {number}"))
    for i, spec in enumerate(specs):
        spec.enum = i
    if not specs:
        logger.warning("prompt file %s holds no prompts", path)
    return specs


def _from_toml(text: str, path: str, context: str) -> list[PromptSpec]:
    import toml

    try:
        data = toml.loads(text)
    except Exception as e:  # toml raises several error types
        raise UserInputError(f"prompt file {path}: invalid TOML ({e})") from None
    table = data.get("prompt")
    if not isinstance(table, dict):
        raise UserInputError(f"prompt file {path}: expected a [prompt] table with [[prompt.subset]] entries")
    subsets = table.get("subset", [])
    if not isinstance(subsets, list):
        raise UserInputError(f"prompt file {path}: 'prompt.subset' must be an array of tables ([[prompt.subset]])")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    name = os.path.basename(path)
    return [
        spec_from_table({**defaults, **sub} if isinstance(sub, dict) else sub, context, f"{name} subset {i + 1}")
        for i, sub in enumerate(subsets)
    ]


def _from_json(text: str, path: str, context: str) -> list[PromptSpec]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserInputError(f"prompt file {path}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise UserInputError(f"prompt file {path}: expected a JSON list of prompt strings or objects")
    name = os.path.basename(path)
    specs = []
    for i, item in enumerate(data):
        where = f"{name} item {i + 1}"
        if isinstance(item, str):
            specs.append(parse_prompt_line(item, context, where))
        else:
            specs.append(spec_from_table(item, context, where))
    return specs


# ---------------------------------------------------------------------------- defaults
def resolve_sample_spec(
    spec: PromptSpec,
    *,
    sampler: str = "ddim",
    width: int = 512,
    height: int = 512,
    steps: int = 30,
    scale: float = 7.5,
    size_multiple: int = 8,
    min_size: int = 64,
) -> PromptSpec:
    """Fill a training-sample spec with defaults (SD/SDXL values by default).

    Sizes are rounded down to `size_multiple` (FLUX: 16) with a floor of `min_size`; steps
    are clamped to 1..1000. The seed stays None when none was given (the caller draws one).
    """
    w = spec.width if spec.width is not None else width
    h = spec.height if spec.height is not None else height
    return spec.replace(
        width=max(min_size, w - w % size_multiple),
        height=max(min_size, h - h % size_multiple),
        sample_steps=max(1, min(MAX_STEPS, spec.sample_steps if spec.sample_steps is not None else steps)),
        scale=spec.scale if spec.scale is not None else scale,
        sample_sampler=spec.sample_sampler or sampler,
    )


# ---------------------------------------------------------------------------- dynamic prompts
class _Choice:
    def __init__(self, options: list[list], lo: int, hi: int, sep: str, enumerate_all: bool):
        self.options, self.lo, self.hi, self.sep, self.enumerate_all = options, lo, hi, sep, enumerate_all


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside braces, leaving escaped braces alone."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _parse_dynamic(text: str) -> list:
    """Text -> list of str and _Choice nodes."""
    out: list = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            buf.append(text[i: i + 2])  # kept escaped until the end (weighting has its own escapes)
            i += 2
            continue
        if ch == "{":
            depth, j = 1, i + 1
            while j < len(text) and depth:
                if text[j] == "\\" and j + 1 < len(text):
                    j += 2
                    continue
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth:  # unclosed: literal
                buf.append(text[i:])
                break
            if buf:
                out.append("".join(buf))
                buf = []
            out.append(_make_choice(text[i + 1: j - 1]))
            i = j
            continue
        buf.append(ch)
        i += 1
    if buf:
        out.append("".join(buf))
    return out


def _make_choice(body: str) -> _Choice:
    parts = _split_top(body, "$$")
    enumerate_all = False
    if len(parts) > 1 and parts[0].strip().lower() == "e":
        enumerate_all = True
        parts = parts[1:]
    lo = hi = 1
    sep = ", "
    if len(parts) > 1:
        count = parts[0].strip()
        a, dash, b = count.partition("-")
        if a.isdigit() and (not dash or b.isdigit()):
            lo, hi = int(a), int(b) if dash else int(a)
            if lo > hi:
                lo, hi = hi, lo
            parts = parts[1:]
            if len(parts) > 1:
                sep = parts[0]
                parts = parts[1:]
    options_text = "$$".join(parts)
    options = [_parse_dynamic(o) for o in _split_top(options_text, "|")]
    hi = min(hi, len(options))
    lo = min(lo, hi)
    return _Choice(options, lo, hi, sep, enumerate_all)


def _has_enumeration(nodes: list) -> bool:
    for n in nodes:
        if isinstance(n, _Choice) and (n.enumerate_all or any(_has_enumeration(o) for o in n.options)):
            return True
    return False


def _render_random(nodes: list, rng: random.Random) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        else:
            k = rng.randint(n.lo, n.hi)
            picked = rng.sample(range(len(n.options)), k)
            out.append(n.sep.join(_render_random(n.options[p], rng) for p in picked))
    return "".join(out)


def _render_all(nodes: list, rng: random.Random) -> list[str]:
    """Every combination of the enumerated choices (random choices drawn per variant)."""
    variants = [""]
    for n in nodes:
        if isinstance(n, str):
            alternatives = [n]
        elif n.enumerate_all:
            alternatives = []
            for k in range(n.lo, n.hi + 1):
                for combo in itertools.combinations(range(len(n.options)), k):
                    for rendered in itertools.product(*(_render_all(n.options[c], rng) for c in combo)):
                        alternatives.append(n.sep.join(rendered))
        elif any(_has_enumeration(o) for o in n.options):
            alternatives = [a for o in n.options for a in _render_all(o, rng)]
        else:
            alternatives = [None]  # drawn per variant below
        new = []
        for v in variants:
            for a in alternatives:
                new.append(v + (a if a is not None else _render_random([n], rng)))
        variants = new
    return variants


def _unescape_braces(text: str) -> str:
    return text.replace("\\{", "{").replace("\\}", "}")


def expand_dynamic_prompts(text: str, count: int = 1, rng: Optional[random.Random] = None) -> list[str]:
    """Expand `{a|b}` choices in a raw prompt line.

    Without any `e$$` choice: `count` random variants (or `[text]` when there is nothing to
    expand). With one: every combination, once each. `\\{` and `\\}` become literal braces.
    """
    rng = rng or random.Random()
    nodes = _parse_dynamic(text)
    if not any(isinstance(n, _Choice) for n in nodes):
        return [_unescape_braces(text)]
    if _has_enumeration(nodes):
        return [_unescape_braces(v) for v in _render_all(nodes, rng)]
    return [_unescape_braces(_render_random(nodes, rng)) for _ in range(max(1, count))]


def iter_option_keys(context: str) -> Iterable[str]:
    """Inline option keys that have an effect in `context` (for help texts)."""
    return (k for k, o in OPTIONS.items() if context in o.contexts)
