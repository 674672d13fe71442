"""networks.lora: key names and shapes (formats.md a), network_args (network-args.md §1-2),
files, max-norm, dropout, LoRA+ and block-wise learning rates, merging."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

import networks.lora as lora
from library.errors import UserInputError
from library.io.hashing import sshs_hashes
from library.io.safetensors_io import load_state_dict, read_metadata


@pytest.fixture(scope="module")
def base_models():
    from library.models.sd.tiny import make_sd_models

    return {v: make_sd_models(v, seed=7) for v in ("sd1", "sd2")}


@pytest.fixture
def sd1(base_models):
    """Fresh copies (tests hook and merge into them)."""
    m = base_models["sd1"]
    return copy.deepcopy(m.text_encoder), copy.deepcopy(m.unet)


def _randomize(network, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(context_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, context_dim, generator=g), torch.randint(0, 49408, (2, 77), generator=g))


@torch.no_grad()
def _outputs(te, unet, seed=0):
    x, t, ctx, ids = _inputs(seed=seed)
    return te(ids).last_hidden_state, unet(x, t, ctx).sample


# -- keys, shapes, counts --------------------------------------------------------------------------


def _expected_lierla_names(te, unet, te_prefix="lora_te"):
    """Independent enumeration: every Linear / 1x1 conv under a transformer block or CLIP
    attention/MLP, named by its full canonical path."""
    names = set()
    for path, mod in unet.named_modules():
        if re.search(r"attentions\.\d+\.", path) and (
            isinstance(mod, torch.nn.Linear) or (isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1))
        ):
            names.add("lora_unet_" + path.replace(".", "_"))
    for path, mod in te.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".self_attn." in path or ".mlp." in path):
            names.add(f"{te_prefix}_text_model_" + path.replace(".", "_"))
    return names


def test_sd1_lierla_keys_shapes_and_counts(sd1):
    te, unet = sd1
    net = lora.create_network(1.0, 4, 1, None, te, unet)
    assert len(net.unet_loras) == 192 and len(net.text_encoder_loras) == 72  # SD 1.5: 192 + 72
    assert {m.lora_name for m in net.all_loras} == _expected_lierla_names(te, unet)
    sd = net.state_dict()
    assert len(sd) == 3 * (192 + 72)
    # formats.md a.4 examples, at tiny widths (320 -> 32, context 768 -> 32)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].shape == (32, 4, 1, 1)
    assert sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (4, 32)
    assert sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight"].shape == (1024, 4)
    assert sd["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0.lora_down.weight"].shape == (4, 32)
    assert sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 32)
    assert sd["lora_te_text_model_encoder_layers_11_mlp_fc1.lora_up.weight"].shape == (64, 4)
    alpha = sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]
    assert alpha.shape == () and alpha.dtype == torch.int64 and int(alpha) == 1  # trainer default int 1
    assert not any("resnets" in k or "samplers" in k for k in sd)
    # float alpha -> float32 tensor
    net = lora.create_network(1.0, 8, 4.0, None, te, unet)
    a = net.state_dict()["lora_unet_mid_block_attentions_0_proj_out.alpha"]
    assert a.dtype == torch.float32 and float(a) == 4.0
    assert net.unet_loras[0].scale == 0.5


def test_sd1_c3lier_keys(sd1):
    te, unet = sd1
    net = lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="8", conv_alpha="2")
    assert len(net.unet_loras) == 278  # SD 1.5 C3Lier: 192 + 22 resnets x 3 + 14 shortcuts + 6 samplers
    sd = net.state_dict()
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (8, 32, 3, 3)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 8, 1, 1)
    assert float(sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 2.0
    # Linear / 1x1 layers inside the ResNet blocks get the base rank and alpha
    assert sd["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape == (4, 128)
    assert sd["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].shape == (4, 32, 1, 1)
    assert int(sd["lora_unet_down_blocks_1_resnets_0_conv_shortcut.alpha"]) == 1
    assert sd["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"].shape == (8, 32, 3, 3)
    assert sd["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"].shape == (8, 128, 3, 3)
    assert "lora_unet_mid_block_resnets_1_conv2.lora_down.weight" in sd
    # the 3x3 down conv keeps the original stride and padding
    down = net.lora_unet_down_blocks_0_downsamplers_0_conv.lora_down
    assert down.stride == (2, 2) and down.padding == (1, 1)


def test_sd2_keys(base_models):
    m = base_models["sd2"]
    net = lora.create_network(1.0, 4, 1, None, m.text_encoder, m.unet)
    assert len(net.unet_loras) == 192 and len(net.text_encoder_loras) == 23 * 6
    assert {x.lora_name for x in net.all_loras} == _expected_lierla_names(m.text_encoder, m.unet)
    sd = net.state_dict()
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32)  # Linear in v2
    assert "lora_te_text_model_encoder_layers_22_mlp_fc2.lora_up.weight" in sd
    assert not any("layers_23" in k for k in sd)


def test_text_encoder_list_prefixes(base_models):
    m = base_models["sd1"]
    te2 = copy.deepcopy(m.text_encoder)
    net = lora.create_network(1.0, 4, 1, None, [m.text_encoder, te2], m.unet)
    names = [x.lora_name for x in net.text_encoder_loras]
    assert sum(n.startswith("lora_te1_text_model_encoder_layers_") for n in names) == 72
    assert sum(n.startswith("lora_te2_text_model_encoder_layers_") for n in names) == 72
    single = lora.create_network(1.0, 4, 1, None, [m.text_encoder], m.unet)
    assert single.text_encoder_loras[0].lora_name.startswith("lora_te_text_model_")


def test_network_args_validation(sd1):
    te, unet = sd1
    with pytest.raises(UserInputError) as e:
        lora.create_network(1.0, 4, 1, None, te, unet, conv_dims="4")
    msg = str(e.value)
    assert "conv_dims" in msg and "conv_dim" in msg and "loraplus_unet_lr_ratio" in msg and "block_lr_zero_threshold" in msg
    with pytest.raises(UserInputError, match="conv_dim='x'.*integer"):
        lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="x")
    with pytest.raises(UserInputError, match=r"rank_dropout must be in \[0, 1\)"):
        lora.create_network(1.0, 4, 1, None, te, unet, rank_dropout="1.5")
    with pytest.raises(UserInputError, match="exactly 25"):
        lora.create_network(1.0, 4, 1, None, te, unet, block_dims="4,4")
    with pytest.raises(UserInputError, match="preset"):
        lora.create_network(1.0, 4, 1, None, te, unet, down_lr_weight="wavy")
    # the trainer's injected `dropout` is accepted (and ignored); None network_dim -> 4
    net = lora.create_network(1.0, None, None, None, te, unet, dropout=0.1)
    assert net.unet_loras[0].lora_dim == 4 and net.unet_loras[0].scale == 0.25 and net.unet_loras[0].dropout is None


# -- behaviour ---------------------------------------------------------------------------------------


def test_new_network_is_identity_and_multiplier_is_linear(sd1):
    te, unet = sd1
    base = _outputs(te, unet)
    net = lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="4")
    net.apply_to(te, unet)
    for a, b in zip(base, _outputs(te, unet)):
        assert torch.equal(a, b)  # up is zero at start
    _randomize(net, 0.05)
    net.eval()
    one = _outputs(te, unet)
    net.set_multiplier(0.5)
    half = _outputs(te, unet)
    net.set_multiplier(0.0)
    zero = _outputs(te, unet)
    for b, o, h, z in zip(base, one, half, zero):
        assert torch.equal(z, b)
        assert (o - b).abs().max() > 1e-3
    # text encoder: every LoRA layer's delta is linear in the multiplier, but attention is not,
    # so compare a single layer instead
    layer = net.lora_te_text_model_encoder_layers_0_self_attn_q_proj
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        layer.multiplier = 1.0
        d1 = layer(x) - layer.org_forward(x)
        layer.multiplier = 0.5
        dh = layer(x) - layer.org_forward(x)
    torch.testing.assert_close(dh, d1 * 0.5, atol=1e-6, rtol=1e-5)
    net.remove_from()
    for a, b in zip(base, _outputs(te, unet)):
        assert torch.equal(a, b)


def test_apply_to_without_text_encoder_drops_its_modules(sd1):
    te, unet = sd1
    net = lora.create_network(1.0, 4, 1, None, te, unet)
    net.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    assert net.text_encoder_loras == [] and len(net.unet_loras) == 192
    assert not any(k.startswith("lora_te") for k in net.state_dict())
    params, desc = net.prepare_optimizer_params(1e-4, None, 1e-3)
    assert desc == ["unet"] and params[0]["lr"] == 1e-3


def test_save_load_round_trip_and_metadata(sd1, tmp_path):
    te, unet = sd1
    net = lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="4", conv_alpha="2")
    _randomize(net)
    meta = {"ss_network_dim": "4", "other": "x"}
    path = tmp_path / "l.safetensors"
    net.save_weights(str(path), None, meta)
    assert "sshs_model_hash" not in meta  # caller's dict untouched
    saved = read_metadata(path)
    tensors = load_state_dict(path)
    assert saved["ss_network_dim"] == "4" and saved["other"] == "x"
    assert (saved["sshs_model_hash"], saved["sshs_legacy_hash"]) == sshs_hashes(tensors, saved)
    assert tensors.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype

    net.apply_to(te, unet)
    net.eval()
    want = _outputs(te, unet)
    net.remove_from()

    # a network built from the file reproduces the outputs
    net2, weights = lora.create_network_from_weights(1.0, str(path), None, te, unet)
    assert len(net2.unet_loras) == 278 and len(net2.text_encoder_loras) == 72
    net2.load_weights(str(path))
    net2.apply_to(te, unet)
    net2.eval()
    for a, b in zip(want, _outputs(te, unet)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    net2.remove_from()

    # fp16 save casts every tensor, alpha included; .pt goes through torch.save
    net.save_weights(str(tmp_path / "h.safetensors"), torch.float16, None)
    assert all(v.dtype == torch.float16 for v in load_state_dict(tmp_path / "h.safetensors").values())
    net.save_weights(str(tmp_path / "l.pt"), torch.bfloat16, {"ss_x": "1"})
    pt = torch.load(tmp_path / "l.pt")
    assert pt.keys() == tensors.keys() and all(v.dtype == torch.bfloat16 for v in pt.values())
    net3 = lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="4", conv_alpha="2")
    net3.load_weights(str(tmp_path / "l.pt"))
    torch.testing.assert_close(net3.lora_unet_mid_block_resnets_0_conv1.lora_up.weight,
                               net.lora_unet_mid_block_resnets_0_conv1.lora_up.weight, atol=1e-2, rtol=1e-2)


def test_dim_from_weights_and_alpha_from_file(sd1, tmp_path):
    te, unet = sd1
    dims = ",".join(str(1 + i % 5) for i in range(25))
    net = lora.create_network(1.0, 4, 3.0, None, te, unet, block_dims=dims, conv_block_dims=dims, conv_block_alphas="0.5," * 24 + "0.5")
    _randomize(net)
    path = str(tmp_path / "b.safetensors")
    net.save_weights(path, None, None)
    net2, sd = lora.create_network_from_weights(1.0, path, None, te, unet)
    sd2 = net2.state_dict()
    assert sd2.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert sd2[k].shape == v.shape
    by_name = {m.lora_name: m for m in net2.all_loras}
    for m in net.all_loras:
        assert by_name[m.lora_name].lora_dim == m.lora_dim and by_name[m.lora_name].scale == pytest.approx(m.scale)
    # block 4 = down_blocks.1.attentions.0 (1 + 3*1 + 0): rank 1 + 4 % 5 = 5
    assert net.lora_unet_down_blocks_1_attentions_0_proj_in.lora_dim == 5
    assert net.lora_unet_down_blocks_1_downsamplers_0_conv.lora_dim == 2  # block 6
    assert net.lora_unet_mid_block_attentions_0_proj_in.lora_dim == 3  # block 12
    # loading a file with a different alpha into an existing network changes the scale too
    net3 = lora.create_network(1.0, 4, 1, None, te, unet)
    sd4 = {k: v for k, v in net3.state_dict().items()}
    sd4["lora_unet_mid_block_attentions_0_proj_in.alpha"] = torch.tensor(2.5)
    net3.load_state_dict(sd4)
    assert net3.lora_unet_mid_block_attentions_0_proj_in.scale == pytest.approx(2.5 / 4)
    # shape mismatch and foreign files are user errors
    with pytest.raises(UserInputError, match="dim_from_weights"):
        net3.load_weights(path)
    other = tmp_path / "foreign.safetensors"
    from library.io.safetensors_io import save_state_dict

    save_state_dict({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8)}, other)
    with pytest.raises(UserInputError, match="none of its"):
        net3.load_weights(str(other))


def test_merge_to_matches_applied_network(sd1, base_models, tmp_path):
    te, unet = sd1
    net = lora.create_network(0.7, 4, 2, None, te, unet, conv_dim="4", conv_alpha="1")
    _randomize(net, 0.05)
    path = str(tmp_path / "m.safetensors")
    net.save_weights(path, None, None)
    net.apply_to(te, unet)
    net.eval()
    want = _outputs(te, unet)
    net.remove_from()

    src = base_models["sd1"]
    te2, unet2 = copy.deepcopy(src.text_encoder), copy.deepcopy(src.unet)
    merger, weights = lora.create_network_from_weights(0.7, path, None, te2, unet2, for_inference=True)
    merger.merge_to(te2, unet2, weights, dtype=None, device="cpu")
    got = _outputs(te2, unet2)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)

    # pre_calculation merges in place; restore_weights undoes it
    te3, unet3 = copy.deepcopy(src.text_encoder), copy.deepcopy(src.unet)
    base = _outputs(te3, unet3)
    inf, weights = lora.create_network_from_weights(0.7, path, None, te3, unet3, for_inference=True)
    inf.load_state_dict(weights)
    inf.apply_to(te3, unet3)
    inf.eval()
    live = _outputs(te3, unet3)
    inf.backup_weights()
    inf.pre_calculation()
    merged = _outputs(te3, unet3)
    inf.restore_weights()
    again = _outputs(te3, unet3)
    inf.set_enabled(False)
    off = _outputs(te3, unet3)
    for lv, mg, ag, b, o in zip(live, merged, again, base, off):
        torch.testing.assert_close(mg, lv, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ag, lv, atol=0, rtol=0)
        torch.testing.assert_close(o, b, atol=0, rtol=0)


def test_max_norm_regularization(sd1):
    te, unet = sd1
    net = lora.create_network(1.0, 4, 2, None, te, unet, conv_dim="4")
    _randomize(net, 0.3)
    before = {m.lora_name: m.delta_weight().norm().item() for m in net.all_loras}
    max_norm = sorted(before.values())[len(before) // 2]  # about half the modules exceed it
    scaled, mean_norm, top = net.apply_max_norm_regularization(max_norm, "cpu")
    after = {m.lora_name: m.delta_weight().norm().item() for m in net.all_loras}
    exceeding = [n for n, v in before.items() if v > max_norm]
    assert scaled == len(exceeding) > 0
    for n, v in before.items():
        if v > max_norm:
            assert after[n] == pytest.approx(max_norm, rel=1e-4)
        else:
            assert after[n] == pytest.approx(v, rel=1e-6)
    assert top == pytest.approx(max_norm, rel=1e-4)
    assert mean_norm == pytest.approx(sum(after.values()) / len(after), rel=1e-4)
    # up and down are scaled by the same sqrt(ratio)
    m = net.all_loras[0]
    assert m.scale == 0.5


def _single_layer(in_f=6, out_f=5, **kw):
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_f, out_f)
    mod = lora.LoRAModule("lora_unet_x", layer, 1.0, 4, 4, **kw)
    with torch.no_grad():
        mod.lora_up.weight.normal_()
    mod.apply_to()
    return layer, mod


def test_rank_dropout_only_in_training():
    layer, mod = _single_layer(rank_dropout=0.5)
    x = torch.randn(3, 7, 6)
    with torch.no_grad():
        mod.eval()
        full = layer(x)
        plain = layer.__class__.forward(layer, x)
        torch.testing.assert_close(full, plain + mod.lora_up(mod.lora_down(x)) * mod.scale)
        mod.train()
        torch.manual_seed(3)
        got = layer(x)
        torch.manual_seed(3)
        keep = (torch.rand(3, 4) > 0.5).float()[:, None, :]
        expected = plain + mod.lora_up(mod.lora_down(x) * keep) * (mod.scale / 0.5)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, full)


def test_module_and_neuron_dropout_only_in_training():
    layer, mod = _single_layer(module_dropout=0.5, dropout=0.5)
    x = torch.randn(4, 6)
    with torch.no_grad():
        plain = layer.__class__.forward(layer, x)
        mod.eval()
        outs = [layer(x) for _ in range(10)]
        assert all(torch.equal(o, outs[0]) for o in outs) and not torch.equal(outs[0], plain)
        mod.train()
        torch.manual_seed(0)
        outs = [layer(x) for _ in range(40)]
    skipped = sum(torch.equal(o, plain) for o in outs)
    assert 5 < skipped < 35  # module dropout: about half the calls return the layer alone
    assert len({o.sum().item() for o in outs if not torch.equal(o, plain)}) > 1  # neuron dropout varies


def test_loraplus_param_groups(sd1):
    te, unet = sd1
    net = lora.create_network(1.0, 4, 1, None, te, unet, loraplus_lr_ratio="16", loraplus_text_encoder_lr_ratio="4")
    groups, desc = net.prepare_optimizer_params(1e-5, 2e-4, 1e-3)
    assert desc == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1e-5, 4e-5, 2e-4, pytest.approx(16 * 2e-4)]
    te_up = {id(m.lora_up.weight) for m in net.text_encoder_loras}
    assert {id(p) for p in groups[1]["params"]} == te_up
    assert all(id(p) not in te_up for p in groups[0]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    # fall-backs and dropping lr 0 groups
    groups, desc = net.prepare_optimizer_params(0, None, 1e-3)
    assert desc == ["unet", "unet plus"] and groups[0]["lr"] == 1e-3
    plain = lora.create_network(1.0, 4, 1, None, te, unet)
    groups, desc = plain.prepare_optimizer_params(None, None, 1e-3)
    assert desc == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-3, 1e-3]
    groups, desc = plain.prepare_optimizer_params([5e-5], 1e-4, 1e-3)
    assert [g["lr"] for g in groups] == [5e-5, 1e-4]


def test_block_lr_weights_presets_and_groups(sd1):
    from library.networks.blocks import SD_LAYOUT, parse_lr_weights

    w = parse_lr_weights(SD_LAYOUT, "sine", None, "cosine+0.5")
    assert len(w) == 25
    # index 0 (conv_in) of 'sine' is sin(0) = 0 -> zero weight; last down entry sin(pi/2) = 1
    assert w[0] == 0.0 and w[11] == pytest.approx(1.0) and w[5] == pytest.approx(math.sin(math.pi / 2 * 5 / 11))
    assert w[12] == 1.0  # mid not given
    assert w[13] == pytest.approx(1.5) and w[24] == pytest.approx(0.5)
    w = parse_lr_weights(SD_LAYOUT, "1,,0.5", "0.2", None, zero_threshold=0.25)
    assert w[:4] == [1.0, 0.0, 0.5, 1.0] and w[12] == 0.0 and w[13:] == [1.0] * 12

    te, unet = sd1
    net = lora.create_network(1.0, 4, 1, None, te, unet, down_lr_weight="1,1,1,1,0,1,1,1,1,1,1,1",
                              mid_lr_weight="0", up_lr_weight="linear", conv_dim="2")
    names = {m.lora_name for m in net.unet_loras}
    # block 4 (down_blocks.1.*.0), the mid block and block 13 (up linear weight 0) are not created
    assert not any(n.startswith(("lora_unet_down_blocks_1_attentions_0", "lora_unet_down_blocks_1_resnets_0",
                                 "lora_unet_mid_block", "lora_unet_up_blocks_0_resnets_0")) for n in names)
    assert "lora_unet_down_blocks_1_attentions_1_proj_in" in names
    groups, desc = net.prepare_optimizer_params(1e-4, 1e-3, 1e-2)
    assert desc[0] == "textencoder" and groups[0]["lr"] == 1e-4
    by_desc = dict(zip(desc, groups))
    assert "unet_block4" not in by_desc and "unet_block12" not in by_desc and "unet_block13" not in by_desc
    assert by_desc["unet_block1"]["lr"] == pytest.approx(1e-3)
    assert by_desc["unet_block24"]["lr"] == pytest.approx(1e-3)
    assert by_desc["unet_block18"]["lr"] == pytest.approx(1e-3 * 5 / 11)
    mods18 = [m for m in net.unet_loras if m.block_index == 18]  # up_blocks.1.resnets/attentions.2 + upsampler
    assert {id(p) for m in mods18 for p in m.parameters()} == {id(p) for p in by_desc["unet_block18"]["params"]}
    assert any("upsamplers" in m.lora_name for m in mods18)


# -- third-party plug-in: LyCORIS' lycoris.kohya ----------------------------------------------------


@pytest.mark.parametrize("algo, suffix", [("loha", ".hada_w1_a"), ("lokr", ".lokr_w1")])
def test_lycoris_plugin_trains_and_saves(algo, suffix, sd1, tmp_path):
    kohya = pytest.importorskip("lycoris.kohya")
    from library.networks.discovery import plugin_view

    te, unet = sd1
    base = _outputs(te, unet)
    # network_args arrive as strings; the trainer adds `dropout`
    net = kohya.create_network(1.0, 4, 1, None, plugin_view(te), unet, algo=algo, conv_dim="4", conv_alpha="1",
                               dropout=None)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    net.prepare_grad_etc(te, unet)
    net.on_epoch_start(te, unet)
    params, desc = net.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    assert desc == ["textencoder", "unet"]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x, t, _, ids = _inputs()
    net.on_step_start()
    hidden = te(ids).last_hidden_state
    loss = torch.nn.functional.mse_loss(unet(x, t, hidden).sample, torch.zeros_like(x))
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("lora_te_"))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("lora_unet_"))
    opt.step()
    net.eval()
    after = _outputs(te, unet)
    assert (after[1] - base[1]).abs().max() > 0

    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": "lycoris.kohya"})
    keys = load_state_dict(path).keys()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" + suffix in keys
    # with the view, text-encoder keys carry the canonical text_model_ level
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" + suffix in keys
    assert "sshs_model_hash" in read_metadata(path)


def test_plugin_view_names(base_models):
    from library.networks.discovery import CanonicalNamesView, plugin_view

    te = base_models["sd1"].text_encoder
    view = plugin_view(te)
    assert isinstance(view, CanonicalNamesView) and view.wrapped is te and view.config is te.config
    assert plugin_view([te, None])[0].wrapped is te
    names = {n for n, _ in view.named_modules()}
    assert "text_model.encoder.layers.0.self_attn.q_proj" in names
    # our own modules name the same layers identically through the view or without it
    unet = base_models["sd1"].unet
    a = {m.lora_name for m in lora.create_network(1.0, 4, 1, None, te, unet).text_encoder_loras}
    b = {m.lora_name for m in lora.create_network(1.0, 4, 1, None, view, unet).text_encoder_loras}
    assert a == b
