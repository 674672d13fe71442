"""The LoRA operations, module by module (one module's tensors in memory at a time).

All results are dicts {module name: LoraModule} with float32 CPU tensors, plus one
`ModuleReport` per module (time, ranks, retained energy) for summaries and benchmarks.

* `resize`      -- new rank per module by SVD of its product; alpha follows so that
                   alpha / rank (the scale) is unchanged and the delta is the best rank-r
                   approximation of the old one.
* `svd_merge`   -- sum of ratio_i * delta_i (times LBW weights) re-factorised at a new rank;
                   alpha = rank. Exact best rank-r approximation of the summed deltas.
* `merge_factors` -- LoRAs of equal rank summed factor-wise (kohya's merge_lora without
                   --concat: the result is not the sum of the deltas unless one LoRA
                   contributes), or concatenated along the rank (--concat: exact sum).
* `split_dylora` -- the first k*unit components of every module.
* `extract`     -- LoRA from weight differences (tuned - original) by truncated SVD.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from library.errors import UserInputError
from library.lora_tools import linalg
from library.lora_tools.arch import lbw_block
from library.lora_tools.cli import progress as progress_bar
from library.lora_tools.lorafile import LoraFile, LoraModule

logger = logging.getLogger(__name__)


@dataclass
class ModuleReport:
    name: str
    kind: str  # linear | conv1x1 | conv
    layer_shape: tuple
    old_rank: int  # input rank (sum of ranks for merges, 0 for extraction)
    new_rank: int
    seconds: float
    retention: linalg.Retention | None = None


@dataclass
class Result:
    modules: dict[str, LoraModule] = field(default_factory=dict)
    reports: list[ModuleReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def seconds(self) -> float:
        return sum(r.seconds for r in self.reports)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def _module_order(loras: Sequence[LoraFile]) -> list[str]:
    seen: dict[str, None] = {}
    for lf in loras:
        for name in lf.modules:
            seen.setdefault(name, None)
    return list(seen)


def check_dynamic(method: str | None, param: float | None) -> None:
    """Validate --dynamic_method / --dynamic_param."""
    if method is None:
        if param is not None:
            raise UserInputError("--dynamic_param is given without --dynamic_method (sv_ratio, sv_fro or sv_cumulative)")
        return
    if method not in linalg.DYNAMIC_METHODS:
        raise UserInputError(f"--dynamic_method {method}: expected one of {', '.join(linalg.DYNAMIC_METHODS)}")
    if param is None:
        raise UserInputError(f"--dynamic_method {method} needs --dynamic_param")
    if method == "sv_ratio" and not param >= 1:
        raise UserInputError(f"--dynamic_param {param}: for sv_ratio it is the largest allowed S[0]/S[r] ratio, >= 1")
    if method in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
        raise UserInputError(f"--dynamic_param {param}: for {method} it is a fraction in (0, 1]")


def resize(lora: LoraFile, new_rank: int, new_conv_rank: int | None = None, method: str | None = None,
           param: float | None = None, device=None, show_progress: bool = True) -> Result:
    """Every module at a new rank (kxk convolutions at new_conv_rank, default new_rank)."""
    if new_rank < 1 or (new_conv_rank is not None and new_conv_rank < 1):
        raise UserInputError("--new_rank / --new_conv_rank must be at least 1")
    check_dynamic(method, param)
    conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    res = Result()
    with torch.no_grad(), linalg.factor_threads(device):
        for m in progress_bar(list(lora.modules.values()), desc="resizing", enabled=show_progress):
            t0 = time.perf_counter()
            a = m.up.to(device=device, dtype=torch.float32).reshape(m.out_features, m.rank)
            b = m.down.to(device=device, dtype=torch.float32).reshape(m.rank, -1)
            u, s, vh = linalg.svd_of_product(a, b)
            rank = linalg.select_rank(s, conv_rank if m.is_kxk else new_rank, method, param)
            up2d, down2d = linalg.truncate(u, s, vh, rank)
            up, down = linalg.to_layer_shapes(_cpu(up2d), _cpu(down2d), m.layer_shape)
            res.modules[m.name] = LoraModule(m.name, down, up, m.scale * rank)
            res.reports.append(ModuleReport(m.name, m.kind, m.layer_shape, m.rank, rank, time.perf_counter() - t0,
                                            linalg.Retention.of(s, rank)))
    kept = [r for r in res.reports if r.new_rank > r.old_rank]
    if kept:  # cannot happen: ranks are capped by the input rank
        res.notes.append(f"{len(kept)} modules grew")
    capped = [r for r in res.reports if method is None and r.new_rank < (conv_rank if r.kind == "conv" else new_rank)]
    if capped:
        res.notes.append(f"{len(capped)} modules had a rank below the target and keep it (e.g. {capped[0].name}: "
                         f"rank {capped[0].new_rank})")
    return res


def _contributions(loras: Sequence[LoraFile], weights_for: Callable[[int, str], float], name: str):
    out = []
    for i, lf in enumerate(loras):
        m = lf.modules.get(name)
        if m is None:
            continue
        w = weights_for(i, name)
        out.append((i, m, w))
    return out


def _check_shapes(name: str, contribs, loras: Sequence[LoraFile]) -> tuple:
    first_i, first, _ = contribs[0]
    for i, m, _ in contribs[1:]:
        if m.flat_shape != first.flat_shape or (m.kernel or (1, 1)) != (first.kernel or (1, 1)):
            raise UserInputError(
                f"{name}: {loras[first_i].path} has it as {first.kind} {first.layer_shape}, {loras[i].path} as "
                f"{m.kind} {m.layer_shape}; LoRAs for different models cannot be merged"
            )
    return first.layer_shape


def lbw_weight_fn(loras: Sequence[LoraFile], ratios: Sequence[float], lbws: Sequence[dict | None] | None,
                  families: Sequence[str]) -> Callable[[int, str], float]:
    """(lora index, module name) -> ratio times the module's LBW block weight."""

    def weight(i: int, name: str) -> float:
        w = ratios[i]
        table = lbws[i] if lbws else None
        if table:
            block = lbw_block(name, families[i])
            if block is not None:
                w *= table.get(block, 1.0)
        return w

    return weight


