"""The dataset configuration: ``--dataset_config`` TOML/JSON or plain command-line options.

Three steps:

1. :func:`load_dataset_config` reads the file (TOML syntax errors name the line);
2. :func:`validate_user_config` checks every table with a voluptuous schema for its
   level (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``) and the script's
   capabilities (:class:`SchemaSupport`); an unknown key, a key at the wrong level or a
   wrong type is one line naming the file, the table and the key, and what is allowed;
3. :func:`generate_blueprint` resolves every value through the fallback chain
   ``subset -> dataset -> [general] -> command line -> runtime -> default`` into
   :class:`DatasetParams` / :class:`SubsetParams` objects.

Without ``--dataset_config``, :func:`user_config_from_args` builds the equivalent
configuration from ``--train_data_dir`` / ``--reg_data_dir`` / ``--in_json`` (and
``--conditioning_data_dir`` for masked-loss / ControlNet training), so both paths share
one code path.

Deliberate leniency: a whole number is accepted where a float is expected (``0`` for
``caption_dropout_rate``); the reference rejects it.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import voluptuous as vol

from library.data.captions import CaptionOptions
from library.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = [
    "SchemaSupport",
    "SubsetParams",
    "DatasetParams",
    "INTERPOLATIONS",
    "load_dataset_config",
    "validate_user_config",
    "user_config_from_args",
    "generate_blueprint",
    "blueprint_from_args",
]

INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


# ---- value validators (raise vol.Invalid with a message that says what was expected) --

def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"array {value!r}"
    return type(value).__name__


def _int(v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise vol.Invalid(f"expected an integer, got {_describe(v)}")
    return v


def _bool(v):
    if not isinstance(v, bool):
        hint = " (write true or false without quotes)" if isinstance(v, (str, int)) else ""
        raise vol.Invalid(f"expected true or false, got {_describe(v)}{hint}")
    return v


def _str(v):
    if not isinstance(v, str):
        raise vol.Invalid(f"expected a string, got {_describe(v)} (put it in quotes)")
    return v


def _float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise vol.Invalid(f"expected a number, got {_describe(v)}")
    return float(v)


def _number(v):  # "float or int": keep an int an int (token_warmup_step counts steps)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise vol.Invalid(f"expected a number, got {_describe(v)}")
    return v


def _float_pair(v):
    if (
        not isinstance(v, list)
        or len(v) != 2
        or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v)
    ):
        raise vol.Invalid(f"expected an array of two numbers like [2.0, 4.0], got {_describe(v)}")
    lo, hi = float(v[0]), float(v[1])
    if lo > hi:
        raise vol.Invalid(f"the first number must not exceed the second, got [{v[0]}, {v[1]}]")
    return (lo, hi)


def _resolution(v):
    if isinstance(v, int) and not isinstance(v, bool):
        if v <= 0:
            raise vol.Invalid(f"expected a positive size, got {v}")
        return (v, v)
    if (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
    ):
        return (v[0], v[1])
    raise vol.Invalid(f"expected a size like 512 or [width, height] like [768, 512], got {_describe(v)}")


def _table(v):
    if not isinstance(v, dict):
        raise vol.Invalid(f"expected a table like {{ key = value }}, got {_describe(v)}")
    return v


def _interp(v):
    if not isinstance(v, str) or v not in INTERPOLATIONS:
        raise vol.Invalid(f"expected one of {', '.join(INTERPOLATIONS)}, got {_describe(v)}")
    return v


# ---- which keys live where ------------------------------------------------------------

SUBSET_INHERITABLE: dict[str, Callable] = {
    "num_repeats": _int,
    "shuffle_caption": _bool,
    "caption_separator": _str,
    "keep_tokens": _int,
    "keep_tokens_separator": _str,
    "secondary_separator": _str,
    "enable_wildcard": _bool,
    "caption_prefix": _str,
    "caption_suffix": _str,
    "color_aug": _bool,
    "flip_aug": _bool,
    "random_crop": _bool,
    "face_crop_aug_range": _float_pair,
    "token_warmup_min": _int,
    "token_warmup_step": _number,
    "custom_attributes": _table,
    "resize_interpolation": _interp,
}
DROPOUT: dict[str, Callable] = {
    "caption_dropout_rate": _number,
    "caption_dropout_every_n_epochs": _int,
    "caption_tag_dropout_rate": _number,
}
DREAMBOOTH_INHERITABLE: dict[str, Callable] = {"caption_extension": _str, "class_tokens": _str, "cache_info": _bool}
CONTROLNET_INHERITABLE: dict[str, Callable] = {"caption_extension": _str, "cache_info": _bool}
DATASET_OPTIONS: dict[str, Callable] = {
    "resolution": _resolution,
    "batch_size": _int,
    "enable_bucket": _bool,
    "min_bucket_reso": _int,
    "max_bucket_reso": _int,
    "bucket_reso_steps": _int,
    "bucket_no_upscale": _bool,
    "network_multiplier": _float,
    "validation_split": _float,
    "validation_seed": _int,
    "resize_interpolation": _interp,
}
SUBSET_ONLY: dict[str, dict[str, tuple[Callable, bool]]] = {  # key -> (validator, required)
    "dreambooth": {"image_dir": (_str, True), "is_reg": (_bool, False), "alpha_mask": (_bool, False)},
    "finetuning": {"metadata_file": (_str, True), "image_dir": (_str, False), "alpha_mask": (_bool, False)},
    "controlnet": {"image_dir": (_str, True), "conditioning_data_dir": (_str, True)},
}
COMMAND_LINE_ONLY = ("prior_loss_weight", "debug_dataset", "max_token_length")
KIND_NAMES = {"dreambooth": "DreamBooth", "finetuning": "fine-tuning (metadata)", "controlnet": "ControlNet/mask"}


@dataclass(frozen=True)
class SchemaSupport:
    """What the running script accepts (mirrors the reference's per-script switches)."""

    dreambooth: bool = True
    finetuning: bool = True
    controlnet: bool = False
    dropout: bool = True


def _subset_keys(kind: str, support: SchemaSupport) -> dict[str, Callable]:
    keys = dict(SUBSET_INHERITABLE)
    if support.dropout:
        keys.update(DROPOUT)
    if kind == "dreambooth":
        keys.update(DREAMBOOTH_INHERITABLE)
    elif kind == "controlnet":
        keys.update(CONTROLNET_INHERITABLE)
    return keys


def _dataset_keys(support: SchemaSupport) -> dict[str, Callable]:
    keys = dict(SUBSET_INHERITABLE)
    keys.update(DATASET_OPTIONS)
    if support.dropout:
        keys.update(DROPOUT)
    keys.update(DREAMBOOTH_INHERITABLE)
    if support.controlnet:
        keys.update(CONTROLNET_INHERITABLE)
    return keys


def _general_keys(support: SchemaSupport) -> dict[str, Callable]:
    keys = dict(SUBSET_INHERITABLE)
    keys.update(DATASET_OPTIONS)
    if support.dropout:
        keys.update(DROPOUT)
    if support.dreambooth:
        keys.update(DREAMBOOTH_INHERITABLE)
    if support.controlnet:
        keys.update(CONTROLNET_INHERITABLE)
    return keys


# ---- reading the file ---------------------------------------------------------------

def load_dataset_config(path: str) -> dict:
    """Read a ``.toml`` or ``.json`` dataset config; syntax errors name the line."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".json"):
        raise UserInputError(f"--dataset_config {path}: the file must end in .toml or .json")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserInputError(f"--dataset_config file not found: {path}") from None
    except OSError as e:
        raise UserInputError(f"cannot read --dataset_config {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserInputError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if ext == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserInputError(f"{path}: TOML syntax error: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise UserInputError(f"{path}: the top level must be an object with 'general' and 'datasets'")
    return obj


# ---- validation -----------------------------------------------------------------------

def _where_known(key: str, support: SchemaSupport) -> Optional[str]:
    """Where a key that is not allowed here *would* be allowed, for the error hint."""
    if key in COMMAND_LINE_ONLY:
        return f"it can only be given on the command line (--{key})"
    if key in SUBSET_ONLY["dreambooth"] or key in SUBSET_ONLY["finetuning"] or key in SUBSET_ONLY["controlnet"]:
        return "it belongs in a [[datasets.subsets]] table"
    if key in DATASET_OPTIONS:
        return "it is a dataset option: put it in [[datasets]] or [general]"
    if key in DREAMBOOTH_INHERITABLE:
        return "it applies to DreamBooth-style subsets (image folders with caption files) only"
    if key in DROPOUT:
        return "caption dropout is not supported by this script"
    if key in SUBSET_INHERITABLE:
        return "it is a subset option"
    return None


def _check_table(
    table: Any, allowed: dict[str, Callable], required: tuple[str, ...], source: str, where: str, support: SchemaSupport
) -> dict:
    if not isinstance(table, dict):
        raise UserInputError(f"{source}: {where} must be a table, got {_describe(table)}")
    for key in table:
        if key in allowed:
            continue
        hint = _where_known(key, support)
        if hint is None:
            close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.75)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed here: {', '.join(sorted(allowed))}"
        raise UserInputError(f"{source}: {where}: key '{key}' is not allowed here; {hint}")
    schema = vol.Schema(
        {(vol.Required(k) if k in required else vol.Optional(k)): v for k, v in allowed.items()},
        extra=vol.PREVENT_EXTRA,
    )
    try:
        return schema(table)
    except vol.MultipleInvalid as err:
        e = err.errors[0]
        key = e.path[0] if e.path else "?"
        if isinstance(e, vol.RequiredFieldInvalid):
            raise UserInputError(f"{source}: {where}: required key '{key}' is missing") from None
        raise UserInputError(f"{source}: {where}: '{key}' {e.msg}") from None


def _subset_kind(subset: dict, support: SchemaSupport, source: str, where: str) -> str:
    if not isinstance(subset, dict):
        raise UserInputError(f"{source}: {where} must be a table, got {_describe(subset)}")
    if "metadata_file" in subset:
        return "finetuning"
    if "conditioning_data_dir" in subset:
        if not support.controlnet:
            raise UserInputError(
                f"{source}: {where}: 'conditioning_data_dir' is only used with --masked_loss or by ControlNet trainers"
            )
        return "controlnet"
    return "dreambooth"


def validate_user_config(config: dict, source: str, support: SchemaSupport = SchemaSupport()) -> dict:
    """Check a parsed dataset config; returns it normalised (tuples for sizes, etc.).

    Raises UserInputError naming ``source``, the table and the key on the first problem.
    """
    if not isinstance(config, dict):
        raise UserInputError(f"{source}: expected a [general] table and [[datasets]] tables")
    for key in config:
        if key not in ("general", "datasets"):
            hint = _where_known(key, support)
            hint = f"; {hint}" if hint else ""
            raise UserInputError(
                f"{source}: top-level key '{key}' is not allowed; only [general] and [[datasets]] may appear "
                f"at the top{hint}"
            )
    out: dict = {}
    if "general" in config:
        out["general"] = _check_table(config["general"], _general_keys(support), (), source, "[general]", support)
    datasets = config.get("datasets")
    if datasets is None:
        raise UserInputError(f"{source}: no [[datasets]] defined; add at least one [[datasets]] with a [[datasets.subsets]]")
    if isinstance(datasets, dict):
        raise UserInputError(f"{source}: 'datasets' must be an array of tables: write [[datasets]] (double brackets)")
    if not isinstance(datasets, list):
        raise UserInputError(f"{source}: 'datasets' must be an array of tables ([[datasets]])")
    out_datasets = []
    for di, dataset in enumerate(datasets, 1):
        dwhere = f"[[datasets]] #{di}"
        if not isinstance(dataset, dict):
            raise UserInputError(f"{source}: {dwhere} must be a table")
        subsets = dataset.get("subsets")
        if subsets is None or subsets == []:
            raise UserInputError(f"{source}: {dwhere} has no [[datasets.subsets]]; add one with an image_dir or metadata_file")
        if isinstance(subsets, dict):
            raise UserInputError(
                f"{source}: {dwhere}: 'subsets' must be an array of tables: write [[datasets.subsets]] (double brackets)"
            )
        if not isinstance(subsets, list):
            raise UserInputError(f"{source}: {dwhere}: 'subsets' must be an array of tables ([[datasets.subsets]])")
        kinds = [_subset_kind(s, support, source, f"{dwhere}, [[datasets.subsets]] #{si}") for si, s in enumerate(subsets, 1)]
        if "finetuning" in kinds and any(k != "finetuning" for k in kinds):
            raise UserInputError(
                f"{source}: {dwhere} mixes subsets with metadata_file and subsets without it; "
                "put metadata (fine-tuning) subsets and image-folder subsets in separate [[datasets]]"
            )
        if "controlnet" in kinds and any(k != "controlnet" for k in kinds):
            raise UserInputError(
                f"{source}: {dwhere}: either every subset has conditioning_data_dir or none has"
            )
        kind = kinds[0]
        if kind == "dreambooth" and not support.dreambooth:
            raise UserInputError(
                f"{source}: {dwhere}: this script trains from metadata only; every subset needs a metadata_file"
            )
        if kind == "finetuning" and not support.finetuning:
            raise UserInputError(
                f"{source}: {dwhere}: this script does not accept metadata_file subsets; use image_dir folders"
            )
        body = {k: v for k, v in dataset.items() if k != "subsets"}
        checked = _check_table(body, _dataset_keys(support), (), source, dwhere, support)
        out_subsets = []
        for si, subset in enumerate(subsets, 1):
            allowed = _subset_keys(kind, support)
            only = SUBSET_ONLY[kind]
            allowed.update({k: v for k, (v, _) in only.items()})
            required = tuple(k for k, (_, req) in only.items() if req)
            out_subsets.append(
                _check_table(subset, allowed, required, source, f"{dwhere}, [[datasets.subsets]] #{si}", support)
            )
        checked["subsets"] = out_subsets
        checked["_kind"] = kind
        out_datasets.append(checked)
    out["datasets"] = out_datasets
    return out


# ---- resolved parameters ------------------------------------------------------------

@dataclass
class SubsetParams:
    """Every setting of one subset after the fallback chain."""

    kind: str = "dreambooth"
    image_dir: Optional[str] = None
    metadata_file: Optional[str] = None
    conditioning_data_dir: Optional[str] = None
    is_reg: bool = False
    alpha_mask: bool = False
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: Optional[tuple[float, float]] = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    custom_attributes: dict = field(default_factory=dict)
    resize_interpolation: Optional[str] = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_extension: str = ".caption"
    class_tokens: Optional[str] = None
    cache_info: bool = False
    where: str = ""  # for messages: "<file>: [[datasets]] #1, [[datasets.subsets]] #2"

    def caption_options(self) -> CaptionOptions:
        return CaptionOptions(
            shuffle_caption=self.shuffle_caption,
            caption_separator=self.caption_separator,
            keep_tokens=self.keep_tokens,
            keep_tokens_separator=self.keep_tokens_separator,
            secondary_separator=self.secondary_separator,
            enable_wildcard=self.enable_wildcard,
            caption_prefix=self.caption_prefix,
            caption_suffix=self.caption_suffix,
            token_warmup_min=self.token_warmup_min,
            token_warmup_step=self.token_warmup_step,
            caption_dropout_rate=self.caption_dropout_rate,
            caption_dropout_every_n_epochs=self.caption_dropout_every_n_epochs,
            caption_tag_dropout_rate=self.caption_tag_dropout_rate,
        )

    @property
    def source_name(self) -> str:
        """Short name used for tag frequency and logs (folder or metadata file name)."""
        path = self.image_dir if self.kind != "finetuning" else self.metadata_file
        return os.path.basename(os.path.normpath(path)) if path else ""


@dataclass
class DatasetParams:
    """Every setting of one ``[[datasets]]`` entry after the fallback chain."""

    kind: str = "dreambooth"
    resolution: Optional[tuple[int, int]] = None
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: Optional[int] = None
    resize_interpolation: Optional[str] = None
    prior_loss_weight: float = 1.0
    debug_dataset: bool = False
    max_token_length: Optional[int] = None
    subsets: list[SubsetParams] = field(default_factory=list)
    where: str = ""


_SUBSET_FIELDS = [f.name for f in fields(SubsetParams) if f.name not in ("kind", "where")]
_DATASET_FIELDS = [f.name for f in fields(DatasetParams) if f.name not in ("kind", "subsets", "where")]


def _args_values(args: Any) -> dict:
    """Command-line values under dataset-config names (``None`` entries mean 'not given')."""
    if args is None:
        return {}
    if isinstance(args, dict):
        raw = dict(args)
    else:
        raw = dict(vars(args))
    out: dict = {}
    names = set(_SUBSET_FIELDS) | set(_DATASET_FIELDS)
    for name in names:
        if name in raw:
            out[name] = raw[name]
    if raw.get("train_batch_size") is not None:
        out["batch_size"] = raw["train_batch_size"]
    if raw.get("dataset_repeats") is not None:
        out["num_repeats"] = raw["dataset_repeats"]
    if raw.get("caption_extention"):
        out["caption_extension"] = raw["caption_extention"]
    if out.get("resolution") is not None:
        from library.args.types import parse_resolution

        out["resolution"] = parse_resolution(out["resolution"], "--resolution")
    fc = out.get("face_crop_aug_range")
    if isinstance(fc, str):
        try:
            lo, hi = (float(x) for x in fc.split(","))
        except ValueError:
            raise UserInputError(f"--face_crop_aug_range {fc!r}: expected two numbers like 2.0,4.0") from None
        if lo > hi:
            raise UserInputError(f"--face_crop_aug_range {fc!r}: the first number must not exceed the second")
        out["face_crop_aug_range"] = (lo, hi)
    elif isinstance(fc, (list, tuple)):
        out["face_crop_aug_range"] = (float(fc[0]), float(fc[1]))
    # subset-only keys never come from the command line (they name the data itself)
    for key in ("image_dir", "metadata_file", "is_reg", "conditioning_data_dir"):
        out.pop(key, None)
    return out


def _first(key: str, *layers: dict) -> Any:
    for layer in layers:
        if layer is not None and layer.get(key) is not None:
            return layer[key]
    return None


def generate_blueprint(
    config: dict,
    args: Any = None,
    runtime: Optional[dict] = None,
    source: str = "dataset config",
) -> list[DatasetParams]:
    """Resolve a validated config into :class:`DatasetParams` (one per ``[[datasets]]``)."""
    general = config.get("general", {})
    argv = _args_values(args)
    runtime = runtime or {}
    blueprint: list[DatasetParams] = []
    for di, dataset in enumerate(config["datasets"], 1):
        dwhere = dataset.get("_where") or f"{source}: [[datasets]] #{di}"
        kind = dataset.get("_kind", "dreambooth")
        dparams = DatasetParams(kind=kind, where=dwhere)
        for name in _DATASET_FIELDS:
            value = _first(name, dataset, general, argv, runtime)
            if name in COMMAND_LINE_ONLY:
                value = _first(name, argv, runtime)
            if value is not None:
                setattr(dparams, name, value)
        seen: set[str] = set()
        for si, subset in enumerate(dataset["subsets"], 1):
            swhere = subset.get("_where") or f"{dwhere}, [[datasets.subsets]] #{si}"
            sp = SubsetParams(kind=kind, where=swhere)
            for name in _SUBSET_FIELDS:
                value = _first(name, subset, dataset, general, argv, runtime)
                if value is not None:
                    setattr(sp, name, value)
            if sp.caption_extension and not sp.caption_extension.startswith("."):
                sp.caption_extension = "." + sp.caption_extension
            sp.custom_attributes = dict(sp.custom_attributes or {})
            if kind == "finetuning":
                sp.is_reg = False
            _check_subset_values(sp, swhere)
            if sp.num_repeats < 1:
                logger.warning("%s: num_repeats is %d (< 1); this subset is ignored", swhere, sp.num_repeats)
                continue
            ident = sp.metadata_file if kind == "finetuning" else sp.image_dir
            ident = os.path.abspath(ident) if ident else ident
            if ident in seen:
                logger.warning("%s: %s is already used by an earlier subset; ignoring this one", swhere, ident)
                continue
            seen.add(ident)
            dparams.subsets.append(sp)
        _check_dataset_values(dparams, dwhere)
        blueprint.append(dparams)
    return blueprint


def _check_subset_values(sp: SubsetParams, where: str) -> None:
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        value = getattr(sp, name)
        if not 0 <= value <= 1:
            raise UserInputError(f"{where}: {name} must be between 0 and 1, got {value}")
    if sp.keep_tokens < 0:
        raise UserInputError(f"{where}: keep_tokens must not be negative, got {sp.keep_tokens}")
    if sp.token_warmup_step < 0:
        raise UserInputError(f"{where}: token_warmup_step must not be negative, got {sp.token_warmup_step}")
    if sp.caption_dropout_every_n_epochs < 0:
        raise UserInputError(f"{where}: caption_dropout_every_n_epochs must not be negative")
    if sp.kind == "controlnet" and sp.random_crop:
        raise UserInputError(f"{where}: random_crop cannot be used with conditioning_data_dir (masks must stay aligned)")
    if sp.resize_interpolation is not None and sp.resize_interpolation not in INTERPOLATIONS:
        raise UserInputError(
            f"{where}: resize_interpolation must be one of {', '.join(INTERPOLATIONS)}, got {sp.resize_interpolation!r}"
        )


def _check_dataset_values(dp: DatasetParams, where: str) -> None:
    if dp.batch_size < 1:
        raise UserInputError(f"{where}: batch_size must be at least 1, got {dp.batch_size}")
    if dp.bucket_reso_steps < 1:
        raise UserInputError(f"{where}: bucket_reso_steps must be at least 1, got {dp.bucket_reso_steps}")
    if dp.resolution is None:
        raise UserInputError(f"{where}: no resolution given; set resolution in [[datasets]] or [general], or pass --resolution")
    if not 0 <= dp.validation_split <= 1:
        logger.warning("%s: validation_split %s is outside [0, 1]; no validation split is made", where, dp.validation_split)
        dp.validation_split = 0.0


# ---- configuration from plain command-line options --------------------------------------

def user_config_from_args(args: Any, support: SchemaSupport = SchemaSupport()) -> dict:
    """The dataset config implied by ``--train_data_dir`` / ``--reg_data_dir`` / ``--in_json``."""
    from library.data.discovery import repeat_subsets_from_folder

    train_dir = getattr(args, "train_data_dir", None)
    reg_dir = getattr(args, "reg_data_dir", None)
    in_json = getattr(args, "in_json", None)
    cond_dir = getattr(args, "conditioning_data_dir", None)
    if in_json:
        subset = {"metadata_file": in_json, "_where": f"--in_json {in_json}"}
        if train_dir:
            subset["image_dir"] = train_dir
        return {"datasets": [{"subsets": [subset], "_kind": "finetuning", "_where": "command-line dataset"}]}
    if not train_dir:
        raise UserInputError("no training data: give --train_data_dir (or --in_json, or --dataset_config)")
    if support.controlnet and cond_dir:
        subsets = repeat_subsets_from_folder(train_dir, False, "--train_data_dir")
        for s in subsets:
            s.pop("is_reg", None)
            s.pop("class_tokens", None)
            s["conditioning_data_dir"] = cond_dir
        return {"datasets": [{"subsets": subsets, "_kind": "controlnet", "_where": "command-line dataset"}]}
    if not support.dreambooth:
        raise UserInputError("this script trains from metadata: give --in_json (or --dataset_config)")
    subsets = repeat_subsets_from_folder(train_dir, False, "--train_data_dir")
    if reg_dir:
        subsets += repeat_subsets_from_folder(reg_dir, True, "--reg_data_dir")
    return {"datasets": [{"subsets": subsets, "_kind": "dreambooth", "_where": "command-line dataset"}]}


def blueprint_from_args(
    args: Any, support: SchemaSupport = SchemaSupport(), runtime: Optional[dict] = None
) -> list[DatasetParams]:
    """The blueprint for a run: from ``--dataset_config`` if given, else from the options."""
    config_path = getattr(args, "dataset_config", None)
    if config_path:
        ignored = [f"--{n}" for n in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, n, None)]
        if ignored:
            logger.warning("--dataset_config is given, so %s %s ignored", ", ".join(ignored), "is" if len(ignored) == 1 else "are")
        source = os.fspath(config_path)
        config = validate_user_config(load_dataset_config(source), source, support)
        return generate_blueprint(config, args, runtime, source)
    config = user_config_from_args(args, support)
    return generate_blueprint(config, args, runtime, "command line")
