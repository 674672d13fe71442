"""networks.dylora (network-args.md §6) and networks.oft (§7): keys, training behaviour,
save/reload, OFT rotation maths and bias handling."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import networks.dylora as dylora
import networks.lora as lora
import networks.oft as oft
from library.errors import UserInputError
from library.io.safetensors_io import load_state_dict


@pytest.fixture(scope="module")
def base_models():
    from library.models.sd.tiny import make_sd_models

    return make_sd_models("sd1", seed=11)


@pytest.fixture
def sd1(base_models):
    return copy.deepcopy(base_models.text_encoder), copy.deepcopy(base_models.unet)


def _randomize(network, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def _outputs(te, unet):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    return te(ids).last_hidden_state, unet(x, torch.tensor([500]), ctx).sample


# -- DyLoRA ----------------------------------------------------------------------------------------


def test_dylora_keys_match_lora(sd1):
    te, unet = sd1
    net = dylora.create_network(1.0, 4, 2, None, te, unet, unit="2", conv_dim="4", dropout=None)
    ref = lora.create_network(1.0, 4, 2, None, te, unet, conv_dim="4", conv_alpha="2")
    sd, rsd = net.state_dict(), ref.state_dict()
    assert len(net.unet_loras) == 278 and len(net.text_encoder_loras) == 72
    assert sd.keys() == rsd.keys()
    for k in sd:
        assert sd[k].shape == rsd[k].shape, k
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    # parameters are kept per unit, the file holds the concatenation
    names = dict(net.lora_unet_mid_block_attentions_0_proj_in.named_parameters())
    assert sorted(names) == ["lora_down_0", "lora_down_1", "lora_up_0", "lora_up_1"]
    assert names["lora_down_0"].shape == (2, 128, 1, 1)


def test_dylora_args(sd1):
    te, unet = sd1
    with pytest.raises(UserInputError, match="multiple of unit"):
        dylora.create_network(1.0, 5, 1, None, te, unet, unit="2")
    with pytest.raises(UserInputError, match="conv_dim .* must equal"):
        dylora.create_network(1.0, 4, 1, None, te, unet, conv_dim="8")
    with pytest.raises(UserInputError, match="accepted keys: conv_alpha, conv_dim, loraplus_lr_ratio.*unit"):
        dylora.create_network(1.0, 4, 1, None, te, unet, rank_dropout="0.1")


def test_dylora_training_step_updates_one_unit():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    mod = dylora.DyLoRAModule("lora_unet_x", layer, 1.0, lora_dim=6, alpha=3, unit=2)
    with torch.no_grad():
        for p in mod.ups():
            p.normal_()
    mod.apply_to()
    x = torch.randn(4, 6)
    plain = layer.__class__.forward(layer, x)
    down = torch.cat(mod.downs(), 0).detach()
    up = torch.cat(mod.ups(), 1).detach()
    mod.train()
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        b = int(torch.randint(0, 6, (1,)).item())
        b -= b % 2
        torch.manual_seed(seed)
        out = layer(x)
        expected = plain + (x @ down.T @ up.T) * (0.5 * math.sqrt(6 / (b + 2)))
        torch.testing.assert_close(out, expected)
        for p in mod.parameters():
            p.grad = None
        out.sum().backward()
        with_grad = sorted(n for n, p in mod.named_parameters() if p.grad is not None)
        assert with_grad == [f"lora_down_{b // 2}", f"lora_up_{b // 2}"]
        seen.add(b)
    assert seen == {0, 2, 4}
    # eval: every component, factor 1 -> a plain LoRA of rank 6
    mod.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain + (x @ down.T @ up.T) * 0.5)


def test_dylora_save_reload_and_lora_loader(sd1, tmp_path):
    te, unet = sd1
    net = dylora.create_network(1.0, 4, 1, None, te, unet, unit="1")
    _randomize(net)
    path = str(tmp_path / "dy.safetensors")
    net.save_weights(path, None, {"ss_network_module": "networks.dylora"})
    net.apply_to(te, unet)
    net.eval()
    want = _outputs(te, unet)
    net.remove_from()
    for module in (dylora, lora):  # a DyLoRA file is a LoRA file
        other, sd = module.create_network_from_weights(1.0, path, None, te, unet)
        other.load_weights(path)
        other.apply_to(te, unet)
        other.eval()
        for a, b in zip(want, _outputs(te, unet)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        other.remove_from()
    # LoRA+ groups take the up chunks
    groups, desc = net.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
    assert desc == ["textencoder", "unet"]
    net.set_loraplus_lr_ratio(8)
    groups, desc = net.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
    assert desc == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert all(len(p.shape) == 2 and p.shape[1] == 1 for p in groups[1]["params"])  # (out, unit) up chunks
    # max-norm works on the concatenated product
    scaled, mean_norm, top = net.apply_max_norm_regularization(0.01, "cpu")
    assert scaled > 0 and top <= 0.01 + 1e-6


# -- OFT -------------------------------------------------------------------------------------------


def test_oft_keys_and_targets(sd1):
    te, unet = sd1
    net = oft.create_network(1.0, 4, 1e-3, None, te, unet)
    assert len(net.unet_loras) == 16 * 2 * 4 and net.text_encoder_loras == []  # to_q/k/v/out of attn1, attn2
    sd = net.state_dict()
    k = "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[k + ".oft_blocks"].shape == (4, 8, 8) and sd[k + ".alpha"].shape == ()
    assert sd[k + ".alpha"].dtype == torch.float32
    assert sd["oft_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.oft_blocks"].shape == (4, 32, 32)
    assert len(oft.create_network(1.0, 4, 1, None, te, unet, enable_all_linear="true").unet_loras) == 16 * 12
    conv = oft.create_network(1.0, 4, 1, None, te, unet, enable_conv="1")
    assert "oft_unet_down_blocks_0_resnets_0_conv1" in {m.lora_name for m in conv.unet_loras}
    assert int(conv.state_dict()["oft_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1
    # 'False' means false here (the reference would read any non-empty string as true)
    assert len(oft.create_network(1.0, 4, 1, None, te, unet, enable_conv="False").unet_loras) == 128
    with pytest.raises(UserInputError, match="cannot be split into 5 blocks"):
        oft.create_network(1.0, 5, 1, None, te, unet)
    with pytest.raises(UserInputError, match="accepted keys: enable_all_linear, enable_conv"):
        oft.create_network(1.0, 4, 1, None, te, unet, conv_dim="4")


def test_oft_identity_at_init_and_with_multiplier_zero(sd1):
    te, unet = sd1
    base = _outputs(te, unet)
    net = oft.create_network(1.0, 4, 1e-3, None, te, unet, enable_all_linear="1", enable_conv="1")
    net.apply_to(te, unet)
    torch.testing.assert_close(_outputs(te, unet)[1], base[1], atol=1e-6, rtol=0)
    _randomize(net, 0.01)
    assert (_outputs(te, unet)[1] - base[1]).abs().max() > 1e-4
    net.set_multiplier(0.0)
    assert torch.equal(_outputs(te, unet)[1], base[1])
    assert torch.equal(_outputs(te, unet)[0], base[0])  # text encoder untouched


def _explicit_rotation(blocks, alpha, out_dim, m=1.0):
    """Independent reference: Cayley transform with an explicit inverse, float64."""
    b = blocks.double()
    q = b - b.transpose(1, 2)
    c = alpha * out_dim
    n = q.norm()
    if n > c:
        q = q * (c + 1e-8) / (n + 1e-8)
    eye = torch.eye(b.shape[1], dtype=torch.float64)
    r = torch.stack([(eye + qi) @ torch.linalg.inv(eye - qi) for qi in q])
    return m * (r - eye) + eye


@pytest.mark.parametrize("conv", [False, True])
def test_oft_rotation_order_bias_and_constraint(conv):
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(6, 8, 3, padding=1) if conv else torch.nn.Linear(6, 8)
    mod = oft.OFTModule("oft_unet_x", layer, 1.0, dim=2, alpha=0.05)
    with torch.no_grad():
        mod.oft_blocks.normal_(0, 0.3)
    mod.apply_to()
    r = _explicit_rotation(mod.oft_blocks.detach(), 0.05, 8)
    # constraint c = alpha * out_dim = 0.4 is active here: |Q|_F is clipped to c
    q = mod.oft_blocks.detach() - mod.oft_blocks.detach().transpose(1, 2)
    assert q.norm() > 0.4
    got_r = mod.rotation().double()
    torch.testing.assert_close(got_r, r, atol=1e-5, rtol=1e-5)
    for ri in got_r:  # orthogonal
        torch.testing.assert_close(ri @ ri.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    # W'_i = R_i^T W_i, bias added unrotated
    w = layer.weight.detach().double().reshape(8, -1)
    w_rot = torch.block_diag(*r).T @ w
    x = torch.randn(3, 6, 5, 5) if conv else torch.randn(3, 6)
    with torch.no_grad():
        got = layer(x).double()
    if conv:
        expected = torch.nn.functional.conv2d(x.double(), w_rot.reshape(layer.weight.shape), layer.bias.double(), padding=1)
    else:
        expected = x.double() @ w_rot.T + layer.bias.double()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the same thing seen from the output side: each block of channels times R_i, then + bias
    if not conv:
        raw = x.double() @ w.T
        expected2 = torch.cat([raw[:, 4 * i:4 * i + 4] @ r[i] for i in range(2)], 1) + layer.bias.double()
        torch.testing.assert_close(got, expected2, atol=1e-5, rtol=1e-5)
    # multiplier m: R_m = m (R - I) + I
    mod.multiplier = 0.5
    torch.testing.assert_close(mod.rotation().double(), _explicit_rotation(mod.oft_blocks.detach(), 0.05, 8, 0.5),
                               atol=1e-5, rtol=1e-5)


def test_oft_float32_compute_under_bf16():
    torch.manual_seed(0)
    layer32 = torch.nn.Linear(16, 16)
    layer16 = copy.deepcopy(layer32).to(torch.bfloat16)
    mods = [oft.OFTModule("oft_unet_x", lyr, 1.0, dim=2, alpha=1.0) for lyr in (layer32, layer16)]
    with torch.no_grad():
        mods[0].oft_blocks.normal_(0, 0.2)
        mods[1].oft_blocks.copy_(mods[0].oft_blocks)
    mods[1].to(torch.bfloat16)
    for m in mods:
        m.apply_to()
    assert mods[1].rotation().dtype == torch.float32
    x = torch.randn(4, 16)
    with torch.no_grad():
        y32 = layer32(x)
        y16 = layer16(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=5e-2)
    # gradients reach the blocks
    layer32(x).sum().backward()
    assert mods[0].oft_blocks.grad is not None and mods[0].oft_blocks.grad.abs().sum() > 0


def test_oft_save_reload_and_merge(sd1, base_models, tmp_path):
    te, unet = sd1
    net = oft.create_network(1.0, 4, 0.01, None, te, unet, enable_conv="true")
    _randomize(net, 0.02)
    path = str(tmp_path / "oft.safetensors")
    net.save_weights(path, None, {"ss_network_module": "networks.oft"})
    sd = load_state_dict(path)
    assert all(k.startswith("oft_unet_") and k.endswith((".oft_blocks", ".alpha")) for k in sd)
    net.apply_to(te, unet)
    want = _outputs(te, unet)
    net.remove_from()
    # from weights: modules (conv ones included), blocks and alpha come from the file
    other, weights = oft.create_network_from_weights(1.0, path, None, te, unet)
    assert {m.lora_name for m in other.unet_loras} == {m.lora_name for m in net.unet_loras}
    other.load_weights(path)
    other.apply_to(te, unet)
    for a, b in zip(want, _outputs(te, unet)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    other.remove_from()
    # merged model == live network (the bias is handled the same way in both)
    te2, unet2 = copy.deepcopy(base_models.text_encoder), copy.deepcopy(base_models.unet)
    merger, weights = oft.create_network_from_weights(1.0, path, None, te2, unet2, for_inference=True)
    merger.merge_to(te2, unet2, weights, dtype=None, device="cpu")
    for a, b in zip(want, _outputs(te2, unet2)):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    groups, desc = net.prepare_optimizer_params(1e-4, 2e-4, 1e-3)
    assert desc == ["unet"] and groups[0]["lr"] == 2e-4
