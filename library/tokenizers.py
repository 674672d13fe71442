"""Loading the tokenizers the trainers use, with the `--tokenizer_cache_dir` cache.

Lookup order for every tokenizer (same as sd-scripts, so caches are interchangeable):

1. `<cache_dir>/<hub id with '/' replaced by '_'>/` when a cache_dir is given and that
   folder exists (a Hugging Face `save_pretrained` folder);
2. the Hugging Face Hub (`from_pretrained(hub_id, subfolder=...)`; a local folder given as
   the id works too);
3. when 2 worked and a cache_dir was given, the tokenizer is saved into the cache layout
   so the next run works offline.

When neither 1 nor 2 works, a UserInputError names the hub id, the folder that was
expected and the command that builds the cache offline (`tools/make_tokenizers.py`).
Every loaded tokenizer is checked (vocabulary size, special ids) before it is returned.

transformers is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse

from library.errors import UserInputError
from library.tokenizer_builder import (
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    T5_MAX_LENGTH,
    default_dir_mode,
    cache_folder_name,
)

logger = logging.getLogger(__name__)

CLIP_L_ID = "openai/clip-vit-large-patch14"  # SD1.x, SDXL tokenizer 1, SD3 and FLUX CLIP-L
SD2_ID = "stabilityai/stable-diffusion-2"  # SD2.x; the tokenizer lives in the 'tokenizer' subfolder
SD2_SUBFOLDER = "tokenizer"
CLIP_G_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"  # SDXL tokenizer 2, SD3 CLIP-G; pads with '!'
T5_XXL_ID = "google/t5-v1_1-xxl"  # FLUX.1 and SD3 T5-XXL

CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_G_PAD_ID = 0  # '!': OpenCLIP pads with 0

# The real T5 vocabulary has 32100 tokens, the offline stand-in 1100. transformers 5.x returns
# a near-empty tokenizer (~100 tokens) instead of failing when it finds no files.
T5_MIN_VOCAB_SIZE = 1000
T5_REAL_VOCAB_SIZE = 32100
# transformers 5.x gives a 2- or 3-token CLIP tokenizer when it finds no files
_EMPTY_TOKENIZER_MAX = 200

_HUB_PROBE_TIMEOUT = 5.0

MAKE_CMD = "python tools/make_tokenizers.py --out DIR"

__all__ = [
    "CLIP_L_ID",
    "SD2_ID",
    "SD2_SUBFOLDER",
    "CLIP_G_ID",
    "T5_XXL_ID",
    "CLIP_VOCAB_SIZE",
    "cache_folder_name",
    "load_clip_tokenizer",
    "load_sd_tokenizer",
    "load_sdxl_tokenizers",
    "load_sd3_tokenizers",
    "load_flux_tokenizers",
    "load_t5_tokenizer",
]


def _short_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _check_clip(tok, source: str) -> None:
    n = len(tok)
    if n != CLIP_VOCAB_SIZE:
        raise UserInputError(
            f"{source}: CLIP tokenizer has {n} tokens, expected {CLIP_VOCAB_SIZE} (wrong or damaged tokenizer folder?)"
        )
    if tok.bos_token_id != CLIP_BOS_ID or tok.eos_token_id != CLIP_EOS_ID:
        raise UserInputError(
            f"{source}: CLIP tokenizer has bos/eos ids {tok.bos_token_id}/{tok.eos_token_id}, "
            f"expected {CLIP_BOS_ID}/{CLIP_EOS_ID} (wrong or damaged tokenizer folder?)"
        )
    # CLIP text models have 77 positions; a folder without the setting would report ~1e30
    tok.model_max_length = CLIP_MAX_LENGTH


def _check_t5(tok, source: str) -> None:
    ids = (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)
    if ids[:2] != (0, 1) or len(tok) < T5_MIN_VOCAB_SIZE:
        raise UserInputError(
            f"{source}: T5 tokenizer has pad/eos ids {ids[0]}/{ids[1]} and {len(tok)} tokens; "
            f"expected pad 0, eos 1 and at least {T5_MIN_VOCAB_SIZE} tokens (wrong or damaged tokenizer folder?)"
        )
    if tok.model_max_length > 1_000_000:  # unset in the folder
        tok.model_max_length = T5_MAX_LENGTH
    if len(tok) < T5_REAL_VOCAB_SIZE:
        logger.warning(
            "%s: T5 tokenizer has only %d tokens: this is the offline stand-in from tools/make_tokenizers.py, "
            "fine for tests but it does not match real T5-XXL weights (%d tokens); replace the folder with the "
            "Hub's %s tokenizer for real training",
            source,
            len(tok),
            T5_REAL_VOCAB_SIZE,
            T5_XXL_ID,
        )


def _save_into_cache(tok, folder: str) -> None:
    """Save atomically (temporary sibling + rename); a failure only costs the cache."""
    parent = os.path.dirname(os.path.abspath(folder))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    except OSError as err:
        logger.warning("could not save tokenizer cache %s: %s", folder, _short_reason(err))
        return
    try:
        tok.save_pretrained(tmp)
        os.chmod(tmp, default_dir_mode())
        os.rename(tmp, folder)
        logger.info("saved tokenizer to cache: %s", folder)
    except OSError as err:
        if not os.path.isdir(folder):  # another process winning the race is fine
            logger.warning("could not save tokenizer cache %s: %s", folder, _short_reason(err))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _offline_env() -> bool:
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.lru_cache(maxsize=1)
def _hub_unreachable_reason() -> str | None:
    """None when the Hub host accepts a TCP connection (or a proxy is configured, which we
    cannot probe); otherwise a short reason. Without this probe an offline machine spends
    minutes in huggingface_hub's retries before failing."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname
    if not host:
        return None
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT):
            return None
    except OSError as err:
        return f"{host}:{port} unreachable ({_short_reason(err)})"


