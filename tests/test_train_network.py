"""train_network.py end to end on a tiny SD1 model: real command lines, files, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from library.errors import UserInputError
from library.io import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sd, tokenizer_cache):
    from library.data.synthetic import make_color_dataset

    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    make_color_dataset(str(data), count=4, size=(64, 64))
    return {"root": root, "data": str(data), "model": tiny_sd("sd1").path, "tok": tokenizer_cache}


def base_argv(ws, out, *extra):
    return [
        "--pretrained_model_name_or_path", ws["model"], "--tokenizer_cache_dir", ws["tok"],
        "--train_data_dir", ws["data"], "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "lora", "--network_module", "networks.lora",
        "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--seed", "7",
        "--max_data_loader_n_workers", "0", "--train_batch_size", "2", *extra,
    ]


def run_in_process(argv):
    import train_network

    return train_network.main(argv)


def lora_tensors(path):
    return safetensors_io.load_state_dict(path)


def test_command_line_with_dataset_toml(workspace, tmp_path):
    """The real script in a subprocess, configured by --dataset_config, saving steps and states."""
    toml_path = tmp_path / "dataset.toml"
    toml_path.write_text(
        f'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = 64\nbatch_size = 2\n\n'
        f'  [[datasets.subsets]]\n  image_dir = "{workspace["data"]}/1_sks"\n  num_repeats = 2\n  class_tokens = "sks"\n'
    )
    out = tmp_path / "out"
    argv = [a for a in base_argv(workspace, out) if a not in ()]
    i = argv.index("--train_data_dir")
    del argv[i:i + 2]
    argv += ["--dataset_config", str(toml_path), "--max_train_steps", "4", "--save_every_n_steps", "2",
             "--save_state", "--save_last_n_steps", "2", "--training_comment", "hello"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_network.py"), *argv], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert "lora.safetensors" in files and "lora-step00000002.safetensors" in files
    assert "lora-step00000002-state" in files and "lora-step00000004-state" in files
    assert not any(f.startswith(".tmp") for f in files), files
    md = safetensors_io.read_metadata(out / "lora.safetensors")
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_training_comment"] == "hello"
    assert md["ss_steps"] == "4"
    datasets = json.loads(md["ss_datasets"])
    assert datasets[0]["subsets"][0]["num_repeats"] == 2 and datasets[0]["subsets"][0]["img_count"] == 4
    assert json.loads(md["ss_tag_frequency"])
    from library.io.hashing import model_hash_of_file

    assert md["sshs_model_hash"] == model_hash_of_file(out / "lora.safetensors")
    state = json.loads((out / "lora-step00000004-state" / "train_state.json").read_text())
    assert state["current_step"] == 4
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 4


def test_exact_resume(workspace, tmp_path):
    """Stopped after step 3 and resumed, a run reaches bit-identical weights at step 6."""
    straight = tmp_path / "straight"
    run_in_process(base_argv(workspace, straight, "--max_train_steps", "6"))
    first = tmp_path / "first"
    run_in_process(base_argv(workspace, first, "--max_train_steps", "6", "--save_every_n_steps", "3", "--save_state"))
    # the same run killed after step 3 is simulated by resuming its step-3 state
    resumed = tmp_path / "resumed"
    run_in_process(base_argv(workspace, resumed, "--max_train_steps", "6", "--resume", str(first / "lora-step00000003-state")))
    a, b = lora_tensors(straight / "lora.safetensors"), lora_tensors(resumed / "lora.safetensors")
    assert set(a) == set(b)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"{len(changed)} tensors differ after resume, e.g. {changed[:3]}"
    # and training did something
    start = lora_tensors(first / "lora-step00000003.safetensors")
    assert any(not torch.equal(start[k], a[k]) for k in a if k.endswith("lora_up.weight"))


def test_saved_lora_reloads_with_same_keys(workspace, tmp_path):
    out = tmp_path / "o"
    run_in_process(base_argv(workspace, out, "--max_train_steps", "2", "--network_args", "conv_dim=2", "conv_alpha=1",
                             "--save_precision", "fp16"))
    sd = lora_tensors(out / "lora.safetensors")
    assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {torch.float16}
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1") for k in sd)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in sd)
    md = safetensors_io.read_metadata(out / "lora.safetensors")
    assert json.loads(md["ss_network_args"])["conv_dim"] == "2"


# ---------------------------------------------------------------- bad input, before models load


@pytest.fixture
def no_model_loading(monkeypatch):
    from library.arch.sd import SDArchitecture

    def refuse(*a, **k):
        raise AssertionError("models were loaded before the bad input was reported")

    monkeypatch.setattr(SDArchitecture, "load_models", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--network_args", "rank=4"], "unknown --network_args key 'rank'; accepted keys:"),
    (["--network_module", "no_such_module.lora"], "--network_module no_such_module.lora: cannot be imported"),
    (["--optimizer_type", "NoSuchOptimizer"], "NoSuchOptimizer"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
    (["--resume", "/nonexistent/state"], "--resume /nonexistent/state"),
])
def test_bad_input_fails_before_models_load(workspace, tmp_path, no_model_loading, extra, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run_in_process(base_argv(workspace, tmp_path / "o", "--max_train_steps", "1", *extra))


def test_truncated_model_fails_before_loading(workspace, tmp_path, no_model_loading):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(open(workspace["model"], "rb").read()[:1000])
    argv = base_argv(workspace, tmp_path / "o", "--max_train_steps", "1")
    argv[argv.index(workspace["model"])] = str(bad)
    with pytest.raises(UserInputError, match="cut.safetensors"):
        run_in_process(argv)


@pytest.mark.parametrize("algo, key_suffix", [("loha", ".hada_w1_a"), ("lokr", ".lokr_w1")])
def test_lycoris_plugin_trains_and_saves(workspace, tmp_path, algo, key_suffix):
    """Third-party network modules plug in unchanged (LyCORIS 3.4 from PyPI)."""
    pytest.importorskip("lycoris", reason="lycoris-lora is not installed")
    out = tmp_path / algo
    argv = base_argv(workspace, out, "--max_train_steps", "2", "--network_args", f"algo={algo}")
    argv[argv.index("networks.lora")] = "lycoris.kohya"
    run_in_process(argv)
    sd = lora_tensors(out / "lora.safetensors")
    assert any(k.endswith(key_suffix) for k in sd)
    # text-encoder modules carry the canonical names every other tool expects
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in sd), sorted(sd)[:5]


def test_two_process_ddp_on_cpu(workspace, tmp_path):
    """accelerate launch with 2 CPU processes (gloo): trains, and only rank 0 writes files."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29731",
           os.path.join(ROOT, "train_network.py"), *base_argv(workspace, out, "--max_train_steps", "2")]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    md = safetensors_io.read_metadata(out / "lora.safetensors")
    assert md["ss_steps"] == "2"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2
