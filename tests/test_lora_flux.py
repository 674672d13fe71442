"""networks.lora_flux / networks.oft_flux: diffusers' FLUX LoRA loading as the oracle, the
network args of network-args.md §4/§8, split_qkv's fused file layout, bad input.

Oracle: diffusers' `FluxPipeline.load_lora_weights` (kohya converter + peft) on the same tiny
FLUX-dev weights must take every `lora_unet_*` / `lora_te1_*` key of our files and give
the same transformer and CLIP-L outputs as our network. Tolerance 1e-4 absolute on float32
outputs of magnitude ~1-5 (measured: about 1e-6). diffusers 0.42.1 hard-codes the
single blocks' split (3072, 3072, 3072, 12288) in its kohya converter; the test runs that
converter with the split read from our tiny model's width (ENVIRONMENT.md). diffusers drops
T5 (`lora_te3_*`) keys: they are checked against flux_minimal_inference's independent
loader instead.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

from flux_helpers import diffusers_flux_from_bfl, random_inputs, tiny_flux_files, tokenizer_dir
from library.errors import UserInputError

ATOL = 1e-4


def _models(variant="flux-dev"):
    from library.models.flux.loading import load_flux_transformer
    from library.models.flux.text_encoders import load_clip_l, load_t5xxl

    p = tiny_flux_files(variant)
    return load_flux_transformer(p["flux"]), load_clip_l(p["clip_l"]), load_t5xxl(p["t5xxl"])


def _randomize(net, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def diffusers_converter_for_width(monkeypatch):
    """diffusers' kohya FLUX converter with the single blocks' split taken from `hidden`."""
    import diffusers.loaders.lora_conversion_utils as lcu
    import diffusers.loaders.lora_pipeline as lp

    def install(hidden: int):
        src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
        old = "dims=[3072, 3072, 3072, 12288]"
        assert old in src, "diffusers changed its converter; update this workaround"
        src = src.replace(old, f"dims=[{hidden}, {hidden}, {hidden}, {4 * hidden}]")
        namespace = dict(vars(lcu))
        exec(compile(src, lcu.__file__, "exec"), namespace)  # noqa: S102 - diffusers' own code, one constant changed
        monkeypatch.setattr(lp, "_convert_kohya_flux_lora_to_diffusers", namespace["_convert_kohya_flux_lora_to_diffusers"])

    return install


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _pipeline(flux_path, config, clip_l, t5):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from library.models.flux.loading import load_ae
    from library.tokenizers import load_flux_tokenizers

    tok_l, tok_t5 = load_flux_tokenizers(tokenizer_dir())
    p = tiny_flux_files("flux-dev")
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=load_ae(p["ae"]), text_encoder=clip_l,
                        tokenizer=tok_l, text_encoder_2=t5, tokenizer_2=tok_t5,
                        transformer=diffusers_flux_from_bfl(flux_path, config))


CASES = {
    "default": {},
    "split_qkv": {"split_qkv": "True"},
    "t5+dims": {"train_t5xxl": "True", "img_mlp_dim": "3", "single_mod_dim": "0"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_diffusers_loads_our_flux_lora_and_agrees(case, tmp_path, diffusers_converter_for_width):
    """Every transformer and CLIP-L key is consumed by diffusers, which then gives our outputs."""
    from peft.tuners.lora import LoraLayer

    import networks.lora_flux as lf

    flux, clip_l, t5 = _models()
    diffusers_converter_for_width(flux.config.hidden_size)
    net = lf.create_network(1.0, 4, 2.0, None, [clip_l, t5], flux, **CASES[case])
    _randomize(net)
    path = str(tmp_path / f"{case}.safetensors")
    net.save_weights(path, None, {"ss_network_module": "networks.lora_flux"})
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    _, pipe_clip, pipe_t5 = _models()  # diffusers' copies: peft wraps their layers
    pipe = _pipeline(tiny_flux_files("flux-dev")["flux"], flux.config, pipe_clip, pipe_t5)
    records = _Records()
    watched = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in watched:
        lg.addHandler(records)
    try:
        pipe.load_lora_weights(path, adapter_name="ours")
    finally:
        for lg in watched:
            lg.removeHandler(records)
    bad = [m for m in records.messages if "unexpected" in m.lower() or "unsupported keys" in m.lower()
           or "incompatible" in m.lower()]
    assert not bad, bad

    # every module of ours is a peft layer on the diffusers side
    injected_tr = [n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)]
    injected_te = [n for n, m in pipe.text_encoder.named_modules() if isinstance(m, LoraLayer)]
    n_clip = sum(1 for m in net.text_encoder_loras if m.te_index == 0)
    assert len(injected_te) == n_clip == 6 * clip_l.config.num_hidden_layers
    expected_tr = 0  # qkv -> to_q/to_k/to_v, linear1 -> to_q/to_k/to_v/proj_mlp
    for m in net.unet_loras:
        if m.lora_name.endswith("_qkv"):
            expected_tr += 3
        elif m.lora_name.endswith("_linear1"):
            expected_tr += 4
        else:
            expected_tr += 1
    assert len(injected_tr) == expected_tr
    t5_keys = [k for k in keys if k.startswith("lora_te3_")]
    assert bool(t5_keys) == (case == "t5+dims")

    # same outputs
    inp = random_inputs(flux.config, batch=2)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base_tr = flux(**inp)
        net.apply_to([clip_l, t5], flux, True, True)
        net.eval()
        want_tr = flux(**inp)
        want_te = clip_l(ids).pooler_output
        got_tr = pipe.transformer(hidden_states=inp["img"], encoder_hidden_states=inp["txt"],
                                  pooled_projections=inp["y"], timestep=inp["timesteps"], img_ids=inp["img_ids"][0],
                                  txt_ids=inp["txt_ids"][0], guidance=inp["guidance"], return_dict=False)[0]
    assert (want_tr - base_tr).abs().max() > 1e-2, "the LoRA has no visible effect"
    diff = (want_tr - got_tr).abs().max().item()
    print(f"{case}: transformer max |ours - diffusers| = {diff:.2e}")
    assert diff <= ATOL
    with torch.no_grad():
        got_te = pipe.text_encoder(ids).pooler_output
    diff_te = (want_te - got_te).abs().max().item()
    print(f"{case}: CLIP-L pooled max |ours - diffusers| = {diff_te:.2e}")
    assert diff_te <= ATOL


def test_split_qkv_file_is_the_fused_layout_with_the_trained_delta(tmp_path):
    """split_qkv saves lora_down stacked, lora_up block-diagonal, alpha k times the per-part
    alpha: a plain fused reading of the file gives exactly the trained delta; loading it back
    into a split network restores every part."""
    import networks.lora_flux as lf
    from library.io.safetensors_io import load_state_dict

    flux, clip_l, t5 = _models()
    h = flux.config.hidden_size
    net = lf.create_network(1.0, 4, 3.0, None, None, flux, split_qkv="True")
    _randomize(net)
    path = str(tmp_path / "s.safetensors")
    net.save_weights(path, None, {})
    sd = load_state_dict(path)
    down = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert down.shape == (12, h) and up.shape == (3 * h, 12)
    assert float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 9.0
    assert torch.count_nonzero(up[:h, 4:]) == 0 and torch.count_nonzero(up[h:2 * h, :4]) == 0
    assert sd["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (16, h)
    assert float(sd["lora_unet_single_blocks_0_linear1.alpha"]) == 12.0
    m = {x.lora_name: x for x in net.unet_loras}["lora_unet_double_blocks_0_img_attn_qkv"]
    fused = 9.0 / 12 * up @ down
    torch.testing.assert_close(fused, m.delta_weight(), atol=1e-6, rtol=1e-5)
    back = lf.create_network(1.0, 4, 1.0, None, None, flux, split_qkv="True")
    back.load_weights(path)
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_t5_and_input_layer_lora_agree_with_the_inference_loader(tmp_path):
    """Keys diffusers 0.42.1 does not apply -- T5 (`lora_te3_*`, filtered out by its converter)
    and the input layers of `in_dims` (converted without the `transformer.` prefix, then
    dropped) -- give the same T5 and transformer outputs through our network and through
    flux_minimal_inference's independent adapter loader."""
    import networks.lora_flux as lf
    from library.inference.flux_adapters import load_adapters
    flux, clip_l, t5 = _models()
    net = lf.create_network(1.0, 4, 2.0, None, [clip_l, t5], flux, train_t5xxl="True", in_dims="[2,3,2,2,4]",
                            train_blocks="single")
    assert sum(1 for m in net.text_encoder_loras if m.te_index == 1) == 7 * len(t5.encoder.block)
    in_layers = {m.lora_name: m.lora_dim for m in net.unet_loras if "blocks" not in m.lora_name}
    assert in_layers == {"lora_unet_img_in": 2, "lora_unet_time_in_in_layer": 3, "lora_unet_time_in_out_layer": 3,
                         "lora_unet_vector_in_in_layer": 2, "lora_unet_vector_in_out_layer": 2,
                         "lora_unet_guidance_in_in_layer": 2, "lora_unet_guidance_in_out_layer": 2,
                         "lora_unet_txt_in": 4}
    _randomize(net, scale=0.05)
    path = str(tmp_path / "t5.safetensors")
    net.save_weights(path, None, {})
    other_flux, other_clip, other_t5 = _models()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    inp = random_inputs(flux.config, batch=1)
    with torch.no_grad():
        base = t5(input_ids=ids).last_hidden_state
        base_tr = flux(**inp)
        net.apply_to([clip_l, t5], flux, True, True)
        ours = t5(input_ids=ids).last_hidden_state
        ours_tr = flux(**inp)
        load_adapters([(path, 1.0)], other_flux, other_clip, other_t5)
        theirs = other_t5(input_ids=ids).last_hidden_state
        theirs_tr = other_flux(**inp)
    assert (ours - base).abs().max() > 1e-3 and (ours_tr - base_tr).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_tr, theirs_tr, atol=1e-5, rtol=1e-4)


