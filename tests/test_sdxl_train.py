"""sdxl_train.py (full SDXL fine-tune) on a tiny SDXL model: real command lines, files diffusers
loads, fused backward pass / fused optimizer groups against plain steps, learning-rate
groups, exact resume and bad option combinations."""

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
UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_sdxl_files, tokenizer_cache):
    from library.data.synthetic import make_color_dataset

    root = tmp_path_factory.mktemp("sdxl_train")
    data = root / "data"
    make_color_dataset(str(data), count=4, size=(64, 64))
    return {"data": str(data), "model": tiny_sdxl_files.path, "ref": tiny_sdxl_files.reference_folder,
            "tok": tokenizer_cache}


def argv_for(ws, out, *extra):
    return [
        "--pretrained_model_name_or_path", ws["model"], "--tokenizer_cache_dir", ws["tok"],
        "--train_data_dir", ws["data"], "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "ft", "--seed", "11", "--max_data_loader_n_workers", "0",
        "--train_batch_size", "2", "--max_train_steps", "1", *extra,
    ]


def run(argv):
    import sdxl_train

    return sdxl_train.main(argv)


def tensors(path):
    return safetensors_io.load_state_dict(str(path))


def max_diff(a: dict, b: dict, prefix: str = "") -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


# ------------------------------------------------------------------------------ command line + diffusers
def test_command_line_checkpoint_loads_in_diffusers(ws, tmp_path):
    """The real script in a subprocess: U-Net with --block_lr (some blocks frozen), text
    encoder 1 trained, text encoder 2 at lr 0; step saves, a state folder, a preview; the final file
    loads in diffusers' StableDiffusionXLPipeline.from_single_file with equal weights."""
    from diffusers import StableDiffusionXLPipeline

    from library.models.sdxl.loading import load_sdxl_models
    from library.models.sdxl.key_maps import ours_to_diffusers
    from library.tokenizers import load_sdxl_tokenizers

    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --d 5\n")
    block_lr = ["0"] + ["1e-3"] * 9 + ["0"] * 3 + ["1e-3"] * 9 + ["2e-3"]  # embedding and middle block frozen
    argv = argv_for(ws, out, "--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state",
                    "--learning_rate", "1e-3", "--block_lr", ",".join(block_lr), "--train_text_encoder",
                    "--learning_rate_te1", "5e-4", "--learning_rate_te2", "0", "--metadata_author", "me",
                    "--sample_prompts", str(prompts), "--sample_every_n_steps", "2")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sdxl_train.py"), *argv], capture_output=True, text=True,
                       timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert {"ft.safetensors", "ft-step00000001.safetensors", "ft-step00000002-state"} <= set(files), files
    assert not any(f.startswith(".tmp") for f in files), files
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2
    assert os.listdir(out / "sample") == ["ft_000002_00_5.png"]  # preview with the SDXL sampler

    md = safetensors_io.read_metadata(out / "ft.safetensors")
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and md["modelspec.author"] == "me"
    before, after = tensors(ws["model"]), tensors(out / "ft.safetensors")
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # frozen: embeddings and middle block (block lr 0), text encoder 2 (lr 0), text encoder 1's
    # last layer and final norm (unused by SDXL), the VAE
    for prefix in (UNET + "time_embed.", UNET + "label_emb.", UNET + "middle_block.", TE2, "first_stage_model.",
                   TE1 + "text_model.encoder.layers.11.", TE1 + "text_model.final_layer_norm."):
        assert not any(k.startswith(prefix) for k in changed), prefix
    for prefix in (UNET + "input_blocks.4.", UNET + "output_blocks.2.", UNET + "out.", TE1 + "text_model.encoder.layers.0."):
        assert any(k.startswith(prefix) for k in changed), prefix

    tok1, tok2 = load_sdxl_tokenizers(ws["tok"])
    pipe = StableDiffusionXLPipeline.from_single_file(str(out / "ft.safetensors"), config=ws["ref"],
                                                      local_files_only=True, tokenizer=tok1, tokenizer_2=tok2)
    ours = load_sdxl_models(str(out / "ft.safetensors"))
    expected = ours_to_diffusers(ours.unet.state_dict(), ours.unet.config)
    theirs = pipe.unet.state_dict()
    assert set(expected) == set(theirs)
    assert all(torch.equal(expected[k], theirs[k].to(expected[k].dtype)) for k in expected)
    te1 = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    ours_te1 = {k.removeprefix("text_model."): v for k, v in ours.text_encoder1.state_dict().items()}
    assert all(torch.equal(ours_te1[k], te1[k]) for k in ours_te1 if k in te1) and len(te1) >= len(ours_te1) - 1


