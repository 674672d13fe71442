"""Learning-rate schedules (``--lr_scheduler`` and friends) and the step arithmetic.

The trainer calls:

* ``get_scheduler(args, optimizer, num_processes) -> scheduler``;
* ``report_loss(scheduler, loss)`` once per optimizer step, before ``scheduler.step()``
  (only ``reduce_lr_on_plateau`` uses it; for every other schedule it does nothing);
* ``current_learning_rates(scheduler, optimizer) -> list[float]`` for logging;
* ``compute_max_train_steps``, ``num_train_epochs``, ``save_every_n_epochs_from_ratio``.

Counting steps
--------------
``num_processes`` is how many times the scheduler is stepped per optimizer step.
accelerate's prepared scheduler (``accelerator.prepare(scheduler)`` without
``split_batches``) steps the wrapped scheduler once per process, so pass
``accelerator.num_processes`` when the scheduler goes through ``prepare`` and 1 when
the trainer steps it itself. All schedule lengths are then scaled so that they mean
*optimizer steps* whatever the number of processes: the total ``T = max_train_steps
x num_processes`` scheduler steps; warmup and decay counts, ``--lr_scheduler_timescale``,
the plateau ``interval`` and ``piecewise_constant`` step boundaries are multiplied by
``num_processes`` as well. (A ratio such as ``0.1`` or ``10%`` becomes
``int(ratio x T)``.) The reference multiplied only the total, so there an integer
warmup of 100 lasted 50 optimizer steps on two processes; here it lasts 100.

Heavy libraries (transformers, diffusers) are imported when a schedule needs them.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from library.args.types import int_or_float
from library.errors import UserInputError
from library.training.optimizers import (
    format_key_value_args,
    is_adaptive_lr,
    is_schedule_free,
    is_transformers_adafactor,
    parse_key_value_args,
    unwrap_optimizer,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Step arithmetic (cli-options §3.4)
# --------------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def update_steps_per_epoch(num_batches: int, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps in one epoch: ``ceil(num_batches / num_processes / accumulation)``.

    ``num_batches`` is the length of the data loader before accelerate shards it.
    """
    return _ceil_div(num_batches, max(1, num_processes) * max(1, gradient_accumulation_steps))


def compute_max_train_steps(args: Any, num_batches: int, num_processes: int = 1) -> int:
    """``--max_train_steps``, or ``E x ceil(batches / processes / accumulation)`` when
    ``--max_train_epochs E`` is given (it takes precedence). Does not modify ``args``."""
    epochs = getattr(args, "max_train_epochs", None)
    if epochs:
        if epochs < 0:
            raise UserInputError(f"--max_train_epochs must be positive (got {epochs})")
        accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
        return int(epochs) * update_steps_per_epoch(num_batches, num_processes, accumulation)
    steps = getattr(args, "max_train_steps", None)
    if steps is None or steps <= 0:
        raise UserInputError(f"--max_train_steps must be a positive number of steps (got {steps})")
    return int(steps)


def num_train_epochs(
    max_train_steps: int, num_batches: int, num_processes: int = 1, gradient_accumulation_steps: int = 1
) -> int:
    """Epochs needed for ``max_train_steps``: ``ceil(max_train_steps / ceil(b / accumulation))``
    where ``b = ceil(num_batches / num_processes)`` is one process' share of the batches
    (the length of accelerate's sharded loader). Passing the sharded length with
    ``num_processes=1`` gives the same result."""
    per_process = _ceil_div(num_batches, max(1, num_processes))
    per_epoch = max(1, _ceil_div(per_process, max(1, gradient_accumulation_steps)))
    return _ceil_div(max_train_steps, per_epoch)


def save_every_n_epochs_from_ratio(num_epochs: int, save_n_epoch_ratio: Optional[int]) -> Optional[int]:
    """``--save_n_epoch_ratio N``: save ``N`` times over the run, i.e. every
    ``max(1, floor(num_epochs / N))`` epochs. ``None`` when the option is unset."""
    if not save_n_epoch_ratio:
        return None
    if save_n_epoch_ratio < 0:
        raise UserInputError(f"--save_n_epoch_ratio must be positive (got {save_n_epoch_ratio})")
    return max(1, math.floor(num_epochs / save_n_epoch_ratio))


