"""Kernel B: probabilistic matching loss of PNBA over a batch, tiled over the B x B grid.

For (B, D) Gaussians y_i = N(mu_y_i, var_y_i) and x_j = N(mu_x_j, var_x_j) and scalars a, b:

    s_i = |mu_y_i|^2 + sum_D var_y_i,   r_j = |mu_x_j|^2 + sum_D var_x_j         (row statistics, saved)
    d_ij = max(s_i + r_j - 2 mu_y_i . mu_x_j, 0),   l_ij = -a d_ij + b
    L = sum_ij softplus(l_ij) - l_ij [i == j]                                       (BCE with logits)

The cross term is a tl.dot over D-chunks, so nothing of size B x B x D exists. The backward keeps one
B x B matrix, G_ij = dL/dd_ij = -a g (sigmoid(l_ij) - [i == j]) (zero where d was clamped), and then

    d mu_y = 2 (mu_y * G 1 - G mu_x),    d lv_y = (G 1) * var_y,    (same for x with G^T)
    d a = -g sum_ij (sigmoid(l_ij) - [i == j]) d_ij,    d b = g sum_ij (sigmoid(l_ij) - [i == j])

Partial sums per tile are reduced by torch, so every result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gaussian import _sigmoids, _softplus, acc_dtypes

BLOCK_M = 32  # tile of the B x B grid (tl.dot needs every block dim >= 16)
BLOCK_K = 32  # D-chunk of the cross term
BLOCK_D = 64  # D-tile of the backward products


@triton.jit
def _rowstat_kernel(muy_ptr, lvy_ptr, mux_ptr, lvx_ptr, sy_ptr, sx_ptr, D,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Program i: s_i and r_i (module docstring), one pass over row i of the four inputs."""
    row = tl.program_id(0).to(tl.int64)
    acc_y = tl.zeros((BLOCK,), ACC)
    acc_x = tl.zeros((BLOCK,), ACC)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        offs = row * D + cols
        muy = tl.load(muy_ptr + offs, mask=mask, other=0.0).to(ACC)
        mux = tl.load(mux_ptr + offs, mask=mask, other=0.0).to(ACC)
        vy = tl.exp(tl.load(lvy_ptr + offs, mask=mask, other=0.0).to(ACC))
        vx = tl.exp(tl.load(lvx_ptr + offs, mask=mask, other=0.0).to(ACC))
        acc_y += muy * muy + tl.where(mask, vy, 0.0)
        acc_x += mux * mux + tl.where(mask, vx, 0.0)
    tl.store(sy_ptr + row, tl.sum(acc_y, axis=0))
    tl.store(sx_ptr + row, tl.sum(acc_x, axis=0))