def test_block_selection_dims_and_train_blocks():
    import networks.lora_flux as lf

    flux, clip_l, t5 = _models()
    names = lambda net: {m.lora_name for m in net.unet_loras}  # noqa: E731
    net = lf.create_network(1.0, 4, 1.0, None, [clip_l, t5], flux, train_blocks="single",
                            train_single_block_indices="1,3")
    assert names(net) == {f"lora_unet_single_blocks_{i}_{p}" for i in (1, 3) for p in ("linear1", "linear2",
                                                                                         "modulation_lin")}
    net = lf.create_network(1.0, 4, 1.0, None, None, flux, train_blocks="double", train_double_block_indices="none")
    assert not net.unet_loras
    net = lf.create_network(1.0, 8, 1.0, None, None, flux, img_attn_dim="2", txt_mlp_dim="0", single_dim="3",
                            single_mod_dim="5", train_double_block_indices="0-0")
    ranks = {m.lora_name: m.lora_dim for m in net.unet_loras}
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 2 and ranks["lora_unet_double_blocks_0_img_attn_proj"] == 2
    assert "lora_unet_double_blocks_0_txt_mlp_0" not in ranks and ranks["lora_unet_double_blocks_0_txt_mod_lin"] == 8
    assert not any("double_blocks_1" in n for n in ranks)
    assert ranks["lora_unet_single_blocks_2_linear1"] == 3 and ranks["lora_unet_single_blocks_2_modulation_lin"] == 5
    net = lf.create_network(1.0, 4, 1.0, None, None, flux, network_reg_dims="single_blocks_0_.*=7,img_mod=1")
    ranks = {m.lora_name: m.lora_dim for m in net.unet_loras}
    assert ranks["lora_unet_single_blocks_0_linear2"] == 7 and ranks["lora_unet_double_blocks_1_img_mod_lin"] == 1
    assert ranks["lora_unet_single_blocks_1_linear2"] == 4
    # CLIP-L by default, T5 only with train_t5xxl
    net = lf.create_network(1.0, 4, 1.0, None, [clip_l, t5], flux)
    assert {m.te_index for m in net.text_encoder_loras} == {0}
    assert all(m.lora_name.startswith("lora_te1_text_model_encoder_layers_") for m in net.text_encoder_loras)


