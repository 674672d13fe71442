"""Canonical key names for Hugging Face CLIP text encoders.

Checkpoint files, diffusers folders and LoRA tools name CLIP tensors `text_model.<...>`.
transformers 5.x flattened `CLIPTextModel` (its state dict is `embeddings.<...>`,
`encoder.<...>`) while `CLIPTextModelWithProjection` kept the `text_model.` level. These two
helpers translate between the canonical file names and whatever the live model uses.
"""

from __future__ import annotations

CANONICAL = "text_model."


def _model_uses_prefix(model) -> bool:
    return any(k.startswith(CANONICAL) for k in model.state_dict().keys())


def canonical_state_dict(model) -> dict:
    """The model's tensors under canonical (`text_model.`-prefixed) names."""
    sd = model.state_dict()
    if _model_uses_prefix(model):
        return dict(sd)
    return {(k if k.startswith("text_projection") else CANONICAL + k): v for k, v in sd.items()}


def canonical_keys(model) -> list[str]:
    return list(canonical_state_dict(model).keys())


def to_model_keys(model, canonical_sd: dict) -> dict:
    """Rename a canonical state dict to the names `model.load_state_dict` expects."""
    if _model_uses_prefix(model):
        return dict(canonical_sd)
    return {(k[len(CANONICAL):] if k.startswith(CANONICAL) else k): v for k, v in canonical_sd.items()}
