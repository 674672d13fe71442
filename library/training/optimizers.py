"""Optimizers by name: ``--optimizer_type``, ``--optimizer_args`` and friends.

The trainer calls:

* ``get_optimizer(args, trainable_params) -> (name, args_string, optimizer)``:
  ``name`` is ``<module>.<Class>`` of the class actually used, ``args_string`` the
  keyword arguments passed to it (``k=v,...``; empty when none). Together they form
  the ``ss_optimizer`` metadata value, see ``optimizer_metadata_string``.
* ``check_fused_backward_pass(args)``: cheap option check, safe to call before any
  model is loaded (``get_optimizer`` calls it as well).
* ``is_schedule_free(optimizer_or_name)``, ``optimizer_train_mode(optimizer)``,
  ``optimizer_eval_mode(optimizer)`` and the ``optimizer_eval_context`` context
  manager: schedule-free optimizers must be switched to their evaluation weights
  for sampling, validation and saving, and back to training weights afterwards.
  For every other optimizer these are no-ops.

How a name is resolved (case-insensitive):

1. the legacy flags ``--use_8bit_adam`` / ``--use_lion_optimizer`` (normally already
   rewritten by ``library.args.checks.verify_training_args``);
2. an empty name means ``AdamW``;
3. the built-in table ``BUILTIN_OPTIMIZERS`` (AdamW8bit, Prodigy, Adafactor, ...);
4. anything else is resolved with its original spelling: without a dot it is a
   ``torch.optim`` class (``RMSprop``), otherwise ``package.module.Class`` is imported
   (``bitsandbytes.optim.AdEMAMix8bit``). The class is built as
   ``Class(params, lr=--learning_rate, **optimizer_args)``.

Rules tied to a class follow the class that was resolved, not the spelling used to
reach it: ``transformers.optimization.Adafactor`` given as a module path gets the
same ``relative_step`` handling as ``--optimizer_type Adafactor``.

Only torch is imported at module level; optimizer packages (bitsandbytes,
transformers, prodigyopt, ...) are imported when they are asked for.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import logging
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from library.errors import UserInputError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# key=value option lists (--optimizer_args, --lr_scheduler_args)
# --------------------------------------------------------------------------------------


def parse_key_value_args(items: Union[None, str, Sequence[Any]], option: str) -> Dict[str, Any]:
    """Turn ``["weight_decay=0.01", "betas=0.9,0.99"]`` into keyword arguments.

    Every item is split at its first ``=``; the value is read as a Python literal with
    ``ast.literal_eval`` (``0.9,0.99`` is a tuple, ``True`` a bool, ``'cosine'`` a
    string; strings must be quoted). ``None`` or an empty list gives ``{}``. A single
    string (as a TOML file may hold) is split like a shell command line first.

    Raises UserInputError naming ``option`` and the offending item when an item has no
    ``=``, an empty key, a value that is not a Python literal, or repeats a key.
    """
    if items is None:
        return {}
    if isinstance(items, str):
        items = shlex.split(items)
    result: Dict[str, Any] = {}
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        key, sep, raw = text.partition("=")
        key = key.strip()
        raw = raw.strip()
        if not sep or not key.isidentifier():
            raise UserInputError(
                f"{option}: {text!r} is not key=value (expected e.g. weight_decay=0.01)"
            )
        if not raw:
            raise UserInputError(f"{option}: {text!r} has no value after '='")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise UserInputError(
                f"{option}: the value of {text!r} is not a Python literal; numbers, True/False/None "
                f"and tuples (0.9,0.99) are written as is, strings need quotes: {key}='{raw}'"
            ) from None
        if key in result:
            raise UserInputError(f"{option}: {key!r} is given more than once")
        result[key] = value
    return result


def format_key_value_args(kwargs: Mapping[str, Any]) -> str:
    """``{"weight_decay": 0.1, "betas": (0.9, 0.99)}`` -> ``weight_decay=0.1,betas=(0.9, 0.99)``."""
    return ",".join(f"{key}={value}" for key, value in kwargs.items())


def optimizer_metadata_string(name: str, args_string: str) -> str:
    """The ``ss_optimizer`` value: ``torch.optim.adamw.AdamW(weight_decay=0.1)``."""
    return f"{name}({args_string})" if args_string else name


# --------------------------------------------------------------------------------------
# The built-in name table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinOptimizer:
    """One row of the ``--optimizer_type`` table."""

    name: str  # the spelling shown to users
    module: str
    attr: str
    package: str  # what to ``pip install`` when the import fails
    fixed: Mapping[str, Any] = field(default_factory=dict)  # always passed
    defaults: Mapping[str, Any] = field(default_factory=dict)  # passed unless the user sets them


def _rows() -> List[BuiltinOptimizer]:
    bnb = "bitsandbytes.optim"
    rows = [
        BuiltinOptimizer("AdamW", "torch.optim", "AdamW", "torch"),
        BuiltinOptimizer("AdamW8bit", bnb, "AdamW8bit", "bitsandbytes"),
        BuiltinOptimizer(
            "SGDNesterov8bit", bnb, "SGD8bit", "bitsandbytes", fixed={"nesterov": True}, defaults={"momentum": 0.9}
        ),
        BuiltinOptimizer("Lion8bit", bnb, "Lion8bit", "bitsandbytes"),
        BuiltinOptimizer("PagedAdamW8bit", bnb, "PagedAdamW8bit", "bitsandbytes"),
        BuiltinOptimizer("PagedLion8bit", bnb, "PagedLion8bit", "bitsandbytes"),
        BuiltinOptimizer("PagedAdamW", bnb, "PagedAdamW", "bitsandbytes"),
        BuiltinOptimizer("PagedAdamW32bit", bnb, "PagedAdamW32bit", "bitsandbytes"),
        BuiltinOptimizer(
            "SGDNesterov", "torch.optim", "SGD", "torch", fixed={"nesterov": True}, defaults={"momentum": 0.9}
        ),
        BuiltinOptimizer("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
        BuiltinOptimizer("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
        BuiltinOptimizer("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
        BuiltinOptimizer("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadaptation"),
        BuiltinOptimizer("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation"),
        BuiltinOptimizer("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadaptation"),
        BuiltinOptimizer("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
        BuiltinOptimizer("DAdaptLion", "dadaptation", "DAdaptLion", "dadaptation"),
        BuiltinOptimizer("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadaptation"),
        BuiltinOptimizer("Prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
        BuiltinOptimizer("Adafactor", "transformers.optimization", "Adafactor", "transformers"),
        BuiltinOptimizer("RAdamScheduleFree", "schedulefree", "RAdamScheduleFree", "schedulefree"),
        BuiltinOptimizer("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", "schedulefree"),
        BuiltinOptimizer("SGDScheduleFree", "schedulefree", "SGDScheduleFree", "schedulefree"),
    ]
    return rows


BUILTIN_OPTIMIZERS: Dict[str, BuiltinOptimizer] = {row.name.lower(): row for row in _rows()}
"""Lower-cased ``--optimizer_type`` name -> table row."""

DEFAULT_OPTIMIZER = "AdamW"


def accepted_names_text() -> str:
    """The help line listing every way to name an optimizer."""
    names = ", ".join(row.name for row in BUILTIN_OPTIMIZERS.values())
    return (
        f"use one of {names} (any letter case), a torch.optim class name such as RMSprop, "
        f"or an importable module.Class path such as bitsandbytes.optim.AdEMAMix8bit"
    )


# --------------------------------------------------------------------------------------
# Name resolution
# --------------------------------------------------------------------------------------


def effective_optimizer_type(args: Any) -> str:
    """The optimizer name the options ask for, legacy flags applied (original case).

    ``--use_8bit_adam`` means AdamW8bit and ``--use_lion_optimizer`` means Lion; either
    together with ``--optimizer_type`` (or with each other) is a UserInputError.
    Nothing set means AdamW.
    """
    name = str(getattr(args, "optimizer_type", "") or "").strip()
    use_8bit_adam = bool(getattr(args, "use_8bit_adam", False))
    use_lion = bool(getattr(args, "use_lion_optimizer", False))
    if use_8bit_adam and use_lion:
        raise UserInputError(
            "--use_8bit_adam and --use_lion_optimizer cannot be used together; choose one with --optimizer_type"
        )
    if use_8bit_adam or use_lion:
        legacy, meaning = ("--use_8bit_adam", "AdamW8bit") if use_8bit_adam else ("--use_lion_optimizer", "Lion")
        if name:
            raise UserInputError(
                f"{legacy} cannot be combined with --optimizer_type {name}; drop {legacy} "
                f"(it is the old spelling of --optimizer_type {meaning})"
            )
        return meaning
    return name or DEFAULT_OPTIMIZER


def _import_builtin(row: BuiltinOptimizer) -> type:
    try:
        module = importlib.import_module(row.module)
    except ImportError as error:
        raise UserInputError(
            f"--optimizer_type {row.name} needs the package {row.package!r}, which cannot be imported "
            f"({error}); install it with: pip install {row.package}"
        ) from None
    return getattr(module, row.attr)


def _bitsandbytes_match(name: str) -> Optional[str]:
    """``bitsandbytes.optim.<Class>`` when ``name`` is a bitsandbytes class given without
    its module (``AdEMAMix8bit``), a common slip."""
    if "." in name:
        return None
    try:
        import bitsandbytes.optim as bnb_optim  # noqa: PLC0415
    except Exception:  # missing or broken bitsandbytes: no hint, the error stays clear
        return None
    for attr in dir(bnb_optim):
        if attr.lower() == name.lower() and isinstance(getattr(bnb_optim, attr), type):
            return f"bitsandbytes.optim.{attr}"
    return None


def _unknown_name_error(name: str) -> UserInputError:
    guess = _bitsandbytes_match(name)
    if guess is None:
        close = difflib.get_close_matches(name.lower(), list(BUILTIN_OPTIMIZERS), n=1, cutoff=0.75)
        guess = BUILTIN_OPTIMIZERS[close[0]].name if close else None
    suggestion = f" Did you mean {guess}?" if guess else ""
    return UserInputError(
        f"--optimizer_type {name!r} is not a known optimizer.{suggestion} To fix it, {accepted_names_text()}."
    )


def resolve_optimizer_class(name: Any) -> type:
    """The class for a name outside the built-in table (original spelling).

    Without a dot the name is a ``torch.optim`` attribute (exact spelling first, then
    any letter case, so ``rmsprop`` finds RMSprop). With a dot everything before the
    last dot is imported and the last part is fetched from it.

    Given an options namespace instead of a string, it runs ``check_optimizer_args``
    (the full early check) and returns the class that ``get_optimizer`` will use.
    """
    if not isinstance(name, str):
        return check_optimizer_args(name)
    if "." not in name:
        candidate = getattr(torch.optim, name, None)
        if not (isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer)):
            candidate = None
            for attr in dir(torch.optim):
                value = getattr(torch.optim, attr)
                if (
                    attr.lower() == name.lower()
                    and isinstance(value, type)
                    and issubclass(value, torch.optim.Optimizer)
                ):
                    candidate = value
                    break
        if candidate is None or candidate is torch.optim.Optimizer:
            raise _unknown_name_error(name)
        return candidate

    module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        raise _unknown_name_error(name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserInputError(
            f"--optimizer_type {name}: cannot import module {module_name!r} ({error}); "
            f"install the package that provides it or check the spelling"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise UserInputError(f"--optimizer_type {name}: module {module_name!r} has no attribute {attr!r}")
    if not callable(cls):
        raise UserInputError(f"--optimizer_type {name}: {attr!r} in {module_name!r} is not a class")
    return cls


def lookup_optimizer(name: str) -> Tuple[type, Optional[BuiltinOptimizer]]:
    """``(class, table row or None)`` for an ``--optimizer_type`` value."""
    row = BUILTIN_OPTIMIZERS.get(name.lower())
    if row is not None:
        return _import_builtin(row), row
    lowered = name.lower()
    if lowered.startswith("dadapt"):
        dadapt_names = ", ".join(r.name for r in BUILTIN_OPTIMIZERS.values() if r.name.lower().startswith("dadapt"))
        raise UserInputError(f"--optimizer_type {name!r} is not a D-Adaptation optimizer; use one of {dadapt_names}")
    return resolve_optimizer_class(name), None


# --------------------------------------------------------------------------------------
# Class families with special rules
# --------------------------------------------------------------------------------------


def _class_of(optimizer_or_class: Any) -> type:
    return optimizer_or_class if isinstance(optimizer_or_class, type) else type(optimizer_or_class)


def is_transformers_adafactor(optimizer_or_class: Any) -> bool:
    cls = _class_of(optimizer_or_class)
    return cls.__name__ == "Adafactor" and cls.__module__.split(".")[0] == "transformers"


def is_adaptive_lr(optimizer_or_class: Any) -> bool:
    """D-Adaptation and Prodigy: they estimate a step size ``d``; the lr multiplies it."""
    name = _class_of(optimizer_or_class).__name__.lower()
    return name.startswith("dadapt") or name.startswith("prodigy")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer under wrappers such as accelerate's AcceleratedOptimizer."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def is_schedule_free(optimizer_or_name: Any) -> bool:
    """True for schedule-free optimizers: names ending in ``schedulefree`` (any case).

    Accepts an ``--optimizer_type`` string, an optimizer (wrapped or not) or a class.
    Optimizer objects whose parameter groups carry a ``train_mode`` flag and that have
    ``train()``/``eval()`` (schedule-free wrappers with other names) count too.
    """
    if optimizer_or_name is None:
        return False
    if isinstance(optimizer_or_name, str):
        return optimizer_or_name.strip().lower().endswith("schedulefree")
    inner = unwrap_optimizer(optimizer_or_name)
    if _class_of(inner).__name__.lower().endswith("schedulefree"):
        return True
    if isinstance(inner, type):
        return False
    groups = getattr(inner, "param_groups", None) or []
    return (
        callable(getattr(inner, "train", None))
        and callable(getattr(inner, "eval", None))
        and any(isinstance(g, dict) and "train_mode" in g for g in groups)
    )


def _switch_mode(optimizer: Any, method: str) -> bool:
    if optimizer is None or not is_schedule_free(optimizer):
        return False
    inner = unwrap_optimizer(optimizer)
    switch = getattr(inner, method, None)
    if not callable(switch):
        return False
    switch()
    return True


def optimizer_train_mode(optimizer: Any) -> bool:
    """Put a schedule-free optimizer's parameters in training mode; returns whether it did."""
    return _switch_mode(optimizer, "train")