def test_learning_rate_groups():
    import networks.lora_flux as lf

    flux, clip_l, t5 = _models()
    net = lf.create_network(1.0, 4, 1.0, None, [clip_l, t5], flux, train_t5xxl="True", loraplus_lr_ratio="4",
                            network_reg_lrs="single_blocks_1_=0.5")
    groups, names = net.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
    lr = dict(zip(names, [g["lr"] for g in groups]))
    assert names[0].startswith("reg_lr_0") and lr["reg_lr_0"] == 0.5 and lr["reg_lr_0 plus"] == 2.0
    assert lr["textencoder1"] == 1e-5 and lr["textencoder2"] == 2e-5 and lr["textencoder2 plus"] == 8e-5
    assert lr["unet"] == 1e-4 and lr["unet plus"] == 4e-4
    groups, names = net.prepare_optimizer_params([3e-5], None, 1e-3)  # one value serves both encoders
    lr = dict(zip(names, [g["lr"] for g in groups]))
    assert lr["textencoder1"] == lr["textencoder2"] == 3e-5 and lr["unet"] == 1e-3


def test_ggpo_perturbs_only_while_training():
    import networks.lora_flux as lf

    flux, _, _ = _models()
    net = lf.create_network(1.0, 4, 1.0, None, None, flux, ggpo_sigma="0.03", ggpo_beta="0.01")
    _randomize(net, scale=0.05)
    net.apply_to(None, flux, False, True)
    inp = random_inputs(flux.config, batch=1)
    flux.train()
    net.train()
    flux(**inp).pow(2).mean().backward()
    net.update_grad_norms()
    net.update_norms()
    m = net.unet_loras[0]
    assert m.grad_norms.shape == (m.out_dim, 1) and m.combined_weight_norms.shape == (m.out_dim, 1)
    with torch.no_grad():
        a, b = flux(**inp), flux(**inp)
        net.eval()
        c, d = flux(**inp), flux(**inp)
    assert not torch.equal(a, b) and torch.equal(c, d)


