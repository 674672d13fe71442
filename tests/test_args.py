"""Shared option groups, converters and pure argument checks (library/args)."""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from library.args import groups as G
from library.args.checks import verify_training_args
from library.args.types import int_or_float, parse_resolution
from library.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
SPEC = Path(os.environ.get("SD_SPEC_DIR", REPO.parent / "shared" / "spec")) / "cli-options.md"


# ----------------------------------------------------------------------------- helpers
def options_of(parser: argparse.ArgumentParser) -> list:
    """Option names the way cli-options.md §9 counts them: positionals in, -h/--help out."""
    names = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        long_names = [s for s in action.option_strings if s.startswith("--")]
        names.append(long_names[0] if long_names else action.dest)
    return names


def own_flags(*names):
    """Stand-in for a script's own options: only their names matter for counting."""

    def add(parser):
        for name in names:
            parser.add_argument("--" + name, action="store_true")

    return add


TRAIN_NETWORK_GROUPS = [
    G.add_logging_arguments,
    G.add_sd_models_arguments,
    G.add_model_spec_arguments,
    lambda p: G.add_dataset_arguments(p, True, True, True),
    lambda p: G.add_training_arguments(p, True),
    G.add_masked_loss_arguments,
    G.add_deepspeed_arguments,
    G.add_optimizer_arguments,
    G.add_config_arguments,
    lambda p: G.add_custom_train_arguments(p, True),
    G.add_train_network_arguments,
]