def optimizer_eval_mode(optimizer: Any) -> bool:
    """Put a schedule-free optimizer's parameters in evaluation mode (for sampling,
    validation and saving); returns whether it did."""
    return _switch_mode(optimizer, "eval")


@contextlib.contextmanager
def optimizer_eval_context(optimizer: Any) -> Iterator[None]:
    """``with optimizer_eval_context(opt): save(...)`` -- eval weights inside, train after."""
    switched = optimizer_eval_mode(optimizer)
    try:
        yield
    finally:
        if switched:
            optimizer_train_mode(optimizer)


# --------------------------------------------------------------------------------------
# --fused_backward_pass
# --------------------------------------------------------------------------------------


def _names_adafactor(name: str) -> bool:
    lowered = name.lower()
    return lowered == "adafactor" or (lowered.startswith("transformers.") and lowered.endswith(".adafactor"))


def check_fused_backward_pass(args: Any) -> None:
    """``--fused_backward_pass`` works with Adafactor only and without gradient accumulation."""
    if not getattr(args, "fused_backward_pass", False):
        return
    name = effective_optimizer_type(args)
    if not _names_adafactor(name):
        raise UserInputError(
            f"--fused_backward_pass needs --optimizer_type Adafactor (got {name}); "
            f"drop --fused_backward_pass or switch to Adafactor"
        )
    accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
    if accumulation != 1:
        raise UserInputError(
            f"--fused_backward_pass cannot be used with gradient accumulation "
            f"(--gradient_accumulation_steps {accumulation}); set it to 1"
        )