@triton.jit
def _logits(muy_ptr, mux_ptr, sy_ptr, sx_ptr, a_ptr, b_ptr, B, D,
            ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_M, BLOCK_M) tile (program_id(0), program_id(1)) of d and l, its validity and labels."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    col_ok = cols < B
    cross = tl.zeros((BLOCK_M, BLOCK_M), ACC)
    for start in range(0, D, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        u = tl.load(muy_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        v = tl.load(mux_ptr + cols[None, :] * D + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)  # (BLOCK_K, BLOCK_M): mu_x^T
        # ieee: the expanded |u - v|^2 cancels, tf32's 10-bit mantissa would dominate d
        cross = tl.dot(u.to(ACC), v.to(ACC), cross, input_precision="ieee", out_dtype=ACC)
    s = tl.load(sy_ptr + rows, mask=row_ok, other=0.0)
    r = tl.load(sx_ptr + cols, mask=col_ok, other=0.0)
    d_raw = s[:, None] + r[None, :] - 2.0 * cross
    d = tl.maximum(d_raw, 0.0)
    logit = -tl.load(a_ptr).to(ACC) * d + tl.load(b_ptr).to(ACC)
    valid = row_ok[:, None] & col_ok[None, :]
    label = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    return d_raw, d, logit, valid, label


@triton.jit
def _fwd_kernel(muy_ptr, mux_ptr, sy_ptr, sx_ptr, a_ptr, b_ptr, part_ptr, B, D,
                ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j): the BCE sum of its tile into part[i, j]."""
    _, _, logit, valid, label = _logits(muy_ptr, mux_ptr, sy_ptr, sx_ptr, a_ptr, b_ptr, B, D,
                                        ACC, BLOCK_M, BLOCK_K)
    loss = tl.where(valid, _softplus(logit) - logit * label, 0.0)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_ptr + tile, tl.sum(tl.sum(loss, axis=1), axis=0))


@triton.jit
def _bwd_pair_kernel(muy_ptr, mux_ptr, sy_ptr, sx_ptr, a_ptr, b_ptr, g_ptr, gmat_ptr, pa_ptr, pb_ptr, B, D,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j): recompute its tile, write G (B, B) and the tile's partial d a, d b."""
    d_raw, d, logit, valid, label = _logits(muy_ptr, mux_ptr, sy_ptr, sx_ptr, a_ptr, b_ptr, B, D,
                                            ACC, BLOCK_M, BLOCK_K)
    resid = tl.where(valid, tl.load(g_ptr).to(ACC) * (_sigmoids(logit)[0] - label), 0.0)
    # clamp_min passes the gradient where d_raw >= 0, as torch does
    gmat = tl.where(d_raw >= 0.0, -tl.load(a_ptr).to(ACC) * resid, 0.0)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(gmat_ptr + rows[:, None] * B + cols[None, :], gmat, mask=valid)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(pa_ptr + tile, -tl.sum(tl.sum(resid * d, axis=1), axis=0))
    tl.store(pb_ptr + tile, tl.sum(tl.sum(resid, axis=1), axis=0))


@triton.jit
def _bwd_side_kernel(gmat_ptr, stride_r, stride_c, mu_o_ptr, mu_ptr, lv_ptr, dmu_ptr, dlv_ptr, B, D,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (i, k): d mu = 2 (mu * G 1 - G mu_o) and d lv = (G 1) * exp(lv) on tile (rows i, cols k).

    G is read through (stride_r, stride_c), so the x side passes G^T's strides and needs no copy."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    col_ok = cols < D
    prod = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    gsum = tl.zeros((BLOCK_M,), ACC)
    for start in range(0, B, BLOCK_M):
        js = start + tl.arange(0, BLOCK_M)
        j_ok = js < B
        g = tl.load(gmat_ptr + rows[:, None] * stride_r + js[None, :] * stride_c,
                    mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        mo = tl.load(mu_o_ptr + js[:, None] * D + cols[None, :], mask=j_ok[:, None] & col_ok[None, :],
                     other=0.0)
        prod = tl.dot(g, mo.to(ACC), prod, input_precision="ieee", out_dtype=ACC)
        gsum += tl.sum(g, axis=1)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * D + cols[None, :]
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(ACC)
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(dmu_ptr + offs, 2.0 * (mu * gsum[:, None] - prod), mask=mask)
    tl.store(dlv_ptr + offs, gsum[:, None] * tl.exp(lv), mask=mask)


def _tiles(B):
    return triton.cdiv(B, BLOCK_M), triton.cdiv(B, BLOCK_M)


@torch.library.custom_op("pnba::match_loss_fwd", mutates_args=())
def match_loss_fwd(mu_y: Tensor, logvar_y: Tensor, mu_x: Tensor, logvar_x: Tensor, a: Tensor, b: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(B, D) each, a and b one-element tensors -> loss (), row statistics s, r (B,)."""
    B, D = mu_y.shape
    acc_t, acc = acc_dtypes(mu_y.dtype)
    ins = [v.contiguous() for v in (mu_y, logvar_y, mu_x, logvar_x)]
    sy, sx = (mu_y.new_empty((B,), dtype=acc_t) for _ in range(2))  # distinct outputs may not alias
    _rowstat_kernel[(B,)](*ins, sy, sx, D, ACC=acc, BLOCK=min(1024, triton.next_power_of_2(D)))
    part = mu_y.new_empty(_tiles(B), dtype=acc_t)
    _fwd_kernel[_tiles(B)](ins[0], ins[2], sy, sx, a, b, part, B, D,
                           ACC=acc, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return part.sum(), sy, sx


@match_loss_fwd.register_fake
def _(mu_y, logvar_y, mu_x, logvar_x, a, b):
    acc_t = acc_dtypes(mu_y.dtype)[0]
    return mu_y.new_empty((), dtype=acc_t), mu_y.new_empty(mu_y.shape[:1], dtype=acc_t), \
        mu_y.new_empty(mu_y.shape[:1], dtype=acc_t)


@torch.library.custom_op("pnba::match_loss_bwd", mutates_args=())
def match_loss_bwd(g: Tensor, mu_y: Tensor, logvar_y: Tensor, mu_x: Tensor, logvar_x: Tensor, a: Tensor,
                   b: Tensor, sy: Tensor, sx: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Upstream g () -> d mu_y, d logvar_y, d mu_x, d logvar_x (B, D), d a, d b (shapes of a, b)."""
    B, D = mu_y.shape
    acc_t, acc = acc_dtypes(mu_y.dtype)
    ins = [v.contiguous() for v in (mu_y, logvar_y, mu_x, logvar_x)]
    gmat = mu_y.new_empty((B, B), dtype=acc_t)
    pa, pb = mu_y.new_empty((2, *_tiles(B)), dtype=acc_t)
    _bwd_pair_kernel[_tiles(B)](ins[0], ins[2], sy, sx, a, b, g, gmat, pa, pb, B, D,
                                ACC=acc, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    outs = [torch.empty_like(v) for v in ins]
    grid = (triton.cdiv(B, BLOCK_M), triton.cdiv(D, BLOCK_D))
    _bwd_side_kernel[grid](gmat, B, 1, ins[2], ins[0], ins[1], outs[0], outs[1], B, D,
                           ACC=acc, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    _bwd_side_kernel[grid](gmat, 1, B, ins[0], ins[2], ins[3], outs[2], outs[3], B, D,
                           ACC=acc, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    return (*outs, pa.sum().to(a.dtype).reshape(a.shape), pb.sum().to(b.dtype).reshape(b.shape))


@match_loss_bwd.register_fake
def _(g, mu_y, logvar_y, mu_x, logvar_x, a, b, sy, sx):
    return tuple(torch.empty_like(v, memory_format=torch.contiguous_format)
                 for v in (mu_y, logvar_y, mu_x, logvar_x, a, b))


class MatchLoss(torch.autograd.Function):
    """Kernel B under autograd; saved: the inputs and the row statistics s, r (B,)."""

    @staticmethod
    def forward(ctx, mu_y, logvar_y, mu_x, logvar_x, a, b):
        loss, sy, sx = torch.ops.pnba.match_loss_fwd(mu_y, logvar_y, mu_x, logvar_x, a, b)
        ctx.save_for_backward(mu_y, logvar_y, mu_x, logvar_x, a, b, sy, sx)
        return loss

    @staticmethod
    def backward(ctx, g):
        return torch.ops.pnba.match_loss_bwd(g, *ctx.saved_tensors)
