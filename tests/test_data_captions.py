"""Caption options, one by one and in their documented order."""

import random

import pytest

from library.data.captions import (
    CaptionOptions,
    count_tags,
    expand_wildcards,
    fixed_caption,
    parse_weighted_caption,
    process_caption,
    resolve_token_warmup_step,
    split_caption_tokens,
)

CAP = "a, b, c, d, e"


def run(caption, rng=None, epoch=1, step=0, warmup=None, **kw):
    return process_caption(caption, CaptionOptions(**kw), rng or random.Random(0), epoch, step, warmup)


def test_plain_caption_unchanged_and_first_line_only():
    assert run(CAP) == CAP
    assert run("line one\nline two") == "line one"


def test_prefix_and_suffix_are_space_joined():
    assert run("x", caption_prefix="pre,", caption_suffix=", post") == "pre, x , post"
    assert run("x", caption_prefix="pre") == "pre x"
    assert run("x", caption_suffix="post") == "x post"


def test_prefix_suffix_are_fixed_when_shuffling_with_keep_tokens_separator():
    # prefix/suffix come first, so with a keep_tokens_separator they sit in the fixed parts
    out = run("a, b, c", rng=random.Random(3), shuffle_caption=True, keep_tokens_separator="|||",
              caption_prefix="P |||", caption_suffix="||| S")
    head, *middle, tail = out.split(", ")
    assert head == "P" and tail == "S"
    assert sorted(middle) == ["a", "b", "c"]


def test_caption_dropout_rate_and_every_n_epochs():
    assert run(CAP, caption_dropout_rate=1.0) == ""
    assert run(CAP, caption_dropout_rate=0.0) == CAP
    rng = random.Random(1)
    drops = sum(run(CAP, rng=rng, caption_dropout_rate=0.3) == "" for _ in range(2000))
    assert 450 < drops < 750
    assert run(CAP, epoch=2, caption_dropout_every_n_epochs=2) == ""
    assert run(CAP, epoch=3, caption_dropout_every_n_epochs=2) == CAP
    assert run(CAP, epoch=1, caption_dropout_every_n_epochs=1) == ""


def test_dropout_skips_everything_after_it():
    # a dropped caption stays empty even with a suffix (suffix is applied before dropout)
    assert run(CAP, caption_suffix="s", caption_dropout_rate=1.0, shuffle_caption=True) == ""


def test_wildcards_choose_alternatives_and_lines():
    rng = random.Random(0)
    seen = {run("a {red|green|blue} ball", rng=rng, enable_wildcard=True) for _ in range(200)}
    assert seen == {"a red ball", "a green ball", "a blue ball"}
    seen = {run("first\n\nsecond", rng=rng, enable_wildcard=True) for _ in range(100)}
    assert seen == {"first", "second"}
    assert run("{{literal}} {x|x}", enable_wildcard=True) == "{literal} x"
    # without enable_wildcard nothing is expanded
    assert run("a {b|c}") == "a {b|c}"


def test_prefix_applies_to_every_wildcard_line():
    seen = {run("one\ntwo", rng=random.Random(i), enable_wildcard=True, caption_prefix="P") for i in range(30)}
    assert seen == {"P one", "P two"}


def test_expand_wildcards_empty():
    assert expand_wildcards("", random.Random(0)) == ""


def test_keep_tokens_fixes_leading_tokens_while_shuffling():
    rng = random.Random(5)
    outs = {run(CAP, rng=rng, shuffle_caption=True, keep_tokens=2) for _ in range(50)}
    assert all(o.startswith("a, b, ") for o in outs)
    assert len(outs) > 1
    assert all(sorted(o.split(", ")) == ["a", "b", "c", "d", "e"] for o in outs)


def test_keep_tokens_separator_fixed_head_and_tail():
    cap = "h1, h2 ||| f1, f2, f3 ||| t1, t2"
    opts = CaptionOptions(keep_tokens_separator="|||")
    assert split_caption_tokens(cap, opts) == (["h1", "h2"], ["f1", "f2", "f3"], ["t1", "t2"])
    rng = random.Random(0)
    for _ in range(20):
        out = run(cap, rng=rng, shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5)
        parts = out.split(", ")
        assert parts[:2] == ["h1", "h2"] and parts[-2:] == ["t1", "t2"]
        assert sorted(parts[2:5]) == ["f1", "f2", "f3"]


def test_keep_tokens_separator_absent_falls_back_to_keep_tokens():
    opts = CaptionOptions(keep_tokens_separator="|||", keep_tokens=1)
    assert split_caption_tokens("a, b, c", opts) == (["a"], ["b", "c"], [])