def _load(kind: str, hub_id: str, cache_dir: str | os.PathLike | None, subfolder: str | None, **kwargs):
    if kind == "clip":
        from transformers import CLIPTokenizer as cls

        check = _check_clip
    else:
        from transformers import T5TokenizerFast as cls

        check = _check_t5

    local = None
    if cache_dir:
        local = os.path.join(os.fspath(cache_dir), cache_folder_name(hub_id))
        if os.path.exists(local):
            if not os.path.isdir(local):
                raise UserInputError(f"{local}: expected a tokenizer folder in --tokenizer_cache_dir, found a file")
            logger.info("loading tokenizer from cache: %s", local)
            try:
                tok = cls.from_pretrained(local, **kwargs)
            except Exception as err:
                raise UserInputError(
                    f"{local}: cannot load the cached tokenizer for '{hub_id}' ({_short_reason(err)}); "
                    f"delete the folder or rebuild it with {MAKE_CMD}"
                ) from err
            check(tok, local)
            return tok

    source = hub_id
    load_kwargs = dict(kwargs)
    is_folder = os.path.isdir(hub_id)
    if is_folder:
        # a local folder given as the id: use its subfolder when it has one
        if subfolder and os.path.isdir(os.path.join(hub_id, subfolder)):
            load_kwargs["subfolder"] = subfolder
            source = os.path.join(hub_id, subfolder)
    elif subfolder:
        load_kwargs["subfolder"] = subfolder
    unreachable = None
    if not is_folder:
        if _offline_env():
            unreachable = "HF_HUB_OFFLINE is set"
        else:
            unreachable = _hub_unreachable_reason()
        if unreachable:
            # no network attempts (and their minutes of retries); the Hugging Face download
            # cache (~/.cache/huggingface) is still used when it has the files
            load_kwargs["local_files_only"] = True
    try:
        tok = cls.from_pretrained(hub_id, **load_kwargs)
        if len(tok) <= _EMPTY_TOKENIZER_MAX:
            raise FileNotFoundError(f"no tokenizer files found (got an empty {len(tok)}-token tokenizer)")
    except Exception as err:
        if is_folder:
            raise UserInputError(f"{source}: cannot load a tokenizer from this folder ({_short_reason(err)})") from err
        where = f"'{cache_folder_name(hub_id)}/' is not in --tokenizer_cache_dir {os.fspath(cache_dir)}" if local else (
            "no --tokenizer_cache_dir was given"
        )
        raise UserInputError(
            f"cannot load tokenizer '{hub_id}': {where}, and the Hugging Face Hub could not provide it "
            f"({unreachable or _short_reason(err)}). Pass --tokenizer_cache_dir DIR where DIR holds "
            f"'{cache_folder_name(hub_id)}/' (build it offline with: {MAKE_CMD})"
        ) from err
    check(tok, source)
    if local and not is_folder:  # a local folder given as the id needs no cache copy
        _save_into_cache(tok, local)
    return tok


def load_clip_tokenizer(hub_id: str = CLIP_L_ID, cache_dir: str | os.PathLike | None = None, subfolder: str | None = None):
    """A CLIP BPE tokenizer (transformers CLIPTokenizer), checked to have 49408 tokens."""
    return _load("clip", hub_id, cache_dir, subfolder)


def load_sd_tokenizer(v2: bool = False, cache_dir: str | os.PathLike | None = None):
    """SD1.x: CLIP ViT-L/14 (pads with <|endoftext|>); SD2.x: the SD2 tokenizer (pads with '!')."""
    if v2:
        return load_clip_tokenizer(SD2_ID, cache_dir, subfolder=SD2_SUBFOLDER)
    return load_clip_tokenizer(CLIP_L_ID, cache_dir)


def _clip_g(cache_dir):
    tok = load_clip_tokenizer(CLIP_G_ID, cache_dir)
    if tok.pad_token_id != CLIP_G_PAD_ID:
        # the bigG text encoder was trained with 0-padding, whatever the folder says
        logger.info("tokenizer %s: padding with '!' (id 0) instead of %r", CLIP_G_ID, tok.pad_token)
        tok.pad_token = "!"
    return tok


def load_sdxl_tokenizers(cache_dir: str | os.PathLike | None = None):
    """(CLIP ViT-L/14, OpenCLIP bigG) for SDXL; the second one pads with id 0."""
    return load_clip_tokenizer(CLIP_L_ID, cache_dir), _clip_g(cache_dir)


def load_t5_tokenizer(cache_dir: str | os.PathLike | None = None, hub_id: str = T5_XXL_ID):
    """T5TokenizerFast (pad 0, eos 1, no bos) for FLUX.1 / SD3."""
    return _load("t5", hub_id, cache_dir, None)


def load_flux_tokenizers(cache_dir: str | os.PathLike | None = None):
    """(CLIP-L, T5-XXL) for FLUX.1."""
    return load_clip_tokenizer(CLIP_L_ID, cache_dir), load_t5_tokenizer(cache_dir)


def load_sd3_tokenizers(cache_dir: str | os.PathLike | None = None):
    """(CLIP-L, CLIP-G, T5-XXL) for SD3 / SD3.5."""
    return load_clip_tokenizer(CLIP_L_ID, cache_dir), _clip_g(cache_dir), load_t5_tokenizer(cache_dir)