# (script, builders, expected total from cli-options.md §5/§8/§9)
SCRIPTS = [
    ("train_network.py", TRAIN_NETWORK_GROUPS, 193),
    (
        "sdxl_train_network.py",
        TRAIN_NETWORK_GROUPS + [lambda p: G.add_sdxl_training_arguments(p, True)],
        196,
    ),
    (
        "flux_train_network.py",
        TRAIN_NETWORK_GROUPS + [G.add_dit_training_arguments, G.add_flux_train_arguments, own_flags("split_mode")],
        215,
    ),
    (
        "sd3_train_network.py",
        TRAIN_NETWORK_GROUPS + [G.add_dit_training_arguments, G.add_sd3_training_arguments],
        218,
    ),
    (
        "flux_train.py",
        [
            G.add_logging_arguments,
            G.add_sd_models_arguments,
            G.add_model_spec_arguments,
            lambda p: G.add_dataset_arguments(p, True, True, True),
            lambda p: G.add_training_arguments(p, False),
            G.add_masked_loss_arguments,
            G.add_deepspeed_arguments,
            G.add_sd_saving_arguments,
            G.add_optimizer_arguments,
            G.add_config_arguments,
            lambda p: G.add_custom_train_arguments(p, True),
            G.add_dit_training_arguments,
            G.add_flux_train_arguments,
            own_flags(
                "mem_eff_save",
                "fused_optimizer_groups",
                "blockwise_fused_optimizers",
                "skip_latents_validity_check",
                "double_blocks_to_swap",
                "single_blocks_to_swap",
                "cpu_offload_checkpointing",
            ),
        ],
        194,
    ),
    (
        "sd3_train.py",
        [
            G.add_logging_arguments,
            G.add_sd_models_arguments,
            G.add_model_spec_arguments,
            lambda p: G.add_dataset_arguments(p, True, True, True),
            lambda p: G.add_training_arguments(p, False),
            G.add_masked_loss_arguments,
            G.add_deepspeed_arguments,
            G.add_sd_saving_arguments,
            G.add_optimizer_arguments,
            G.add_config_arguments,
            lambda p: G.add_custom_train_arguments(p, True),
            G.add_dit_training_arguments,
            G.add_sd3_training_arguments,
            own_flags(
                "train_text_encoder",
                "train_t5xxl",
                "use_t5xxl_cache_only",
                "learning_rate_te1",
                "learning_rate_te2",
                "learning_rate_te3",
                "blockwise_fused_optimizers",
                "fused_optimizer_groups",
                "skip_latents_validity_check",
                "num_last_block_to_freeze",
            ),
        ],
        201,
    ),
    (
        "train_db.py",
        [
            G.add_logging_arguments,
            G.add_sd_models_arguments,
            G.add_model_spec_arguments,
            lambda p: G.add_dataset_arguments(p, True, False, True),
            lambda p: G.add_training_arguments(p, True),
            G.add_masked_loss_arguments,
            G.add_deepspeed_arguments,
            G.add_sd_saving_arguments,
            G.add_optimizer_arguments,
            G.add_config_arguments,
            lambda p: G.add_custom_train_arguments(p, True),
            own_flags("learning_rate_te", "no_token_padding", "stop_text_encoder_training", "no_half_vae"),
        ],
        169,
    ),
    (
        "fine_tune.py",
        [
            G.add_logging_arguments,
            G.add_sd_models_arguments,
            G.add_model_spec_arguments,
            lambda p: G.add_dataset_arguments(p, False, True, True),
            lambda p: G.add_training_arguments(p, False),
            G.add_deepspeed_arguments,
            G.add_sd_saving_arguments,
            G.add_optimizer_arguments,
            G.add_config_arguments,
            lambda p: G.add_custom_train_arguments(p, True),
            own_flags("diffusers_xformers", "train_text_encoder", "learning_rate_te", "no_half_vae"),
        ],
        167,
    ),
    (
        "sdxl_train.py",
        [
            G.add_logging_arguments,
            G.add_sd_models_arguments,
            G.add_model_spec_arguments,
            lambda p: G.add_dataset_arguments(p, True, True, True),
            lambda p: G.add_training_arguments(p, False),
            G.add_masked_loss_arguments,
            G.add_deepspeed_arguments,
            G.add_sd_saving_arguments,
            G.add_optimizer_arguments,
            G.add_config_arguments,
            lambda p: G.add_custom_train_arguments(p, True),
            lambda p: G.add_sdxl_training_arguments(p, True),
            own_flags(
                "learning_rate_te1",
                "learning_rate_te2",
                "diffusers_xformers",
                "train_text_encoder",
                "no_half_vae",
                "block_lr",
                "fused_optimizer_groups",
            ),
        ],
        176,
    ),
    (
        "train_textual_inversion.py",
        [
            G.add_logging_arguments,
            G.add_sd_models_arguments,
            G.add_model_spec_arguments,
            lambda p: G.add_dataset_arguments(p, True, True, False),
            lambda p: G.add_training_arguments(p, True),
            G.add_masked_loss_arguments,
            G.add_deepspeed_arguments,
            G.add_optimizer_arguments,
            G.add_config_arguments,
            lambda p: G.add_custom_train_arguments(p, False),
            own_flags(
                "save_model_as",
                "weights",
                "num_vectors_per_token",
                "token_string",
                "init_word",
                "use_object_template",
                "use_style_template",
                "no_half_vae",
            ),
        ],
        169,
    ),
    (
        "tools/cache_latents.py",
        [
            G.add_logging_arguments,
            G.add_sd_models_arguments,
            G.add_model_spec_arguments,
            lambda p: G.add_training_arguments(p, True),
            lambda p: G.add_dataset_arguments(p, True, True, True),
            G.add_masked_loss_arguments,
            G.add_config_arguments,
            G.add_dit_training_arguments,
            G.add_flux_train_arguments,
            own_flags("sdxl", "flux", "no_half_vae", "skip_existing"),
        ],
        160,
    ),
    (
        "tools/cache_text_encoder_outputs.py",
        [
            G.add_logging_arguments,
            G.add_sd_models_arguments,
            G.add_model_spec_arguments,
            lambda p: G.add_training_arguments(p, True),
            lambda p: G.add_dataset_arguments(p, True, True, True),
            G.add_masked_loss_arguments,
            G.add_config_arguments,
            G.add_dit_training_arguments,
            G.add_flux_train_arguments,
            own_flags("sdxl", "flux", "t5xxl_dtype", "skip_existing", "weighted_captions"),
        ],
        161,
    ),
]


def build(builders) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for add in builders:
        add(parser)
    return parser


def train_network_parser() -> argparse.ArgumentParser:
    return build(TRAIN_NETWORK_GROUPS)


