"""Metadata of the files the LoRA tools write (formats.md b.1-b.3).

* LoRAs made from other LoRAs (merge, SVD merge) carry the *minimum set*: ss_v2,
  ss_base_model_version (from the first input), ss_network_module, ss_network_dim,
  ss_network_alpha (the common value or 'Dynamic'), ss_network_args (conv rank/alpha when
  there are conv modules) -- plus modelspec.* unless --no_metadata.
* resize and DyLoRA splits keep the input's metadata and rewrite what changed.
* `sshs_model_hash` / `sshs_legacy_hash` are always computed on the tensors as saved
  (after the cast to the save precision), never carried over from an input.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from library.io import modelspec

logger = logging.getLogger(__name__)

HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


@dataclass
class ArchInfo:
    family: str  # sd | sdxl | flux | sd3 | unknown
    v2: bool | None
    v_parameterization: bool
    base_model_version: str | None
    architecture: str | None = None  # an input's modelspec.architecture, if any
    resolution: str | None = None
    flux_variant: str | None = None  # FLUX: 'dev' / 'schnell' when known


def _bool(text: str | None) -> bool | None:
    if text is None:
        return None
    return str(text).strip().lower() == "true"


def base_model_version(family: str, v2: bool | None, v_param: bool) -> str | None:
    if family == "sd":
        return f"sd_{'v2' if v2 else 'v1'}{'_v' if v_param else ''}"
    if family == "sdxl":
        return "sdxl_base_v1-0"
    if family == "flux":
        return "flux1"
    return None


def arch_info(metadata: Mapping[str, str], family: str, v2_hint: bool | None = None) -> ArchInfo:
    """What an input says about its model: ss_* and modelspec entries, else the key names."""
    arch = metadata.get("modelspec.architecture")
    v2 = _bool(metadata.get("ss_v2"))
    bmv = metadata.get("ss_base_model_version")
    v_param = metadata.get("modelspec.prediction_type") == "v" or (bmv or "").endswith("_v")
    if arch:
        base = arch.split("/")[0]
        if base.startswith("stable-diffusion-v2"):
            v2 = True
            v_param = v_param or base.endswith("-v")
        elif base == modelspec.ARCH_SD_V1:
            v2 = False if v2 is None else v2
    if v2 is None and bmv:
        v2 = bmv.startswith("sd_v2")
    if v2 is None and family == "sd":
        v2 = bool(v2_hint)  # unknown: SD1.x, as ss_base_model_version will say
    if family != "sd":
        v2 = False if family in ("sdxl", "flux", "sd3") else v2
    if bmv is None:
        bmv = base_model_version(family, v2, v_param)
    return ArchInfo(family, v2, v_param, bmv, arch, metadata.get("modelspec.resolution"))


def merged_from(titles: Iterable[str]) -> str:
    """modelspec.merged_from: the inputs' titles (or file stems), comma-separated."""
    return ", ".join(titles)


def file_title(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def minimum_network_metadata(info: ArchInfo | None, network_module: str, dim: str | None, alpha: str | None,
                             network_args: Mapping | None = None) -> dict[str, str]:
    md: dict[str, str] = {}
    if info is not None and info.v2 is not None:
        md["ss_v2"] = str(bool(info.v2))
    if info is not None and info.base_model_version:
        md["ss_base_model_version"] = info.base_model_version
    md["ss_network_module"] = network_module
    if dim is not None:
        md["ss_network_dim"] = str(dim)
    if alpha is not None:
        md["ss_network_alpha"] = str(alpha)
    if network_args:
        md["ss_network_args"] = json.dumps(dict(network_args))
    return md


def _spec_kwargs(info: ArchInfo) -> dict:
    kw = dict(v2=bool(info.v2), v_parameterization=info.v_parameterization, sdxl=info.family == "sdxl")
    if info.family == "flux":
        kw["flux"] = info.flux_variant or True
    elif info.family == "sd3":
        kw["sd3"] = "medium"
    return kw


def lora_modelspec(info: ArchInfo, title: str, merged: str | None = None, timestamp: float | None = None) -> dict[str, str]:
    """modelspec.* for a LoRA written by a tool; the input's architecture string is kept when
    it has one."""
    ts = time.time() if timestamp is None else timestamp
    md = modelspec.build_metadata(lora=True, timestamp=ts, title=title, merged_from=merged, reso=info.resolution,
                                  **_spec_kwargs(info))
    if info.architecture and info.architecture.endswith("/lora"):
        md["modelspec.architecture"] = info.architecture
    return md


def checkpoint_modelspec(v2: bool, v_parameterization: bool, title: str, merged: str | None,
                         timestamp: float | None = None, sdxl: bool = False) -> dict[str, str]:
    ts = time.time() if timestamp is None else timestamp
    return modelspec.build_metadata(v2=v2, v_parameterization=v_parameterization, sdxl=sdxl, lora=False, timestamp=ts,
                                    title=title, merged_from=merged)


def without_hashes(metadata: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k not in HASH_KEYS}


def network_args_with_conv(existing: str | None, conv_dim, conv_alpha) -> str | None:
    """ss_network_args JSON with conv_dim/conv_alpha replaced (or added); None when there is
    nothing to write."""
    args: dict = {}
    if existing:
        try:
            parsed = json.loads(existing)
            if isinstance(parsed, dict):
                args = parsed
        except json.JSONDecodeError:
            logger.warning("ss_network_args is not JSON; left as it was")
            return existing
    if conv_dim is None:
        args.pop("conv_dim", None)
        args.pop("conv_alpha", None)
    else:
        args["conv_dim"] = str(conv_dim)
        args["conv_alpha"] = str(conv_alpha)
    return json.dumps(args) if args else (existing if existing else None)


def save_lora(modules, path: str, dtype=None, metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write modules as a kohya LoRA, atomically. A .safetensors file gets the metadata and
    fresh sshs_* hashes computed on the tensors in `dtype` (written without extra in-memory
    copies); other extensions are torch.save'd (no metadata). Returns the metadata written."""
    from library.io.safetensors_io import is_safetensors_path
    from library.lora_tools.lorafile import to_state_dict
    from library.io.tensor_files import save_with_sshs

    sd = to_state_dict(modules, dtype)
    md = without_hashes(metadata or {})
    if is_safetensors_path(path):
        written = save_with_sshs(sd, path, md)
        logger.info("saved %s (%d tensors)", path, len(sd))
        return written
    from library.networks.weights_io import save_weights_file

    save_weights_file(sd, path, None, None)
    return {}


def ranks_and_alphas(modules: Mapping, kxk: bool) -> tuple[list[int], list[float]]:
    sel = [m for m in modules.values() if m.is_kxk == kxk]
    return [m.rank for m in sel], [m.alpha for m in sel]


def dims_for(modules: Mapping, conv: bool = True) -> tuple[str | None, str | None, dict | None]:
    """(ss_network_dim, ss_network_alpha, network_args) describing modules: the common rank /
    alpha of the Linear and 1x1 modules ('Dynamic' when they differ) and conv_dim/conv_alpha
    for the kxk ones."""
    from library.lora_tools.ops import common_value, format_alpha

    ranks, alphas = ranks_and_alphas(modules, False)
    dim = common_value(ranks)
    alpha = common_value(alphas, format_alpha)
    args = None
    if conv:
        cranks, calphas = ranks_and_alphas(modules, True)
        if cranks:
            args = {"conv_dim": common_value(cranks), "conv_alpha": common_value(calphas, format_alpha)}
    return dim, alpha, args


def first_present(values: Sequence) -> object:
    for v in values:
        if v is not None:
            return v
    return None
