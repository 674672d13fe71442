"""`modelspec.*` metadata (Stability AI model spec 1.0.1), as in formats.md b.3.

`build_metadata(...)` returns the dict of `modelspec.*` keys for one saved file;
`build_metadata_from_args(args, ...)` fills it from the `--metadata_*` options (G-SPEC)
and the usual training arguments. All values are strings (safetensors metadata).

`modelspec.implementation_version` names this project, not sd-scripts: it is
`sd-trainer/<git HEAD of this checkout>` (or `sd-trainer/unknown`). The consumers we
know of (ComfyUI, A1111/Forge, model-spec readers) display it or ignore it; none parses
it, and a reference-project commit hash would be false here.
"""

from __future__ import annotations

import base64
import datetime
import functools
import logging
import mimetypes
import os
import subprocess
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)

SPEC_VERSION = "1.0.1"
IMPLEMENTATION_NAME = "sd-trainer"

ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
ARCH_SD_XL_V1_BASE = "stable-diffusion-xl-v1-base"
ARCH_SD3_PREFIX = "stable-diffusion-3-"  # + medium / 5-medium / 5-large
ARCH_FLUX_1_DEV = "flux-1-dev"
ARCH_FLUX_1_SCHNELL = "flux-1-schnell"
ARCH_FLUX_1_UNKNOWN = "flux-1"
ARCH_CHROMA = "chroma"

ADAPTER_LORA = "lora"
ADAPTER_TEXTUAL_INVERSION = "textual-inversion"

IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
IMPL_FLUX = "https://github.com/black-forest-labs/flux"
IMPL_CHROMA = "https://huggingface.co/lodestones/Chroma"

SD3_TYPES = ("medium", "5-medium", "5-large")

# order in which keys are written (dicts keep insertion order; readers do not care)
_KEY_ORDER = (
    "sai_model_spec",
    "architecture",
    "implementation",
    "title",
    "resolution",
    "description",
    "author",
    "date",
    "hash_sha256",
    "license",
    "usage_hint",
    "thumbnail",
    "tags",
    "merged_from",
    "trigger_phrase",
    "prediction_type",
    "timestep_range",
    "encoder_layer",
    "preprocessor",
    "is_negative_embedding",
    "implementation_version",
)


