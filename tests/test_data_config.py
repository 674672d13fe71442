"""Dataset TOML/JSON: parsing, validation messages, fallback chain, command-line datasets."""

import json
import os

import pytest

from library.data.config_schema import (
    SchemaSupport,
    blueprint_from_args,
    generate_blueprint,
    load_dataset_config,
    validate_user_config,
)
from library.errors import UserInputError
from test_data_helpers import dataset_args, make_tree, write


def cfg(tmp_path, text, name="ds.toml"):
    return write(str(tmp_path / name), text)


def check(tmp_path, text, support=SchemaSupport()):
    path = cfg(tmp_path, text)
    return validate_user_config(load_dataset_config(path), path, support)


def error_of(tmp_path, text, support=SchemaSupport()):
    with pytest.raises(UserInputError) as exc:
        check(tmp_path, text, support)
    return str(exc.value)


MINIMAL = """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "/data/a"
"""


def test_minimal_config_validates(tmp_path):
    out = check(tmp_path, MINIMAL)
    assert out["datasets"][0]["resolution"] == (512, 512)
    assert out["datasets"][0]["_kind"] == "dreambooth"


def test_toml_syntax_error_names_file_and_line(tmp_path):
    msg = error_of(tmp_path, "[general]\nshuffle_caption = true\nkeep_tokens = = 1\n")
    assert "ds.toml" in msg and "TOML syntax error" in msg and "line 3" in msg


def test_json_config_and_syntax_error(tmp_path):
    path = cfg(tmp_path, json.dumps({"datasets": [{"resolution": [64, 32], "subsets": [{"image_dir": "x"}]}]}), "d.json")
    out = validate_user_config(load_dataset_config(path), path)
    assert out["datasets"][0]["resolution"] == (64, 32)
    bad = cfg(tmp_path, '{"datasets": [\n  {"resolution": 5,}\n]}', "bad.json")
    with pytest.raises(UserInputError, match=r"bad.json: JSON syntax error at line 2"):
        load_dataset_config(bad)


def test_other_extension_and_missing_file(tmp_path):
    with pytest.raises(UserInputError, match=r"must end in \.toml or \.json"):
        load_dataset_config(cfg(tmp_path, "", "ds.yaml"))
    with pytest.raises(UserInputError, match="not found"):
        load_dataset_config(str(tmp_path / "nope.toml"))


def test_unknown_key_suggests_close_match(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "  num_repeat = 3\n")
    assert "ds.toml" in msg and "[[datasets]] #1, [[datasets.subsets]] #1" in msg
    assert "'num_repeat'" in msg and "did you mean 'num_repeats'" in msg


def test_unknown_key_lists_allowed(tmp_path):
    msg = error_of(tmp_path, "[general]\nbogus_option = 1\n" + MINIMAL)
    assert "[general]" in msg and "'bogus_option'" in msg and "allowed here:" in msg and "shuffle_caption" in msg


def test_key_at_wrong_level(tmp_path):
    msg = error_of(tmp_path, "[general]\nimage_dir = 'x'\n" + MINIMAL)
    assert "[general]" in msg and "'image_dir'" in msg and "[[datasets.subsets]]" in msg
    msg = error_of(tmp_path, MINIMAL + "  batch_size = 2\n")
    assert "'batch_size'" in msg and "dataset option" in msg
    msg = error_of(tmp_path, "[general]\nprior_loss_weight = 1.0\n" + MINIMAL)
    assert "command line (--prior_loss_weight)" in msg
    msg = error_of(tmp_path, "resolution = 512\n" + MINIMAL)
    assert "top-level key 'resolution'" in msg


@pytest.mark.parametrize(
    "line,expected",
    [
        ("num_repeats = 1.5", "'num_repeats' expected an integer, got float 1.5"),
        ("num_repeats = true", "'num_repeats' expected an integer, got boolean true"),
        ("shuffle_caption = 'yes'", "'shuffle_caption' expected true or false, got string 'yes'"),
        ("caption_prefix = 3", "'caption_prefix' expected a string, got integer 3"),
        ("face_crop_aug_range = [1.0]", "'face_crop_aug_range' expected an array of two numbers"),
        ("face_crop_aug_range = [3.0, 2.0]", "must not exceed"),
        ("resize_interpolation = 'fancy'", "expected one of lanczos"),
        ("custom_attributes = 5", "'custom_attributes' expected a table"),
        ("caption_dropout_rate = 'x'", "'caption_dropout_rate' expected a number"),
    ],
)
def test_wrong_types(tmp_path, line, expected):
    msg = error_of(tmp_path, MINIMAL + f"  {line}\n")
    assert expected in msg and "ds.toml" in msg


