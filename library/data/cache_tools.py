"""Glue between the caching tools (tools/cache_*.py) and the architecture objects.

The dataset code never knows architectures; the tools need one to load a VAE or text
encoders. An architecture module ``library.arch.<name>`` provides a class whose name
ends in ``Architecture`` with ``from_args(args)``; the tools use, when present:

* ``load_vae(args, dtype)`` -- else ``load_models(args, dtype).vae``;
* ``encode_latents_for_cache(vae, images)`` -- what the cache stores (FLUX stores
  scaled/shifted latents); default: a sample of the VAE posterior, unscaled;
* ``latent_cache_format`` -- a :class:`LatentCacheFormat`; default by architecture name;
* ``text_encoder_cache_strategy(args)`` -- a :class:`TextEncoderCacheStrategy` with its
  text encoders loaded.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

from library.data.latent_cache import LATENT_FORMATS, LatentCacheFormat
from library.errors import UserInputError

logger = logging.getLogger(__name__)

ARCH_FLAGS = {"sd": "(default)", "sdxl": "--sdxl", "flux": "--flux", "sd3": "--sd3"}


def resolve_architecture(name: str, args: Any):
    """The architecture object for ``name`` ('sd', 'sdxl', 'flux', 'sd3')."""
    try:
        module = importlib.import_module(f"library.arch.{name}")
    except ImportError:
        raise UserInputError(
            f"{ARCH_FLAGS.get(name, name)}: the {name.upper()} architecture is not available in this installation yet"
        ) from None
    classes = [v for k, v in vars(module).items() if isinstance(v, type) and k.endswith("Architecture")
               and v.__module__ == module.__name__]
    if not classes:
        raise UserInputError(f"library.arch.{name} defines no architecture class")
    cls = classes[0]
    return cls.from_args(args) if hasattr(cls, "from_args") else cls()


def latent_format_for(arch: Any, name: str) -> LatentCacheFormat:
    fmt = getattr(arch, "latent_cache_format", None)
    if isinstance(fmt, LatentCacheFormat):
        return fmt
    return LATENT_FORMATS[name]


def load_vae(arch: Any, args: Any, dtype=None):
    if hasattr(arch, "load_vae"):
        return arch.load_vae(args, dtype)
    models = arch.load_models(args, dtype=dtype)
    vae = getattr(models, "vae", None)
    if vae is None:
        raise UserInputError("the model has no VAE; pass one with --vae")
    return vae


def vae_encoder(arch: Any, vae, device: str, dtype) -> Callable:
    """``encode(images in [-1, 1]) -> latents`` as the cache files store them."""
    custom = getattr(arch, "encode_latents_for_cache", None)

    def encode(images):
        x = images.to(device=device, dtype=dtype)
        if custom is not None:
            return custom(vae, x)
        return vae.encode(x).latent_dist.sample()

    return encode


def torch_device_and_dtype(mixed_precision: str, full_precision: bool):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if full_precision or device == "cpu":
        return device, torch.float32
    return device, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


def add_cache_tool_arguments(p) -> None:
    """The option groups both caching tools share: the training scripts' model and dataset options."""
    from library.args import groups

    groups.add_logging_arguments(p)
    groups.add_sd_models_arguments(p)
    groups.add_model_spec_arguments(p)
    groups.add_training_arguments(p, True)
    groups.add_dataset_arguments(p, True, True, True)
    groups.add_masked_loss_arguments(p)
    groups.add_config_arguments(p)
    groups.add_dit_training_arguments(p)
    groups.add_flux_train_arguments(p)
    p.add_argument("--skip_existing", action="store_true", help="no effect; valid caches are always kept")


def parse_tool_args(parser, argv):
    """Command line + ``--config_file``, logging set up, ``--skip_existing`` explained."""
    from library.args.config_file import read_config_from_file
    from library.log import setup_logging

    args = read_config_from_file(parser.parse_args(argv), parser, argv)
    setup_logging(args, reset=True)
    if args.skip_existing:
        logger.warning("--skip_existing has no effect: valid cache files are always kept")
    return args


def build_dataset_groups(args, **compatibility) -> list:
    """Train (and validation) groups, checked for what caching needs before any model loads."""
    from library.data.config_schema import SchemaSupport
    from library.data.datasets import build_from_args, check_caching_compatibility

    train, val = build_from_args(args, SchemaSupport(controlnet=bool(args.masked_loss)))
    found = [g for g in (train, val) if g is not None]
    for g in found:
        check_caching_compatibility(g, **compatibility)
    return found
