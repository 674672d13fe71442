"""FLUX.1 transformer keys: diffusers `FluxTransformer2DModel` names <-> BFL names.

One table of rules, generated from the block counts and widths, serves both directions:
a rule maps one BFL tensor to one or more diffusers tensors, with an operation:

- "same": renamed only;
- "cat":  the BFL tensor is the diffusers tensors concatenated along dim 0 (fused q/k/v of
          the double blocks; q/k/v + MLP input of the single blocks' `linear1`);
- "swap": the two halves along dim 0 are exchanged (final adaLN: BFL stores shift then
          scale, diffusers scale then shift).

Split sizes are read from the shapes (hidden width = rows of `x_embedder` / `img_in`), so
compact and tiny models convert as well as the released ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from library.errors import UserInputError

DIFFUSERS_MARKER = "transformer_blocks.0.attn.add_k_proj.bias"


@dataclass(frozen=True)
class KeyRule:
    bfl: str
    diffusers: tuple[str, ...]
    op: str  # "same" | "cat" | "swap"
    sizes: tuple[int, ...] = ()  # for "cat": rows of each diffusers tensor


def is_diffusers_layout(keys) -> bool:
    return any(k == DIFFUSERS_MARKER or k.endswith("." + DIFFUSERS_MARKER) for k in keys)


def key_rules(hidden: int, mlp_hidden: int, depth: int, depth_single: int, guidance: bool,
              biases: bool = True) -> list[KeyRule]:
    """Every tensor of a FLUX.1 transformer of these sizes (BFL key order)."""
    rules: list[KeyRule] = []

    def lin(bfl: str, diff, op: str = "same", sizes=(), bias: bool = True):
        diff = (diff,) if isinstance(diff, str) else tuple(diff)
        rules.append(KeyRule(bfl + ".weight", tuple(d + ".weight" for d in diff), op, tuple(sizes)))
        if bias:
            rules.append(KeyRule(bfl + ".bias", tuple(d + ".bias" for d in diff), op, tuple(sizes)))

    def scale(bfl: str, diff: str):
        rules.append(KeyRule(bfl + ".scale", (diff + ".weight",), "same"))

    lin("img_in", "x_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if guidance:
        lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    lin("txt_in", "context_embedder")
    qkv = (hidden, hidden, hidden)
    for i in range(depth):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        lin(b + "img_mod.lin", d + "norm1.linear")
        lin(b + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], "cat", qkv, bias=biases)
        scale(b + "img_attn.norm.query_norm", d + "attn.norm_q")
        scale(b + "img_attn.norm.key_norm", d + "attn.norm_k")
        lin(b + "img_attn.proj", d + "attn.to_out.0")
        lin(b + "img_mlp.0", d + "ff.net.0.proj")
        lin(b + "img_mlp.2", d + "ff.net.2")
        lin(b + "txt_mod.lin", d + "norm1_context.linear")
        lin(b + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], "cat", qkv,
            bias=biases)
        scale(b + "txt_attn.norm.query_norm", d + "attn.norm_added_q")
        scale(b + "txt_attn.norm.key_norm", d + "attn.norm_added_k")
        lin(b + "txt_attn.proj", d + "attn.to_add_out")
        lin(b + "txt_mlp.0", d + "ff_context.net.0.proj")
        lin(b + "txt_mlp.2", d + "ff_context.net.2")
    for i in range(depth_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        lin(b + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"], "cat",
            (hidden, hidden, hidden, mlp_hidden))
        lin(b + "linear2", d + "proj_out")
        scale(b + "norm.query_norm", d + "attn.norm_q")
        scale(b + "norm.key_norm", d + "attn.norm_k")
        lin(b + "modulation.lin", d + "norm.linear")
    lin("final_layer.linear", "proj_out")
    lin("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    return rules


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def diffusers_rules(shapes: dict, path: str) -> list[KeyRule]:
    """The rule table for a diffusers-named state dict (sizes and counts from its shapes)."""
    from library.models.flux.config import contiguous_count

    if "x_embedder.weight" not in shapes:
        raise UserInputError(f"{path}: not a diffusers FLUX transformer: missing 'x_embedder.weight'")
    hidden = shapes["x_embedder.weight"][0]
    depth = contiguous_count(_indices(shapes, r"^transformer_blocks\.(\d+)\."), "transformer_blocks", path)
    depth_single = contiguous_count(_indices(shapes, r"^single_transformer_blocks\.(\d+)\."),
                                    "single_transformer_blocks", path)
    mlp_key = "transformer_blocks.0.ff.net.0.proj.weight" if depth else "single_transformer_blocks.0.proj_mlp.weight"
    if mlp_key not in shapes:
        raise UserInputError(f"{path}: diffusers FLUX transformer is missing '{mlp_key}'")
    mlp_hidden = shapes[mlp_key][0]
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in shapes
    biases = depth == 0 or "transformer_blocks.0.attn.to_q.bias" in shapes
    return key_rules(hidden, mlp_hidden, depth, depth_single, guidance, biases)


def bfl_shape(rule: KeyRule, shapes: dict) -> tuple:
    parts = [tuple(shapes[k]) for k in rule.diffusers]
    if rule.op == "cat":
        return (sum(p[0] for p in parts), *parts[0][1:])
    return parts[0]


def to_bfl_tensor(rule: KeyRule, parts: list[torch.Tensor]) -> torch.Tensor:
    if rule.op == "cat":
        return torch.cat(parts, dim=0)
    if rule.op == "swap":
        a, b = parts[0].chunk(2, dim=0)
        return torch.cat([b, a], dim=0)
    return parts[0]


def to_diffusers_tensors(rule: KeyRule, t: torch.Tensor) -> list[torch.Tensor]:
    if rule.op == "cat":
        return list(torch.split(t, list(rule.sizes), dim=0))
    if rule.op == "swap":
        a, b = t.chunk(2, dim=0)
        return [torch.cat([b, a], dim=0)]
    return [t]


def check_complete(rules: list[KeyRule], shapes: dict, path: str) -> None:
    for r in rules:
        for k in r.diffusers:
            if k not in shapes:
                raise UserInputError(f"{path}: diffusers FLUX transformer is missing '{k}' (needed for '{r.bfl}')")


def diffusers_to_bfl_state_dict(sd: dict, path: str = "<state dict>") -> dict:
    """A whole diffusers-named state dict renamed/fused to BFL names."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    rules = diffusers_rules(shapes, path)
    check_complete(rules, shapes, path)
    return {r.bfl: to_bfl_tensor(r, [sd[k] for k in r.diffusers]) for r in rules}


def bfl_to_diffusers_state_dict(sd: dict, config) -> dict:
    """A BFL state dict (of a model with FluxConfig `config`) in diffusers names."""
    rules = key_rules(config.hidden_size, config.mlp_hidden_dim, config.depth, config.depth_single_blocks,
                      config.guidance_embed, config.qkv_bias)
    out = {}
    for r in rules:
        for name, t in zip(r.diffusers, to_diffusers_tensors(r, sd[r.bfl])):
            out[name] = t
    return out