def test_wrong_resolution_type(tmp_path):
    msg = error_of(tmp_path, MINIMAL.replace("resolution = 512", "resolution = '512'"))
    assert "[[datasets]] #1: 'resolution' expected a size like 512" in msg
    msg = error_of(tmp_path, MINIMAL.replace("resolution = 512", "resolution = [512, 512, 3]"))
    assert "'resolution'" in msg


def test_int_accepted_for_float_fields(tmp_path):
    out = check(tmp_path, MINIMAL + "  caption_dropout_rate = 0\n")
    assert out["datasets"][0]["subsets"][0]["caption_dropout_rate"] == 0


def test_single_bracket_tables_explained(tmp_path):
    msg = error_of(tmp_path, "[datasets]\nresolution = 512\n")
    assert "write [[datasets]] (double brackets)" in msg
    msg = error_of(tmp_path, "[[datasets]]\nresolution = 512\n[datasets.subsets]\nimage_dir = 'a'\n")
    assert "[[datasets.subsets]] (double brackets)" in msg


def test_missing_datasets_and_subsets(tmp_path):
    assert "no [[datasets]]" in error_of(tmp_path, "[general]\nshuffle_caption = true\n")
    assert "has no [[datasets.subsets]]" in error_of(tmp_path, "[[datasets]]\nresolution = 512\n")


def test_required_key_missing(tmp_path):
    msg = error_of(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'm.json'\n[[datasets]]\n"
                             "[[datasets.subsets]]\nnum_repeats = 2\n")
    assert "[[datasets]] #2, [[datasets.subsets]] #1: required key 'image_dir' is missing" in msg


