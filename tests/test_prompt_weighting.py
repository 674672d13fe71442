"""Prompt weighting: the (text)/[text]/(text:w) syntax, token weights and their effect on embeddings."""

from __future__ import annotations

import pytest
import torch

from library.arch.sd import SDArchitecture
from library.inference.prompt_weighting import (
    apply_token_weights,
    encode_weighted,
    parse_prompt_attention,
    tokenize_weighted,
)
from library.models.sd.loading import load_sd_models
from library.tokenizers import load_sd_tokenizer

R = 1.1
S = 1 / 1.1


def _approx(pieces):
    return [(t, pytest.approx(w)) for t, w in pieces]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a plain prompt", [("a plain prompt", 1.0)]),
        ("a (cat)", [("a ", 1.0), ("cat", R)]),
        ("((cat))", [("cat", R * R)]),
        ("[cat]", [("cat", S)]),
        ("[[cat]]", [("cat", S * S)]),
        ("a (cat:1.5) b", [("a ", 1.0), ("cat", 1.5), (" b", 1.0)]),
        ("(cat: 0.5 )", [("cat", 0.5)]),
        ("((cat:1.5))", [("cat", 1.5 * R)]),
        ("(a (b:2) c)", [("a ", R), ("b", 2 * R), (" c", R)]),
        ("([a])", [("a", 1.0)]),
        (r"\(not weighted\) \[x\] back\\slash", [(r"(not weighted) [x] back\slash", 1.0)]),
        (r"(a \) b)", [("a ) b", R)]),
        ("(unclosed rest", [("unclosed rest", R)]),
        ("a [open", [("a ", 1.0), ("open", S)]),
        ("stray ) and ] and :1.2)", [("stray ) and ] and :1.2)", 1.0)]),
        ("a (b:1.0) c", [("a b c", 1.0)]),
        ("time 12:30 (x:y)", [("time 12:30 ", 1.0), ("x:y", R)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_parse(text, expected):
    assert parse_prompt_attention(text) == _approx(expected)


@pytest.fixture(scope="module")
def tok(tokenizer_cache):
    return load_sd_tokenizer(False, tokenizer_cache)


@pytest.fixture(scope="module")
def tok2(tokenizer_cache):
    return load_sd_tokenizer(True, tokenizer_cache)


def test_token_weights_follow_the_pieces(tok):
    t = tokenize_weighted(tok, ["a photo of a (cat:1.5), [dog]"])
    plain = SDArchitecture().tokenize(tok, ["a photo of a cat, dog"])
    assert torch.equal(t.input_ids, plain)  # same ids as the plain caption
    ids = t.input_ids[0].tolist()
    cat = tok("cat", add_special_tokens=False).input_ids[0]
    dog = tok("dog", add_special_tokens=False).input_ids[0]
    w = t.weights[0]
    assert w[ids.index(cat)] == pytest.approx(1.5)
    assert w[ids.index(dog)] == pytest.approx(S)
    assert (w[[i for i, x in enumerate(ids) if x not in (cat, dog)]] == 1.0).all()  # incl. BOS, EOS, padding
    assert t.input_ids.shape == (1, 77) and t.windows == 1


@pytest.mark.parametrize("v2", [False, True])
def test_layout_matches_the_tokenizer_padding(v2, tok, tok2):
    tk = tok2 if v2 else tok
    prompts = ["short", "word " * 160]
    t = tokenize_weighted(tk, prompts, 150)
    assert torch.equal(t.input_ids, SDArchitecture(v2).tokenize(tk, prompts, 150))
    assert t.truncated == [0, 10]


def test_long_prompts_make_windows(tok):
    words = "cat " * 150  # 150 content tokens
    t = tokenize_weighted(tok, [words], 225, fit_to_longest=True)
    assert t.input_ids.shape == (1, 152) and t.windows == 2
    windows = SDArchitecture.split_into_windows(t.input_ids, tok)
    assert windows.shape == (2, 77)
    assert (windows[:, 0] == tok.bos_token_id).all() and (windows[:, -1] == tok.eos_token_id).all()
    # fit_to_longest uses as few windows as the longest prompt of the batch needs
    assert tokenize_weighted(tok, ["a cat"], 225, fit_to_longest=True).input_ids.shape == (1, 77)
    assert tokenize_weighted(tok, ["a cat"], 225).input_ids.shape == (1, 227)
    assert tokenize_weighted(tok, ["a cat", "cat " * 80], 225, fit_to_longest=True).input_ids.shape == (2, 152)


def test_apply_weights_modes():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, generator=g) + 0.3
    weights = torch.ones(2, 5)
    weights[0, 2] = 1.5
    none = apply_token_weights(hidden, weights)
    torch.testing.assert_close(none[0, 2], hidden[0, 2] * 1.5)
    mask = weights != 1.5
    torch.testing.assert_close(none[mask], hidden[mask])
    orig = apply_token_weights(hidden, weights, "original")
    torch.testing.assert_close(orig.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)))
    torch.testing.assert_close(orig[0], none[0] * (hidden[0].mean() / none[0].mean()))
    absm = apply_token_weights(hidden, weights, "abs")
    torch.testing.assert_close(absm.abs().mean(dim=(1, 2)), hidden.abs().mean(dim=(1, 2)))
    torch.testing.assert_close(orig[1], hidden[1])  # all-ones row unchanged
    with pytest.raises(ValueError):
        apply_token_weights(hidden, weights, "bogus")


def test_weighted_encoding_scales_that_token(tiny_sd, tok):
    arch = SDArchitecture()
    te = load_sd_models(tiny_sd("sd1").path).text_encoder
    with torch.no_grad():
        plain = arch.encode_tokens(te, arch.tokenize(tok, ["a photo of a cat"]), tok)
        weighted = encode_weighted(arch, te, tok, ["a photo of a (cat:1.5)"])
        ids = arch.tokenize(tok, ["a photo of a cat"])[0].tolist()
        pos = ids.index(tok("cat", add_special_tokens=False).input_ids[0])
        torch.testing.assert_close(weighted[0, pos], plain[0, pos] * 1.5)
        others = [i for i in range(77) if i != pos]
        torch.testing.assert_close(weighted[0, others], plain[0, others])
        # gen_img's default normalisation keeps the mean
        normed = encode_weighted(arch, te, tok, ["a photo of a (cat:1.5)"], normalize="original")
        torch.testing.assert_close(normed.mean(), plain.mean())
        # long prompt: 150 tokens -> 2 windows of 77 -> 152 states
        long_ctx = encode_weighted(arch, te, tok, ["(cat:1.2) " + "dog " * 149], max_token_length=150)
        assert long_ctx.shape == (1, 152, te.config.hidden_size)
