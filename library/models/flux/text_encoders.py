"""FLUX.1 text encoders: CLIP-L (`--clip_l`) and T5-XXL (`--t5xxl`) from single files, and
prompt encoding (formats.md §c.4, training-math.md §3.3).

- CLIP-L: transformers `CLIPTextModel` from a Hugging Face state dict (`text_model.*`;
  extra tensors such as `text_projection.weight` or `logit_scale` are ignored). Sizes come
  from the shapes; heads follow the head_dim-64 rule (one head under width 64).
- T5-XXL: transformers `T5EncoderModel` (`shared.weight`, `encoder.block.N...`), stored in
  float32, fp16, bf16 or fp8 e4m3fn; any other stored dtype is a UserInputError naming the
  file, a tensor and its dtype. Heads from `relative_attention_bias`, the rest from shapes.
  `fp8=True` keeps the Linear weights in float8_e4m3fn and computes in `dtype`.
  In fp16 the feed-forward output projections (`wo`) stay in float32, as transformers does.

    l_pooled, t5_out, txt_ids, t5_mask = encode_prompts(clip_l, t5, tok_l, tok_t5, prompts,
                                                         t5_max_length=512, apply_t5_attn_mask=False)
"""

from __future__ import annotations

import logging
import os
import re
from typing import Optional, Sequence

import torch

from library.errors import UserInputError
from library.models.flux.loading import assign_state_dict, build_empty, is_fp8, parse_dtype

logger = logging.getLogger(__name__)

T5_MAX_LENGTH_DEV = 512
T5_MAX_LENGTH_SCHNELL = 256
CLIP_MAX_LENGTH = 77

_T5_STORED_OK = ("float32", "float16", "bfloat16", "float8_e4m3fn")


def default_t5_max_length(is_schnell: bool) -> int:
    return T5_MAX_LENGTH_SCHNELL if is_schnell else T5_MAX_LENGTH_DEV


def _open(path: str, what: str):
    from library.io.tensor_files import TensorFile

    if not path:
        raise UserInputError(f"{what} is required")
    if os.path.isdir(path):
        raise UserInputError(f"{what} {path}: is a folder; expected a single .safetensors file")
    return TensorFile(path, what)


# --------------------------------------------------------------------------------------
# CLIP-L


def load_clip_l(path: str, dtype=None, device="cpu", what: str = "--clip_l"):
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models import clip_naming
    from library.models.sd.config import infer_clip_config

    dtype = parse_dtype(dtype, what, allow_fp8=True) if dtype is not None else None
    fp8 = dtype is not None and is_fp8(dtype)
    compute = torch.bfloat16 if fp8 else dtype
    with _open(path, what) as tf:
        shapes = {k: tf.shape(k) for k in tf.keys()}
        prefix = next((p for p in ("", "text_encoders.clip_l.transformer.", "clip_l.transformer.", "transformer.")
                       if f"{p}text_model.embeddings.token_embedding.weight" in shapes), None)
        if prefix is None:
            raise UserInputError(f"{what} {path}: not a CLIP text encoder (no 'text_model.embeddings.token_embedding.weight')")
        cfg = infer_clip_config(shapes, f"{what} {path}", prefix=prefix + "text_model.")
        te = build_empty(lambda: CLIPTextModel(CLIPTextConfig(**cfg)))
        wanted = clip_naming.canonical_keys(te)
        missing = [k for k in wanted if prefix + k not in shapes]
        if missing:
            raise UserInputError(f"{what} {path}: CLIP-L is missing '{prefix + missing[0]}'")
        sd = {}
        for k in wanted:
            t = tf.get(prefix + k)
            target = compute or (torch.bfloat16 if is_fp8(t.dtype) else t.dtype)
            sd[k] = t.to(target) if t.is_floating_point() else t
        assign_state_dict(te, clip_naming.to_model_keys(te, sd), "CLIP-L", path)
    te.eval()
    if fp8:
        from library.training.model_options import store_weights_in_fp8

        store_weights_in_fp8(te, compute)
    if device is not None and str(device) != "cpu":
        te.to(device)
    logger.info("loaded CLIP-L from %s (%d layers, width %d)", path, cfg["num_hidden_layers"], cfg["hidden_size"])
    return te