# ------------------------------------------------------------------------------ fused modes
def test_fused_backward_pass_equals_plain_adafactor_step(ws, tmp_path):
    """One Adafactor step, fused into the backward pass (per-tensor steps in hooks) or
    plain: the same weights. Measured max abs difference 0.0 in float32 (the optimizer's
    own step() does the arithmetic either way); tolerance 1e-7. Clipping off: fused mode
    clips per tensor, plain clipping uses the global norm."""
    common = ("--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
              "warmup_init=False", "--learning_rate", "1e-3", "--max_grad_norm", "0")
    run(argv_for(ws, tmp_path / "plain", *common))
    run(argv_for(ws, tmp_path / "fused", *common, "--fused_backward_pass"))
    plain, fused = tensors(tmp_path / "plain" / "ft.safetensors"), tensors(tmp_path / "fused" / "ft.safetensors")
    base = tensors(ws["model"])
    assert max_diff(plain, base, UNET) > 1e-4  # the step did something
    diff = max_diff(plain, fused, UNET)
    print(f"fused backward vs plain Adafactor, max abs diff {diff:.3g}")
    assert diff <= 1e-7


def test_fused_backward_pass_bf16_rounds_stochastically(ws, tmp_path):
    """--full_bf16: the fused update is computed in float32 and rounded stochastically to
    bf16; the plain step rounds to nearest. Both start from the same bf16 weights with the
    same gradients, so every fused weight is within one bf16 spacing of the plain one, and
    a good share of them took the other neighbour (measured: about a quarter)."""
    common = ("--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
              "warmup_init=False", "--learning_rate", "1e-2", "--max_grad_norm", "0", "--mixed_precision", "bf16",
              "--full_bf16", "--save_precision", "bf16")
    run(argv_for(ws, tmp_path / "plain", *common))
    run(argv_for(ws, tmp_path / "fused", *common, "--fused_backward_pass"))
    plain, fused = tensors(tmp_path / "plain" / "ft.safetensors"), tensors(tmp_path / "fused" / "ft.safetensors")
    start = tensors(ws["model"])
    differing = total = 0
    for k in (k for k in plain if k.startswith(UNET) and plain[k].dim() == 2):
        p, f = plain[k].float(), fused[k].float()
        assert fused[k].dtype == torch.bfloat16
        assert not torch.equal(p, start[k].to(torch.bfloat16).float())  # trained
        spacing = p.abs() * 2.0 ** -7 + 1e-30
        assert bool(((f - p).abs() <= spacing).all()), k
        differing += int((f != p).sum())
        total += p.numel()
    print(f"bf16 fused backward: {differing / total:.1%} of U-Net matrix weights took the other bf16 neighbour")
    assert differing / total > 0.05


def test_copy_stochastic_is_unbiased():
    from library.training.fused_optimizers import copy_stochastic_

    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2 ** -9)  # a quarter of the way between bf16 1.0 and 1.0078125
    y = torch.empty_like(x, dtype=torch.bfloat16)
    copy_stochastic_(y, x)
    values = set(y.float().unique().tolist())
    assert values == {1.0, 1.0078125}
    assert abs(float(y.float().mean()) - float(x.mean())) < 2e-5  # unbiased; nearest rounding gives 1.0
    neg = torch.full((1000,), -3.0)
    copy_stochastic_(y[:1000], neg)
    assert torch.equal(y[:1000].float(), neg)  # representable values stay exact


