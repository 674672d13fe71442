"""Prompt files (.txt/.toml/.json), inline prompt options and dynamic prompts."""

from __future__ import annotations

import json
import logging
import random

import pytest

from library.errors import UserInputError
from library.inference.prompt_file import (
    GEN,
    OPTIONS,
    SAMPLE,
    PromptSpec,
    expand_dynamic_prompts,
    parse_prompt_line,
    read_prompt_file,
    resolve_sample_spec,
)

TXT = """# comment line
a cat on a mat --w 768 --h 512 --d 42 --s 20 --l 5.5 --n blurry, ugly

   
a dog --ss euler_a
"""

TOML = """
[prompt]
width = 768
height = 512
scale = 5.5
sample_steps = 20

[[prompt.subset]]
prompt = "a cat on a mat"
seed = 42
negative_prompt = "blurry, ugly"

[[prompt.subset]]
prompt = "a dog"
width = 512
height = 512
scale = 7.5
sample_steps = 30
sample_sampler = "euler_a"
"""

JSON = [
    {"prompt": "a cat on a mat", "width": 768, "height": 512, "seed": 42, "sample_steps": 20, "scale": 5.5,
     "negative_prompt": "blurry, ugly"},
    "a dog --ss euler_a",
]


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def _resolved(specs):
    return [resolve_sample_spec(s) for s in specs]


def test_three_file_types_give_the_same_prompts(tmp_path):
    txt = read_prompt_file(_write(tmp_path, "p.txt", TXT))
    toml = read_prompt_file(_write(tmp_path, "p.toml", TOML))
    js = read_prompt_file(_write(tmp_path, "p.json", json.dumps(JSON)))
    assert len(txt) == len(toml) == len(js) == 2
    first = txt[0]
    assert (first.prompt, first.width, first.height, first.seed, first.sample_steps, first.scale, first.negative_prompt) == (
        "a cat on a mat", 768, 512, 42, 20, 5.5, "blurry, ugly")
    assert [s.enum for s in txt] == [0, 1]
    assert _resolved(txt) == _resolved(toml) == _resolved(js)
    assert _resolved(txt)[1] == PromptSpec(prompt="a dog", width=512, height=512, sample_steps=30, scale=7.5,
                                           sample_sampler="euler_a", enum=1)


# (key, value text, field, expected)
CASES = [
    ("w", "640", "width", 640), ("h", "384", "height", 384), ("d", "7", "seeds", [7]), ("s", "25", "sample_steps", 25),
    ("l", "6.5", "scale", 6.5), ("n", "low quality, (bad:1.2)", "negative_prompt", "low quality, (bad:1.2)"),
    ("g", "3.5", "guidance_scale", 3.5), ("ss", "k_euler", "sample_sampler", "k_euler"), ("cn", "ctrl.png", "controlnet_image", "ctrl.png"),
    ("ctr", "0.25", "cfg_trunc_ratio", 0.25), ("rcfg", "1.5", "renorm_cfg", 1.5), ("fs", "3.0", "flow_shift", "3.0"),
    ("ow", "1024", "original_width", 1024), ("oh", "768", "original_height", 768),
    ("nw", "512", "original_width_negative", 512), ("nh", "256", "original_height_negative", 256),
    ("ct", "16", "crop_top", 16), ("cl", "8", "crop_left", 8), ("nl", "2.5", "negative_scale", 2.5),
    ("t", "0.6", "strength", 0.6), ("c", "clip text", "clip_prompt", "clip text"),
    ("am", "0.5,1,0.25", "network_multipliers", [0.5, 1.0, 0.25]), ("f", "out.png", "file_name", "out.png"),
    ("dsd1", "3", "ds_depth_1", 3), ("dst1", "700", "ds_timesteps_1", 700), ("dsd2", "5", "ds_depth_2", 5),
    ("dst2", "500", "ds_timesteps_2", 500), ("dsr", "0.4", "ds_ratio", 0.4), ("glt", "650", "gradual_latent_timesteps", 650),
    ("glr", "0.5", "gradual_latent_ratio", 0.5), ("gle", "3", "gradual_latent_every_n_steps", 3),
    ("gls", "0.125", "gradual_latent_ratio_step", 0.125), ("glsn", "1.0", "gradual_latent_s_noise", 1.0),
    ("glus", "3,0.5,0.5,1", "gradual_latent_unsharp_params", "3,0.5,0.5,1"),
]


def test_cases_cover_every_option():
    assert sorted(k for k, *_ in CASES) == sorted(OPTIONS)


@pytest.mark.parametrize("key,value,fieldname,expected", CASES, ids=[c[0] for c in CASES])
def test_each_inline_option(key, value, fieldname, expected, caplog):
    context = SAMPLE if SAMPLE in OPTIONS[key].contexts else GEN
    with caplog.at_level(logging.WARNING):
        spec = parse_prompt_line(f"a prompt --{key} {value}", context)
    assert spec.prompt == "a prompt"
    assert getattr(spec, fieldname) == expected
    assert caplog.records == []
    # upper-case keys work too
    assert getattr(parse_prompt_line(f"a prompt --{key.upper()} {value}", context), fieldname) == expected


