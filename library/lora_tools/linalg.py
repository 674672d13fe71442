"""Linear algebra of LoRA deltas: SVDs, rank choice, factors.

A LoRA delta is a product `A @ B` with A (m, r) and B (r, n) and r much smaller than m and n.
Its SVD never needs the m x n matrix: with thin QR factorisations A = Qa Ra and B^T = Qb Rb,
A @ B = Qa (Ra Rb^T) Qb^T, and the SVD of the small r x r core Ra Rb^T = Uc S Vc^T gives
A @ B = (Qa Uc) S (Qb Vc)^T exactly. That costs O((m + n) r^2) instead of O(m n min(m, n)):
resizing or SVD-merging a full SDXL LoRA takes seconds instead of an hour on a CPU, and
memory is the factors', not the dense deltas'. Sums of LoRAs are products too (the factors
concatenated along the rank), so SVD merges use the same path.

Rank choice for a matrix with singular values S (descending):
* fixed:          min(new_rank, rank available)
* sv_ratio p:     keep the values greater than S[0] / p
* sv_cumulative p: the smallest r with sum(S[:r]) >= p * sum(S)
* sv_fro p:       the smallest r with ||S[:r]||_2 >= p * ||S||_2, i.e. the rank-r
                  approximation keeps at least the fraction p of the Frobenius norm
Each dynamic choice is capped by new_rank and is at least 1.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")

# Below this largest singular value a delta is treated as zero (rank 1 of zeros).
ZERO_SV = 1e-12


@contextlib.contextmanager
def factor_threads(device=None):
    """One CPU thread for the factor-sized linear algebra of resize / SVD merge.

    The QRs and SVDs there are small (rank ~ tens to hundreds); a thread team gains little on
    them and, on a machine whose cores are shared, loses a lot: measured on 2 busy cores, a
    768x64 QR took 1 ms on one thread and 20-200 ms on two. Other devices are left alone.
    """
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def svd_of_product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of a @ b for a (m, r), b (r, n), without forming a @ b when r is
    smaller than m and n. S has min(r, m, n) entries, descending. float32 in, float32 out;
    the small core SVD runs in float64."""
    m, r = a.shape
    n = b.shape[1]
    if r >= min(m, n):
        return torch.linalg.svd(a @ b, full_matrices=False)
    qa, ra = torch.linalg.qr(a)  # (m, r), (r, r)
    qb, rb = torch.linalg.qr(b.mT)  # (n, r), (r, r)
    core = (ra.double() @ rb.double().mT)
    uc, s, vch = torch.linalg.svd(core)
    u = qa @ uc.to(a.dtype)
    vh = vch.to(a.dtype) @ qb.mT
    return u, s.to(a.dtype), vh