def svd_merge(loras: Sequence[LoraFile], weights_for: Callable[[int, str], float], new_rank: int,
              new_conv_rank: int | None = None, device=None, show_progress: bool = True) -> Result:
    """Sum of the weighted deltas of every module, factorised at new_rank (kxk convolutions
    at new_conv_rank). A module is at most min(out, in*kh*kw) wide; a merged delta of lower
    true rank is zero-padded to the asked rank. Modules whose every weight is 0 are left out."""
    if new_rank < 1 or (new_conv_rank is not None and new_conv_rank < 1):
        raise UserInputError("--new_rank / --new_conv_rank must be at least 1")
    conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    res = Result()
    names = _module_order(loras)
    with torch.no_grad(), linalg.factor_threads(device):
        for name in progress_bar(names, desc="svd merge", enabled=show_progress):
            t0 = time.perf_counter()
            contribs = _contributions(loras, weights_for, name)
            layer_shape = _check_shapes(name, contribs, loras)
            live = [(i, m, w) for i, m, w in contribs if w != 0]
            if not live:
                res.skipped.append(name)
                continue
            first = live[0][1]
            pairs = [m.matrices(w, device) for _, m, w in live]
            a = torch.cat([p[0] for p in pairs], 1)
            b = torch.cat([p[1] for p in pairs], 0)
            del pairs
            u, s, vh = linalg.svd_of_product(a, b)
            out_dim, flat_in = first.flat_shape
            target = conv_rank if first.is_kxk else new_rank
            rank = min(target, out_dim, flat_in)
            up2d, down2d = linalg.truncate(u, s, vh, rank)
            up, down = linalg.to_layer_shapes(_cpu(up2d), _cpu(down2d), layer_shape)
            res.modules[name] = LoraModule(name, down, up, float(rank))
            res.reports.append(ModuleReport(name, first.kind, layer_shape, a.shape[1], rank, time.perf_counter() - t0,
                                            linalg.Retention.of(s, rank)))
    return res