def test_option_of_the_other_context_is_read_and_reported(caplog):
    with caplog.at_level(logging.WARNING):
        spec = parse_prompt_line("a cat --t 0.5 --am 0.7", SAMPLE)
    assert spec.strength == 0.5 and spec.network_multipliers == [0.7]
    assert "--t" in caplog.text and "gen_img" in caplog.text


def test_unknown_option_warns_with_its_name_and_keeps_the_prompt(caplog):
    with caplog.at_level(logging.WARNING):
        spec = parse_prompt_line("a cat on a mat --zz 3 --w 256", SAMPLE, "prompts.txt line 2")
    assert spec.prompt == "a cat on a mat" and spec.width == 256
    assert "--zz" in caplog.text and "prompts.txt line 2" in caplog.text


def test_invalid_numbers_are_logged_and_ignored(caplog):
    with caplog.at_level(logging.WARNING):
        spec = parse_prompt_line("a cat --w wide --l high --d x --s", SAMPLE)
    assert spec.width is None and spec.scale is None and spec.seed is None and spec.sample_steps is None
    for key in ("--w", "--l", "--d", "--s"):
        assert key in caplog.text


def test_steps_are_clamped_and_seed_lists():
    assert parse_prompt_line("x --s 5000").sample_steps == 1000
    assert parse_prompt_line("x --s 0").sample_steps == 1
    gen = parse_prompt_line("x --d 1,2, 3", GEN)
    assert gen.seeds == [1, 2, 3] and gen.seed == 1
    assert parse_prompt_line("x --d 5,6", SAMPLE).seeds == [5]
    assert parse_prompt_line("x --nl none", GEN).negative_scale == "none"


def test_text_file_comments_and_blank_lines(tmp_path):
    specs = read_prompt_file(_write(tmp_path, "p.txt", "#skip\n\n  \nfirst\n #not a comment (first char is a space)\nsecond --n x\n"))
    assert [s.prompt for s in specs] == ["first", "#not a comment (first char is a space)", "second"]
    assert [s.enum for s in specs] == [0, 1, 2]


def test_table_values_are_converted_and_unknown_keys_warn(tmp_path, caplog):
    data = [{"prompt": "p", "width": "640", "seed": 3, "sample_steps": 2000, "colour": "red", "scale": "abc"}]
    with caplog.at_level(logging.WARNING):
        (spec,) = read_prompt_file(_write(tmp_path, "p.json", json.dumps(data)))
    assert spec.width == 640 and spec.seed == 3 and spec.seeds == [3] and spec.sample_steps == 1000
    assert spec.scale is None and spec.extra == {"colour": "red"}
    assert "colour" in caplog.text and "scale" in caplog.text


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("a.toml", "[other]\nx = 1\n", "[prompt]"),
        ("b.toml", "[prompt\n", "invalid TOML"),
        ("c.json", '{"prompt": "x"}', "JSON list"),
        ("d.json", "[1, ", "invalid JSON"),
        ("e.json", '[{"width": 5}]', "no 'prompt'"),
    ],
)
def test_bad_files_are_user_errors(tmp_path, name, text, message):
    with pytest.raises(UserInputError, match=message.replace("[", r"\[")):
        read_prompt_file(_write(tmp_path, name, text))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        read_prompt_file(str(tmp_path / "none.txt"))


def test_resolve_sample_defaults():
    spec = resolve_sample_spec(PromptSpec(prompt="x", width=515, height=30, sample_steps=None), sampler="k_euler")
    assert (spec.width, spec.height, spec.sample_steps, spec.scale, spec.sample_sampler, spec.seed) == (512, 64, 30, 7.5, "k_euler", None)
    flux = resolve_sample_spec(PromptSpec(prompt="x", width=1000), size_multiple=16, steps=20, scale=1.0)
    assert (flux.width, flux.sample_steps, flux.scale) == (992, 20, 1.0)


def test_dynamic_prompts():
    rng = random.Random(0)
    for _ in range(20):
        (one,) = expand_dynamic_prompts("a {red|green|blue} ball", 1, rng)
        assert one in {"a red ball", "a green ball", "a blue ball"}
        (two,) = expand_dynamic_prompts("{2$$a|b|c}", 1, rng)
        left, right = two.split(", ")
        assert left != right and {left, right} <= {"a", "b", "c"}
        (custom,) = expand_dynamic_prompts("{1-2$$ and $$x|y}", 1, rng)
        assert custom in {"x", "y", "x and y", "y and x"}
        (nested,) = expand_dynamic_prompts("{a {big|small} cat|dog}", 1, rng)
        assert nested in {"a big cat", "a small cat", "dog"}
    assert len(expand_dynamic_prompts("{a|b}", 3, rng)) == 3
    assert expand_dynamic_prompts("{e$$a|b} {e$$x|y}") == ["a x", "a y", "b x", "b y"]
    assert expand_dynamic_prompts("{e$$2$$a|b|c}") == ["a, b", "a, c", "b, c"]
    assert expand_dynamic_prompts(r"literal \{a|b\} (w:1.2) \(x\)") == [r"literal {a|b} (w:1.2) \(x\)"]
    assert expand_dynamic_prompts("no choices --w 512", 4) == ["no choices --w 512"]