def test_split_keeps_empty_tokens_without_separator_but_drops_them_with_it():
    assert split_caption_tokens("a,,b", CaptionOptions()) == ([], ["a", "", "b"], [])
    assert split_caption_tokens("a,, ||| b,,c", CaptionOptions(keep_tokens_separator="|||")) == (["a"], ["b", "c"], [])


def test_custom_caption_separator_and_rejoin_with_comma_space():
    out = run("a;b;c", rng=random.Random(2), shuffle_caption=True, caption_separator=";")
    assert sorted(out.split(", ")) == ["a", "b", "c"]


def test_shuffle_without_keep_changes_order_deterministically():
    a = run(CAP, rng=random.Random(42), shuffle_caption=True)
    b = run(CAP, rng=random.Random(42), shuffle_caption=True)
    assert a == b
    assert {run(CAP, rng=random.Random(i), shuffle_caption=True) for i in range(20)} != {CAP}


def test_tag_dropout_only_touches_flexible_tokens():
    assert run(CAP, caption_tag_dropout_rate=1.0, keep_tokens=1) == "a"
    rng = random.Random(0)
    counts = [len(run(CAP, rng=rng, caption_tag_dropout_rate=0.5, keep_tokens=1).split(", ")) for _ in range(500)]
    mean_flex = sum(c - 1 for c in counts) / len(counts)
    assert 1.6 < mean_flex < 2.4


def test_token_warmup():
    # 4 flexible tokens, warmup over 10 steps from 1 token
    caption = "k, a, b, c, d"
    kw = dict(keep_tokens=1, token_warmup_min=1, token_warmup_step=10)
    assert run(caption, step=0, **kw) == "k, a"
    assert run(caption, step=5, **kw) == "k, a, b"  # floor(5*3/10)+1 = 2
    assert run(caption, step=9, **kw) == "k, a, b, c"  # floor(27/10)+1 = 3
    assert run(caption, step=10, **kw) == caption


def test_token_warmup_fraction_resolves_against_max_steps():
    assert resolve_token_warmup_step(0.5, 100) == 50
    assert resolve_token_warmup_step(0.5, None) == 0
    assert resolve_token_warmup_step(20, 100) == 20
    caption = "a, b, c, d"
    opts = dict(token_warmup_min=1, token_warmup_step=0.5)
    assert run(caption, step=0, warmup=resolve_token_warmup_step(0.5, 100), **opts) == "a"
    assert run(caption, step=50, warmup=resolve_token_warmup_step(0.5, 100), **opts) == caption


def test_secondary_separator_replaced_after_shuffle():
    cap = "a;;;b, c"
    outs = {run(cap, rng=random.Random(i), shuffle_caption=True, secondary_separator=";;;") for i in range(20)}
    # "a;;;b" moved as one token, then became "a,b"
    assert outs == {"a,b, c", "c, a,b"}
    assert run(cap, secondary_separator=";;;") == "a,b, c"


def test_order_wildcard_before_shuffle():
    # the wildcard alternative containing a separator is split into tokens afterwards
    out = run("{x, y|x, y}, z", rng=random.Random(1), enable_wildcard=True, shuffle_caption=True)
    assert sorted(out.split(", ")) == ["x", "y", "z"]


def test_no_token_processing_keeps_spacing():
    # without shuffle/warmup/tag dropout the caption is not re-joined
    assert run("a,b ,  c") == "a,b ,  c"
    assert run("a,b ,  c", shuffle_caption=True, rng=random.Random(0)).count(", ") == 2


def test_fixed_caption_for_cached_text_encoder_outputs():
    opts = CaptionOptions(caption_prefix="P", secondary_separator="::", shuffle_caption=True)
    assert fixed_caption("a::b, c\nsecond", opts) == "P a,b, c"


def test_options_flags():
    assert not CaptionOptions().is_random
    assert CaptionOptions(enable_wildcard=True).is_random
    assert CaptionOptions(token_warmup_step=5).needs_token_processing


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
        ("a ((cat))", [("a ", 1.0), ("cat", pytest.approx(1.21))]),
        ("a [cat]", [("a ", 1.0), ("cat", pytest.approx(1 / 1.1))]),
        ("(cat:1.5) dog", [("cat", 1.5), (" dog", 1.0)]),
        ("(a (b:2))", [("a ", 1.1), ("b", pytest.approx(2.2))]),
        (r"\(not\) weighted", [("(not) weighted", 1.0)]),
        ("(open", [("open", 1.1)]),
        ("a: b", [("a: b", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_weighted_caption(text, expected):
    assert parse_weighted_caption(text) == expected


def test_count_tags():
    assert count_tags(["A, b", "a,  c", ""]) == {"a": 2, "b": 1, "c": 1}