def save_clip_l(te, path: str, dtype=None) -> None:
    from library.io.safetensors_io import save_state_dict
    from library.models import clip_naming

    sd = clip_naming.canonical_state_dict(te)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    save_state_dict(sd, path)


# --------------------------------------------------------------------------------------
# T5-XXL


def infer_t5_config(shapes: dict, path: str, prefix: str = "") -> dict:
    def need(key, what):
        if prefix + key not in shapes:
            raise UserInputError(f"{path}: not a T5 encoder: missing '{prefix + key}' ({what})")
        return tuple(shapes[prefix + key])

    emb_key = "shared.weight" if prefix + "shared.weight" in shapes else "encoder.embed_tokens.weight"
    vocab, d_model = need(emb_key, "token embedding")
    rx = re.compile(rf"^{re.escape(prefix)}encoder\.block\.(\d+)\.")
    idx = sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})
    from library.models.flux.config import contiguous_count

    layers = contiguous_count(idx, "encoder.block", path)
    if layers == 0:
        raise UserInputError(f"{path}: T5 encoder without encoder.block.N layers")
    buckets, heads = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "relative attention bias")
    inner = need("encoder.block.0.layer.0.SelfAttention.q.weight", "attention")[0]
    gated = prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = need("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight", "feed-forward")[0]
    return dict(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    )


def _fp8_safe_feed_forward(t5) -> None:
    """transformers casts the hidden states to `wo`'s dtype before `wo`; with fp8 weights that
    would compute in fp8. Run the gated feed-forward without that cast."""
    for module in t5.modules():
        name = type(module).__name__
        if name == "T5DenseGatedActDense":
            def forward(hidden_states, m=module):
                h = m.act(m.wi_0(hidden_states)) * m.wi_1(hidden_states)
                return m.wo(m.dropout(h))

            module.forward = forward
        elif name == "T5DenseActDense":
            def forward(hidden_states, m=module):
                return m.wo(m.dropout(m.act(m.wi(hidden_states))))

            module.forward = forward


