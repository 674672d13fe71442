"""Build the trainers' tokenizers offline, in the `--tokenizer_cache_dir` layout.

Nothing here touches the network:

* the CLIP BPE tokenizers (ViT-L/14 for SD1.x/SDXL/SD3/FLUX, the SD2 one, and the OpenCLIP
  bigG one of SDXL/SD3) are assembled from the BPE merge list that open_clip_torch ships as
  `open_clip/bpe_simple_vocab_16e6.txt.gz`. The result is token-for-token the published
  vocabulary (49408 entries); only the padding token differs between the variants;
* the T5 tokenizer is a small sentencepiece unigram model (1000 pieces + 100 sentinel
  tokens) trained in well under a second on a generated corpus. It is a stand-in for tests
  and offline smoke runs, not the real 32k T5 vocabulary (which is not redistributable
  from any installed package): prompts tokenize to different ids than with the real one.

`build_tokenizer_cache(out_dir)` writes all of them; `ensure_tokenizer_cache(out_dir)` only
adds what is missing (cheap to call from a test fixture). `tools/make_tokenizers.py` is the
command-line front end.

transformers is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable

from library.errors import UserInputError

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
# number of merges used by the CLIP text models (49408 - 2*256 byte symbols - 2 specials)
CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48894
OPEN_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

T5_SPIECE_PIECES = 1000
T5_EXTRA_IDS = 100
T5_TEST_VOCAB_SIZE = T5_SPIECE_PIECES + T5_EXTRA_IDS  # len() of the built T5 tokenizer
T5_MAX_LENGTH = 512

# Files that mark a folder as a saved tokenizer (so it may be replaced without --force).
_TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


# ---------------------------------------------------------------------------------------
# CLIP BPE
# ---------------------------------------------------------------------------------------


def open_clip_bpe_path() -> str:
    """Path of the BPE merges file inside the installed open_clip_torch (not imported)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            "open_clip_torch is not installed; it provides the CLIP BPE vocabulary "
            f"({OPEN_CLIP_BPE_FILE}) needed to build CLIP tokenizers offline (pip install open_clip_torch)"
        )
    for folder in spec.submodule_search_locations:
        candidate = os.path.join(folder, OPEN_CLIP_BPE_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise UserInputError(f"open_clip_torch is installed but has no {OPEN_CLIP_BPE_FILE}; reinstall open_clip_torch")


def _byte_symbols() -> list[str]:
    """The 256 single-character symbols of byte-level BPE, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the remaining bytes (controls, space,
    soft hyphen, ...) are mapped to code points from U+0100 upwards, in byte order. The
    vocabulary lists the self-mapped bytes first, then the remapped ones.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    printable_set = set(printable)
    others = [b for b in range(256) if b not in printable_set]
    return [chr(b) for b in printable] + [chr(0x100 + i) for i in range(len(others))]


def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[str]]:
    """The CLIP ViT-L/14 vocabulary (token -> id) and merge rules ('a b' strings)."""
    path = bpe_path or open_clip_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is a version header; the text models use the first CLIP_NUM_MERGES rules
    merges = lines[1 : 1 + CLIP_NUM_MERGES]
    if len(merges) != CLIP_NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise UserInputError(f"{path}: unexpected content (expected at least {CLIP_NUM_MERGES} 'a b' merge lines)")
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise UserInputError(f"{path}: built a CLIP vocabulary of {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def build_clip_tokenizer(pad_token: str = CLIP_EOS, bpe_path: str | None = None):
    """A transformers CLIPTokenizer equal to the published CLIP ones.

    pad_token: '<|endoftext|>' for openai/clip-vit-large-patch14 (pads with 49407), '!' for
    the SD2 and OpenCLIP bigG tokenizers (pads with 0; as on the Hub, '!' then counts as a
    special token, so a literal '!' in a prompt also becomes id 0).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(bpe_path)
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )
    if len(tok) != CLIP_VOCAB_SIZE:  # guards against the transformers 5.x silent-ignore traps
        raise RuntimeError(f"built CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


def _write_clip_raw_files(tok, folder: str, pad_token: str) -> None:
    """vocab.json / merges.txt / special_tokens_map.json next to tokenizer.json, for readers
    (older transformers, slow CLIPTokenizer) that do not use tokenizer.json."""
    vocab, merges = clip_vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(merges))
        f.write("\n")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": pad_token}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)


