"""Import a --network_module and turn --network_args into its keyword arguments."""

from __future__ import annotations

import importlib
import logging

from library.errors import UserInputError

logger = logging.getLogger(__name__)


def import_network_module(name: str | None):
    if not name:
        raise UserInputError("--network_module is required (e.g. networks.lora)")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UserInputError(f"--network_module {name}: cannot be imported ({e})") from None
    missing = [f for f in ("create_network", "create_network_from_weights") if not hasattr(module, f)]
    if "create_network" in missing:
        raise UserInputError(f"--network_module {name}: has no create_network(); not a network module")
    return module


def parse_network_args(items) -> dict[str, str]:
    """`k=v` items split at the first '='; values stay strings (the module converts them)."""
    kwargs: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise UserInputError(f"--network_args {item!r}: expected key=value")
        key, value = item.split("=", 1)
        kwargs[key.strip()] = value.strip()
    return kwargs


def network_kwargs(args) -> dict[str, str]:
    """The kwargs passed to create_network: --network_args plus the injected `dropout`."""
    kwargs = parse_network_args(getattr(args, "network_args", None))
    if "dropout" not in kwargs and not getattr(args, "dim_from_weights", False):
        # LyCORIS reads `dropout`; the built-in modules use neuron_dropout instead.
        kwargs["dropout"] = getattr(args, "network_dropout", None)
    return kwargs


def check_network_kwargs(module, name: str, kwargs: dict) -> None:
    """Validate --network_args before models load, for modules that declare ACCEPTED_ARGS.

    Third-party modules (e.g. lycoris.kohya) declare nothing and validate at creation.
    """
    accepted = getattr(module, "ACCEPTED_ARGS", None)
    if accepted is None:
        return
    from library.networks.args import parse_network_kwargs

    parse_network_kwargs(kwargs, accepted, name)