def load_t5xxl(path: str, dtype=None, device="cpu", what: str = "--t5xxl"):
    """T5EncoderModel from a single file; `dtype` an fp8 name keeps the weights in fp8."""
    from transformers import T5Config, T5EncoderModel

    dtype = parse_dtype(dtype, what, allow_fp8=True) if dtype is not None else None
    fp8 = dtype is not None and is_fp8(dtype)
    compute = torch.bfloat16 if fp8 else dtype
    with _open(path, what) as tf:
        shapes = {k: tf.shape(k) for k in tf.keys()}
        bad = [(k, tf.dtype(k)) for k in tf.keys()
               if tf.dtype(k).is_floating_point and str(tf.dtype(k)).replace("torch.", "") not in _T5_STORED_OK]
        bad += [(k, tf.dtype(k)) for k in tf.keys() if not tf.dtype(k).is_floating_point and k.endswith(".weight")]
        if bad:
            k, dt = bad[0]
            raise UserInputError(
                f"{what} {path}: tensor '{k}' is stored as {str(dt).replace('torch.', '')}; T5-XXL files must be "
                f"float32, fp16, bf16 or fp8 e4m3fn ({len(bad)} tensor(s) affected)"
            )
        prefix = next((p for p in ("", "text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "transformer.")
                       if f"{p}encoder.block.0.layer.0.SelfAttention.q.weight" in shapes), None)
        if prefix is None:
            raise UserInputError(f"{what} {path}: not a T5 encoder (no 'encoder.block.0.layer.0.SelfAttention.q.weight')")
        cfg = infer_t5_config(shapes, f"{what} {path}", prefix)
        stored_fp8 = any(is_fp8(tf.dtype(k)) for k in shapes)
        if stored_fp8 and dtype is None:
            compute = torch.bfloat16
        t5 = build_empty(lambda: T5EncoderModel(T5Config(**cfg)))
        wanted = [k for k in t5.state_dict().keys() if k != "encoder.embed_tokens.weight"]
        missing = [k for k in wanted if prefix + k not in shapes and not (k == "shared.weight" and
                                                                         prefix + "encoder.embed_tokens.weight" in shapes)]
        if missing:
            raise UserInputError(f"{what} {path}: T5 encoder is missing '{prefix + missing[0]}'")
        sd = {}
        for k in wanted:
            stored = prefix + k if prefix + k in shapes else prefix + "encoder.embed_tokens.weight"
            t = tf.get(stored)
            if fp8 and k.endswith(".weight") and len(t.shape) == 2 and "relative_attention_bias" not in k and k != "shared.weight":
                target = torch.float8_e4m3fn
            else:
                target = compute or t.dtype
                if target == torch.float16 and re.search(r"DenseReluDense\.wo\.weight$", k):
                    target = torch.float32  # as transformers' _keep_in_fp32_modules
            sd[k] = t.to(target)
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
        assign_state_dict(t5, sd, "T5-XXL", path)
    t5.encoder.embed_tokens = t5.shared
    t5.eval()
    if fp8:
        from library.training.model_options import store_weights_in_fp8

        # embeddings and relative-position tables stay in the compute dtype
        store_weights_in_fp8(t5.encoder.block, compute)
        _fp8_safe_feed_forward(t5)
    if device is not None and str(device) != "cpu":
        t5.to(device)
    logger.info("loaded T5 encoder from %s (%d layers, d_model %d, %d heads%s)", path, cfg["num_layers"],
                cfg["d_model"], cfg["num_heads"], ", fp8 weights" if fp8 else "")
    return t5


def save_t5xxl(t5, path: str, dtype=None) -> None:
    from library.io.safetensors_io import save_state_dict

    sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    save_state_dict(sd, path)


# --------------------------------------------------------------------------------------
# prompts -> conditioning


def tokenize(tok_l, tok_t5, prompts: Sequence[str], t5_max_length: int):
    """(CLIP ids (B, 77), T5 ids (B, L), T5 attention mask (B, L))."""
    prompts = list(prompts)
    l_ids = tok_l(prompts, max_length=CLIP_MAX_LENGTH, padding="max_length", truncation=True,
                  return_tensors="pt").input_ids
    t5 = tok_t5(prompts, max_length=t5_max_length, padding="max_length", truncation=True, return_tensors="pt")
    return l_ids, t5.input_ids, t5.attention_mask


def _first_param_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_tokens(clip_l, t5, l_ids: Optional[torch.Tensor], t5_ids: Optional[torch.Tensor],
                  t5_mask: Optional[torch.Tensor], apply_t5_attn_mask: bool = False, dtype=None):
    """(l_pooled (B, 768), t5_out (B, L, 4096), txt_ids (B, L, 3), t5_mask) (either encoder may be None)."""
    l_pooled = t5_out = txt_ids = None
    if clip_l is not None and l_ids is not None:
        out = clip_l(l_ids.to(_first_param_device(clip_l)))
        l_pooled = out.pooler_output
    if t5 is not None and t5_ids is not None:
        device = _first_param_device(t5)
        mask = t5_mask.to(device) if (apply_t5_attn_mask and t5_mask is not None) else None
        t5_out = t5(input_ids=t5_ids.to(device), attention_mask=mask).last_hidden_state
        txt_ids = torch.zeros(t5_out.shape[0], t5_out.shape[1], 3, device=t5_out.device)
    if dtype is not None:
        l_pooled = None if l_pooled is None else l_pooled.to(dtype)
        t5_out = None if t5_out is None else t5_out.to(dtype)
    return l_pooled, t5_out, txt_ids, t5_mask


def encode_prompts(clip_l, t5, tok_l, tok_t5, prompts: Sequence[str], t5_max_length: int,
                   apply_t5_attn_mask: bool = False, dtype=None):
    l_ids, t5_ids, t5_mask = tokenize(tok_l, tok_t5, prompts, t5_max_length)
    return encode_tokens(clip_l, t5, l_ids, t5_ids, t5_mask, apply_t5_attn_mask, dtype)