# ---------------------------------------------------------------------------------------
# T5 (sentencepiece unigram stand-in)
# ---------------------------------------------------------------------------------------

_COMMON_WORDS = (
    "a an the of and or to in on at by for from with without into over under near behind "
    "is are was were be been has have had this that these those it its one two three four "
    "photo photograph picture image painting drawing sketch illustration render portrait "
    "cat cats dog dogs bird birds horse fish man men woman women girl boy child person people "
    "red green blue yellow white black orange purple pink brown gray grey golden silver "
    "sky tree trees house city street road car water sea ocean lake mountain river forest "
    "flower flowers sun moon star stars night day morning evening light dark shadow "
    "beautiful small large big tiny huge old young happy sad smiling sitting standing "
    "walking running flying holding wearing looking dress shirt hat coat hair eyes face "
    "hand hands style art artist detailed highly quality masterpiece best realistic "
    "anime cartoon background landscape close up view sunset sunrise beach snow rain "
    "cloud clouds field garden window room table chair book lamp cup glass stone wood "
    "metal fabric soft sharp focus bokeh lens camera film digital oil watercolor pencil "
    "ink colorful vibrant muted warm cold cinematic lighting studio outdoor indoor "
    "fantasy science fiction robot castle bridge boat ship train plane winter summer "
    "spring autumn fall leaves grass sand rock wall door floor roof tower market crowd"
).split()

_SYLLABLES = (
    "ka lo mi ra ten zu vo shi pra gle dor fin que wex bly sno tri pul mor xan "
    "bel cri dax eff gor hul jin kev lum nop ost pif ryn sav tup ulk vex wim yor zed"
).split()


def t5_training_corpus(seed: int = 0, lines: int = 6000) -> list[str]:
    """A generated English-like corpus, reproducible from the seed.

    Made-up words are mixed in because a corpus of common words alone does not hold enough
    distinct substrings for the unigram trainer to reach the requested vocabulary size.
    """
    rng = random.Random(seed)
    invented = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    out = []
    for _ in range(lines):
        words = [
            rng.choice(_COMMON_WORDS) if rng.random() < 0.6 else rng.choice(invented)
            for _ in range(rng.randint(3, 14))
        ]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 2100)))
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice(("", ".", ",", "!", "?", ";", ":")))
    return out


