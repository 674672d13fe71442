"""LoRA files as validated modules.

A kohya LoRA file holds, per adapted layer (module name `lora_unet_...`, `lora_te_...`):
`<name>.lora_down.weight` (r, in) or (r, in, kh, kw), `<name>.lora_up.weight` (out, r) or
(out, r, 1, 1), and an optional 0-dim `<name>.alpha` (missing, or 0, means alpha = r). The
layer's weight changes by `multiplier * alpha / r * up @ down` (formats.md a.2,
network-args.md section 1).

`read_lora` checks the whole layout from the header alone (no tensor data is read) and says
clearly what a file is when it is not such a LoRA (LyCORIS, OFT, diffusers/PEFT, DoRA).
Tensors are read when a module asks for them, so a tool that works module by module holds
one module in memory, not the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from library.errors import UserInputError
from library.io.tensor_files import TensorFile
from library.networks.modules import low_rank_product

DOWN = "lora_down.weight"
UP = "lora_up.weight"
ALPHA = "alpha"
KNOWN_SUFFIXES = (DOWN, UP, ALPHA)


class LazyTensor:
    """A tensor of a file: shape and dtype known, data read on each `load()`."""

    __slots__ = ("shape", "dtype", "_load")

    def __init__(self, shape, dtype, loader: Callable[[], torch.Tensor]):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._load = loader

    def load(self) -> torch.Tensor:
        return self._load()


def _materialize(t) -> torch.Tensor:
    return t.load() if isinstance(t, LazyTensor) else t


class LoraModule:
    """One adapted layer: `down`, `up` (tensors or LazyTensors) and `alpha`.

    `alpha_int` records whether the file stored alpha as an integer tensor (the trainer's
    default alpha 1 is int64), so files written back keep the same kind.
    """

    __slots__ = ("name", "_down", "_up", "alpha", "alpha_int")

    def __init__(self, name: str, down, up, alpha: float | None = None, alpha_int: bool = False):
        self.name = name
        self._down = down
        self._up = up
        rank = int(down.shape[0])
        self.alpha = float(rank) if alpha is None or alpha == 0 else float(alpha)
        self.alpha_int = alpha_int

    # -- shapes (never read data) ----------------------------------------------------------
    @property
    def down_shape(self) -> tuple[int, ...]:
        return tuple(self._down.shape)

    @property
    def up_shape(self) -> tuple[int, ...]:
        return tuple(self._up.shape)

    @property
    def rank(self) -> int:
        return int(self._down.shape[0])

    @property
    def in_features(self) -> int:
        return int(self._down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self._up.shape[0])

    @property
    def is_conv(self) -> bool:
        return len(self._down.shape) == 4

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self._down.shape[2:]) if self.is_conv else ()

    @property
    def is_kxk(self) -> bool:
        """A convolution with a kernel other than 1x1 (the `conv_dim` layers)."""
        return self.is_conv and self.kernel != (1, 1)

    @property
    def kind(self) -> str:
        """'linear', 'conv1x1' or 'conv' (kxk), as library.networks.discovery names them."""
        if not self.is_conv:
            return "linear"
        return "conv" if self.is_kxk else "conv1x1"

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """Shape of the adapted layer's weight."""
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def flat_shape(self) -> tuple[int, int]:
        """(out, in * kh * kw): the delta as a matrix."""
        return self.out_features, math.prod(self.layer_shape[1:])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def nbytes(self) -> int:
        size = 0
        for t in (self._down, self._up):
            size += math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
        return size

    # -- data ------------------------------------------------------------------------------
    @property
    def down(self) -> torch.Tensor:
        return _materialize(self._down)

    @property
    def up(self) -> torch.Tensor:
        return _materialize(self._up)

    def matrices(self, multiplier: float = 1.0, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A @ B = multiplier * scale * up @ down as an (out, in*kh*kw) matrix."""
        a = self.up.to(device=device, dtype=dtype).reshape(self.out_features, self.rank)
        b = self.down.to(device=device, dtype=dtype).reshape(self.rank, -1)
        return a * (multiplier * self.scale), b

    def delta(self, multiplier: float = 1.0, device=None) -> torch.Tensor:
        """multiplier * scale * up @ down in float32, shaped like the layer's weight."""
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        return low_rank_product(up, down) * (multiplier * self.scale)

    def materialized(self) -> "LoraModule":
        return LoraModule(self.name, self.down, self.up, self.alpha, self.alpha_int)

    def __repr__(self) -> str:
        return f"LoraModule({self.name}, {self.kind} {self.layer_shape}, rank {self.rank}, alpha {self.alpha:g})"


@dataclass
class LoraFile:
    path: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    source: TensorFile | None = None

    @property
    def title(self) -> str:
        """modelspec.title, else the file name without extension."""
        title = self.metadata.get("modelspec.title")
        return title if title else os.path.splitext(os.path.basename(self.path))[0]

    @property
    def family(self) -> str:
        from library.lora_tools.arch import detect_family

        return detect_family(self.modules, self.path)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def foreign_layout(keys: Iterable[str]) -> str | None:
    """What a file is when its keys are not a plain kohya LoRA (None: nothing recognised)."""
    keys = list(keys)

    def has(part):
        return any(part in k for k in keys)

    if has(".hada_") or has(".lokr_") or has(".lora_mid.") or has(".b1.weight"):
        return "a LyCORIS file (LoHa / LoKr / LoCon with Tucker decomposition)"
    if has(".oft_blocks") or any(k.startswith("oft_") for k in keys):
        return "an OFT file"
    if has(".dora_scale"):
        return "a DoRA file (its magnitude vectors cannot be expressed as a plain LoRA)"
    if has(".lora_A.") or has(".lora_B.") or has(".lora.down.") or has(".lora.up."):
        return "a LoRA in diffusers/PEFT layout (lora_A / lora_B keys)"
    return None


def _fail(what: str, path: str, message: str):
    raise UserInputError(f"{what} {path}: {message}")


def parse_modules(shapes: Mapping[str, tuple], dtypes: Mapping[str, torch.dtype], fetch: Callable[[str], torch.Tensor],
                  path: str, what: str, alpha_values: Mapping[str, torch.Tensor] | None = None) -> dict[str, LoraModule]:
    """Validated modules from key -> shape; `fetch(key)` reads a tensor when needed."""
    groups: dict[str, dict[str, str]] = {}
    stray = []
    for key in shapes:
        name, dot, suffix = key.partition(".")
        if not dot:
            stray.append(key)
            continue
        groups.setdefault(name, {})[suffix] = key
    foreign = foreign_layout(shapes)
    if foreign:
        _fail(what, path, f"this is {foreign}; these tools take kohya LoRA files "
                          f"('<module>.lora_down.weight', '.lora_up.weight', '.alpha')")
    if not any(DOWN in g for g in groups.values()):
        _fail(what, path, f"no '*.{DOWN}' tensors: not a LoRA file ({len(shapes)} tensors, e.g. {list(shapes)[:3]})")
    unknown = sorted(k for g in groups.values() for s, k in g.items() if s not in KNOWN_SUFFIXES) + stray
    if unknown:
        _fail(what, path, f"{len(unknown)} tensors are not LoRA weights ({unknown[:3]}); expected only "
                          f"'.{DOWN}', '.{UP}' and '.alpha' per module")

    modules: dict[str, LoraModule] = {}
    for name, g in groups.items():
        if DOWN not in g or UP not in g:
            missing = DOWN if DOWN not in g else UP
            _fail(what, path, f"module {name} has no '{missing}'")
        ds, us = tuple(shapes[g[DOWN]]), tuple(shapes[g[UP]])
        if len(ds) not in (2, 4):
            _fail(what, path, f"{name}: lora_down has shape {ds}; expected (rank, in) or (rank, in, kh, kw)")
        if len(us) != len(ds) or (len(us) == 4 and us[2:] != (1, 1)):
            _fail(what, path, f"{name}: lora_up has shape {us} but lora_down {ds}; expected "
                              f"{'(out, rank)' if len(ds) == 2 else '(out, rank, 1, 1)'}")
        if us[1] != ds[0]:
            _fail(what, path, f"{name}: ranks disagree: lora_down has {ds[0]} rows, lora_up {us[1]} columns")
        if ds[0] == 0:
            _fail(what, path, f"{name}: rank 0")
        alpha, alpha_int = None, False
        if ALPHA in g:
            if math.prod(shapes[g[ALPHA]]) != 1:
                _fail(what, path, f"{name}: alpha has shape {tuple(shapes[g[ALPHA]])}; expected a scalar")
            t = alpha_values[g[ALPHA]] if alpha_values and g[ALPHA] in alpha_values else fetch(g[ALPHA])
            alpha = float(t.float().reshape(()))
            alpha_int = not t.dtype.is_floating_point
            if not math.isfinite(alpha):
                _fail(what, path, f"{name}: alpha is {alpha}")
        down = LazyTensor(ds, dtypes[g[DOWN]], (lambda k=g[DOWN]: fetch(k)))
        up = LazyTensor(us, dtypes[g[UP]], (lambda k=g[UP]: fetch(k)))
        modules[name] = LoraModule(name, down, up, alpha, alpha_int)
    return modules


def read_lora(path: str | os.PathLike, what: str = "--models") -> LoraFile:
    """Open a LoRA file (.safetensors read on demand; .pt/.ckpt loaded whole) and validate it.

    `what` names the option the path came from, for error messages.
    """
    path = os.fspath(path)
    src = TensorFile(path, what)
    shapes = {k: src.shape(k) for k in src.keys()}
    dtypes = {k: src.dtype(k) for k in src.keys()}
    try:
        modules = parse_modules(shapes, dtypes, src.get, path, what)
    except BaseException:
        src.close()
        raise
    return LoraFile(path, modules, dict(src.metadata), src)


def modules_from_state_dict(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>",
                            what: str = "weights") -> dict[str, LoraModule]:
    """Validated modules from an in-memory state dict."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    dtypes = {k: v.dtype for k, v in state_dict.items()}
    mods = parse_modules(shapes, dtypes, state_dict.__getitem__, path, what)
    return {n: m.materialized() for n, m in mods.items()}


def to_state_dict(modules: Iterable[LoraModule] | Mapping[str, LoraModule], dtype=None) -> dict[str, torch.Tensor]:
    """Flat kohya state dict: per module `.lora_down.weight`, `.lora_up.weight`, `.alpha`.

    Every tensor (alpha included) is cast to `dtype` when given; without it the factors keep
    their dtype and alpha is float32 (int64 when the module's alpha came as an integer and is
    a whole number).
    """
    if isinstance(modules, Mapping):
        modules = modules.values()
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        down, up = m.down, m.up
        if m.alpha_int and float(m.alpha).is_integer():
            alpha = torch.tensor(int(m.alpha), dtype=torch.int64)
        else:
            alpha = torch.tensor(m.alpha, dtype=torch.float32)
        if dtype is not None:
            down, up, alpha = down.to(dtype), up.to(dtype), alpha.to(dtype)
        out[f"{m.name}.{DOWN}"] = down.contiguous()
        out[f"{m.name}.{UP}"] = up.contiguous()
        out[f"{m.name}.{ALPHA}"] = alpha
    return out