# --------------------------------------------------------------------------------------
# Early check
# --------------------------------------------------------------------------------------


def check_optimizer_args(args: Any) -> type:
    """Everything about the optimizer and schedule options that can be checked before
    models load: the optimizer name resolves (its package imports), ``--optimizer_args``
    and ``--lr_scheduler_args`` parse, ``--fused_backward_pass`` is allowed, and the
    schedule name and warmup fit together. Returns the optimizer class."""
    name = effective_optimizer_type(args)
    check_fused_backward_pass(args)
    kwargs = parse_key_value_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    if "lr" in kwargs:
        raise UserInputError("--optimizer_args: do not set lr there; use --learning_rate")
    cls, _ = lookup_optimizer(name)
    from library.training.lr_schedulers import check_scheduler_args  # noqa: PLC0415

    # Adafactor with relative_step replaces --lr_scheduler by its own proxy schedule.
    replaced = is_schedule_free(cls) or (
        is_transformers_adafactor(cls) and bool(kwargs.get("relative_step", True) or kwargs.get("warmup_init", False))
    )
    check_scheduler_args(args, schedule_replaced=replaced)
    return cls


# --------------------------------------------------------------------------------------
# get_optimizer
# --------------------------------------------------------------------------------------


def _param_groups(trainable_params: Iterable[Any]) -> List[Any]:
    """A list of tensors or of param-group dicts (copied, so callers' dicts stay intact)."""
    items = list(trainable_params)
    return [dict(item) if isinstance(item, dict) else item for item in items]