@functools.lru_cache(maxsize=1)
def implementation_version() -> str:
    """`sd-trainer/<git HEAD>` of the checkout this code runs from, else `sd-trainer/unknown`."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{IMPLEMENTATION_NAME}/{out if out else 'unknown'}"


def _flux_kind(flux: Any, model_config: Mapping[str, Any] | None) -> str | None:
    """'dev' / 'schnell' / 'chroma' / '' (unknown FLUX) or None (not FLUX)."""
    if model_config and "flux" in model_config:
        flux = model_config["flux"]
    if flux is None or flux is False:
        return None
    if flux is True:
        return ""
    return str(flux).strip().lower()


def _sd3_kind(sd3: Any, model_config: Mapping[str, Any] | None) -> str | None:
    if model_config and "sd3" in model_config:
        sd3 = model_config["sd3"]
    if sd3 is None or sd3 is False:
        return None
    return str(sd3).strip()


def architecture(
    *,
    v2: bool = False,
    v_parameterization: bool = False,
    sdxl: bool = False,
    lora: bool = False,
    textual_inversion: bool = False,
    flux: Any = None,
    sd3: Any = None,
    model_config: Mapping[str, Any] | None = None,
) -> str:
    """The `modelspec.architecture` string, with '/lora' or '/textual-inversion' appended."""
    if lora and textual_inversion:
        raise ValueError("a file is either a LoRA or a textual-inversion embedding, not both")
    flux_kind = _flux_kind(flux, model_config)
    sd3_kind = _sd3_kind(sd3, model_config)
    if flux_kind is not None:
        arch = {
            "dev": ARCH_FLUX_1_DEV,
            "schnell": ARCH_FLUX_1_SCHNELL,
            "chroma": ARCH_CHROMA,
        }.get(flux_kind, ARCH_FLUX_1_UNKNOWN)
    elif sd3_kind is not None:
        arch = ARCH_SD3_PREFIX + sd3_kind
    elif sdxl:
        arch = ARCH_SD_XL_V1_BASE
    elif v2:
        arch = ARCH_SD_V2_768_V if v_parameterization else ARCH_SD_V2_512
    else:
        arch = ARCH_SD_V1
    if lora:
        arch += "/" + ADAPTER_LORA
    elif textual_inversion:
        arch += "/" + ADAPTER_TEXTUAL_INVERSION
    return arch


def implementation(
    *,
    sdxl: bool = False,
    lora: bool = False,
    textual_inversion: bool = False,
    flux: Any = None,
    model_config: Mapping[str, Any] | None = None,
) -> str:
    """FLUX/Chroma URL for FLUX models; Stability AI's URL for SDXL LoRAs, embeddings and
    full checkpoints; 'diffusers' for the other LoRAs (SD1/2, SD3)."""
    flux_kind = _flux_kind(flux, model_config)
    if flux_kind is not None:
        return IMPL_CHROMA if flux_kind == "chroma" else IMPL_FLUX
    if (lora and sdxl) or textual_inversion or not lora:
        return IMPL_STABILITY_AI
    return IMPL_DIFFUSERS


def format_resolution(reso: Any) -> str | None:
    """'<W>x<H>' from an int, a (W, H) pair or a string like '512', '512,768' or '512x768'."""
    if reso is None:
        return None
    if isinstance(reso, str):
        text = reso.strip().lower().replace("x", ",")
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            return None
        reso = [int(float(p)) for p in parts]
    if isinstance(reso, (int, float)):
        reso = (int(reso), int(reso))
    reso = list(reso)
    if len(reso) == 1:
        reso = reso * 2
    if len(reso) != 2:
        raise ValueError(f"resolution must be one or two numbers, got {reso!r}")
    return f"{int(reso[0])}x{int(reso[1])}"


def default_resolution(*, v2: bool, v_parameterization: bool, large: bool) -> str:
    if large:  # SDXL, SD3, FLUX
        return "1024x1024"
    if v2 and v_parameterization:
        return "768x768"
    return "512x512"


def format_date(timestamp: float) -> str:
    """Local time, ISO 8601 to the second: YYYY-MM-DDTHH:MM:SS."""
    return datetime.datetime.fromtimestamp(timestamp).replace(microsecond=0).isoformat()


def thumbnail_data_url(thumbnail: str | None) -> str | None:
    """A data URL is kept; a file path becomes data:<mime>;base64,...; a missing file is
    dropped (None) with a warning."""
    if thumbnail is None or thumbnail == "":
        return None
    if thumbnail.startswith("data:"):
        return thumbnail
    if not os.path.isfile(thumbnail):
        logger.warning("thumbnail file not found, modelspec.thumbnail not written: %s", thumbnail)
        return None
    mime = mimetypes.guess_type(thumbnail)[0] or "application/octet-stream"
    with open(thumbnail, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f"data:{mime};base64,{data}"


def default_title(*, lora: bool, textual_inversion: bool, timestamp: float) -> str:
    kind = "LoRA" if lora else "TextualInversion" if textual_inversion else "Checkpoint"
    return f"{kind}@{timestamp}"


def _timestep_range(timesteps: Sequence | None) -> str | None:
    if timesteps is None:
        return None
    lo, hi = (list(timesteps) + [None, None])[:2]
    if lo is None and hi is None:
        return None
    return f"{0 if lo is None else lo},{1000 if hi is None else hi}"


def build_metadata(
    *,
    v2: bool = False,
    v_parameterization: bool = False,
    sdxl: bool = False,
    lora: bool = False,
    textual_inversion: bool = False,
    flux: Any = None,
    sd3: Any = None,
    model_config: Mapping[str, Any] | None = None,
    timestamp: float,
    title: str | None = None,
    reso: Any = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    merged_from: str | None = None,
    timesteps: Sequence | None = None,
    clip_skip: int | None = None,
    usage_hint: str | None = None,
    thumbnail: str | None = None,
    trigger_phrase: str | None = None,
    preprocessor: str | None = None,
    is_negative_embedding: str | None = None,
) -> dict[str, str]:
    """The `modelspec.*` entries for one saved file (all values str).

    flux: None (not FLUX) or 'dev' / 'schnell' / 'chroma' (anything else: 'flux-1');
    sd3: None or the SD3 type 'medium' / '5-medium' / '5-large'; model_config: optional
    dict with a 'flux' or 'sd3' entry, overriding those arguments. timestamp: save time
    (UNIX seconds) for the date and the default title. reso: int, (W, H) or '--resolution'
    text. timesteps: (min_timestep, max_timestep), either may be None.
    """
    flux_kind = _flux_kind(flux, model_config)
    sd3_kind = _sd3_kind(sd3, model_config)
    large = sdxl or flux_kind is not None or sd3_kind is not None

    md: dict[str, str] = {
        "sai_model_spec": SPEC_VERSION,
        "architecture": architecture(
            v2=v2,
            v_parameterization=v_parameterization,
            sdxl=sdxl,
            lora=lora,
            textual_inversion=textual_inversion,
            flux=flux,
            sd3=sd3,
            model_config=model_config,
        ),
        "implementation": implementation(
            sdxl=sdxl, lora=lora, textual_inversion=textual_inversion, flux=flux, model_config=model_config
        ),
        "title": title if title else default_title(lora=lora, textual_inversion=textual_inversion, timestamp=timestamp),
        "resolution": format_resolution(reso)
        or default_resolution(v2=v2, v_parameterization=v_parameterization, large=large),
        "date": format_date(timestamp),
    }
    optional = {
        "description": description,
        "author": author,
        "license": license,
        "tags": tags,
        "merged_from": merged_from,
        "usage_hint": usage_hint,
        "thumbnail": thumbnail_data_url(thumbnail),
        "trigger_phrase": trigger_phrase,
        "preprocessor": preprocessor,
        "is_negative_embedding": is_negative_embedding,
        "timestep_range": _timestep_range(timesteps),
        "encoder_layer": None if clip_skip is None else str(clip_skip),
    }
    for key, value in optional.items():
        if value is not None:
            md[key] = str(value)
    if flux_kind is None:
        md["prediction_type"] = "v" if v_parameterization else "epsilon"
    md["implementation_version"] = implementation_version()

    ordered = {k: md[k] for k in _KEY_ORDER if k in md}
    return {f"modelspec.{k}": v for k, v in ordered.items()}


def build_metadata_from_args(
    args: Any,
    *,
    timestamp: float,
    sdxl: bool = False,
    lora: bool = False,
    textual_inversion: bool = False,
    flux: Any = None,
    sd3: Any = None,
    model_config: Mapping[str, Any] | None = None,
    reso: Any = None,
    title: str | None = None,
    clip_skip: Any = "args",
) -> dict[str, str]:
    """build_metadata() filled from an argparse namespace.

    Reads (each optional on `args`): v2, v_parameterization, resolution, output_name,
    min_timestep, max_timestep, clip_skip and the G-SPEC options metadata_title,
    metadata_author, metadata_description, metadata_license, metadata_tags,
    metadata_usage_hint, metadata_thumbnail, metadata_merged_from,
    metadata_trigger_phrase, metadata_preprocessor, metadata_is_negative_embedding.
    Title: --metadata_title, else --output_name, else the kind@timestamp default.
    Keyword arguments override what the namespace says (reso, title, clip_skip).
    """

    def get(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    if title is None:
        title = get("metadata_title") or get("output_name") or None
    if reso is None:
        reso = get("resolution")
    min_t, max_t = get("min_timestep"), get("max_timestep")
    timesteps = (min_t, max_t) if (min_t is not None or max_t is not None) else None
    if clip_skip == "args":
        clip_skip = get("clip_skip")
    return build_metadata(
        v2=bool(get("v2", False)),
        v_parameterization=bool(get("v_parameterization", False)),
        sdxl=sdxl,
        lora=lora,
        textual_inversion=textual_inversion,
        flux=flux,
        sd3=sd3,
        model_config=model_config,
        timestamp=timestamp,
        title=title,
        reso=reso,
        author=get("metadata_author"),
        description=get("metadata_description"),
        license=get("metadata_license"),
        tags=get("metadata_tags"),
        merged_from=get("metadata_merged_from"),
        timesteps=timesteps,
        clip_skip=clip_skip,
        usage_hint=get("metadata_usage_hint"),
        thumbnail=get("metadata_thumbnail"),
        trigger_phrase=get("metadata_trigger_phrase"),
        preprocessor=get("metadata_preprocessor"),
        is_negative_embedding=get("metadata_is_negative_embedding"),
    )
