"""OpenCLIP text tower (SD2's ViT-H, SDXL's bigG) <-> transformers CLIP naming.

OpenCLIP fuses q/k/v into one `in_proj` tensor and stores `text_projection` as a plain
matrix used as `x @ P`; transformers keeps separate q/k/v and a Linear (weight = P^T).
"""

from __future__ import annotations

_LAYER_CHILDREN = {  # HF name -> OpenCLIP name, inside one layer
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}


def openclip_to_hf(get, num_layers: int, with_projection: bool = False) -> dict:
    """Build an HF CLIPTextModel(+WithProjection) state dict from OpenCLIP tensors.

    `get(key)` returns the OpenCLIP tensor named `key` (without the checkpoint prefix). Only the first `num_layers`
    resblocks are used (SD2 drops the last one). The returned dict's keys are every key the
    HF model needs; the caller records which file keys were consumed.
    """
    sd = {
        "text_model.embeddings.token_embedding.weight": get("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": get("positional_embedding"),
        "text_model.final_layer_norm.weight": get("ln_final.weight"),
        "text_model.final_layer_norm.bias": get("ln_final.bias"),
    }
    for i in range(num_layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for hf, oc in _LAYER_CHILDREN.items():
            for p in ("weight", "bias"):
                sd[f"{dst}{hf}.{p}"] = get(f"{src}{oc}.{p}")
        w, b = get(src + "attn.in_proj_weight"), get(src + "attn.in_proj_bias")
        for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, dim=0), b.chunk(3, dim=0)):
            sd[f"{dst}self_attn.{name}.weight"] = wi
            sd[f"{dst}self_attn.{name}.bias"] = bi
    if with_projection:
        sd["text_projection.weight"] = get("text_projection").t()
    return sd


def openclip_keys_used(num_layers: int, with_projection: bool = False) -> list[str]:
    keys = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"]
    for i in range(num_layers):
        src = f"transformer.resblocks.{i}."
        keys += [f"{src}{oc}.{p}" for oc in _LAYER_CHILDREN.values() for p in ("weight", "bias")]
        keys += [src + "attn.in_proj_weight", src + "attn.in_proj_bias"]
    if with_projection:
        keys.append("text_projection")
    return keys


def hf_to_openclip(sd: dict, num_layers: int, with_projection: bool = False) -> dict:
    """Inverse of `openclip_to_hf`: canonical HF names in, OpenCLIP names (no prefix) out."""
    import torch

    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
    }
    for i in range(num_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for hf, oc in _LAYER_CHILDREN.items():
            for p in ("weight", "bias"):
                out[f"{dst}{oc}.{p}"] = sd[f"{src}{hf}.{p}"]
        out[dst + "attn.in_proj_weight"] = torch.cat([sd[f"{src}self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
        out[dst + "attn.in_proj_bias"] = torch.cat([sd[f"{src}self_attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
    if with_projection:
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    return out