def _group_lrs(params: List[Any], default_lr: Optional[float]) -> List[Optional[float]]:
    return [item.get("lr", default_lr) if isinstance(item, dict) else default_lr for item in params]


def _apply_adafactor_rules(kwargs: Dict[str, Any], params: List[Any], args: Any, lr: Optional[float]):
    """relative_step handling; returns the lr to pass to the constructor."""
    if "relative_step" not in kwargs:
        kwargs["relative_step"] = True
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.warning("Adafactor: warmup_init=True only works with relative_step=True; setting relative_step=True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return lr

    logger.info("Adafactor with relative_step=True computes its own step size; the optimizer gets lr=None")
    dropped = False
    for item in params:
        if isinstance(item, dict) and "lr" in item:
            del item["lr"]
            dropped = True
    if dropped:
        logger.warning(
            "Adafactor with relative_step=True ignores per-group learning rates (--unet_lr, --text_encoder_lr, ...)"
        )
    scheduler = str(getattr(args, "lr_scheduler", "") or "")
    if not scheduler.lower().startswith("adafactor"):
        new_scheduler = f"adafactor:{lr}"
        logger.info(
            f"Adafactor with relative_step=True: --lr_scheduler {scheduler or 'constant'} is replaced by "
            f"{new_scheduler} (a proxy that reports Adafactor's own learning rate)"
        )
        args.lr_scheduler = new_scheduler
    return None


def _warn_adaptive_lrs(cls: type, params: List[Any], lr: Optional[float]) -> None:
    lrs = [x for x in _group_lrs(params, lr) if x is not None]
    if not lrs:
        return
    if min(lrs) <= 0.1:
        logger.warning(
            f"{cls.__name__} adapts its own step size; the learning rate is a multiplier of it and is "
            f"usually 1.0 (got {min(lrs)})"
        )
    if len(set(lrs)) > 1:
        logger.warning(
            f"{cls.__name__}: parameter groups have different learning rates {sorted(set(lrs))}; they scale one "
            f"shared adapted step size and the largest one drives its estimate; equal values (1.0) are usual"
        )


def get_optimizer(args: Any, trainable_params: Iterable[Any]) -> Tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer the options ask for.

    ``trainable_params`` is an iterable of tensors or of param-group dicts
    (``{"params": [...], "lr": 1e-4}``). Returns ``(name, args_string, optimizer)``:
    ``name`` is ``<module>.<Class>`` of the class used, ``args_string`` the keyword
    arguments passed besides ``lr`` (``k=v,...``). May rewrite ``args.lr_scheduler``
    (Adafactor with ``relative_step=True``). Schedule-free optimizers are returned in
    training mode.
    """
    name = effective_optimizer_type(args)
    check_fused_backward_pass(args)
    kwargs = parse_key_value_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    if "lr" in kwargs:
        raise UserInputError("--optimizer_args: do not set lr there; use --learning_rate")
    cls, row = lookup_optimizer(name)
    lr: Optional[float] = getattr(args, "learning_rate", None)
    params = _param_groups(trainable_params)

    if row is not None:
        for key, value in row.fixed.items():
            if key in kwargs and kwargs[key] != value:
                raise UserInputError(
                    f"--optimizer_args {key}={kwargs[key]!r}: --optimizer_type {row.name} always uses "
                    f"{key}={value!r}; pick another optimizer to change it"
                )
        for key, value in row.defaults.items():
            kwargs.setdefault(key, value)
        for key, value in row.fixed.items():
            kwargs[key] = value

    if is_transformers_adafactor(cls):
        lr = _apply_adafactor_rules(kwargs, params, args, lr)
    elif is_adaptive_lr(cls):
        _warn_adaptive_lrs(cls, params, lr)

    display = f"{cls.__module__}.{cls.__name__}"
    logger.info(f"optimizer: {display} | lr={lr} | {format_key_value_args(kwargs) or 'no extra arguments'}")
    try:
        optimizer = cls(params, lr=lr, **kwargs)
    except (TypeError, ValueError) as error:
        raise UserInputError(
            f"--optimizer_type {name} / --optimizer_args: {display} rejected the settings: {error}"
        ) from error

    if is_schedule_free(optimizer):
        optimizer_train_mode(optimizer)
    return display, format_key_value_args(kwargs), optimizer


# The schedule and step helpers live in lr_schedulers (which imports this module); they
# are reachable from here too, loaded on first use, so a trainer can import one module.
_FROM_LR_SCHEDULERS = (
    "get_scheduler",
    "current_learning_rates",
    "report_loss",
    "compute_max_train_steps",
    "num_train_epochs",
    "save_every_n_epochs_from_ratio",
    "update_steps_per_epoch",
)


def __getattr__(name: str) -> Any:
    if name in _FROM_LR_SCHEDULERS:
        from library.training import lr_schedulers  # noqa: PLC0415

        return getattr(lr_schedulers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILTIN_OPTIMIZERS",
    "check_optimizer_args",
    "BuiltinOptimizer",
    "accepted_names_text",
    "check_fused_backward_pass",
    "effective_optimizer_type",
    "format_key_value_args",
    "get_optimizer",
    "is_adaptive_lr",
    "is_schedule_free",
    "is_transformers_adafactor",
    "lookup_optimizer",
    "optimizer_eval_context",
    "optimizer_eval_mode",
    "optimizer_metadata_string",
    "optimizer_train_mode",
    "parse_key_value_args",
    "resolve_optimizer_class",
    "unwrap_optimizer",
]
