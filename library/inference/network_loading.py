"""Networks for inference: gen_img's --network_module / --network_weights / --network_mul /
--network_args / --network_merge(_n_models) / --network_pre_calc, and diffusers-layout
LoRA files.

Any module with the kohya interface works (`networks.lora`, `networks.dylora`,
`networks.oft`, `lycoris.kohya`, ...): `create_network_from_weights(multiplier, file, vae,
text_encoder, unet, for_inference=True, **network_args)` -> (network, weights), then either
`apply_to` + `load_state_dict` (live: its multiplier can change per prompt with `--am`) or
`merge_to` (folded into the model weights once: fastest, multiplier fixed).
Third-party modules see the text encoder under its canonical `text_model.` module names
(`library.networks.discovery.plugin_view`), as in training.

With `--network_pre_calc` the live networks are folded into the weights before each batch
whose multipliers differ from the previous one, and taken out again first (their layers'
original weights are kept in memory): the speed of merging with per-prompt multipliers.

LoRA files in diffusers/peft layout (`unet.<module path>.lora_A.weight`,
`text_encoder.<...>.lora_B.weight`, the older `.lora.down.weight` and
`.processor.to_q_lora.down.weight` forms) are converted to the kohya layout on load.
Their scale comes from the `lora_adapter_metadata` that diffusers writes (`lora_alpha`,
`alpha_pattern`) when present, else alpha = rank (scale 1), as diffusers reads such files.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from library.errors import UserInputError

logger = logging.getLogger(__name__)


@dataclass
class NetworkRequest:
    """One --network_module entry, checked before any model is loaded."""

    index: int
    module_name: str
    module: Any
    weights: str
    multiplier: float
    kwargs: dict = field(default_factory=dict)
    merge: bool = False


def parse_network_args_string(text: Optional[str], what: str) -> dict[str, str]:
    """`"conv_dim=4;algo=lora"` -> {"conv_dim": "4", "algo": "lora"} (values stay strings)."""
    out: dict[str, str] = {}
    for item in (text or "").split(";"):
        if not item.strip():
            continue
        if "=" not in item:
            raise UserInputError(f"{what}: {item.strip()!r} is not key=value (pairs are joined by ';')")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _import_module(name: str):
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UserInputError(f"--network_module {name}: cannot be imported ({e})") from None
    if not hasattr(module, "create_network_from_weights"):
        raise UserInputError(f"--network_module {name}: has no create_network_from_weights(); not a network module")
    return module


def check_network_requests(args) -> list[NetworkRequest]:
    """Validate the network options (module import, files, counts, args) without loading models."""
    modules = list(args.network_module or [])
    weights = list(args.network_weights or [])
    muls = list(args.network_mul or [])
    net_args = list(args.network_args or [])
    if not modules:
        if weights:
            raise UserInputError("--network_weights needs --network_module (one per file, e.g. networks.lora)")
        return []
    if len(weights) < len(modules):
        raise UserInputError(
            f"--network_weights: {len(weights)} file(s) for {len(modules)} --network_module entries; every network needs its weights"
        )
    for what, values in (("--network_weights", weights), ("--network_mul", muls), ("--network_args", net_args)):
        if len(values) > len(modules):
            logger.warning("%s: %d values for %d networks; the extra ones are ignored", what, len(values), len(modules))
    if args.network_merge:
        n_merge = len(modules)
    elif args.network_merge_n_models:
        n_merge = max(0, int(args.network_merge_n_models))
    else:
        n_merge = 0
    requests = []
    for i, name in enumerate(modules):
        path = weights[i]
        if not os.path.isfile(path):
            raise UserInputError(f"--network_weights {path}: file not found")
        kwargs = parse_network_args_string(net_args[i] if i < len(net_args) else None, f"--network_args (network {i + 1})")
        module = _import_module(name)
        requests.append(NetworkRequest(i, name, module, path, muls[i] if i < len(muls) else 1.0, kwargs, i < n_merge))
    return requests


# ---------------------------------------------------------------------------- diffusers layout
_PEFT_SUFFIX = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_OLD_SUFFIX = re.compile(r"^(?P<path>.+)\.lora(?:_linear_layer)?\.(?P<ud>down|up)\.weight$")
_PROC_SUFFIX = re.compile(r"^(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")
_TE_OLD_PROJ = re.compile(r"^(?P<path>.+)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_PARTS = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"))


def is_diffusers_lora(keys: Sequence[str]) -> bool:
    """True when the keys are in diffusers/peft layout rather than kohya's `lora_unet_...`."""
    keys = list(keys)
    if not keys or any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return False
    return any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.", "base_model.model.")) for k in keys)


def _adapter_metadata(metadata: Optional[dict]) -> dict:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alpha_for(meta: dict, part: str, module_path: str, rank: int) -> float:
    pattern = meta.get(f"{part}.alpha_pattern") or {}
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return float(value)
    alpha = meta.get(f"{part}.lora_alpha")
    return float(alpha) if alpha is not None else float(rank)