def svd_dense(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense matrix (float32)."""
    return torch.linalg.svd(w, full_matrices=False)


# Below this smaller dimension, or when the asked rank is a sizeable part of it, a dense SVD
# is cheap enough and exact.
DENSE_SVD_LIMIT = 1024
POWER_ITERATIONS = 6


def svd_top(w: torch.Tensor, rank: int, oversample: int | None = None, power_iters: int = POWER_ITERATIONS,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading singular triplets (U, S, Vh) of a dense matrix, at least `rank` of them.

    Small matrices (smaller dimension <= DENSE_SVD_LIMIT, or rank + oversampling above a quarter
    of it) get the dense SVD. Large ones a randomized subspace iteration (Halko, Martinsson &
    Tropp 2011): a Gaussian sketch of k = rank + oversample columns (oversample default
    max(rank, 16)), `power_iters` rounds of A^T / A products with re-orthonormalisation, and
    the dense SVD of the k x n projection. The sketch's seed is fixed, so results are
    reproducible. Cost O(m n k (2 q + 2)) instead of O(m n min(m, n)): for a 18432 x 3072 FLUX
    layer at rank 16 about 1 s instead of a minute or two on a CPU. Exact (to rounding) when
    the matrix has rank <= k; otherwise each of the top singular values converges with the
    ratio (s_{k+1} / s_i)^(2q+1), so the rank-r truncation keeps essentially the optimal
    Frobenius norm (measured: within 1e-4 relative of the dense SVD's on a slowly decaying
    spectrum, tests/test_flux_lora_tools.py)."""
    m, n = w.shape
    small = min(m, n)
    p = max(rank, 16) if oversample is None else oversample
    k = rank + p
    if small <= DENSE_SVD_LIMIT or 4 * k >= small:
        return svd_dense(w)
    a = w if m >= n else w.mT  # (M, N), M >= N
    g = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(a.shape[1], k, generator=g, device=a.device, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.mT @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    u = q @ ub
    if m >= n:
        return u, s, vh
    return vh.mT, s, u.mT


def select_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """The rank to keep (see the module docstring). `s`: singular values, descending."""
    avail = int(s.numel())
    if avail == 0:
        return 1
    s64 = s.detach().double().cpu()
    if float(s64[0]) <= ZERO_SV:
        return 1
    if method is None:
        rank = max_rank
    elif method == "sv_ratio":
        rank = int((s64 > s64[0] / param).sum())
    elif method == "sv_cumulative":
        frac = torch.cumsum(s64, 0) / s64.sum()
        rank = _first_reaching(frac, param)
    elif method == "sv_fro":
        sq = s64 * s64
        frac = torch.sqrt(torch.cumsum(sq, 0) / sq.sum())
        rank = _first_reaching(frac, param)
    else:
        raise ValueError(f"unknown dynamic method {method!r}")
    return max(1, min(rank, max_rank, avail))


def _first_reaching(frac: torch.Tensor, target: float) -> int:
    # smallest r with frac[r-1] >= target; round-off may leave the last entry a hair below 1
    hit = torch.nonzero(frac >= target - 1e-12)
    return int(hit[0]) + 1 if hit.numel() else int(frac.numel())


@dataclass
class Retention:
    """How much of a delta a rank-r truncation keeps."""

    sum_fraction: float  # sum(S[:r]) / sum(S)
    fro_fraction: float  # ||S[:r]|| / ||S||: Frobenius norm of the approximation over the delta's
    max_ratio: float  # S[0] / S[r-1]

    @staticmethod
    def of(s: torch.Tensor, rank: int, total_sq: float | None = None) -> "Retention":
        """From the singular values `s`; `total_sq`: the squared Frobenius norm of the whole
        matrix when `s` holds only the leading values (then sum_fraction is over those)."""
        s64 = s.detach().double().cpu()
        total = float(s64.sum())
        if s64.numel() == 0 or total <= 0:
            return Retention(1.0, 1.0, 1.0)
        kept = s64[:rank]
        denom = float((s64 * s64).sum()) if total_sq is None else max(float(total_sq), float((s64 * s64).sum()))
        fro = math.sqrt(float((kept * kept).sum()) / denom)
        last = float(kept[-1]) if kept.numel() else 0.0
        return Retention(float(kept.sum()) / total, fro, float(s64[0]) / last if last > 0 else math.inf)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up2d, down2d) = (U[:, :r] diag(S[:r]), Vh[:r]), zero-padded when fewer than `rank`
    components exist (so a module keeps the rank asked for)."""
    k = min(rank, s.numel())
    up = u[:, :k] * s[:k]
    down = vh[:k].clone()  # a row slice is contiguous and would keep all of vh alive
    if k < rank:
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - k)], 1)
        down = torch.cat([down, down.new_zeros(rank - k, down.shape[1])], 0)
    return up, down


def to_layer_shapes(up2d: torch.Tensor, down2d: torch.Tensor, layer_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape matrix factors to kohya tensors for a layer of `layer_shape`:
    Linear (out, r) / (r, in); conv (out, r, 1, 1) / (r, in, kh, kw)."""
    r = down2d.shape[0]
    if len(layer_shape) == 2:
        return up2d.contiguous(), down2d.contiguous()
    out, inp, kh, kw = layer_shape
    return up2d.reshape(out, r, 1, 1).contiguous(), down2d.reshape(r, inp, kh, kw).contiguous()


def quantile(values: torch.Tensor, q: float) -> float:
    """torch.quantile(values, q) (linear interpolation) for tensors of any size
    (torch.quantile refuses more than 16M elements)."""
    flat = values.detach().reshape(-1).float()
    n = flat.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v_lo = float(torch.kthvalue(flat.cpu(), lo + 1).values)
    if hi == lo or pos == lo:
        return v_lo
    v_hi = float(torch.kthvalue(flat.cpu(), hi + 1).values)
    return v_lo + (pos - lo) * (v_hi - v_lo)


def clamp_factors(up2d: torch.Tensor, down2d: torch.Tensor, q: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors' entries to [-h, h], h the q-quantile of all their entries together
    (sd-scripts' outlier clamp for extracted LoRAs). q None or >= 1: unchanged."""
    if q is None or q >= 1.0:
        return up2d, down2d
    h = quantile(torch.cat([up2d.reshape(-1), down2d.reshape(-1)]), q)
    return up2d.clamp(-h, h), down2d.clamp(-h, h)