# --------------------------------------------------------------------------------------
# Schedulers of our own
# --------------------------------------------------------------------------------------


class NoOpScheduler(LRScheduler):
    """Leaves every learning rate as it is. Used for schedule-free optimizers, which
    schedule internally. It is a real LRScheduler, so accelerate prepares, saves and
    restores it like any other."""

    def get_lr(self) -> List[float]:  # type: ignore[override]
        return [group["lr"] for group in self.optimizer.param_groups]


class LossPlateauScheduler(ReduceLROnPlateau):
    """``reduce_lr_on_plateau`` that works with a loop calling ``step()`` without arguments.

    The loop reports training losses with ``report_loss(loss)`` (or the module-level
    ``report_loss(scheduler, loss)``). Every ``interval`` calls of ``step()`` the mean of
    the losses reported since the last check is handed to torch's ReduceLROnPlateau,
    so ``patience`` and ``cooldown`` count checks, not single noisy steps. ``step(x)``
    with an explicit metric checks immediately (e.g. a validation loss).

    In multi-process training report the same value on every process (a loss
    averaged over processes), or the processes' learning rates drift apart.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, interval: int = 1, **kwargs: Any):
        if int(interval) < 1:
            raise ValueError(f"interval must be at least 1 (got {interval})")
        super().__init__(optimizer, **kwargs)
        self.interval = int(interval)
        self.loss_sum = 0.0
        self.loss_count = 0
        self.calls = 0
        self.warned_no_loss = False

    def report_loss(self, loss: Any) -> None:
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        if math.isfinite(value):
            self.loss_sum += value
            self.loss_count += 1

    def step(self, metrics: Any = None, epoch: Any = None) -> None:  # type: ignore[override]
        if metrics is not None:
            super().step(metrics)
            return
        self.calls += 1
        if self.calls % self.interval:
            return
        if self.loss_count == 0:
            if not self.warned_no_loss:
                logger.warning("reduce_lr_on_plateau received no loss values, so it cannot reduce the learning rate")
                self.warned_no_loss = True
            return
        mean = self.loss_sum / self.loss_count
        self.loss_sum = 0.0
        self.loss_count = 0
        super().step(mean)


def report_loss(scheduler: Any, loss: Any) -> None:
    """Give the current training loss to schedulers that use it (reduce_lr_on_plateau);
    a no-op for all others. Accepts accelerate's wrapped scheduler."""
    inner = getattr(scheduler, "scheduler", scheduler)
    receiver = getattr(inner, "report_loss", None)
    if callable(receiver):
        receiver(loss)


# --------------------------------------------------------------------------------------
# Step values (--lr_warmup_steps / --lr_decay_steps)
# --------------------------------------------------------------------------------------


