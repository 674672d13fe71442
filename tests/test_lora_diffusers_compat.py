"""Compatibility oracle: diffusers' `load_lora_weights` must take every key of our LoRA files
and give the same U-Net and text-encoder outputs as our network at multiplier 1.

Tolerance: atol 1e-5 on float32 outputs of magnitude ~1. Measured: text encoder 0 (bit for
bit), U-Net about 1.1e-6 to 1.4e-6 (summation order inside the two attention paths), merged
weights vs diffusers about 2e-6.
"""

from __future__ import annotations

import logging

import pytest
import torch

import networks.lora as lora

ATOL = 1e-5


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, tokenizer=None, requires_safety_checker=False
    )


def _inputs(context_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([900]),
            torch.randn(1, 77, context_dim, generator=g), torch.randint(0, 49408, (1, 77), generator=g))


@torch.no_grad()
def _outputs(te, unet, context_dim):
    x, t, ctx, ids = _inputs(context_dim)
    return te(ids).last_hidden_state, unet(x, t, ctx).sample


CASES = {  # variant, network_args, also check merge_to
    "sd1-lierla": ("sd1", {}, False),
    "sd1-c3lier": ("sd1", {"conv_dim": "3", "conv_alpha": "1"}, True),
    "sd2-lierla": ("sd2", {}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_diffusers_loads_our_lora_and_agrees(case, tiny_sd, tmp_path):
    from peft.tuners.lora import LoraLayer

    from library.models.sd.loading import load_sd_models

    variant, net_args, check_merge = CASES[case]
    model = tiny_sd(variant)
    ours = load_sd_models(model.path)
    te, unet = ours.text_encoder, ours.unet
    context_dim = te.config.hidden_size

    net = lora.create_network(1.0, 4, 2.0, None, te, unet, **net_args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # non-zero up and down
    path = tmp_path / f"{case}.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": "networks.lora"})

    pipe = _pipeline(model.reference_folder)
    base = _outputs(pipe.text_encoder, pipe.unet, context_dim)
    records = _Records()
    watched = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in watched:
        lg.addHandler(records)
    try:
        pipe.load_lora_weights(str(path), adapter_name="ours")
    finally:
        for lg in watched:
            lg.removeHandler(records)
    assert not [m for m in records.messages if "unexpected" in m.lower() or "not found" in m.lower()], records.messages

    # (a) every one of our modules became a peft LoRA layer with the same tensors and scale
    injected = {
        "unet": {n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)},
        "te": {n for n, m in pipe.text_encoder.named_modules() if isinstance(m, LoraLayer)},
    }
    assert len(injected["unet"]) == len(net.unet_loras) == (278 if net_args else 192)
    assert len(injected["te"]) == len(net.text_encoder_loras) == te.config.num_hidden_layers * 6
    unet_modules = dict(pipe.unet.named_modules())
    te_modules = dict(pipe.text_encoder.named_modules())
    our_paths = {id(mod): n for model_ in (te, unet) for n, mod in model_.named_modules()}
    for m in net.all_loras:
        is_te = m.lora_name.startswith("lora_te")
        live = our_paths[id(m.org_module)]
        peft_layer = (te_modules if is_te else unet_modules)[live]
        assert isinstance(peft_layer, LoraLayer), m.lora_name
        canonical = ("text_model." if is_te and not live.startswith("text_model.") else "") + live
        assert m.lora_name == ("lora_te_" if is_te else "lora_unet_") + canonical.replace(".", "_")
        torch.testing.assert_close(peft_layer.lora_A["ours"].weight, m.lora_down.weight, atol=0, rtol=0)
        torch.testing.assert_close(peft_layer.lora_B["ours"].weight, m.lora_up.weight, atol=0, rtol=0)
        assert peft_layer.scaling["ours"] == pytest.approx(m.scale)

    # (b) same outputs as our network applied at multiplier 1
    net.apply_to(te, unet)
    net.eval()
    want = _outputs(te, unet, context_dim)
    got = _outputs(pipe.text_encoder, pipe.unet, context_dim)
    for name, w, gt, b in zip(("text encoder", "unet"), want, got, base):
        assert (w - b).abs().max() > 1e-2, f"{name}: the LoRA has no visible effect"
        diff = (w - gt).abs().max().item()
        assert diff <= ATOL, f"{name}: max abs diff {diff} vs diffusers"

    # merge_to on a fresh copy of the model matches diffusers too
    if not check_merge:
        return
    fresh = load_sd_models(model.path)
    merger, weights = lora.create_network_from_weights(1.0, str(path), None, fresh.text_encoder, fresh.unet, for_inference=True)
    merger.merge_to(fresh.text_encoder, fresh.unet, weights, dtype=None, device="cpu")
    merged = _outputs(fresh.text_encoder, fresh.unet, context_dim)
    for name, m_, gt in zip(("text encoder", "unet"), merged, got):
        diff = (m_ - gt).abs().max().item()
        assert diff <= 1e-4, f"{name}: merged weights differ from diffusers by {diff}"