def test_mixing_kinds_is_an_error(tmp_path):
    msg = error_of(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n[[datasets.subsets]]\nmetadata_file='m.json'\n")
    assert "mixes subsets with metadata_file" in msg


def test_script_support_switches(tmp_path):
    ft_only = SchemaSupport(dreambooth=False)
    assert "metadata only" in error_of(tmp_path, MINIMAL, ft_only)
    msg = error_of(tmp_path, "[general]\nclass_tokens = 'x'\n[[datasets]]\n[[datasets.subsets]]\nmetadata_file='m'\n",
                   ft_only)
    assert "'class_tokens'" in msg
    no_ft = SchemaSupport(finetuning=False)
    assert "metadata_file" in error_of(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nmetadata_file='m'\n", no_ft)
    no_drop = SchemaSupport(dropout=False)
    assert "caption dropout is not supported" in error_of(tmp_path, MINIMAL + "caption_dropout_rate = 0.1\n", no_drop)
    msg = error_of(tmp_path, MINIMAL + "conditioning_data_dir = 'c'\n")
    assert "--masked_loss" in msg
    out = check(tmp_path, MINIMAL + "conditioning_data_dir = 'c'\n", SchemaSupport(controlnet=True))
    assert out["datasets"][0]["_kind"] == "controlnet"


def test_finetuning_subset_rejects_class_tokens(tmp_path):
    msg = error_of(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nmetadata_file='m'\nclass_tokens='x'\n")
    assert "'class_tokens'" in msg and "DreamBooth-style" in msg


def test_fallback_chain(tmp_path):
    text = """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = "txt"
flip_aug = true

[[datasets]]
resolution = [64, 32]
batch_size = 4
keep_tokens = 2
  [[datasets.subsets]]
  image_dir = "/a"
  keep_tokens = 3
  [[datasets.subsets]]
  image_dir = "/b"
  flip_aug = false
  custom_attributes = { diff_output_preservation = true }

[[datasets]]
  [[datasets.subsets]]
  image_dir = "/c"
"""
    path = cfg(tmp_path, text)
    config = validate_user_config(load_dataset_config(path), path)
    args = dataset_args(["--resolution", "16,8", "--train_batch_size", "3", "--color_aug", "--caption_prefix", "p",
                         "--prior_loss_weight", "0.5", "--dataset_repeats", "4"])
    bp = generate_blueprint(config, args, source=path)
    d1, d2 = bp
    assert d1.resolution == (64, 32) and d1.batch_size == 4
    assert d2.resolution == (16, 8) and d2.batch_size == 3
    a, b = d1.subsets
    assert (a.keep_tokens, b.keep_tokens) == (3, 2)
    assert d2.subsets[0].keep_tokens == 1
    assert a.caption_extension == ".txt"  # leading dot added
    assert a.shuffle_caption and a.flip_aug and not b.flip_aug
    assert a.color_aug and a.caption_prefix == "p"  # command line as the lowest level
    assert a.num_repeats == 4  # --dataset_repeats maps to num_repeats
    assert d1.prior_loss_weight == 0.5
    assert b.custom_attributes == {"diff_output_preservation": True}
    assert a.custom_attributes == {}
    assert a.caption_separator == ","  # argparse default
    assert d1.min_bucket_reso == 256 and d1.bucket_reso_steps == 64


def test_duplicate_and_zero_repeat_subsets_ignored(tmp_path, caplog):
    text = MINIMAL + "[[datasets.subsets]]\nimage_dir = '/data/a'\n[[datasets.subsets]]\nimage_dir='/z'\nnum_repeats=0\n"
    path = cfg(tmp_path, text)
    bp = generate_blueprint(validate_user_config(load_dataset_config(path), path), None, source=path)
    assert [s.image_dir for s in bp[0].subsets] == ["/data/a"]
    assert "already used" in caplog.text and "num_repeats is 0" in caplog.text


def test_value_range_errors(tmp_path):
    path = cfg(tmp_path, MINIMAL + "caption_dropout_rate = 1.5\n")
    with pytest.raises(UserInputError, match="caption_dropout_rate must be between 0 and 1"):
        generate_blueprint(validate_user_config(load_dataset_config(path), path), None, source=path)
    path = cfg(tmp_path, MINIMAL.replace("resolution = 512\n", ""))
    with pytest.raises(UserInputError, match="no resolution given"):
        generate_blueprint(validate_user_config(load_dataset_config(path), path), None, source=path)


def test_caption_extention_alias_and_face_crop_from_args(tmp_path):
    args = dataset_args(["--caption_extention", ".tags", "--face_crop_aug_range", "2.0,4.0", "--resolution", "64"])
    path = cfg(tmp_path, MINIMAL)
    bp = generate_blueprint(validate_user_config(load_dataset_config(path), path), args, source=path)
    s = bp[0].subsets[0]
    assert s.caption_extension == ".tags" and s.face_crop_aug_range == (2.0, 4.0)
    with pytest.raises(UserInputError, match="face_crop_aug_range"):
        generate_blueprint(validate_user_config(load_dataset_config(path), path),
                           dataset_args(["--face_crop_aug_range", "x"]), source=path)


def test_dataset_config_ignores_train_data_dir(tmp_path, caplog):
    path = cfg(tmp_path, MINIMAL)
    args = dataset_args(["--dataset_config", path, "--train_data_dir", "/whatever", "--in_json", "m.json"])
    bp = blueprint_from_args(args)
    assert bp[0].subsets[0].image_dir == "/data/a"
    assert "--train_data_dir, --in_json are ignored" in caplog.text


def test_command_line_dreambooth_from_folders(tmp_path, caplog):
    root = str(tmp_path)
    make_tree(root, {"train/10_sks dog": [((16, 16), None)], "train/3_a_b c": [((16, 16), None)],
                     "train/noprefix": [((16, 16), None)], "train/0_zero": [((16, 16), None)],
                     "reg/1_dog": [((16, 16), None)]})
    args = dataset_args(["--train_data_dir", f"{root}/train", "--reg_data_dir", f"{root}/reg", "--resolution", "16"])
    (d,) = blueprint_from_args(args)
    got = [(os.path.basename(s.image_dir), s.num_repeats, s.class_tokens, s.is_reg) for s in d.subsets]
    assert got == [("10_sks dog", 10, "sks dog", False), ("3_a_b c", 3, "a_b c", False), ("1_dog", 1, "dog", True)]
    assert "noprefix'" in caplog.text and "must start with a repeat count" in caplog.text
    assert "repeat count 0 is below 1" in caplog.text


def test_command_line_errors(tmp_path):
    with pytest.raises(UserInputError, match="give --train_data_dir"):
        blueprint_from_args(dataset_args(["--resolution", "16"]))
    with pytest.raises(UserInputError, match="--train_data_dir folder not found"):
        blueprint_from_args(dataset_args(["--train_data_dir", str(tmp_path / "missing"), "--resolution", "16"]))
    make_tree(str(tmp_path), {"flat": [((16, 16), None)]})
    with pytest.raises(UserInputError, match="holds 1 image\\(s\\) directly"):
        blueprint_from_args(dataset_args(["--train_data_dir", str(tmp_path / "flat"), "--resolution", "16"]))


def test_command_line_in_json_and_controlnet(tmp_path):
    (d,) = blueprint_from_args(dataset_args(["--in_json", "m.json", "--train_data_dir", "imgs", "--resolution", "8"]))
    assert d.kind == "finetuning" and d.subsets[0].metadata_file == "m.json" and d.subsets[0].image_dir == "imgs"
    make_tree(str(tmp_path), {"t/2_x": [((16, 16), None)]})
    args = dataset_args(["--train_data_dir", str(tmp_path / "t"), "--conditioning_data_dir", "cond",
                         "--masked_loss", "--resolution", "16"])
    (d,) = blueprint_from_args(args, SchemaSupport(controlnet=True))
    assert d.kind == "controlnet" and d.subsets[0].conditioning_data_dir == "cond" and d.subsets[0].num_repeats == 2
