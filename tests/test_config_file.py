"""--config_file / --output_config (library/args/config_file.py), cli-options.md §1."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import toml

from library.args import groups as G
from library.args.config_file import read_config_from_file, warn_secrets_on_command_line
from library.errors import UserInputError
from library.log import teardown_logging


@pytest.fixture(autouse=True)
def _no_leftover_log_handler():
    yield
    teardown_logging()


def make_parser() -> argparse.ArgumentParser:
    """The train_network.py option set."""
    parser = argparse.ArgumentParser()
    G.add_logging_arguments(parser)
    G.add_sd_models_arguments(parser)
    G.add_model_spec_arguments(parser)
    G.add_dataset_arguments(parser, True, True, True)
    G.add_training_arguments(parser, True)
    G.add_masked_loss_arguments(parser)
    G.add_deepspeed_arguments(parser)
    G.add_optimizer_arguments(parser)
    G.add_config_arguments(parser)
    G.add_custom_train_arguments(parser, True)
    G.add_train_network_arguments(parser)
    return parser


def run(argv, parser=None):
    """Parse like an entry script does: parse, then apply the config file."""
    parser = parser or make_parser()
    args = parser.parse_args(argv)
    return read_config_from_file(args, parser, argv=argv)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_without_config_file_nothing_changes():
    parser = make_parser()
    args = parser.parse_args(["--network_dim", "4"])
    assert read_config_from_file(args, parser, argv=["--network_dim", "4"]) is args


def test_precedence_cli_over_file_over_default(tmp_path):
    cfg = write(
        tmp_path / "cfg.toml",
        'learning_rate = 1e-4\nnetwork_dim = 16\nnetwork_module = "networks.lora"\ncache_latents = true\n',
    )
    args = run(["--config_file", str(cfg), "--network_dim", "32"])
    assert args.network_dim == 32  # command line wins
    assert args.learning_rate == 1e-4  # file wins over default
    assert args.network_module == "networks.lora"
    assert args.cache_latents is True  # store_true set in the file
    assert args.max_train_steps == 1600  # default
    assert args.network_alpha == 1
    assert args.config_file == str(tmp_path / "cfg")  # extension removed


def test_store_true_from_file_cannot_be_switched_off(tmp_path):
    cfg = write(tmp_path / "c.toml", "flip_aug = true\n")
    assert run(["--config_file", str(cfg)]).flip_aug is True


def test_toml_extension_is_appended(tmp_path):
    write(tmp_path / "settings.toml", "seed = 7\n")
    args = run(["--config_file", str(tmp_path / "settings")])
    assert args.seed == 7
    assert args.config_file == str(tmp_path / "settings")


def test_lists_and_toml_types_are_kept(tmp_path):
    cfg = write(
        tmp_path / "c.toml",
        'optimizer_args = ["weight_decay=0.01", "betas=0.9,0.999"]\n'
        "text_encoder_lr = [1e-4, 5e-5]\n"
        'network_args = ["conv_dim=4"]\n'
        "lr_warmup_steps = 0.1\n"
        'lr_decay_steps = "10%"\n'
        'dataset_config = "data.toml"\n',
    )
    args = run(["--config_file", str(cfg), "--network_args", "conv_dim=8", "conv_alpha=1"])
    assert args.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.999"]
    assert args.text_encoder_lr == [1e-4, 5e-5]
    assert args.network_args == ["conv_dim=8", "conv_alpha=1"]  # command line list replaces the file's
    assert args.lr_warmup_steps == 0.1 and isinstance(args.lr_warmup_steps, float)
    # file values bypass the option's converter (as in sd-scripts)
    assert args.lr_decay_steps == "10%"
    assert args.dataset_config == "data.toml"


def test_sections_are_flattened(tmp_path):
    cfg = write(
        tmp_path / "c.toml",
        'output_name = "top"\n'
        "[model]\n"
        'pretrained_model_name_or_path = "base.safetensors"\n'
        "v2 = true\n"
        "[optimizer]\n"
        'optimizer_type = "AdamW8bit"\n'
        "learning_rate = 3e-4\n"
        "[later]\n"
        "learning_rate = 5e-4\n",
    )
    args = run(["--config_file", str(cfg)])
    assert args.output_name == "top"
    assert args.pretrained_model_name_or_path == "base.safetensors"
    assert args.v2 is True
    assert args.optimizer_type == "AdamW8bit"
    assert args.learning_rate == 5e-4  # later section wins
    assert not hasattr(args, "model") and not hasattr(args, "optimizer")


def test_unknown_keys_are_kept_with_a_warning(tmp_path, caplog):
    cfg = write(tmp_path / "c.toml", "network_dim = 8\nnetwork_dimm = 4\n[extra]\nmystery = 1\n")
    with caplog.at_level(logging.WARNING):
        args = run(["--config_file", str(cfg)])
    assert args.network_dimm == 4 and args.mystery == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "network_dimm" in warnings[0] and "mystery" in warnings[0] and "c.toml" in warnings[0]
    assert "network_dim," not in warnings[0]


def test_missing_file_exits_1_naming_it(tmp_path, caplog):
    missing = tmp_path / "nope"
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        run(["--config_file", str(missing)])
    assert exc.value.code == 1
    assert str(missing) + ".toml" in caplog.text


def test_bad_toml_names_file_and_line(tmp_path):
    cfg = write(tmp_path / "broken.toml", 'seed = 1\nlearning_rate = 1e-4\noutput_name = "unterminated\n')
    with pytest.raises(UserInputError) as exc:
        run(["--config_file", str(cfg)])
    message = str(exc.value)
    assert str(cfg) in message
    assert "line 3" in message


def test_output_config_round_trip(tmp_path, caplog):
    out = tmp_path / "saved"  # .toml gets appended
    argv = [
        "--pretrained_model_name_or_path", "model.safetensors",
        "--network_module", "networks.lora",
        "--network_dim", "16",
        "--learning_rate", "1e-4",
        "--lr_warmup_steps", "10%",
        "--text_encoder_lr", "1e-5", "2e-5",
        "--optimizer_args", "weight_decay=0.01",
        "--dataset_config", "data/set.toml",
        "--cache_latents",
        "--mixed_precision", "bf16",
        "--wandb_api_key", "SECRET",
        "--max_train_steps", "1600",  # equal to the default: not written
    ]
    parser = make_parser()
    original = parser.parse_args(argv + ["--config_file", str(out), "--output_config"])
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exc:
        read_config_from_file(original, parser, argv=[])
    assert exc.value.code == 0
    written = tmp_path / "saved.toml"
    assert str(written) in caplog.text

    data = toml.loads(written.read_text(encoding="utf-8"))
    assert data == {
        "pretrained_model_name_or_path": "model.safetensors",
        "network_module": "networks.lora",
        "network_dim": 16,
        "learning_rate": 1e-4,
        "lr_warmup_steps": 0.1,
        "text_encoder_lr": [1e-5, 2e-5],
        "optimizer_args": ["weight_decay=0.01"],
        "dataset_config": "data/set.toml",
        "cache_latents": True,
        "mixed_precision": "bf16",
    }
    assert list(tmp_path.iterdir()) == [written]  # no temp file left behind

    loaded = run(["--config_file", str(written)])
    expected = vars(original).copy()
    expected.update(config_file=str(tmp_path / "saved"), output_config=False, wandb_api_key=None)
    expected["dataset_config"] = "data/set.toml"  # TOML values are not converted back to Path
    assert vars(loaded) == expected


def test_output_config_refuses_to_overwrite(tmp_path, caplog):
    existing = write(tmp_path / "keep.toml", "seed = 1\n")
    parser = make_parser()
    args = parser.parse_args(["--config_file", str(existing), "--output_config", "--seed", "2"])
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        read_config_from_file(args, parser, argv=[])
    assert exc.value.code == 1
    assert str(existing) in caplog.text and "exists" in caplog.text
    assert existing.read_text(encoding="utf-8") == "seed = 1\n"


def test_output_config_into_missing_folder_is_a_user_error(tmp_path):
    parser = make_parser()
    args = parser.parse_args(["--config_file", str(tmp_path / "no" / "dir" / "x"), "--output_config"])
    with pytest.raises(UserInputError, match="does not exist"):
        read_config_from_file(args, parser, argv=[])


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--wandb_api_key", "abc"], ["wandb_api_key"]),
        (["--huggingface_token=hf_x", "--seed", "1"], ["huggingface_token"]),
        (["--wandb_api", "abc", "--huggingface_token", "t"], ["wandb_api_key", "huggingface_token"]),
        (["--seed", "1"], []),
    ],
)
def test_secrets_on_command_line_warn(argv, expected, caplog):
    with caplog.at_level(logging.WARNING):
        found = warn_secrets_on_command_line(argv)
    assert found == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(expected)
    for name, message in zip(expected, warnings):
        assert f"--{name}" in message and "--config_file" in message


def test_secret_from_file_does_not_warn(tmp_path, caplog):
    cfg = write(tmp_path / "c.toml", 'wandb_api_key = "abc"\n')
    argv = ["--config_file", str(cfg)]
    args = run(argv)
    assert args.wandb_api_key == "abc"
    with caplog.at_level(logging.WARNING):
        assert warn_secrets_on_command_line(argv, args) == []