def train_t5_spiece_model(vocab_size: int = T5_SPIECE_PIECES, seed: int = 0) -> bytes:
    """Serialized sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos).

    Deterministic: fixed corpus, fixed random seed, one training thread, no shuffling.
    """
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(seed + 1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t5_training_corpus(seed)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        # every printable ASCII character gets a piece, so English prompts never hit <unk>
        required_chars="".join(chr(c) for c in range(0x21, 0x7F)),
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def build_t5_tokenizer(spiece_model: bytes | None = None):
    """T5TokenizerFast over the small sentencepiece model (pad 0, eos 1, unk 2, 100 sentinels)."""
    from transformers import T5TokenizerFast

    data = spiece_model if spiece_model is not None else train_t5_spiece_model()
    with tempfile.TemporaryDirectory(prefix="t5spm-") as tmp:
        with open(os.path.join(tmp, "spiece.model"), "wb") as f:
            f.write(data)
        # transformers 5.x: only from_pretrained on a folder reads spiece.model
        tok = T5TokenizerFast.from_pretrained(tmp, extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)
    if (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) != (0, 1, 2) or len(tok) < T5_SPIECE_PIECES:
        raise RuntimeError(
            f"built T5 tokenizer is off: {len(tok)} tokens, pad/eos/unk ids "
            f"{tok.pad_token_id}/{tok.eos_token_id}/{tok.unk_token_id} (expected 0/1/2)"
        )
    return tok


# ---------------------------------------------------------------------------------------
# The cache layout
# ---------------------------------------------------------------------------------------


def cache_folder_name(hub_id: str) -> str:
    """Folder name of a hub id inside --tokenizer_cache_dir ('/' becomes '_')."""
    return hub_id.replace("/", "_")


@dataclass(frozen=True)
class CacheTarget:
    name: str  # short name used by tools/make_tokenizers.py --only
    hub_id: str
    description: str
    build: Callable[[str], None]  # writes the tokenizer into the given (empty) folder


def _save_clip(pad_token: str) -> Callable[[str], None]:
    def save(folder: str) -> None:
        tok = build_clip_tokenizer(pad_token=pad_token)
        tok.save_pretrained(folder)
        _write_clip_raw_files(tok, folder, pad_token)

    return save


def _save_t5(folder: str) -> None:
    data = train_t5_spiece_model()
    tok = build_t5_tokenizer(data)
    tok.save_pretrained(folder)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(data)


def cache_targets() -> dict[str, CacheTarget]:
    from library import tokenizers as ids  # hub ids live with the loaders

    return {
        "clip-l": CacheTarget("clip-l", ids.CLIP_L_ID, "CLIP ViT-L/14 (SD1.x, SDXL 1, SD3, FLUX), pads with <|endoftext|>", _save_clip(CLIP_EOS)),
        "sd2": CacheTarget("sd2", ids.SD2_ID, "SD 2.x CLIP (same vocabulary), pads with '!' (id 0)", _save_clip("!")),
        "clip-g": CacheTarget("clip-g", ids.CLIP_G_ID, "OpenCLIP bigG (SDXL 2, SD3), pads with '!' (id 0)", _save_clip("!")),
        "t5": CacheTarget(
            "t5",
            ids.T5_XXL_ID,
            f"T5 stand-in: sentencepiece unigram, {T5_SPIECE_PIECES} pieces + {T5_EXTRA_IDS} sentinels (not the real T5 vocabulary)",
            _save_t5,
        ),
    }


def _is_tokenizer_folder(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _TOKENIZER_MARKERS)


def _check_out_dir(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserInputError(f"{out_dir}: exists and is not a folder")


def default_dir_mode() -> int:
    """0o777 minus the umask: what os.makedirs would have given (mkdtemp gives 0o700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _write_target(target: CacheTarget, out_dir: str, replace: bool = True) -> str:
    """Build into a temporary sibling folder, then move it into place (readers never see a
    half-written tokenizer). With replace=False a folder that appeared meanwhile (another
    process building the same cache) is kept and the new build discarded."""
    final = os.path.join(out_dir, cache_folder_name(target.hub_id))
    tmp = tempfile.mkdtemp(prefix=f".{cache_folder_name(target.hub_id)}.tmp-", dir=out_dir)
    try:
        target.build(tmp)
        os.chmod(tmp, default_dir_mode())
        if replace and os.path.exists(final):
            if os.path.isdir(final) and not os.path.islink(final):
                shutil.rmtree(final)
            else:
                os.remove(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if replace or not _is_tokenizer_folder(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tokenizer_cache(
    out_dir: str | os.PathLike,
    targets: Iterable[str] | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Write the tokenizers into `out_dir/<hub id with '_'>/`; returns {name: folder}.

    An existing target folder is replaced when it holds a saved tokenizer; any other
    existing folder of that name is refused (UserInputError) unless force=True.
    """
    out_dir = os.fspath(out_dir)
    _check_out_dir(out_dir)
    all_targets = cache_targets()
    names = list(targets) if targets is not None else list(all_targets)
    unknown = [n for n in names if n not in all_targets]
    if unknown:
        raise UserInputError(f"unknown tokenizer name(s) {unknown}; choose from {sorted(all_targets)}")
    for name in names:
        final = os.path.join(out_dir, cache_folder_name(all_targets[name].hub_id))
        if os.path.exists(final) and not force and not _is_tokenizer_folder(final):
            raise UserInputError(
                f"{final}: exists and does not look like a saved tokenizer; not replacing it (use --force to overwrite)"
            )
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name in names:
        target = all_targets[name]
        final = os.path.join(out_dir, cache_folder_name(target.hub_id))
        existed = os.path.exists(final)
        written[name] = _write_target(target, out_dir)
        if log:
            log(f"{'replaced' if existed else 'wrote'} {written[name]}  ({target.description})")
    return written


def ensure_tokenizer_cache(out_dir: str | os.PathLike, targets: Iterable[str] | None = None) -> str:
    """Build only the target folders missing from out_dir; returns out_dir as str.

    Meant for tests: `ensure_tokenizer_cache(tmp_path_factory.mktemp("tok"))` in a
    session-scoped fixture, then pass the folder as --tokenizer_cache_dir.
    """
    out_dir = os.fspath(out_dir)
    _check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    all_targets = cache_targets()
    for name in targets if targets is not None else all_targets:
        target = all_targets[name]
        if not _is_tokenizer_folder(os.path.join(out_dir, cache_folder_name(target.hub_id))):
            _write_target(target, out_dir, replace=False)
    return out_dir
