"""`--blocks_to_swap N`: keep the weights of some transformer blocks in CPU memory and bring
each onto the GPU only while it runs, in forward and in backward.

The model calls `before_block(kind, index)` / `after_block(kind, index)` around every block
(`Flux.block_swap`, library/models/flux/model.py). The swapped blocks are the last ones of
each list (FLUX: N // 2 double blocks and 2 * (N - N // 2) single blocks, a single block
being about half a double one, as in sd-scripts). For each of them the swapper keeps a
pinned CPU copy of every parameter and buffer ("home") and, while the block is needed, a
device copy:

* forward: before a swapped block runs, its copy is made resident (the copy was started
  one block earlier on a separate CUDA stream, so it overlaps with compute); right after
  it, the block is evicted (its tensors point at the CPU copy again). The weights are
  frozen (network training), so eviction is free: nothing is copied back.
* backward: a hook on each block's outputs fires when their gradient arrives, i.e. just
  before the block's backward (and, with gradient checkpointing, its recomputation) runs;
  it makes the block resident, evicts the blocks whose backward is done and prefetches
  the next one in backward order.

Autograd keeps references to the parameter tensors a layer used; switching
`param.data` between the device copy and the home copy changes what those references
hold, so the memory of an evicted block is freed even without gradient checkpointing, and
its backward sees the weights again because they are made resident first.

Without CUDA there is no second memory to swap with: `BlockSwapper.create` then returns
None (the trainer logs that the option has no effect). `simulate=True` runs the same
schedule on the CPU with evicted tensors replaced by empty placeholders, so a block used
while evicted fails loudly; the tests use it to show swapping changes no loss or gradient.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from library.errors import UserInputError

logger = logging.getLogger(__name__)


def flux_swap_counts(blocks_to_swap: int, num_double: int, num_single: int) -> tuple[int, int]:
    """(double, single) blocks swapped for `--blocks_to_swap N` on a FLUX model."""
    double = blocks_to_swap // 2
    single = (blocks_to_swap - double) * 2
    if double > num_double or single > num_single:
        # the largest N with N // 2 <= num_double and 2 * (N - N // 2) <= num_single
        most = max(n for n in range(0, 2 * (num_double + num_single) + 1)
                   if n // 2 <= num_double and 2 * (n - n // 2) <= num_single)
        raise UserInputError(
            f"--blocks_to_swap {blocks_to_swap}: this model has {num_double} double and {num_single} single blocks; "
            f"N swaps N//2 double and 2*(N - N//2) single blocks, so N can be at most {most}"
        )
    return double, single


class BlockSwapper:
    """Block-by-block weight swapping between a CPU home copy and the compute device."""

    def __init__(self, blocks: dict, swapped: list, device, simulate: bool = False):
        """`blocks`: {(kind, index): module} for every block; `swapped`: the keys to swap, in
        forward order; `order`: forward order of all keys (dict order of `blocks`)."""
        self.blocks = blocks
        self.order = list(blocks)
        self.pos = {k: i for i, k in enumerate(self.order)}
        self.swapped = sorted(swapped, key=self.pos.__getitem__)
        self.swapped_set = set(self.swapped)
        self.device = torch.device(device)
        self.simulate = simulate
        self.use_streams = self.device.type == "cuda" and not simulate
        self.copy_stream = torch.cuda.Stream(self.device) if self.use_streams else None
        self.home: dict = {}  # key -> {tensor name: CPU tensor}
        self.resident: dict = {}  # key -> {tensor name: device tensor}
        self.events: dict = {}  # key -> CUDA event of its pending copy
        self.in_forward: Optional[tuple] = None
        self.max_resident = 0  # most swapped blocks resident at once (for tests and logs)
        self._hooks = []
        self.enabled = True

    # -- setup ---------------------------------------------------------------------------
    @classmethod
    def create(cls, model, blocks_to_swap: int, device, simulate: bool = False) -> Optional["BlockSwapper"]:
        """A swapper installed on a FLUX model (model.block_swap), or None without CUDA."""
        if not blocks_to_swap:
            return None
        device = torch.device(device)
        if device.type != "cuda" and not simulate:
            return None
        nd, ns = flux_swap_counts(int(blocks_to_swap), len(model.double_blocks), len(model.single_blocks))
        blocks = {("double", i): b for i, b in enumerate(model.double_blocks)}
        blocks.update({("single", i): b for i, b in enumerate(model.single_blocks)})
        swapped = [("double", i) for i in range(len(model.double_blocks) - nd, len(model.double_blocks))]
        swapped += [("single", i) for i in range(len(model.single_blocks) - ns, len(model.single_blocks))]
        swapper = cls(blocks, swapped, device, simulate=simulate)
        swapper.install(model)
        logger.info("--blocks_to_swap %d: %d double and %d single blocks live in CPU memory and visit the %s "
                    "one at a time%s", blocks_to_swap, nd, ns, "device" if not simulate else "(simulated) device",
                    " (copies overlap compute on a CUDA stream)" if swapper.use_streams else "")
        return swapper

    def install(self, model) -> None:
        """Move everything but the swapped blocks to the device; give the swapped blocks CPU homes."""
        swapped_modules = {id(self.blocks[k]) for k in self.swapped}
        for k, block in self.blocks.items():
            if k not in self.swapped_set:
                block.to(self.device)
        for name, child in model.named_children():
            if isinstance(child, torch.nn.ModuleList) and any(id(b) in swapped_modules for b in child):
                continue
            child.to(self.device)
        for name, p in model.named_parameters(recurse=False):
            p.data = p.data.to(self.device)
        for k in self.swapped:
            home = {}
            for name, t in self._tensors(self.blocks[k]):
                cpu = t.data.to("cpu")
                if self.use_streams:
                    cpu = cpu.pin_memory()
                elif self.simulate:
                    cpu = cpu.clone()
                home[name] = cpu
            self.home[k] = home
            self._evict(k)
        for k, block in self.blocks.items():
            self._hooks.append(block.register_forward_hook(self._make_forward_hook(k)))
        model.block_swap = self

    @staticmethod
    def _tensors(block):
        for name, p in block.named_parameters():
            yield name, p
        for name, b in block.named_buffers():
            yield name, b

    # -- moving --------------------------------------------------------------------------
    def _start_load(self, key) -> None:
        if key in self.resident or key not in self.swapped_set:
            return
        home = self.home[key]
        if self.use_streams:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.resident[key] = {n: t.to(self.device, non_blocking=True) for n, t in home.items()}
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            self.events[key] = ev
        else:
            self.resident[key] = {n: t.clone() if self.simulate else t.to(self.device) for n, t in home.items()}
        self.max_resident = max(self.max_resident, len(self.resident))

    def _ensure(self, key) -> None:
        if key not in self.swapped_set:
            return
        self._start_load(key)
        ev = self.events.pop(key, None)
        current = torch.cuda.current_stream(self.device) if self.use_streams else None
        if ev is not None:
            current.wait_event(ev)
        tensors = self.resident[key]
        for name, t in self._tensors(self.blocks[key]):
            dev = tensors[name]
            if current is not None:
                dev.record_stream(current)
            t.data = dev

    def _evict(self, key) -> None:
        if key not in self.swapped_set:
            return
        self.resident.pop(key, None)
        self.events.pop(key, None)
        home = self.home[key]
        for name, t in self._tensors(self.blocks[key]):
            t.data = torch.empty(0, dtype=t.dtype) if self.simulate else home[name]

    def _next_swapped(self, key, step: int):
        i = self.pos[key]
        rng = range(i + 1, len(self.order)) if step > 0 else range(i - 1, -1, -1)
        for j in rng:
            if self.order[j] in self.swapped_set:
                return self.order[j]
        return None

    # -- hooks called by the model -------------------------------------------------------
    def before_block(self, kind: str, index: int) -> None:
        if not self.enabled:
            return
        key = (kind, index)
        for other in list(self.resident):
            if other != key and self.pos[other] < self.pos[key]:
                self._evict(other)  # done in this forward (backward reloads what it needs)
        self._ensure(key)
        nxt = self._next_swapped(key, +1)
        if nxt is not None:
            self._start_load(nxt)
        self.in_forward = key

    def after_block(self, kind: str, index: int) -> None:
        if not self.enabled:
            return
        key = (kind, index)
        self.in_forward = None
        last = self.swapped and key == self.swapped[-1]
        if key in self.swapped_set and not (last and torch.is_grad_enabled()):
            self._evict(key)  # the last one stays: backward starts with it

    def _make_forward_hook(self, key):
        def hook(module, inputs, output):
            if not self.enabled or self.in_forward != key or not torch.is_grad_enabled():
                return  # recomputation inside backward, or no backward to come
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._make_backward_hook(key))
        return hook

    def _make_backward_hook(self, key):
        def hook(grad):
            self._before_backward(key)
            return grad
        return hook

    def _before_backward(self, key) -> None:
        for other in list(self.resident):
            if self.pos[other] > self.pos[key]:
                self._evict(other)  # their backward is done
        self._ensure(key)
        prev = self._next_swapped(key, -1)
        if prev is not None:
            self._start_load(prev)

    # -- control -------------------------------------------------------------------------
    def evict_all(self) -> None:
        for key in list(self.resident):
            self._evict(key)

    def remove(self, model=None) -> None:
        """Bring every block back to the device and take the hooks off."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for key in self.swapped:
            self._ensure(key)
        self.resident.clear()
        if model is not None and getattr(model, "block_swap", None) is self:
            model.block_swap = None