def convert_diffusers_lora(state_dict: dict, metadata: Optional[dict] = None, source: str = "weights") -> dict:
    """diffusers/peft LoRA keys -> kohya keys (`lora_unet_...`, `lora_te_...`), alphas added.

    Module paths are taken as they are (SD1/2 U-Net modules have diffusers names in both
    layouts); text-encoder paths get the canonical `text_model.` level when they lack it.
    With two text encoders (SDXL files) the prefixes are `lora_te1_` / `lora_te2_`.
    """
    import torch

    meta = _adapter_metadata(metadata)
    two_te = any(k.startswith("text_encoder_2.") for k in state_dict)
    te_prefix = {"te": "lora_te1" if two_te else "lora_te", "te2": "lora_te2", "unet": "lora_unet"}
    out: dict = {}
    ranks: dict[str, tuple[str, str, int]] = {}
    alphas: dict[str, Any] = {}
    skipped = []
    for key, tensor in state_dict.items():
        k = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        part = next((p for prefix, p in _PARTS if k.startswith(prefix)), None)
        if part is None:
            skipped.append(key)
            continue
        rest = k.split(".", 1)[1]
        meta_part = "unet" if part == "unet" else ("text_encoder_2" if part == "te2" else "text_encoder")
        if rest.endswith(".alpha"):
            path, kind = rest[: -len(".alpha")], "alpha"
        elif m := _PEFT_SUFFIX.match(rest):
            path, kind = m.group("path"), "down" if m.group("ab") == "A" else "up"
        elif m := _PROC_SUFFIX.match(rest):
            proj = "to_out.0" if m.group("proj") == "to_out" else m.group("proj")
            path, kind = f"{m.group('path')}.{proj}", m.group("ud")
        elif part != "unet" and (m := _TE_OLD_PROJ.match(rest)):
            path, kind = f"{m.group('path')}.{_TE_PROJ[m.group('proj')]}", m.group("ud")
        elif m := _OLD_SUFFIX.match(rest):
            path, kind = m.group("path"), m.group("ud")
        else:
            if "lora_magnitude_vector" in rest or "dora_scale" in rest:
                raise UserInputError(f"{source}: DoRA weights ({key}) are not supported")
            skipped.append(key)
            continue
        if part != "unet" and not path.startswith("text_model."):
            path = "text_model." + path
        name = f"{te_prefix[part]}_{path.replace('.', '_')}"
        if kind == "alpha":
            alphas[name] = tensor
            continue
        out[f"{name}.lora_{kind}.weight"] = tensor
        if kind == "down":
            ranks[name] = (meta_part, path, int(tensor.shape[0]))
    if skipped:
        logger.warning("%s: %d tensors are not LoRA weights in a known layout and were ignored, e.g. %s",
                       source, len(skipped), skipped[:3])
    for name, (meta_part, path, rank) in ranks.items():
        if name in alphas:
            out[f"{name}.alpha"] = alphas[name]
        else:
            out[f"{name}.alpha"] = torch.tensor(_alpha_for(meta, meta_part, path, rank))
    if not ranks:
        raise UserInputError(f"{source}: no LoRA down/up weights found in its diffusers-layout keys")
    logger.info("%s: converted %d diffusers-layout LoRA modules to the kohya layout", source, len(ranks))
    return out


def _read_weights(path: str) -> tuple[Optional[dict], Optional[dict]]:
    """(state dict to hand to the module, safetensors metadata).

    The state dict is None for a kohya-layout .safetensors file (the module reads it
    itself); diffusers-layout files come back converted; other files (torch pickles) are
    read once here.
    """
    from library.io.safetensors_io import is_safetensors_path, read_header
    from library.networks.weights_io import load_weights_file

    metadata = None
    if is_safetensors_path(path):
        header = read_header(path)  # a damaged file is a UserInputError naming it
        metadata = header.metadata
        if not is_diffusers_lora(list(header.shapes())):
            return None, metadata
    sd = load_weights_file(path)
    if is_diffusers_lora(list(sd)):
        return convert_diffusers_lora(sd, metadata, path), metadata
    return sd, metadata


# ---------------------------------------------------------------------------- loading
@dataclass
class LoadedNetwork:
    request: NetworkRequest
    network: Any
    pre_calc: bool = False  # folded into the weights per batch (--network_pre_calc)


