"""Optimizer steps inside the backward pass: `--fused_backward_pass` and `--fused_optimizer_groups`.

Plain training keeps every gradient until backward ends, then steps: peak memory holds
the weights plus a full set of gradients. Here a parameter (or a group of parameters) is
updated from a post-accumulate-grad hook the moment its gradient is complete, and the
gradient is released at once, so only a few gradients exist at any time.

* ``FusedBackwardPass(optimizer, ...)``: one update per parameter tensor, done by the
  optimizer's own ``step()`` run on a one-parameter view of the tensor's group, so the
  arithmetic is exactly the optimizer's (the spec allows Adafactor only: its update of one
  tensor depends on nothing but that tensor). bf16 weights (``--full_bf16``) are updated
  in float32 and written back with stochastic rounding (`copy_stochastic_`), so updates
  smaller than bf16's resolution are not all lost.
* ``FusedOptimizerGroups(optimizers, ...)``: the parameters split into N optimizers
  (``split_param_groups``); an optimizer steps when the last gradient of its parameters
  has arrived, then frees them. Works with any optimizer whose update needs no global
  statistic (not D-Adaptation / Prodigy, which estimate one step size from all
  parameters).

Gradient clipping (``--max_grad_norm``) cannot use the global norm here (it is known only
when backward ends): fused backward clips each tensor's gradient by its own norm (as the
reference does); fused groups clip each group by the group's norm (with one group this is
ordinary clipping).

Both objects stand in for the optimizer in the training loop: ``step()`` finishes what the
hooks left (parameters that received no gradient, groups never completed) and
``zero_grad()`` clears leftovers; ``param_groups`` lists every group.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Iterable, List, Optional, Sequence

import torch

from library.training.optimizers import unwrap_optimizer

logger = logging.getLogger(__name__)


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
    """Write float32 ``source`` into bfloat16 ``target`` with stochastic rounding.

    A bf16 value is the upper 16 bits of a float32. Adding a uniform random integer in
    [0, 2^16) to the float32 bit pattern and dropping the low 16 bits rounds the
    magnitude up with probability equal to the dropped fraction, so the rounding is
    unbiased on average. Uses the global torch RNG unless a generator is given (its
    state is part of accelerate's saved state, so resumed runs stay exact).
    """
    if target.dtype != torch.bfloat16:
        target.copy_(source)
        return
    bits = source.detach().to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32
    target.copy_(rounded.view(torch.float32))


def step_one_parameter(optimizer, param: torch.Tensor, group: dict, stochastic_rounding: bool = True) -> None:
    """Run ``optimizer.step()`` for ``param`` alone (its gradient in ``param.grad``).

    The optimizer sees a single group holding only ``param`` (the group's current
    settings, lr included), so its state and arithmetic are those of a normal step.
    A bfloat16 parameter with ``stochastic_rounding`` is stepped as a float32 working copy
    (Adafactor computes in float32 anyway) and rounded back stochastically.
    """
    inner = unwrap_optimizer(optimizer)
    work = param
    if stochastic_rounding and param.dtype == torch.bfloat16:
        work = param.detach().float()
        work.grad = param.grad.float()
        state = inner.state.pop(param, None)
        if state is not None:
            inner.state[work] = state
    saved = inner.param_groups
    inner.param_groups = [dict(group, params=[work])]
    try:
        inner.step()
    finally:
        inner.param_groups = saved
        if work is not param:
            if work in inner.state:
                inner.state[param] = inner.state.pop(work)
    if work is not param:
        with torch.no_grad():
            copy_stochastic_(param, work)


def _clip_(params: Sequence[torch.Tensor], max_norm: float) -> None:
    grads = [p for p in params if p.grad is not None]
    if grads and max_norm:
        torch.nn.utils.clip_grad_norm_(grads, max_norm)


class FusedBackwardPass:
    """Per-tensor optimizer steps during backward (``--fused_backward_pass``)."""

    def __init__(self, optimizer, max_grad_norm: float = 0.0, stochastic_rounding: bool = True):
        self.optimizer = optimizer  # (possibly accelerate-wrapped) optimizer: what gets saved/loaded
        self.inner = unwrap_optimizer(optimizer)
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.stochastic_rounding = stochastic_rounding
        self.enabled = True
        self._handles = []
        for group in self.inner.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._hook, group=group)))
        self.num_hooked = len(self._handles)

    def _hook(self, param: torch.Tensor, group: dict) -> None:
        if not self.enabled or param.grad is None:
            return
        _clip_([param], self.max_grad_norm)
        step_one_parameter(self.inner, param, group, self.stochastic_rounding)
        param.grad = None

    # ---- the optimizer interface the training loop uses
    @property
    def param_groups(self) -> List[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def step(self, closure=None) -> None:
        """Everything was stepped in the hooks; a gradient left over (hooks disabled) is stepped here."""
        for group in self.inner.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    step_one_parameter(self.inner, p, group, self.stochastic_rounding)
                    p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, sd) -> None:
        self.optimizer.load_state_dict(sd)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def split_param_groups(param_groups: Iterable[dict], n: int) -> List[dict]:
    """Split parameter groups into about ``n`` consecutive chunks of equal tensor count.

    A chunk never mixes learning rates (a new chunk starts where the lr changes), so
    different lrs (U-Net blocks, text encoders) can give more than ``n`` chunks; groups
    with the same lr may share a chunk. A chunk keeps the other keys of its first group
    (``name``...).
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    groups = list(param_groups)
    total = sum(len(g["params"]) for g in groups)
    per_chunk = max(1, math.ceil(total / n))
    chunks: List[dict] = []
    current: Optional[dict] = None
    for g in groups:
        for p in g["params"]:
            if current is None or len(current["params"]) >= per_chunk or current.get("lr") != g.get("lr"):
                current = {k: v for k, v in g.items() if k != "params"}
                current["params"] = []
                chunks.append(current)
            current["params"].append(p)
    return chunks


class FusedOptimizerGroups:
    """N optimizers, each stepped during backward when its parameters' gradients are complete."""

    def __init__(self, optimizers: Sequence[Any], max_grad_norm: float = 0.0):
        self.optimizers = list(optimizers)
        self.inners = [unwrap_optimizer(o) for o in self.optimizers]
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.enabled = True
        self._members: List[List[torch.Tensor]] = []
        self._handles = []
        for i, inner in enumerate(self.inners):
            members = [p for g in inner.param_groups for p in g["params"] if p.requires_grad]
            self._members.append(members)
            for p in members:
                self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._hook, index=i)))
        self._arrived = [0] * len(self.inners)

    def _hook(self, param: torch.Tensor, index: int) -> None:
        if not self.enabled:
            return
        self._arrived[index] += 1
        if self._arrived[index] == len(self._members[index]):
            self._step_group(index)

    def _step_group(self, index: int) -> None:
        _clip_(self._members[index], self.max_grad_norm)
        self.inners[index].step()
        self.inners[index].zero_grad(set_to_none=True)
        self._arrived[index] = 0

    # ---- the optimizer interface the training loop uses
    @property
    def param_groups(self) -> List[dict]:
        return [g for inner in self.inners for g in inner.param_groups]

    def step(self, closure=None) -> None:
        """Step the groups whose parameters did not all get a gradient (frozen or unused ones)."""
        for i, members in enumerate(self._members):
            if any(p.grad is not None for p in members):
                self._step_group(i)
            self._arrived[i] = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for inner in self.inners:
            inner.zero_grad(set_to_none=set_to_none)
        self._arrived = [0] * len(self.inners)

    # schedule-free optimizers switch weights for evaluation; forward to every optimizer
    def train(self) -> None:
        for inner in self.inners:
            if callable(getattr(inner, "train", None)):
                inner.train()

    def eval(self) -> None:
        for inner in self.inners:
            if callable(getattr(inner, "eval", None)):
                inner.eval()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class SchedulerList:
    """Several LR schedulers stepped together (one per optimizer of FusedOptimizerGroups)."""

    def __init__(self, schedulers: Sequence[Any]):
        self.schedulers = list(schedulers)

    def step(self, *args, **kwargs) -> None:
        for s in self.schedulers:
            s.step(*args, **kwargs)

    def get_last_lr(self) -> List[float]:
        return [lr for s in self.schedulers for lr in s.get_last_lr()]

    def report_loss(self, loss) -> None:
        from library.training.lr_schedulers import report_loss

        for s in self.schedulers:
            report_loss(s, loss)


__all__ = [
    "FusedBackwardPass",
    "FusedOptimizerGroups",
    "SchedulerList",
    "copy_stochastic_",
    "split_param_groups",
    "step_one_parameter",
]