def merge_factors(loras: Sequence[LoraFile], ratios: Sequence[float], concat: bool = False, shuffle: bool = False,
                  generator: torch.Generator | None = None, show_progress: bool = True,
                  weights_for: Callable[[int, str], float] | None = None) -> Result:
    """Merge LoRAs into one without SVD.

    Each LoRA's factors are scaled by c = sqrt(|ratio * scale / base_scale|) (the down factor
    also takes the sign), base_scale being the scale of the first LoRA that has the module,
    whose alpha the result keeps. Then
    * without concat: the factors are added (all ranks of a module must be equal). For one
      contributing LoRA the delta is exactly ratio * delta; for several it also has cross
      terms up_i @ down_j (that is what this kind of merge is);
    * with concat: the factors are stacked along the rank, alpha = base_scale * total rank:
      the delta is exactly sum(ratio_i * delta_i).
    shuffle: permute the rank components of the result (the delta does not change).
    weights_for(lora index, module name): the weight of each module instead of its LoRA's
    ratio (LoRA block weights, see lbw_weight_fn); modules whose every weight is 0 are left out.
    """
    res = Result()
    names = _module_order(loras)
    with torch.no_grad():
        for name in progress_bar(names, desc="merging", enabled=show_progress):
            t0 = time.perf_counter()
            contribs = _contributions(loras, weights_for or (lambda i, _n: ratios[i]), name)
            layer_shape = _check_shapes(name, contribs, loras)
            if weights_for is not None:
                contribs = [c for c in contribs if c[2] != 0] or None
                if contribs is None:
                    continue
            base = contribs[0][1]
            if not concat:
                ranks = {m.rank for _, m, _ in contribs}
                if len(ranks) > 1:
                    detail = ", ".join(f"{loras[i].path}: {m.rank}" for i, m, _ in contribs)
                    raise UserInputError(f"{name}: ranks differ ({detail}); merge with --concat, or use "
                                         f"networks/svd_merge_lora.py to choose a rank")
            ups, downs = [], []
            for _, m, w in contribs:
                factor = w * m.scale / base.scale
                c = math.sqrt(abs(factor))
                ups.append(m.up.float() * c)
                downs.append(m.down.float() * (c if factor >= 0 else -c))
            if concat:
                up = torch.cat(ups, 1)
                down = torch.cat(downs, 0)
                rank = down.shape[0]
                alpha, alpha_int = base.scale * rank, False
            else:
                up = torch.stack(ups).sum(0)
                down = torch.stack(downs).sum(0)
                rank = base.rank
                alpha, alpha_int = base.alpha, base.alpha_int
            if shuffle:
                perm = torch.randperm(rank, generator=generator)
                down = down[perm]
                up = up[:, perm]
            res.modules[name] = LoraModule(name, down.contiguous(), up.contiguous(), alpha, alpha_int)
            res.reports.append(ModuleReport(name, base.kind, layer_shape, sum(m.rank for _, m, _ in contribs), rank,
                                            time.perf_counter() - t0))
    return res


def split_dylora(lora: LoraFile, unit: int) -> list[tuple[int, dict[str, LoraModule]]]:
    """[(rank, modules)] for rank = unit, 2*unit, ... below the file's largest rank: the first
    `rank` components of every module, alpha unchanged (a module of lower rank stays whole)."""
    if unit is None or unit < 1:
        raise UserInputError("--unit must be a positive integer: the rank step of the DyLoRA")
    max_rank = max(m.rank for m in lora.modules.values())
    if unit >= max_rank:
        raise UserInputError(f"--unit {unit}: the DyLoRA's rank is {max_rank}, so there is nothing below it to cut; "
                             f"choose a unit smaller than {max_rank}")
    if max_rank % unit:
        logger.warning("the DyLoRA's rank %d is not a multiple of --unit %d", max_rank, unit)
    loaded = {name: (m.down, m.up, m) for name, m in lora.modules.items()}
    out = []
    for rank in range(unit, max_rank, unit):
        mods = {}
        for name, (down, up, m) in loaded.items():
            k = min(rank, m.rank)
            mods[name] = LoraModule(name, down[:k].contiguous(), up[:, :k].contiguous(), m.alpha, m.alpha_int)
        out.append((rank, mods))
    return out


