"""Options that change how the frozen base models run: attention kernels, fp8 storage,
torch.compile. Applied to the models before the network hooks into them."""

from __future__ import annotations

import logging

from library.errors import UserInputError

logger = logging.getLogger(__name__)


def check_attention_options(args) -> None:
    """Fail early when --xformers is asked for but cannot run here."""
    if getattr(args, "xformers", False):
        try:
            import xformers.ops  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
            raise UserInputError(
                f"--xformers: xformers cannot be imported here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "use --sdpa (PyTorch's built-in attention) instead"
            ) from None


def set_attention(unet, args) -> str:
    """Choose the U-Net attention implementation; returns a short description for the log."""
    if getattr(args, "xformers", False):
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    if getattr(args, "mem_eff_attn", False):
        # sd-scripts' own memory-efficient attention trades speed for memory; sliced SDPA
        # gives the same trade-off with a maintained implementation.
        unet.set_attention_slice("auto")
        return "sliced attention (--mem_eff_attn)"
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return "PyTorch scaled_dot_product_attention"


def _stored_weight_linear_class():
    import torch
    import torch.nn.functional as F

    class StoredWeightLinear(torch.autograd.Function):
        """F.linear with a frozen low-precision weight upcast for the call. Backward keeps
        the stored (fp8) weight and upcasts it again, instead of the upcast copy autograd
        would otherwise hold until backward (a whole bf16 model when nothing is checkpointed)."""

        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(weight)
            return F.linear(x, weight.to(x.dtype), bias)

        @staticmethod
        def backward(ctx, grad):
            (weight,) = ctx.saved_tensors
            grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
            return grad_x, None, None

    return StoredWeightLinear


class _LazyFunction:
    def __init__(self, factory):
        self._factory, self._cls = factory, None

    def apply(self, *args):
        if self._cls is None:
            self._cls = self._factory()
        return self._cls.apply(*args)


_StoredWeightLinear = _LazyFunction(_stored_weight_linear_class)


def store_weights_in_fp8(model, compute_dtype) -> int:
    """Keep Linear/Conv2d weights of a frozen model as float8_e4m3fn; upcast per call.

    Halves the memory of the base weights again compared with fp16. Each layer converts
    its weight to the activation dtype when it runs, so numerics are those of fp8
    storage with `compute_dtype` arithmetic. Returns the number of layers converted.
    """
    import torch
    import torch.nn.functional as F

    if not hasattr(torch, "float8_e4m3fn"):
        raise UserInputError("--fp8_base needs a PyTorch build with float8_e4m3fn (torch >= 2.1)")
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)

            def linear_forward(x, m=module):
                bias = None if m.bias is None else m.bias.to(x.dtype)
                if torch.is_grad_enabled() and not m.weight.requires_grad and (bias is None or not bias.requires_grad):
                    return _StoredWeightLinear.apply(x, m.weight, bias)
                return F.linear(x, m.weight.to(x.dtype), bias)

            module.forward = linear_forward
            count += 1
        elif isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)

            def conv_forward(x, m=module):
                bias = None if m.bias is None else m.bias.to(x.dtype)
                return m._conv_forward(x, m.weight.to(x.dtype), bias)

            module.forward = conv_forward
            count += 1
    logger.info("fp8 base: %d layers stored as float8_e4m3fn, computed in %s", count, compute_dtype)
    return count


def compile_model(model, args):
    import torch

    backend = getattr(args, "dynamo_backend", "inductor") or "inductor"
    logger.info("torch.compile with backend %s", backend)
    return torch.compile(model, backend=backend)