def test_bad_network_args_are_named():
    import networks.lora_flux as lf
    import networks.oft_flux as of

    flux, clip_l, t5 = _models()
    with pytest.raises(UserInputError, match="unknown --network_args key 'spilt_qkv'"):
        lf.create_network(1.0, 4, 1.0, None, None, flux, spilt_qkv="True")
    with pytest.raises(UserInputError, match="block 38 is out of range; valid indices are 0-37"):
        lf.create_network(1.0, 4, 1.0, None, None, flux, train_single_block_indices="0,30-38")
    with pytest.raises(UserInputError, match="valid indices are 0-18"):
        lf.create_network(1.0, 4, 1.0, None, None, flux, train_double_block_indices="19")
    with pytest.raises(UserInputError, match="train_blocks"):
        lf.create_network(1.0, 4, 1.0, None, None, flux, train_blocks="both")
    with pytest.raises(UserInputError, match="in_dims"):
        lf.create_network(1.0, 4, 1.0, None, None, flux, in_dims="[1,2,3]")
    with pytest.raises(UserInputError, match="ggpo"):
        lf.create_network(1.0, 4, 1.0, None, None, flux, ggpo_sigma="0.1")
    # 256-wide tiny model: 3 blocks do not divide the q/k/v parts
    with pytest.raises(UserInputError, match="cannot be split into 3 blocks"):
        of.create_network(1.0, 3, 1e-3, None, None, flux)
    with pytest.raises(UserInputError, match="does not divide"):
        of.check_before_loading(flux.config, 3, 1e-3)


def test_oft_flux_parts_and_inference_loader(tmp_path):
    """oft_flux: `.oft_blocks.<part>` per q/k/v (and MLP) part; the file gives the same output in
    flux_minimal_inference's independent loader; identity at start."""
    import networks.oft_flux as of
    from library.inference.flux_adapters import load_adapters

    flux, _, _ = _models()
    h = flux.config.hidden_size
    inp = random_inputs(flux.config, batch=1)
    net = of.create_network(1.0, 4, 1e-3, None, None, flux, enable_all_linear="true")
    sd = net.state_dict()
    assert sd["oft_unet_single_blocks_0_linear1.oft_blocks.3"].shape == (4, h, h)  # MLP part 4h / 4
    assert sd["oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.2"].shape == (4, h // 4, h // 4)
    with torch.no_grad():
        base = flux(**inp)
        net.apply_to(None, flux, True, True)
        torch.testing.assert_close(flux(**inp), base)  # zero blocks: identity
        _randomize(net, scale=0.01)
        ours = flux(**inp)
        net.remove_from()
    path = str(tmp_path / "oft.safetensors")
    net.save_weights(path, None, {})
    other = _models()[0]
    load_adapters([(path, 1.0)], other)
    with torch.no_grad():
        theirs = other(**inp)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    default = of.create_network(1.0, 4, 1e-3, None, None, flux)
    assert {m.lora_name.rsplit("_", 2)[-2] + "_" + m.lora_name.rsplit("_", 1)[-1] for m in default.unet_loras} == \
        {"attn_qkv", "attn_proj"}
    back, w = of.create_network_from_weights(1.0, path, None, None, _models()[0])
    assert len(back.unet_loras) == len(net.unet_loras)