@dataclass
class WeightPair:
    """One adaptable layer of two models: its LoRA name, kind, and a way to get both weights."""

    name: str
    kind: str  # linear | conv1x1 | conv
    layer_shape: tuple
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (original, tuned)
    part: str = "unet"  # unet | text_encoder


def extract(pairs: Iterable[WeightPair], dim: int, conv_dim: int | None, clamp_quantile: float | None = 0.99,
            device=None, show_progress: bool = True, total: int | None = None, svd: str = "dense") -> Result:
    """LoRA modules approximating tuned - original: truncated SVD at `dim` (kxk convolutions at
    `conv_dim`; without it they are skipped), up = U S, down = Vh, both clamped at the
    `clamp_quantile` of their entries (>= 1: no clamping), alpha = rank (scale 1).
    svd: "dense" (the full SVD of every difference) or "top" (linalg.svd_top: the leading
    components only, randomized for large matrices)."""
    if svd not in ("dense", "top"):
        raise ValueError(f"svd must be 'dense' or 'top', not {svd!r}")
    if dim < 1 or (conv_dim is not None and conv_dim < 1):
        raise UserInputError("--dim / --conv_dim must be at least 1")
    res = Result()
    with torch.no_grad():
        for p in progress_bar(pairs, total=total, desc="extracting", enabled=show_progress):
            if p.kind == "conv" and conv_dim is None:
                res.skipped.append(p.name)
                continue
            t0 = time.perf_counter()
            org, tuned = p.load()
            diff = tuned.to(device=device, dtype=torch.float32, copy=True)  # a copy: the caller's tensor stays
            del tuned
            diff -= org.to(device=device, dtype=torch.float32)
            del org
            mat = diff.reshape(diff.shape[0], -1)
            rank = min(conv_dim if p.kind == "conv" else dim, mat.shape[0], mat.shape[1])
            # small SVDs on one CPU thread: on shared cores a thread team made a 1792x256 SVD
            # 10-40x slower (linalg.factor_threads)
            small = min(mat.shape) <= linalg.DENSE_SVD_LIMIT
            with linalg.factor_threads(device) if small else contextlib.nullcontext():
                if svd == "top":
                    total_sq = float(torch.linalg.vector_norm(mat)) ** 2
                    u, s, vh = linalg.svd_top(mat, rank)
                else:
                    total_sq = None
                    u, s, vh = linalg.svd_dense(mat)
            del diff, mat
            up2d, down2d = linalg.truncate(u, s, vh, rank)
            del u, vh
            up2d, down2d = linalg.clamp_factors(up2d, down2d, clamp_quantile)
            up, down = linalg.to_layer_shapes(_cpu(up2d), _cpu(down2d), p.layer_shape)
            res.modules[p.name] = LoraModule(p.name, down, up, float(rank))
            res.reports.append(ModuleReport(p.name, p.kind, p.layer_shape, 0, rank, time.perf_counter() - t0,
                                            linalg.Retention.of(s, rank, total_sq)))
    return res


def common_value(values: Iterable, fmt: Callable = str) -> str | None:
    """The one value of a collection as text, 'Dynamic' when they differ, None when empty."""
    vals = list(dict.fromkeys(values))
    if not vals:
        return None
    return fmt(vals[0]) if len(vals) == 1 else "Dynamic"


def format_alpha(alpha: float) -> str:
    """An alpha as metadata text: '4.0', '0.5' (float text, as sd-scripts writes float alphas)."""
    return str(float(alpha))


def kind_breakdown(reports: Sequence[ModuleReport]) -> list[str]:
    """Per-kind time lines for summaries: 'linear 3072x768: 144 modules, 1.23 s'."""
    groups: dict[tuple, list[ModuleReport]] = {}
    for r in reports:
        shape = "x".join(str(d) for d in r.layer_shape)
        groups.setdefault((r.kind, shape), []).append(r)
    lines = []
    for (kind, shape), rs in sorted(groups.items(), key=lambda kv: -sum(r.seconds for r in kv[1])):
        lines.append(f"{kind:8s} {shape:>18s}: {len(rs):4d} modules, {sum(r.seconds for r in rs):7.2f} s")
    return lines