class InferenceNetworks:
    """The live (not merged) networks and their per-batch multipliers."""

    def __init__(self, live: list[LoadedNetwork], merged: list[LoadedNetwork], pre_calc: bool):
        self.live = live
        self.merged = merged
        self.pre_calc = pre_calc
        self._current: Optional[tuple] = None

    def __len__(self) -> int:
        return len(self.live)

    @property
    def default_multipliers(self) -> tuple:
        return tuple(float(n.request.multiplier) for n in self.live)

    def resolve_multipliers(self, muls: Optional[Sequence[float]]) -> tuple:
        """A prompt's `--am` list (last value repeated) or the defaults, one per live network."""
        if not self.live:
            return ()
        if not muls:
            return self.default_multipliers
        muls = [float(m) for m in muls]
        if len(muls) > len(self.live):
            logger.warning("--am: %d multipliers for %d live networks; the extra ones are ignored", len(muls), len(self.live))
        while len(muls) < len(self.live):
            muls.append(muls[-1])
        return tuple(muls[: len(self.live)])

    def activate(self, muls: tuple) -> None:
        """Set the multipliers for the next batch (and fold them in with --network_pre_calc)."""
        if not self.live or muls == self._current:
            return
        import torch

        folded = [n for n in self.live if n.pre_calc]
        with torch.no_grad():
            for n in folded:
                n.network.restore_weights()
            for n, m in zip(self.live, muls):
                n.network.set_multiplier(m)
            for n in folded:
                n.network.backup_weights()
            for n in folded:
                n.network.pre_calculation()
        self._current = muls
        logger.info("network multipliers: %s%s", ", ".join(f"{m:g}" for m in muls), " (pre-calculated)" if folded else "")


def load_networks(requests: list[NetworkRequest], *, vae, text_encoders: list, unet, dtype=None, device=None,
                  pre_calc: bool = False, show_meta: bool = False, channels_last: bool = False) -> InferenceNetworks:
    """Create, load and apply (or merge) every requested network, in order."""
    import torch

    from library.networks.discovery import plugin_view

    live, merged = [], []
    for req in requests:
        third_party = getattr(req.module, "ACCEPTED_ARGS", None) is None and not req.module_name.startswith("networks.")
        tes = plugin_view(text_encoders) if third_party else list(text_encoders)
        te_arg = tes[0] if len(tes) == 1 else tes
        weights_sd, metadata = _read_weights(req.weights)
        if show_meta:
            if metadata is None:
                from library.io.safetensors_io import is_safetensors_path, read_header

                metadata = read_header(req.weights).metadata if is_safetensors_path(req.weights) else None
            logger.info("metadata of %s: %s", req.weights, json.dumps(metadata or {}, indent=1, ensure_ascii=False))
        kwargs = dict(req.kwargs)
        call = dict(for_inference=True, **kwargs)
        if weights_sd is not None:
            call["weights_sd"] = weights_sd
        try:
            result = req.module.create_network_from_weights(req.multiplier, req.weights, vae, te_arg, unet, **call)
        except UserInputError:
            raise
        except TypeError as e:
            raise UserInputError(f"--network_module {req.module_name}: {e} (check --network_args)") from None
        if result is None or (isinstance(result, tuple) and result[0] is None):
            raise UserInputError(f"--network_module {req.module_name}: could not create a network from {req.weights}")
        network, sd = result if isinstance(result, tuple) else (result, None)
        if sd is None:
            from library.networks.weights_io import load_weights_file

            sd = weights_sd if weights_sd is not None else load_weights_file(req.weights)
        mergeable = network.is_mergeable() if hasattr(network, "is_mergeable") else hasattr(network, "merge_to")
        if req.merge and not mergeable:
            logger.warning("network %d (%s) cannot be merged; it is applied instead", req.index + 1, req.module_name)
        if req.merge and mergeable:
            network.merge_to(te_arg, unet, sd, dtype, device)
            merged.append(LoadedNetwork(req, network))
            logger.info("network %d: %s merged into the model at multiplier %g", req.index + 1, req.weights, req.multiplier)
            continue
        network.apply_to(te_arg, unet, True, True)
        if hasattr(network, "load_state_dict_checked"):
            info = network.load_state_dict_checked(sd, source=req.weights)
        else:
            info = network.load_state_dict(sd, False)
        logger.debug("network %d weights loaded: %s", req.index + 1, info)
        network.eval()
        if channels_last:
            network.to(memory_format=torch.channels_last)
        network.to(device=device, dtype=dtype)
        if hasattr(network, "set_multiplier"):
            network.set_multiplier(req.multiplier)
        live.append(LoadedNetwork(req, network))
        logger.info("network %d: %s applied (multiplier %g)", req.index + 1, req.weights, req.multiplier)
    if pre_calc:
        for n in live:
            n.pre_calc = all(hasattr(n.network, f) for f in ("backup_weights", "restore_weights", "pre_calculation"))
            if not n.pre_calc:
                logger.warning("--network_pre_calc: %s networks cannot be pre-calculated; network %d stays live",
                               n.request.module_name, n.request.index + 1)
    return InferenceNetworks(live, merged, pre_calc)
