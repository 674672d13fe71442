"""Offline tokenizers: the builder, the --tokenizer_cache_dir loaders and tools/make_tokenizers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from library import tokenizers as T
from library import tokenizer_builder as B
from library.errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # never touch the network from these tests (and fail fast instead of retrying)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory):
    return B.ensure_tokenizer_cache(tmp_path_factory.mktemp("tokenizer_cache"))


def test_cache_layout(tok_cache):
    names = sorted(os.listdir(tok_cache))
    assert names == sorted(
        [
            "openai_clip-vit-large-patch14",
            "stabilityai_stable-diffusion-2",
            "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k",
            "google_t5-v1_1-xxl",
        ]
    )
    clip = os.path.join(tok_cache, "openai_clip-vit-large-patch14")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(clip, f)), f
    assert os.path.isfile(os.path.join(tok_cache, "google_t5-v1_1-xxl", "spiece.model"))
    with open(os.path.join(clip, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
    with open(os.path.join(clip, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320


def test_clip_l_sd1(tok_cache):
    tok = T.load_sd_tokenizer(v2=False, cache_dir=tok_cache)
    assert len(tok) == 49408 and tok.vocab_size == 49408
    assert tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[:7] == A_PHOTO_OF_A_CAT and set(ids[7:]) == {49407}
    # text normalisation: lower-cased, whitespace collapsed
    assert tok("A  PHOTO of a Cat").input_ids == A_PHOTO_OF_A_CAT


def test_sd2_and_sdxl_pad_with_bang(tok_cache):
    sd2 = T.load_sd_tokenizer(v2=True, cache_dir=tok_cache)
    tok1, tok2 = T.load_sdxl_tokenizers(tok_cache)
    assert tok1.pad_token_id == 49407
    for tok in (sd2, tok2):
        assert len(tok) == 49408 and tok.pad_token == "!" and tok.pad_token_id == 0
        ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert ids[:7] == A_PHOTO_OF_A_CAT and set(ids[7:]) == {0} and len(ids) == 77


def test_sd3_flux_helpers(tok_cache):
    l, g, t5 = T.load_sd3_tokenizers(tok_cache)
    assert (l.pad_token_id, g.pad_token_id, t5.pad_token_id) == (49407, 0, 0)
    l2, t52 = T.load_flux_tokenizers(tok_cache)
    assert l2("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT and t52.eos_token_id == 1


def test_t5(tok_cache):
    tok = T.load_t5_tokenizer(tok_cache)
    assert type(tok).__name__.startswith("T5Tokenizer")
    assert len(tok) == B.T5_TEST_VOCAB_SIZE == 1100
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, None)
    ids = tok("a photo of a cat").input_ids
    assert ids[-1] == 1 and 1 not in ids[:-1] and 0 not in ids and 2 not in ids
    padded = tok("a photo of a cat", padding="max_length", max_length=16, truncation=True).input_ids
    assert padded[: len(ids)] == ids and padded[len(ids) :] == [0] * (16 - len(ids))
    assert tok.decode(padded, skip_special_tokens=True) == "a photo of a cat"
    # unseen words still round-trip (character coverage 1.0)
    assert tok.decode(tok("Zebra-striped xylophones, 42!").input_ids, skip_special_tokens=True) == "Zebra-striped xylophones, 42!"


def test_t5_training_is_deterministic():
    a = B.train_t5_spiece_model()
    b = B.train_t5_spiece_model()
    assert a == b


def test_raw_vocab_files_match_tokenizer_json(tok_cache):
    from transformers import CLIPTokenizer

    folder = os.path.join(tok_cache, "openai_clip-vit-large-patch14")
    raw = CLIPTokenizer(vocab=os.path.join(folder, "vocab.json"), merges=os.path.join(folder, "merges.txt"))
    full = T.load_clip_tokenizer(cache_dir=tok_cache)
    assert len(raw) == 49408
    text = "a watercolor painting of an astronaut riding a horse, highly detailed, 8k, trending!"
    assert raw(text).input_ids == full(text).input_ids


def test_offline_failure_message(tmp_path):
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    t0 = time.time()
    with pytest.raises(UserInputError) as ei:
        T.load_sd_tokenizer(v2=False, cache_dir=str(empty))
    msg = str(ei.value)
    assert "openai/clip-vit-large-patch14" in msg
    assert "--tokenizer_cache_dir" in msg and "openai_clip-vit-large-patch14/" in msg
    assert "tools/make_tokenizers.py" in msg and "\n" not in msg
    with pytest.raises(UserInputError) as ei:
        T.load_t5_tokenizer(None)
    assert "google/t5-v1_1-xxl" in str(ei.value) and "--tokenizer_cache_dir" in str(ei.value)
    with pytest.raises(UserInputError) as ei:
        T.load_sdxl_tokenizers(None)
    assert "openai/clip-vit-large-patch14" in str(ei.value)
    assert time.time() - t0 < 10  # no network retries
    assert os.listdir(empty) == []  # nothing half-written


def test_damaged_cache_folder_is_reported(tmp_path):
    (tmp_path / "openai_clip-vit-large-patch14").mkdir()
    with pytest.raises(UserInputError) as ei:
        T.load_clip_tokenizer(cache_dir=str(tmp_path))
    assert "openai_clip-vit-large-patch14" in str(ei.value) and "49408" in str(ei.value)


def test_hub_load_fills_the_cache(tok_cache, tmp_path, monkeypatch):
    """Simulate the Hub with a local folder: the first load saves into the cache layout,
    the second comes from the cache without asking the Hub."""
    from transformers import CLIPTokenizer

    real = CLIPTokenizer.from_pretrained.__func__
    hub_calls = []

    def fake_from_pretrained(cls, name, *args, **kwargs):
        if name == T.SD2_ID:
            hub_calls.append(kwargs.get("subfolder"))
            return real(cls, os.path.join(tok_cache, "stabilityai_stable-diffusion-2"))
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", classmethod(fake_from_pretrained))
    cache = tmp_path / "cache"
    tok = T.load_sd_tokenizer(v2=True, cache_dir=str(cache))
    assert hub_calls == ["tokenizer"] and tok.pad_token_id == 0
    assert sorted(os.listdir(cache)) == ["stabilityai_stable-diffusion-2"]
    assert os.path.isfile(cache / "stabilityai_stable-diffusion-2" / "tokenizer.json")
    tok2 = T.load_sd_tokenizer(v2=True, cache_dir=str(cache))
    assert hub_calls == ["tokenizer"]
    assert tok2("a photo of a cat", padding="max_length", max_length=77).input_ids == tok(
        "a photo of a cat", padding="max_length", max_length=77
    ).input_ids


def test_local_folder_as_id(tok_cache, tmp_path):
    folder = os.path.join(tok_cache, "openai_clip-vit-large-patch14")
    tok = T.load_clip_tokenizer(folder, cache_dir=str(tmp_path))
    assert tok("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT
    assert os.listdir(tmp_path) == []  # a local folder is not copied into the cache


def test_build_refuses_foreign_folder(tmp_path):
    foreign = tmp_path / "google_t5-v1_1-xxl"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError) as ei:
        B.build_tokenizer_cache(tmp_path, targets=["t5"])
    assert "--force" in str(ei.value) and "google_t5-v1_1-xxl" in str(ei.value)
    assert (foreign / "notes.txt").exists()
    logs = []
    B.build_tokenizer_cache(tmp_path, targets=["t5"], force=True, log=logs.append)
    assert not (foreign / "notes.txt").exists() and (foreign / "spiece.model").exists()
    assert logs and "replaced" in logs[0]
    # an existing tokenizer folder is replaced without --force
    B.build_tokenizer_cache(tmp_path, targets=["t5"])
    with pytest.raises(UserInputError):
        B.build_tokenizer_cache(tmp_path, targets=["nope"])
    assert sorted(os.listdir(tmp_path)) == ["google_t5-v1_1-xxl"]  # no temp folders left


def _run(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120, **kw)


def test_make_tokenizers_cli(tmp_path):
    out = tmp_path / "tok"
    r = _run(["tools/make_tokenizers.py", "--out", str(out), "--only", "clip-g", "t5"])
    assert r.returncode == 0, r.stderr
    assert "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k" in r.stdout and "google_t5-v1_1-xxl" in r.stdout
    assert "--tokenizer_cache_dir" in r.stdout
    tok = T.load_clip_tokenizer(T.CLIP_G_ID, cache_dir=str(out))
    assert tok.pad_token_id == 0

    (out / "foreign").mkdir()
    (tmp_path / "file").write_text("x")
    r = _run(["tools/make_tokenizers.py", "--out", str(tmp_path / "file")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a folder" in r.stderr


def test_cli_help_and_light_imports():
    r = _run(["tools/make_tokenizers.py", "--help"])
    assert r.returncode == 0 and "--out" in r.stdout
    code = "import sys, library.tokenizers, library.tokenizer_builder; assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    r = _run(["-c", code])
    assert r.returncode == 0, r.stderr