# ----------------------------------------------------------------------------- option counts
@pytest.mark.parametrize("script,builders,expected", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_option_counts_match_spec(script, builders, expected):
    parser = build(builders)  # argparse itself rejects a name registered twice
    names = options_of(parser)
    assert len(names) == len(set(names))
    assert len(names) == expected, script
    parser.format_help()  # every help string must survive %-formatting


def test_train_network_parses_a_typical_command_line():
    parser = train_network_parser()
    args = parser.parse_args(
        [
            "--pretrained_model_name_or_path", "model.safetensors",
            "--network_module", "networks.lora",
            "--network_dim", "8",
            "--text_encoder_lr", "1e-4", "5e-5",
            "--lr_warmup_steps", "10%",
            "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.999",
            "--dataset_config", "data.toml",
            "--mixed_precision", "bf16",
        ]
    )
    assert args.network_dim == 8
    assert args.text_encoder_lr == [1e-4, 5e-5]
    assert args.lr_warmup_steps == pytest.approx(0.1)
    assert args.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.999"]
    assert args.dataset_config == Path("data.toml")
    assert args.save_model_as == "safetensors"
    assert args.network_alpha == 1
    assert args.lr_decay_steps == 0 and args.learning_rate == 2e-6


def test_optional_group_members_depend_on_flags():
    def names(add):
        parser = argparse.ArgumentParser()
        add(parser)
        return set(options_of(parser))

    full = names(lambda p: G.add_dataset_arguments(p, True, True, True))
    assert len(full) == 38
    assert full - names(lambda p: G.add_dataset_arguments(p, False, True, True)) == {"--reg_data_dir"}
    assert full - names(lambda p: G.add_dataset_arguments(p, True, False, True)) == {"--in_json", "--dataset_repeats"}
    assert full - names(lambda p: G.add_dataset_arguments(p, True, True, False)) == {
        "--caption_dropout_rate",
        "--caption_dropout_every_n_epochs",
        "--caption_tag_dropout_rate",
    }
    assert names(lambda p: G.add_training_arguments(p, True)) - names(
        lambda p: G.add_training_arguments(p, False)
    ) == {"--prior_loss_weight"}
    assert names(lambda p: G.add_custom_train_arguments(p, True)) - names(
        lambda p: G.add_custom_train_arguments(p, False)
    ) == {"--weighted_captions"}
    assert names(lambda p: G.add_sdxl_training_arguments(p, False)) == {"--disable_mmap_load_safetensors"}


def test_invalid_choice_is_an_argparse_error(capsys):
    parser = train_network_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--mixed_precision", "fp32"])
    assert exc.value.code == 2
    assert "--mixed_precision" in capsys.readouterr().err


# ----------------------------------------------------------------------------- spec tables
GROUP_FUNCTIONS = {
    "G-LOG": (G.add_logging_arguments, []),
    "G-MODEL": (G.add_sd_models_arguments, []),
    "G-SPEC": (G.add_model_spec_arguments, []),
    "G-DATA": (G.add_dataset_arguments, ["support_dreambooth", "support_caption", "support_caption_dropout"]),
    "G-TRAIN": (G.add_training_arguments, ["support_dreambooth"]),
    "G-MASK": (G.add_masked_loss_arguments, []),
    "G-DS": (G.add_deepspeed_arguments, []),
    "G-SAVE": (G.add_sd_saving_arguments, []),
    "G-OPT": (G.add_optimizer_arguments, []),
    "G-CFG": (G.add_config_arguments, []),
    "G-CUSTOM": (G.add_custom_train_arguments, ["support_weighted_captions"]),
    "G-DIT": (G.add_dit_training_arguments, []),
    "G-SDXL": (G.add_sdxl_training_arguments, ["support_text_encoder_caching"]),
    "G-FLUX": (G.add_flux_train_arguments, []),
    "G-SD3": (G.add_sd3_training_arguments, []),
}


SNAPSHOT = REPO / "tests" / "data" / "cli_option_tables.json"
SNAPSHOT_HEADINGS = [f"### {g} " for g in sorted(GROUP_FUNCTIONS)] + ["### `train_network.py`"]


def _spec_cells(heading_prefix: str) -> list:
    """[option, kind, default literal, choices, only_if] of each row of one spec table."""
    text = SPEC.read_text(encoding="utf-8")
    start = text.index(heading_prefix)
    end = text.find("\n###", start + 1)
    section = text[start : end if end != -1 else len(text)]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        only_if = re.search(r"only if `(\w+)`", cells[4])
        rows.append(cells[:4] + [only_if.group(1) if only_if else None])
    return rows


def _spec_rows(heading_prefix: str) -> list:
    """The spec table's rows, from ../shared/spec when present, else from the snapshot of
    its facts (names, kinds, defaults, choices) kept in tests/data for clones without it."""
    if SPEC.exists():
        cells = _spec_cells(heading_prefix)
    else:
        cells = json.loads(SNAPSHOT.read_text(encoding="utf-8"))[heading_prefix]
    return [
        dict(
            name=option.strip("`"),
            kind=kind,
            default=ast.literal_eval(default),
            choices=None
            if not choices
            else [None if c == "None" else int(c) if c.isdigit() else c for c in choices.split(", ")],
            only_if=only_if,
        )
        for option, kind, default, choices, only_if in cells
    ]


def write_snapshot() -> None:
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(json.dumps({h: _spec_cells(h) for h in SNAPSHOT_HEADINGS}, indent=1) + "\n", encoding="utf-8")


def _check_action(action: argparse.Action, row: dict) -> None:
    name = row["name"]
    kind = row["kind"]
    if kind == "flag":
        assert isinstance(action, argparse._StoreTrueAction), name
        assert action.default is False, name
        return
    base, _, nargs = kind.partition(", nargs=")
    expected_type = {"str": str, "int": int, "float": float, "Path": Path, "int_or_float": int_or_float}[base]
    assert action.type is expected_type, name
    assert action.nargs == (nargs or None), name
    assert action.default == row["default"], name
    assert type(action.default) is type(row["default"]) or isinstance(row["default"], (int, float)), name
    assert action.choices == row["choices"], name


@pytest.mark.skipif(not SPEC.exists(), reason="shared/spec/cli-options.md not available: nothing to compare the snapshot with")
def test_snapshot_of_spec_tables_is_current():
    """tests/data/cli_option_tables.json must equal the spec (regenerate: python tests/test_args.py)."""
    snapshot = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    assert snapshot == {h: _spec_cells(h) for h in SNAPSHOT_HEADINGS}


@pytest.mark.parametrize("group", sorted(GROUP_FUNCTIONS))
def test_group_matches_spec_table(group):
    func, flag_names = GROUP_FUNCTIONS[group]
    rows = _spec_rows(f"### {group} ")
    # all flags on: every row, in the spec's order
    parser = argparse.ArgumentParser()
    func(parser, *([True] * len(flag_names)))
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert [a.option_strings[0] for a in actions] == [r["name"] for r in rows]
    for action, row in zip(actions, rows):
        _check_action(action, row)
    # each flag off removes exactly the rows marked "only if <flag>"
    for i, flag in enumerate(flag_names):
        values = [True] * len(flag_names)
        values[i] = False
        parser = argparse.ArgumentParser()
        func(parser, *values)
        assert set(options_of(parser)) == {r["name"] for r in rows if r["only_if"] != flag}


def test_train_network_own_options_match_spec():
    rows = _spec_rows("### `train_network.py`")
    assert len(rows) == 28
    parser = argparse.ArgumentParser()
    G.add_train_network_arguments(parser)
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert [a.option_strings[0] for a in actions] == [r["name"] for r in rows]
    for action, row in zip(actions, rows):
        _check_action(action, row)


def test_group_functions_take_the_spec_parameters():
    import inspect

    for func, flags in GROUP_FUNCTIONS.values():
        assert list(inspect.signature(func).parameters)[1:] == flags, func.__name__
    assert inspect.signature(G.add_custom_train_arguments).parameters["support_weighted_captions"].default is True
    assert inspect.signature(G.add_sdxl_training_arguments).parameters["support_text_encoder_caching"].default is True


# ----------------------------------------------------------------------------- import cost
def test_args_and_log_modules_do_not_import_heavy_libraries():
    code = (
        "import sys, library.args.groups, library.args, library.args.config_file, "
        "library.args.checks, library.args.types, library.log\n"
        "heavy = [m for m in ('torch', 'numpy', 'diffusers', 'transformers', 'accelerate') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


# ----------------------------------------------------------------------------- int_or_float
@pytest.mark.parametrize(
    "text,expected",
    [
        ("100", 100),
        ("1", 1),
        ("0", 0.0),
        ("0.1", 0.1),
        ("0.05", 0.05),
        ("10%", 0.1),
        ("2.5%", 0.025),
        ("150%", 1.5),
    ],
)
def test_int_or_float_accepts(text, expected):
    value = int_or_float(text)
    assert value == pytest.approx(expected)
    if text.endswith("%") or float(text) < 1:
        assert isinstance(value, float)
    else:
        assert isinstance(value, int)


@pytest.mark.parametrize("text", ["1.5", "100.0", "abc", "x%", ""])
def test_int_or_float_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        int_or_float(text)


def test_int_or_float_error_is_reported_by_argparse(capsys):
    parser = argparse.ArgumentParser()
    G.add_optimizer_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr_warmup_steps", "1.5"])
    err = capsys.readouterr().err
    assert "--lr_warmup_steps" in err and "1.5" in err and "whole" in err


# ----------------------------------------------------------------------------- parse_resolution
@pytest.mark.parametrize(
    "value,expected",
    [("512", (512, 512)), ("768,512", (768, 512)), (" 768 , 512 ", (768, 512)), (1024, (1024, 1024)), ([640, 480], (640, 480))],
)
def test_parse_resolution(value, expected):
    assert parse_resolution(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "512,", "1,2,3", "0", "-512", "512.5", None, True])
def test_parse_resolution_errors_name_the_option(value):
    with pytest.raises(UserInputError, match="--resolution"):
        parse_resolution(value)


# ----------------------------------------------------------------------------- checks
def train_args(*argv):
    return train_network_parser().parse_args(list(argv))


def test_checks_pass_defaults_and_fill_in_implied_values():
    args = train_args("--cache_latents_to_disk", "--sample_every_n_steps", "0", "--sample_every_n_epochs", "-1")
    assert verify_training_args(args) is args
    assert args.cache_latents is True
    assert args.sample_every_n_steps is None and args.sample_every_n_epochs is None


def test_checks_text_encoder_output_caching_implied():
    parser = argparse.ArgumentParser()
    G.add_dit_training_arguments(parser)
    args = parser.parse_args(["--cache_text_encoder_outputs_to_disk"])
    verify_training_args(args)
    assert args.cache_text_encoder_outputs is True


def test_checks_caption_extention_overrides(caplog):
    args = train_args("--caption_extension", ".txt", "--caption_extention", ".tags")
    with caplog.at_level(logging.WARNING):
        verify_training_args(args)
    assert args.caption_extension == ".tags"
    assert "caption_extention" in caplog.text


def test_checks_work_on_a_bare_namespace():
    args = argparse.Namespace()
    verify_training_args(args)
    assert vars(args) == {}


@pytest.mark.parametrize(
    "argv,names",
    [
        (["--adaptive_noise_scale", "0.1"], ["--adaptive_noise_scale", "--noise_offset"]),
        (["--scale_v_pred_loss_like_noise_pred"], ["--scale_v_pred_loss_like_noise_pred", "--v_parameterization"]),
        (["--v_pred_like_loss", "0.1", "--v_parameterization"], ["--v_pred_like_loss", "--v_parameterization"]),
        (["--full_fp16"], ["--full_fp16", "--mixed_precision"]),
        (["--full_fp16", "--mixed_precision", "bf16"], ["--full_fp16", "fp16"]),
        (["--full_bf16", "--mixed_precision", "fp16"], ["--full_bf16", "bf16"]),
        (["--fp8_base"], ["--fp8_base", "--mixed_precision"]),
        (["--use_8bit_adam", "--use_lion_optimizer"], ["--use_8bit_adam", "--use_lion_optimizer"]),
        (["--use_8bit_adam", "--optimizer_type", "Lion"], ["--use_8bit_adam", "--optimizer_type"]),
        (["--use_lion_optimizer", "--optimizer_type", "AdamW"], ["--use_lion_optimizer", "--optimizer_type"]),
    ],
)
def test_checks_reject_bad_combinations(argv, names):
    with pytest.raises(UserInputError) as exc:
        verify_training_args(train_args(*argv))
    for name in names:
        assert name in str(exc.value)


def test_checks_accept_valid_combinations():
    verify_training_args(train_args("--adaptive_noise_scale", "0.1", "--noise_offset", "0.05"))
    verify_training_args(train_args("--scale_v_pred_loss_like_noise_pred", "--v_parameterization"))
    verify_training_args(train_args("--full_bf16", "--mixed_precision", "bf16"))
    verify_training_args(train_args("--fp8_base", "--mixed_precision", "fp16"))


@pytest.mark.parametrize("flag,optimizer", [("--use_8bit_adam", "AdamW8bit"), ("--use_lion_optimizer", "Lion")])
def test_legacy_optimizer_flags_are_translated_with_a_warning(flag, optimizer, caplog):
    args = train_args(flag)
    with caplog.at_level(logging.WARNING):
        verify_training_args(args)
    assert args.optimizer_type == optimizer
    assert not args.use_8bit_adam and not args.use_lion_optimizer
    assert "deprecated" in caplog.text and f"--optimizer_type {optimizer}" in caplog.text
    verify_training_args(args)  # idempotent


if __name__ == "__main__":
    write_snapshot()
    print(f"wrote {SNAPSHOT}")