def scheduler_steps(value: Any, option: str, max_train_steps: int, num_processes: int = 1) -> int:
    """Scheduler steps for a warmup/decay value: an int count (optimizer steps, times
    ``num_processes``), or a ratio (float below 1, or ``"10%"`` from a TOML file)
    giving ``int(ratio x max_train_steps x num_processes)``."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise UserInputError(f"{option}: {value!r} is not a step count or ratio")
    if isinstance(value, str):
        try:
            value = int_or_float(value)
        except argparse.ArgumentTypeError as error:
            raise UserInputError(f"{option}: {error}") from None
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise UserInputError(f"{option}: {value!r} is not a step count or ratio")
    if value < 0:
        raise UserInputError(f"{option} must not be negative (got {value})")
    total = max_train_steps * num_processes
    if isinstance(value, float):
        if value < 1:
            return int(value * total)
        if not value.is_integer():
            raise UserInputError(
                f"{option}: {value} is neither a whole step count nor a ratio below 1; write e.g. 100, 0.1 or 10%"
            )
        value = int(value)
    return int(value) * num_processes


# --------------------------------------------------------------------------------------
# get_scheduler
# --------------------------------------------------------------------------------------


class _Plan:
    """Everything a schedule builder needs."""

    def __init__(self, args: Any, optimizer: Any, num_processes: int, user_kwargs: Dict[str, Any]):
        self.args = args
        self.optimizer = optimizer
        self.num_processes = num_processes
        self.user_kwargs = user_kwargs
        max_steps = getattr(args, "max_train_steps", None)
        if max_steps is None or max_steps <= 0:
            raise UserInputError(f"--max_train_steps must be a positive number of steps (got {max_steps})")
        self.max_train_steps = int(max_steps)
        self.total = self.max_train_steps * num_processes
        self.warmup = scheduler_steps(getattr(args, "lr_warmup_steps", 0), "--lr_warmup_steps", self.max_train_steps, num_processes)
        self.decay = scheduler_steps(getattr(args, "lr_decay_steps", 0), "--lr_decay_steps", self.max_train_steps, num_processes)

    def kwargs(self, name: str, computed: Dict[str, Any]) -> Dict[str, Any]:
        """Computed arguments, overridden by --lr_scheduler_args with a note."""
        merged = dict(computed)
        for key, value in self.user_kwargs.items():
            if key in merged and merged[key] != value:
                logger.info(f"--lr_scheduler_args {key}={value!r} replaces {merged[key]!r} for {name}")
            merged[key] = value
        return merged


def _call(name: str, builder: Callable, optimizer: Any, kwargs: Dict[str, Any]):
    try:
        return builder(optimizer, **kwargs)
    except (TypeError, ValueError) as error:
        raise UserInputError(
            f"--lr_scheduler {name}: the schedule rejected its settings ({format_key_value_args(kwargs)}): {error}"
        ) from error


def _transformers():
    import transformers.optimization as transformers_optimization  # noqa: PLC0415

    return transformers_optimization


def _reject_warmup(plan: _Plan, name: str, hint: str) -> None:
    if plan.warmup:
        raise UserInputError(f"--lr_scheduler {name} has no warmup; {hint} (got --lr_warmup_steps {plan.args.lr_warmup_steps})")


def _min_lr_kwargs(plan: _Plan, name: str) -> Dict[str, Any]:
    ratio = getattr(plan.args, "lr_scheduler_min_lr_ratio", None)
    user_has = [k for k in ("min_lr", "min_lr_rate") if k in plan.user_kwargs]
    if ratio is not None:
        _check_ratio(ratio)
        if user_has:
            raise UserInputError(
                f"--lr_scheduler {name}: give the minimum either with --lr_scheduler_min_lr_ratio or with "
                f"--lr_scheduler_args {user_has[0]}=..., not both"
            )
        return {"min_lr_rate": float(ratio)}
    if not user_has:
        raise UserInputError(
            f"--lr_scheduler {name} needs --lr_scheduler_min_lr_ratio (the final lr as a fraction of the "
            f"initial one, e.g. 0.1)"
        )
    return {}


def _check_ratio(ratio: Any) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio <= 1:
        raise UserInputError(f"--lr_scheduler_min_lr_ratio must be between 0 and 1 (got {ratio!r})")


def _build_constant(plan: _Plan, name: str):
    _reject_warmup(plan, name, "use --lr_scheduler constant_with_warmup for a warmup")
    return _call(name, _transformers().get_constant_schedule, plan.optimizer, plan.kwargs(name, {}))


def _build_constant_with_warmup(plan: _Plan, name: str):
    kwargs = plan.kwargs(name, {"num_warmup_steps": plan.warmup})
    return _call(name, _transformers().get_constant_schedule_with_warmup, plan.optimizer, kwargs)


def _build_linear(plan: _Plan, name: str):
    kwargs = plan.kwargs(name, {"num_warmup_steps": plan.warmup, "num_training_steps": plan.total})
    return _call(name, _transformers().get_linear_schedule_with_warmup, plan.optimizer, kwargs)


def _build_cosine(plan: _Plan, name: str):
    kwargs = plan.kwargs(name, {"num_warmup_steps": plan.warmup, "num_training_steps": plan.total})
    return _call(name, _transformers().get_cosine_schedule_with_warmup, plan.optimizer, kwargs)


def _num_cycles(plan: _Plan) -> int:
    cycles = getattr(plan.args, "lr_scheduler_num_cycles", 1)
    return 1 if cycles is None else cycles


def _build_cosine_with_restarts(plan: _Plan, name: str):
    kwargs = plan.kwargs(
        name,
        {"num_warmup_steps": plan.warmup, "num_training_steps": plan.total, "num_cycles": _num_cycles(plan)},
    )
    return _call(name, _transformers().get_cosine_with_hard_restarts_schedule_with_warmup, plan.optimizer, kwargs)


def _build_polynomial(plan: _Plan, name: str):
    power = getattr(plan.args, "lr_scheduler_power", 1.0)
    kwargs = plan.kwargs(
        name,
        {
            "num_warmup_steps": plan.warmup,
            "num_training_steps": plan.total,
            "power": 1.0 if power is None else float(power),
        },
    )
    return _call(name, _transformers().get_polynomial_decay_schedule_with_warmup, plan.optimizer, kwargs)


def _build_inverse_sqrt(plan: _Plan, name: str):
    timescale = getattr(plan.args, "lr_scheduler_timescale", None)
    computed: Dict[str, Any] = {"num_warmup_steps": plan.warmup}
    if timescale is not None:
        if timescale <= 0:
            raise UserInputError(f"--lr_scheduler_timescale must be positive (got {timescale})")
        computed["timescale"] = int(timescale) * plan.num_processes
    return _call(name, _transformers().get_inverse_sqrt_schedule, plan.optimizer, plan.kwargs(name, computed))


def _build_cosine_with_min_lr(plan: _Plan, name: str):
    computed = {
        "num_warmup_steps": plan.warmup,
        "num_training_steps": plan.total,
        "num_cycles": _num_cycles(plan) / 2,
        **_min_lr_kwargs(plan, name),
    }
    builder = _transformers().get_cosine_with_min_lr_schedule_with_warmup
    return _call(name, builder, plan.optimizer, plan.kwargs(name, computed))


def _build_cosine_warmup_with_min_lr(plan: _Plan, name: str):
    computed = {
        "num_warmup_steps": plan.warmup,
        "num_training_steps": plan.total,
        "num_cycles": _num_cycles(plan) / 2,
        **_min_lr_kwargs(plan, name),
    }
    builder = _transformers().get_cosine_with_min_lr_schedule_with_warmup_lr_rate
    return _call(name, builder, plan.optimizer, plan.kwargs(name, computed))


def _build_warmup_stable_decay(plan: _Plan, name: str):
    if plan.warmup + plan.decay > plan.total:
        raise UserInputError(
            f"--lr_scheduler {name}: warmup ({plan.warmup}) plus decay ({plan.decay}) scheduler steps exceed the "
            f"{plan.total} steps of training; shorten --lr_warmup_steps or --lr_decay_steps"
        )
    if plan.decay == 0:
        logger.warning(f"--lr_scheduler {name} with --lr_decay_steps 0 never decays; give e.g. --lr_decay_steps 0.2")
    ratio = getattr(plan.args, "lr_scheduler_min_lr_ratio", None)
    if ratio is not None:
        _check_ratio(ratio)
    computed = {
        "num_warmup_steps": plan.warmup,
        "num_stable_steps": plan.total - plan.warmup - plan.decay,
        "num_decay_steps": plan.decay,
        "num_cycles": _num_cycles(plan) / 2,
        "min_lr_ratio": 0.0 if ratio is None else float(ratio),
    }
    return _call(name, _transformers().get_wsd_schedule, plan.optimizer, plan.kwargs(name, computed))


def _plateau_kwargs(plan: _Plan) -> Dict[str, Any]:
    kwargs = dict(plan.user_kwargs)
    if "interval" in kwargs:
        interval = kwargs["interval"]
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise UserInputError(f"--lr_scheduler_args interval must be a whole number of steps >= 1 (got {interval!r})")
        kwargs["interval"] = interval * plan.num_processes
    else:
        kwargs["interval"] = max(1, plan.max_train_steps // 100) * plan.num_processes
    return kwargs


def _build_reduce_lr_on_plateau(plan: _Plan, name: str):
    _reject_warmup(plan, name, "drop --lr_warmup_steps")
    return _call(name, LossPlateauScheduler, plan.optimizer, _plateau_kwargs(plan))


def _scaled_step_rules(rules: Any, factor: int) -> str:
    """Multiply the step boundaries of a diffusers ``step_rules`` string by ``factor``."""
    if not isinstance(rules, str) or not rules.strip():
        raise UserInputError(
            "--lr_scheduler piecewise_constant needs --lr_scheduler_args \"step_rules='1:100,0.5:200,0.1'\" "
            "(multiplier:until_step pairs, then the final multiplier)"
        )
    parts = [p.strip() for p in rules.split(",")]
    out = []
    try:
        for part in parts[:-1]:
            multiplier, _, until = part.partition(":")
            float(multiplier)
            out.append(f"{multiplier.strip()}:{int(until) * factor}")
        float(parts[-1])
    except ValueError:
        raise UserInputError(
            f"--lr_scheduler_args step_rules={rules!r} is malformed; expected e.g. '1:100,0.5:200,0.1' "
            f"(multiplier:until_step pairs, then the final multiplier)"
        ) from None
    out.append(parts[-1])
    return ",".join(out)


def _build_piecewise_constant(plan: _Plan, name: str):
    if plan.warmup:
        logger.warning(f"--lr_scheduler {name} has no warmup; --lr_warmup_steps is ignored")
    kwargs = dict(plan.user_kwargs)
    kwargs["step_rules"] = _scaled_step_rules(kwargs.get("step_rules"), plan.num_processes)
    from diffusers.optimization import get_piecewise_constant_schedule  # noqa: PLC0415

    return _call(name, get_piecewise_constant_schedule, plan.optimizer, kwargs)


def _build_adafactor(plan: _Plan, name: str):
    optimizer = unwrap_optimizer(plan.optimizer)
    if not is_transformers_adafactor(optimizer):
        raise UserInputError(
            f"--lr_scheduler {name} only works with --optimizer_type Adafactor (got {type(optimizer).__name__})"
        )
    _, sep, value = name.partition(":")
    if sep:
        try:
            initial_lr = float(value)
        except ValueError:
            raise UserInputError(f"--lr_scheduler {name}: {value!r} after 'adafactor:' is not a number") from None
    else:
        initial_lr = float(getattr(plan.args, "learning_rate", 0.0) or 0.0)
    if plan.warmup:
        logger.warning("--lr_scheduler adafactor ignores --lr_warmup_steps (Adafactor's warmup_init=True warms up)")
    kwargs = plan.kwargs("adafactor", {"initial_lr": initial_lr})
    return _call(name, _transformers().AdafactorSchedule, optimizer, kwargs)


SCHEDULERS: Dict[str, Callable[[_Plan, str], Any]] = {
    "constant": _build_constant,
    "constant_with_warmup": _build_constant_with_warmup,
    "linear": _build_linear,
    "cosine": _build_cosine,
    "cosine_with_restarts": _build_cosine_with_restarts,
    "polynomial": _build_polynomial,
    "inverse_sqrt": _build_inverse_sqrt,
    "cosine_with_min_lr": _build_cosine_with_min_lr,
    "cosine_warmup_with_min_lr": _build_cosine_warmup_with_min_lr,
    "warmup_stable_decay": _build_warmup_stable_decay,
    "reduce_lr_on_plateau": _build_reduce_lr_on_plateau,
    "piecewise_constant": _build_piecewise_constant,
    "adafactor": _build_adafactor,
}
"""``--lr_scheduler`` name -> builder. ``adafactor:<lr>`` goes to the ``adafactor`` builder."""

_USES_DECAY = {"warmup_stable_decay"}


def scheduler_names_text() -> str:
    return ", ".join(list(SCHEDULERS) + ["adafactor:<lr>"])


def resolve_scheduler_class(name: str) -> type:
    """``--lr_scheduler_type``: a torch.optim.lr_scheduler name or an importable module.Class."""
    import importlib  # noqa: PLC0415

    if "." not in name:
        cls = getattr(torch.optim.lr_scheduler, name, None)
        if not isinstance(cls, type):
            raise UserInputError(
                f"--lr_scheduler_type {name!r} is not a class in torch.optim.lr_scheduler; give e.g. "
                f"CosineAnnealingLR or an importable module.Class path"
            )
        return cls
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserInputError(f"--lr_scheduler_type {name}: cannot import module {module_name!r} ({error})") from None
    cls = getattr(module, attr, None)
    if cls is None or not callable(cls):
        raise UserInputError(f"--lr_scheduler_type {name}: module {module_name!r} has no class {attr!r}")
    return cls


def _build_custom(plan: _Plan, type_name: str):
    if plan.warmup:
        raise UserInputError(
            f"--lr_scheduler_type {type_name} cannot be combined with --lr_warmup_steps "
            f"{plan.args.lr_warmup_steps}; set the warmup through the class's own --lr_scheduler_args if it has one"
        )
    cls = resolve_scheduler_class(type_name)
    if cls is ReduceLROnPlateau:
        logger.info(
            "--lr_scheduler_type ReduceLROnPlateau: fed with the training loss (see reduce_lr_on_plateau in "
            "docs/optimizers.md)"
        )
        return _call(type_name, LossPlateauScheduler, plan.optimizer, _plateau_kwargs(plan))
    logger.info(f"lr scheduler: {cls.__module__}.{cls.__name__}({format_key_value_args(plan.user_kwargs)})")
    try:
        return cls(plan.optimizer, **plan.user_kwargs)
    except (TypeError, ValueError) as error:
        raise UserInputError(f"--lr_scheduler_type {type_name} / --lr_scheduler_args rejected: {error}") from error


def _nonzero(value: Any) -> bool:
    if value is None or value == 0 or value == "":
        return False
    if isinstance(value, str):
        try:
            return int_or_float(value) != 0
        except argparse.ArgumentTypeError:
            return True  # malformed: get_scheduler will say so
    return True


def check_scheduler_args(args: Any, schedule_replaced: bool = False) -> None:
    """Early check of the schedule options (nothing is built, no total step count needed):
    ``--lr_scheduler_args`` parse, the name is known or ``--lr_scheduler_type`` resolves,
    and schedules without a warmup are not given one. Schedule-free optimizers ignore
    all of it, so nothing is checked for them beyond the argument syntax; the same holds
    when ``schedule_replaced`` (Adafactor with relative_step sets its own schedule)."""
    parse_key_value_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    if schedule_replaced or is_schedule_free(getattr(args, "optimizer_type", None)):
        return
    warmup = getattr(args, "lr_warmup_steps", 0)
    type_name = str(getattr(args, "lr_scheduler_type", None) or "").strip()
    if type_name:
        resolve_scheduler_class(type_name)
        if _nonzero(warmup):
            raise UserInputError(f"--lr_scheduler_type {type_name} cannot be combined with --lr_warmup_steps {warmup}")
        return
    name = str(getattr(args, "lr_scheduler", None) or "constant").strip().lower()
    base = "adafactor" if name.startswith("adafactor:") else name
    if base not in SCHEDULERS:
        raise UserInputError(f"--lr_scheduler {name!r} is not a known schedule; use one of {scheduler_names_text()}")
    if base == "constant" and _nonzero(warmup):
        raise UserInputError(
            f"--lr_scheduler constant has no warmup; use --lr_scheduler constant_with_warmup for a warmup "
            f"(got --lr_warmup_steps {warmup})"
        )
    if base == "reduce_lr_on_plateau" and _nonzero(warmup):
        raise UserInputError(f"--lr_scheduler reduce_lr_on_plateau has no warmup; drop --lr_warmup_steps {warmup}")


def get_scheduler(args: Any, optimizer: torch.optim.Optimizer, num_processes: int = 1) -> Any:
    """The LR scheduler for ``--lr_scheduler`` / ``--lr_scheduler_type`` (see module doc).

    Order: schedule-free optimizer -> NoOpScheduler; ``--lr_scheduler_type`` -> that
    class; otherwise the ``--lr_scheduler`` name (any letter case).
    """
    num_processes = max(1, int(num_processes or 1))
    user_kwargs = parse_key_value_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    name = str(getattr(args, "lr_scheduler", None) or "constant").strip()
    type_name = str(getattr(args, "lr_scheduler_type", None) or "").strip()

    if is_schedule_free(optimizer) or is_schedule_free(getattr(args, "optimizer_type", None)):
        asked = type_name or (name if name.lower() != "constant" else "")
        if asked or getattr(args, "lr_warmup_steps", 0):
            logger.warning(
                f"schedule-free optimizers schedule themselves: --lr_scheduler/--lr_scheduler_type/--lr_warmup_steps "
                f"are ignored (use --optimizer_args warmup_steps=N for a warmup)"
            )
        return NoOpScheduler(unwrap_optimizer(optimizer))

    plan = _Plan(args, optimizer, num_processes, user_kwargs)
    if plan.warmup > plan.total:
        logger.warning(
            f"--lr_warmup_steps ({plan.warmup} scheduler steps) is longer than training ({plan.total}); "
            f"the learning rate never reaches its full value"
        )
    if type_name:
        return _build_custom(plan, type_name)

    key = name.lower()
    base = "adafactor" if key.startswith("adafactor:") else key
    builder = SCHEDULERS.get(base)
    if builder is None:
        raise UserInputError(f"--lr_scheduler {name!r} is not a known schedule; use one of {scheduler_names_text()}")
    if plan.decay and base not in _USES_DECAY:
        logger.warning(f"--lr_decay_steps is only used by warmup_stable_decay; --lr_scheduler {base} ignores it")
    logger.info(
        f"lr scheduler: {base} | total {plan.total} scheduler steps, warmup {plan.warmup}"
        + (f", decay {plan.decay}" if base in _USES_DECAY else "")
        + (f" ({num_processes} per optimizer step)" if num_processes > 1 else "")
    )
    return builder(plan, key if base == "adafactor" else base)


# --------------------------------------------------------------------------------------
# Logging helper
# --------------------------------------------------------------------------------------


def _adafactor_lrs(optimizer: Any) -> List[float]:
    lrs = []
    for group in optimizer.param_groups:
        params = group["params"]
        state = optimizer.state.get(params[0]) if params else None
        if state and "step" in state and "RMS" in state:
            lrs.append(optimizer._get_lr(group, state))
        else:
            lrs.append(group.get("lr") or group.get("initial_lr") or 0.0)
    return lrs


def current_learning_rates(scheduler: Any, optimizer: Any) -> List[float]:
    """One learning rate per parameter group, as it acts on the weights.

    D-Adaptation and Prodigy report ``lr x d`` (their adapted step size); Adafactor
    with ``relative_step`` reports the step size it computes; schedule-free optimizers
    report their internally warmed-up lr. Accepts accelerate-wrapped objects.
    """
    inner = unwrap_optimizer(optimizer)
    sched = getattr(scheduler, "scheduler", scheduler)
    groups = inner.param_groups
    if is_transformers_adafactor(inner):
        lrs = _adafactor_lrs(inner)
    elif sched is not None and hasattr(sched, "get_last_lr"):
        try:
            lrs = list(sched.get_last_lr())
        except (AttributeError, RuntimeError):
            lrs = [g["lr"] for g in groups]
    else:
        lrs = [g["lr"] for g in groups]
    if len(lrs) != len(groups):
        lrs = [g["lr"] for g in groups]

    if is_schedule_free(inner):
        lrs = [g.get("scheduled_lr") or lr for g, lr in zip(groups, lrs)]
    if is_adaptive_lr(inner):
        lrs = [lr * g.get("d", 1.0) for g, lr in zip(groups, lrs)]
    return [float(x) for x in lrs]


__all__ = [
    "LossPlateauScheduler",
    "NoOpScheduler",
    "SCHEDULERS",
    "check_scheduler_args",
    "compute_max_train_steps",
    "current_learning_rates",
    "get_scheduler",
    "num_train_epochs",
    "report_loss",
    "resolve_scheduler_class",
    "save_every_n_epochs_from_ratio",
    "scheduler_names_text",
    "scheduler_steps",
    "update_steps_per_epoch",
]