@pytest.mark.parametrize("groups,clip", [(4, "0"), (1, "1.0")], ids=["4-groups-no-clip", "1-group-clipped"])
def test_fused_optimizer_groups_equal_plain_adamw(ws, tmp_path, groups, clip):
    """AdamW split into N optimizers stepped during backward gives the weights of one plain
    AdamW step (U-Net and both text encoders). With one group, clipping by the group's norm
    is ordinary global clipping. Measured max abs diff 0.0; tolerance 1e-7."""
    common = ("--learning_rate", "1e-3", "--train_text_encoder", "--max_grad_norm", clip)
    run(argv_for(ws, tmp_path / "plain", *common))
    run(argv_for(ws, tmp_path / "groups", *common, "--fused_optimizer_groups", str(groups)))
    plain, fused = tensors(tmp_path / "plain" / "ft.safetensors"), tensors(tmp_path / "groups" / "ft.safetensors")
    assert max_diff(plain, tensors(ws["model"]), UNET) > 1e-4
    for prefix in (UNET, TE1, TE2):
        diff = max_diff(plain, fused, prefix)
        print(f"fused groups {groups} vs plain AdamW ({prefix}) max abs diff {diff:.3g}")
        assert diff <= 1e-7


def _gradient_bytes_held_at_most(mode: str) -> tuple[int, int]:
    """Largest number of gradient bytes alive at once during one backward pass of a
    12-layer MLP (plain: every gradient waits for step(); fused modes free them early)."""
    from transformers.optimization import Adafactor

    from library.training.fused_optimizers import FusedBackwardPass, FusedOptimizerGroups, split_param_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(12)])
    params = list(model.parameters())
    peak = [0]

    def count(_param):  # registered first, so it runs before a fused hook frees the gradient
        peak[0] = max(peak[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    kwargs = dict(lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
    if mode == "plain":
        opt = Adafactor(params, **kwargs)
    elif mode == "fused_backward":
        opt = FusedBackwardPass(Adafactor(params, **kwargs))
    else:
        opt = FusedOptimizerGroups([Adafactor(g["params"], **kwargs)
                                    for g in split_param_groups([{"params": params, "lr": 1e-3}], 4)])
    model(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    return peak[0], sum(p.numel() * p.element_size() for p in params)


def test_fused_modes_hold_fewer_gradients_at_once():
    """The memory the fused modes exist for: plain training holds every gradient until the
    step; --fused_backward_pass at most one tensor's; --fused_optimizer_groups 4 about a
    quarter (one group's, plus the next group's first arrivals)."""
    plain, total = _gradient_bytes_held_at_most("plain")
    fused, _ = _gradient_bytes_held_at_most("fused_backward")
    groups, _ = _gradient_bytes_held_at_most("groups4")
    largest_tensor = 64 * 64 * 4
    print(f"gradient bytes held at most: plain {plain}, fused backward {fused}, 4 groups {groups} (all {total})")
    assert plain == total
    assert fused <= largest_tensor
    assert largest_tensor < groups <= total // 4 + largest_tensor


def test_split_param_groups_keeps_learning_rates_apart():
    from library.training.fused_optimizers import split_param_groups

    a = [torch.nn.Parameter(torch.zeros(1)) for _ in range(10)]
    b = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    chunks = split_param_groups([{"params": a, "lr": 1.0, "name": "x"}, {"params": b, "lr": 2.0, "name": "y"}], 4)
    assert [len(c["params"]) for c in chunks] == [4, 4, 2, 3]
    assert [c["lr"] for c in chunks] == [1.0, 1.0, 1.0, 2.0] and chunks[-1]["name"] == "y"
    assert [p for c in chunks for p in c["params"]] == a + b
    same_lr = split_param_groups([{"params": a, "lr": 1.0, "name": "x"}, {"params": b, "lr": 1.0, "name": "y"}], 1)
    assert len(same_lr) == 1 and same_lr[0]["params"] == a + b


# ------------------------------------------------------------------------------ learning-rate groups
def test_block_lr_and_text_encoder_lrs_reach_the_right_parameters(tiny_sdxl_files):
    from types import SimpleNamespace

    from library.arch.sdxl_finetune import SDXLFineTuneArchitecture, block_lr_index, parse_block_lr
    from library.models.sdxl.loading import load_sdxl_models

    models = load_sdxl_models(tiny_sdxl_files.path)
    arch = SDXLFineTuneArchitecture()
    values = [round(0.001 * (i + 1), 6) for i in range(23)]
    values[10] = 0.0  # middle block part 0 frozen
    values[22] = -1.0  # negative: frozen too
    args = SimpleNamespace(learning_rate=1e-4, train_text_encoder=True, learning_rate_te1=None, learning_rate_te2=3e-5,
                           block_lr=",".join(map(str, values)))
    block_lrs = arch.check_finetune_args(args)
    assert block_lrs == values
    parts = arch.trainable_parts(args, block_lrs)
    assert [(p.key, p.lr) for p in parts][1:] == [("text_encoder1", 1e-4), ("text_encoder2", 3e-5)]
    arch.freeze_unused(models, parts)
    groups = arch.param_groups(models, parts, block_lrs)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in models.unet.named_parameters():
        i = block_lr_index(name)
        expected = values[i] if values[i] > 0 else None
        assert lr_of.get(id(p)) == expected, name
    assert block_lr_index("input_blocks.8.0.emb_layers.1.weight") == 9
    assert block_lr_index("middle_block.2.skip.weight") == 12
    assert block_lr_index("output_blocks.0.1.proj_in.weight") == 13 and block_lr_index("out.0.weight") == 22
    te1_last = {id(p) for p in models.text_encoder1.encoder.layers[-1].parameters()}
    for p in models.text_encoder1.parameters():
        assert lr_of.get(id(p)) == (None if id(p) in te1_last or p is models.text_encoder1.final_layer_norm.weight
                                    or p is models.text_encoder1.final_layer_norm.bias else 1e-4)
    assert all(lr_of[id(p)] == 3e-5 for p in models.text_encoder2.parameters())
    with pytest.raises(UserInputError, match="23 values"):
        parse_block_lr("1e-4,1e-4")


# ------------------------------------------------------------------------------ options end to end
def test_exact_resume_with_fused_optimizer_groups(ws, tmp_path):
    """2 steps at once == 1 step, state saved, resumed for the 2nd step (two optimizers' states restored)."""
    common = ("--learning_rate", "1e-3", "--fused_optimizer_groups", "2", "--max_train_steps", "2")
    run(argv_for(ws, tmp_path / "once", *common))
    run(argv_for(ws, tmp_path / "first", *common, "--save_every_n_steps", "1", "--save_state"))
    state = tmp_path / "first" / "ft-step00000001-state"
    assert sorted(n for n in os.listdir(state) if n.startswith("optimizer")) == ["optimizer.bin", "optimizer_1.bin"]
    run(argv_for(ws, tmp_path / "resumed", *common, "--resume", str(state)))
    once, resumed = tensors(tmp_path / "once" / "ft.safetensors"), tensors(tmp_path / "resumed" / "ft.safetensors")
    assert max_diff(once, resumed, UNET) == 0.0


def test_cached_text_encoder_outputs_v_prediction_diffusers_output(ws, tmp_path):
    """--cache_text_encoder_outputs_to_disk (_te_outputs.npz), --v_parameterization and
    --save_model_as diffusers_safetensors: the folder loads with our loader and names a
    v-prediction scheduler."""
    from library.models.sdxl.loading import load_sdxl_models

    out = tmp_path / "out"
    summary = run(argv_for(ws, out, "--learning_rate", "1e-3", "--cache_text_encoder_outputs_to_disk",
                           "--v_parameterization", "--save_model_as", "diffusers_safetensors", "--save_precision",
                           "fp16"))
    assert summary["steps"] == 1
    npz = [f for f in os.listdir(os.path.join(ws["data"], "1_sks")) if f.endswith("_te_outputs.npz")]
    assert len(npz) == 4
    folder = out / "ft"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    stored = tensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    models = load_sdxl_models(str(folder))
    assert models.unet.config.widths == [32, 64, 128]


# ------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_model_loading(monkeypatch):
    from library.arch.sdxl_finetune import SDXLFineTuneArchitecture

    def refuse(*a, **k):
        raise AssertionError("models were loaded before the options were checked")

    monkeypatch.setattr(SDXLFineTuneArchitecture, "load_models", refuse)


@pytest.mark.parametrize("extra,message", [
    (["--fused_backward_pass"], "needs --optimizer_type Adafactor"),
    (["--fused_backward_pass", "--optimizer_type", "Adafactor", "--gradient_accumulation_steps", "2"],
     "gradient accumulation"),
    (["--fused_optimizer_groups", "4", "--optimizer_type", "Prodigy"], "Prodigy"),
    (["--fused_optimizer_groups", "4", "--optimizer_type", "DAdaptAdam"], "DAdaptAdam"),
    (["--fused_optimizer_groups", "4", "--gradient_accumulation_steps", "2"], "gradient accumulation"),
    (["--fused_optimizer_groups", "4", "--fused_backward_pass", "--optimizer_type", "Adafactor"], "exclude each other"),
    (["--fused_optimizer_groups", "2", "--mixed_precision", "fp16"], "--mixed_precision fp16"),
    (["--block_lr", "1e-4,1e-4,1e-4"], "23 values"),
    (["--train_text_encoder", "--cache_text_encoder_outputs"], "--train_text_encoder"),
    (["--learning_rate", "0"], "nothing to train"),
    (["--optimizer_type", "NoSuchOptimizer"], "not a known optimizer"),
], ids=["fused-adamw", "fused-accum", "groups-prodigy", "groups-dadapt", "groups-accum", "both-fused", "groups-fp16",
        "block-lr-count", "cache-te-train", "nothing", "optimizer-name"])
def test_bad_combinations_fail_before_models_load(ws, tmp_path, no_model_loading, extra, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
        run(argv_for(ws, tmp_path / "out", *extra))


def test_idle_frozen_weights_are_paged_out_and_read_back(tiny_sdxl_files):
    """Memory-mapped frozen weights: resident memory drops by about their size, values stay."""
    from library.models.sdxl.loading import load_sdxl_models
    from library.training.memory import page_out_frozen

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    models = load_sdxl_models(tiny_sdxl_files.path, dtype=torch.float32)
    te = models.text_encoder2.requires_grad_(False)
    expected = {k: v.clone() for k, v in te.state_dict().items()}
    size = sum(p.numel() * p.element_size() for p in te.parameters()) / 2**20
    float(sum(p.sum() for p in te.parameters()))  # make every page resident
    before = rss_mib()
    released = page_out_frozen([te]) / 2**20
    after = rss_mib()
    assert released > 0.8 * size and before - after > 0.5 * size, (size, released, before, after)
    assert all(torch.equal(expected[k], v) for k, v in te.state_dict().items())
    trained = models.unet  # requires_grad tensors are never paged out
    assert page_out_frozen([trained]) == 0


def test_parser_has_every_spec_option_and_help_is_fast():
    import time

    from library.args.finetune_args import sdxl_train_parser

    parser = sdxl_train_parser()
    names = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert len(names) == 176  # cli-options.md §9
    for own in ("--learning_rate_te1", "--learning_rate_te2", "--diffusers_xformers", "--train_text_encoder",
                "--no_half_vae", "--block_lr", "--fused_optimizer_groups", "--fused_backward_pass",
                "--cache_text_encoder_outputs_to_disk", "--save_model_as", "--v_parameterization"):
        assert own in names
    assert "--prior_loss_weight" not in names and "--network_module" not in names
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sdxl_train.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--fused_optimizer_groups" in r.stdout
    assert time.time() - t0 < 10  # no torch import before parsing (about 1 s on an idle machine)
