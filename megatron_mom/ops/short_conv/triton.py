"""Triton causal depthwise short convolution (+ SiLU) over packed sequences, with backward.

Semantics are those of `short_conv_reference`: y_t = act(sum_i w[c, i] x_{t-(W-1)+i}); inputs
before a sequence's first token come from its `initial_state` [N, C, W-1] (oldest first) or are
zero; nothing crosses a `cu_seqlens` boundary. Each token finds its sequence by a binary search
on `cu_seqlens` inside the kernel (no host sync). The final state (last W-1 inputs of each
sequence) is returned for decoding and is not differentiable here.

Two compile-time variations save memory traffic in the MoM layer. With a row index (GATHER),
packed row r reads input row x_row[r], so the packed copy of the input is never built. And the
backward writes dx with any row stride (DX_STRIDE), so column groups of one input fill one
gradient buffer (`short_conv_split`). Without them the kernels are the plain contiguous ones.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_mom.ops.common import (as_int32, checker, dense_cu_seqlens, need_device,
                                     need_triton_dtypes, search_steps)
from megatron_mom.ops.common.search import sequence_of_unrolled
from megatron_mom.ops.mix import sum_over_slots
from megatron_mom.ops.short_conv.reference import final_state

MAX_WIDTH = 8
# The forward and backward stream over rows: a program owns a run of consecutive packed rows
# and a block of BC channels, and visits its rows in order, R rows per step (loaded one step
# ahead, so R rows of every input are in flight while the previous R are computed). The last
# W-1 inputs, and in the backward the W-1 unfinished dx rows, wait in registers, so every
# input row is read once and every output row written once, each row a contiguous load or
# store along the channels; the run's first W-1 inputs (and in the backward the W-1 rows after
# it) are read again by the neighbouring program. No gather, shuffle or shared memory. The
# tensors are 1-D over channels: E = BC / (32 warps) channels a thread, so E = 4 gives 8-byte
# bf16 loads and stores.
# (R rows per step, BC channels, warps). Registers (offline sm_90 builds, Triton 3.9, W = 4,
# no spills): see docs/kernels.md; W > 4 doubles the warps for the same block.
FWD_CONFIG = (16, 512, 4)
BWD_CONFIG = (8, 512, 4)
# A program walks up to *_MAX_TILES steps of R rows, as long as each channel block still gets
# *_MIN_PROGRAMS programs (enough to fill the GPU). The backward writes one dw partial sum
# [C, W] per program (summed on the device afterwards), so its runs are longer.
FWD_MAX_TILES = 16
FWD_MIN_PROGRAMS = 256
BWD_MAX_TILES = 32
BWD_MIN_PROGRAMS = 128
# With the L2 norm (`conv_l2norm_forward`) a tile [BT rows, one head's columns] is reduced
# along its rows: (BT, warps) by the largest head dim served, so the tile stays at 4096
# elements. Its loads are issued before the sequence search (they do not depend on it).
NORM_CONFIG = {64: (64, 4), 128: (32, 4), 256: (16, 4)}


# Each load of x below has two compile-time forms. With GATHER it first reads the row index
# (the head of the load's dependency chain, so issued first); without, it is the plain kernels'
# line unchanged, which keeps their code (sm_90 SASS compared offline) and their tuned speed.

@triton.jit
def _tap(x, x_row, init, seq, tok, pos, shift, cols, tmask, cmask, x_stride,
         C: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr, GATHER: tl.constexpr):
    """x_{t - shift} [BT, BC] fp32 for each token t, from its own sequence or its initial state.
    The row is read whatever sequence it is in (its load does not wait for the search) and
    dropped by a select where it lies before the sequence: a NaN there stays there."""
    inside = pos >= shift
    here = tmask & (tok >= shift)
    if GATHER:
        row = tl.load(x_row + (tok - shift), mask=here, other=0).to(tl.int64)
        val = tl.load(x + row * x_stride + cols, mask=here & cmask, other=0.0)
    else:
        val = tl.load(x + (tok - shift).to(tl.int64) * x_stride + cols, mask=here & cmask,
                      other=0.0)
    val = tl.where(inside, val.to(tl.float32), 0.0)
    if HAS_INIT:
        slot = W - 1 + pos - shift                                   # >= 0 when not inside
        val += tl.load(init + seq.to(tl.int64) * C * (W - 1) + slot + cols * (W - 1),
                       mask=tmask & (pos < shift) & cmask, other=0.0).to(tl.float32)
    return val


@triton.jit
def _pre_activation(x, x_row, init, weight, seq, tok, pos, cols, tmask, cmask, x_stride,
                    C: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr,
                    GATHER: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    z = tl.zeros([BT, BC], dtype=tl.float32)
    for d in tl.static_range(W):
        w_d = tl.load(weight + cols * W + (W - 1 - d), mask=cmask, other=0.0).to(tl.float32)
        z += w_d * _tap(x, x_row, init, seq, tok, pos, d, cols, tmask, cmask, x_stride, C, W,
                        HAS_INIT, GATHER)
    return z


@triton.jit
def _locate(cu_seqlens, tok, N, STEPS: tl.constexpr):
    """(sequence, its start, its length) [BT, 1] of each token."""
    seq = sequence_of_unrolled(cu_seqlens, tok, N, STEPS)
    bos = tl.load(cu_seqlens + seq)
    return seq, bos, tl.load(cu_seqlens + seq + 1) - bos


@triton.jit(do_not_specialize=["TT", "N"])
def _conv_fwd_kernel(x, x_row, weight, init, y, cu_seqlens, TT, N, x_stride: tl.constexpr,
                     STEPS: tl.constexpr,
                     C: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                     GATHER: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                     NORM: tl.constexpr = False, rstd=None, eps=1e-6):
    """NORM: each column block is one head (BC = its dim); its rows are L2-normalised before
    the store, from the float32 activations, and 1/norm goes to rstd [TT, C // BC]."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]         # [BT, 1]
    cols = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]        # [1, BC]
    tmask = tok < TT
    cmask = cols < C
    seq, bos, _ = _locate(cu_seqlens, tok, N, STEPS)
    z = _pre_activation(x, x_row, init, weight, seq, tok, tok - bos, cols, tmask, cmask, x_stride,
                        C, W, HAS_INIT, GATHER, BT, BC)
    if SILU:
        z = z / (1.0 + tl.exp(-z))
    if NORM:
        r = 1.0 / tl.sqrt(tl.sum(z * z, axis=1) + eps)                   # [BT]
        z = z * r[:, None]
        tl.store(rstd + tl.reshape(tok, [BT]).to(tl.int64) * (C // BC) + tl.program_id(1), r,
                 mask=tl.reshape(tmask, [BT]))
    tl.store(y + tok.to(tl.int64) * C + cols, z.to(y.dtype.element_ty), mask=tmask & cmask)


@triton.jit
def _next_row(cu_seqlens, t, seq, end, pos, TT):
    """(sequence, its end, position in it) of row t from those of row t-1 (rows in order):
    past a sequence's end, the next non-empty sequence starts at t."""
    if (t >= end) & (t < TT):
        seq += 1
        while tl.load(cu_seqlens + seq + 1) <= t:                   # empty sequences
            seq += 1
        end = tl.load(cu_seqlens + seq + 1)
        pos = pos * 0
    else:
        pos += 1
    return seq, end, pos


@triton.jit
def _run_start(cu_seqlens, a, N, STEPS: tl.constexpr):
    """(sequence, end, position - 1) of row a, as `_next_row` takes them for row a - 1."""
    seq = sequence_of_unrolled(cu_seqlens, a, N, STEPS)
    return seq, tl.load(cu_seqlens + seq + 1), a - tl.load(cu_seqlens + seq) - 1


@triton.jit
def _row(x, x_row, t, limit, cols, cmask, x_stride, GATHER: tl.constexpr):
    """Input row t [BC] in x's dtype (zeros at or past `limit`, or before row 0)."""
    ok = (t >= 0) & (t < limit)
    if GATHER:
        r = tl.load(x_row + t, mask=ok, other=0).to(tl.int64)
    else:
        r = t.to(tl.int64)
    tv = cols * 0 + t          # masks of [BC] (the interpreter rejects a scalar & a block)
    return tl.load(x + r * x_stride + cols, mask=cmask & (tv >= 0) & (tv < limit), other=0.0)


@triton.jit
def _load_rows(x, x_row, first, limit, cols, cmask, x_stride, GATHER: tl.constexpr, R: tl.constexpr):
    """R input rows first.. first+R-1 (a tuple of [BC])."""
    out = ()
    for r in tl.static_range(R):
        out = out + (_row(x, x_row, first + r, limit, cols, cmask, x_stride, GATHER),)
    return out


@triton.jit
def _with_history(xw, init, seq, pos, cols, cmask, C: tl.constexpr, W: tl.constexpr,
                  HAS_INIT: tl.constexpr):
    """The window xw (x_{t-1}, ..., x_{t-W+1}) of a row at position `pos` of sequence `seq`:
    entries before the sequence's start replaced (a select: a NaN of the previous sequence
    stays there) by its initial state or zeros."""
    out = ()
    for e in tl.static_range(1, W):
        if HAS_INIT:
            hist = tl.load(init + seq.to(tl.int64) * C * (W - 1) + cols * (W - 1) + (W - 1 + pos - e),
                           mask=cmask & (cols * 0 + pos < e), other=0.0).to(tl.float32)
        else:
            hist = 0.0
        out = out + (tl.where(pos >= e, xw[e - 1], hist),)
    return out


@triton.jit
def _window(x, x_row, a, cols, cmask, x_stride, W: tl.constexpr, GATHER: tl.constexpr, TT):
    """x_{a-1}, ..., x_{a-W+1} [BC] fp32: the inputs before a run (whatever their sequence)."""
    out = ()
    for e in tl.static_range(1, W):
        out = out + (_row(x, x_row, a - e, TT, cols, cmask, x_stride, GATHER).to(tl.float32),)
    return out


@triton.jit
def _weights(weight, cols, cmask, W: tl.constexpr):
    """w[:, i] [BC] fp32 for i = 0..W-1."""
    out = ()
    for i in tl.static_range(W):
        out = out + (tl.load(weight + cols * W + i, mask=cmask, other=0.0).to(tl.float32),)
    return out


@triton.jit
def _taps(xt, xw, W: tl.constexpr):
    """(x_t, x_{t-1}, ..., x_{t-W+1}) from x_t and the window."""
    out = (xt,)
    for e in tl.static_range(1, W):
        out = out + (xw[e - 1],)
    return out


@triton.jit
def _shifted(taps, W: tl.constexpr):
    """The window of the next row: the first W-1 taps."""
    out = ()
    for e in tl.static_range(W - 1):
        out = out + (taps[e],)
    return out


@triton.jit
def _z(taps, w, W: tl.constexpr):
    z = w[W - 1] * taps[0]
    for e in tl.static_range(1, W):
        z = tl.fma(w[W - 1 - e], taps[e], z)
    return z


@triton.jit(do_not_specialize=["TT", "N", "TILES"])
def _conv_fwd_stream_kernel(x, x_row, weight, init, y, cu_seqlens, TT, N, TILES,
                            x_stride: tl.constexpr, STEPS: tl.constexpr, C: tl.constexpr,
                            W: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                            GATHER: tl.constexpr, R: tl.constexpr, BC: tl.constexpr):
    """y rows a .. a + TILES*R - 1 (a = program 0's run) of channel block program 1: each input
    row read once (the W-1 before the run read again), kept for the next W-1 rows."""
    cols = tl.program_id(1) * BC + tl.arange(0, BC)                  # [BC]
    cmask = cols < C
    a = tl.program_id(0) * TILES * R
    w = _weights(weight, cols, cmask, W)
    seq, end, pos = _run_start(cu_seqlens, a, N, STEPS)
    xw = _window(x, x_row, a, cols, cmask, x_stride, W, GATHER, TT)
    nxt = _load_rows(x, x_row, a, TT, cols, cmask, x_stride, GATHER, R)
    for step in range(TILES):
        base = a + step * R
        cur = nxt
        nxt = _load_rows(x, x_row, base + R, tl.where(step + 1 < TILES, TT, 0), cols, cmask, x_stride,
                    GATHER, R)
        for r in tl.static_range(R):
            t = base + r
            seq, end, pos = _next_row(cu_seqlens, t, seq, end, pos, TT)
            if pos >= W - 1:                       # the window is all inside the sequence
                taps = _taps(cur[r].to(tl.float32), xw, W)
            else:
                taps = _taps(cur[r].to(tl.float32),
                             _with_history(xw, init, seq, pos, cols, cmask, C, W, HAS_INIT), W)
            z = _z(taps, w, W)
            if SILU:
                z = z / (1.0 + tl.exp(-z))
            tl.store(y + t.to(tl.int64) * C + cols, z.to(y.dtype.element_ty),
                     mask=cmask & (cols * 0 + t < TT))
            xw = _shifted(taps, W)


@triton.jit
def _bwd_row(taps, g, w, dw, opened, pos, t, b, stop, W: tl.constexpr, SILU: tl.constexpr,
             EDGE: tl.constexpr):
    """One row t of the backward: (taps, dw + dz_t x_{t-e}, dx rows t .. t-(W-1) with dz_t's
    terms added). EDGE: the row may be past the run (no dw), past the rows read (no dz) or
    within W-1 of its sequence's start (dz_t reaches back only to the start): selects."""
    dz = g
    if SILU:
        z = _z(taps, w, W)
        sig = 1.0 / (1.0 + tl.exp(-z))
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    if EDGE:
        dz = tl.where(t < stop, dz, 0.0)    # past the rows read: nothing (not 0 * NaN)
        mine = tl.where(t < b, dz, 0.0)
    else:
        mine = dz
    # explicit fma: the compiler merges the two paths' common tails, and an add merged apart
    # from its product is no longer contracted into an fma
    acc = ()
    for e in tl.static_range(W):
        acc = acc + (tl.fma(mine, taps[e], dw[e]),)
    rows = (w[W - 1] * dz,)
    for d in tl.static_range(1, W):
        if EDGE:
            rows = rows + (tl.fma(w[W - 1 - d], tl.where(pos >= d, dz, 0.0), opened[d - 1]),)
        else:
            rows = rows + (tl.fma(w[W - 1 - d], dz, opened[d - 1]),)
    return taps, acc, rows


@triton.jit(do_not_specialize=["TT", "N", "TILES"])
def _conv_bwd_stream_kernel(x, x_row, weight, init, dy, dx, dw_part, cu_seqlens, TT, N, TILES,
                            x_stride: tl.constexpr, STEPS: tl.constexpr, C: tl.constexpr,
                            W: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                            GATHER: tl.constexpr, DX_STRIDE: tl.constexpr, R: tl.constexpr,
                            BC: tl.constexpr, PART_C: tl.constexpr):
    """dx and this program's dw partial sum for the run of RUN = TILES*R rows a .. b-1.

    Row t: z_t from x_t and the window, dz_t = dy_t silu'(z_t); dz_t adds w[W-1-d] dz_t to
    dx_{t-d} (d = 0..W-1, same sequence: d <= pos_t) and dz_t x_{t-e} to dw[W-1-e] (t < b).
    dx_{t-(W-1)} then has all its terms and is stored; the W-1 rows still open wait in
    registers. The walk goes on W-1 rows past b (dz only, for the last rows' dx). dw_part
    rows are PART_C channels apart (a column range of a wider buffer, as for heads of one
    weight); dx rows DX_STRIDE apart, x rows x_stride apart: compile-time constants, so the
    compiler knows how the rows align (a runtime 2056, the memory rows' stride, compiled to
    2-byte accesses)."""
    RUN = TILES * R
    cols = tl.program_id(1) * BC + tl.arange(0, BC)                  # [BC]
    cmask = cols < C
    a = tl.program_id(0) * RUN
    b = tl.minimum(a + RUN, TT)
    stop = tl.minimum(b + W - 1, TT)                                  # rows read: a .. stop-1
    w = _weights(weight, cols, cmask, W)
    seq, end, pos = _run_start(cu_seqlens, a, N, STEPS)
    xw = _window(x, x_row, a, cols, cmask, x_stride, W, GATHER, TT)
    opened = ()                                                       # dx_{t-1}, .., dx_{t-W+1}
    dw = ()                                                           # sum dz_t x_{t-e}
    for e in tl.static_range(W):
        dw = dw + (tl.zeros([BC], dtype=tl.float32),)
        if e > 0:
            opened = opened + (tl.zeros([BC], dtype=tl.float32),)
    nxt_x = _load_rows(x, x_row, a, stop, cols, cmask, x_stride, GATHER, R)
    nxt_g = _load_rows(dy, dy, a, stop, cols, cmask, C, False, R)
    for step in range(TILES + (W - 1 + R - 1) // R):
        base = a + step * R
        cur_x, cur_g = nxt_x, nxt_g
        nxt_x = _load_rows(x, x_row, base + R, stop, cols, cmask, x_stride, GATHER, R)
        nxt_g = _load_rows(dy, dy, base + R, stop, cols, cmask, C, False, R)
        for r in tl.static_range(R):
            t = base + r
            seq, end, pos = _next_row(cu_seqlens, t, seq, end, pos, TT)
            xt, g = cur_x[r].to(tl.float32), cur_g[r].to(tl.float32)
            # A row of the run whose window and open dx rows are all in its sequence (nearly
            # every row) needs none of the selects.
            if (pos >= W - 1) & (t < b):
                taps, dw, rows = _bwd_row(_taps(xt, xw, W), g, w, dw, opened, pos, t, b, stop,
                                          W, SILU, False)
            else:
                taps = _taps(xt, _with_history(xw, init, seq, pos, cols, cmask, C, W, HAS_INIT), W)
                taps, dw, rows = _bwd_row(taps, g, w, dw, opened, pos, t, b, stop, W, SILU, True)
            s = t - (W - 1)                                           # finished: store it
            tl.store(dx + s.to(tl.int64) * DX_STRIDE + cols, rows[W - 1].to(dx.dtype.element_ty),
                     mask=cmask & (cols * 0 + s >= a) & (cols * 0 + s < b))
            opened = _shifted(rows, W)
            xw = _shifted(taps, W)
    part = dw_part + (tl.program_id(0).to(tl.int64) * PART_C + cols) * W
    for e in tl.static_range(W):
        tl.store(part + (W - 1 - e), dw[e], mask=cmask)


@triton.jit
def _grad_pre_activation(x, x_row, init, weight, dy, seq, tok, pos, cols, tmask, cmask, x_stride,
                         C: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr,
                         SILU: tl.constexpr, GATHER: tl.constexpr, BT: tl.constexpr,
                         BC: tl.constexpr):
    """dL/dz [BT, BC] at tokens `tok` (zero where tmask is off)."""
    g = tl.load(dy + tok.to(tl.int64) * C + cols, mask=tmask & cmask, other=0.0).to(tl.float32)
    if SILU:
        z = _pre_activation(x, x_row, init, weight, seq, tok, pos, cols, tmask, cmask, x_stride,
                            C, W, HAS_INIT, GATHER, BT, BC)
        sig = 1.0 / (1.0 + tl.exp(-z))
        g = g * sig * (1.0 + z * (1.0 - sig))
    return g


@triton.jit(do_not_specialize=["N", "STEPS", "x_stride"])
def _conv_init_grad_kernel(x, x_row, weight, init, dy, dinit, cu_seqlens, N, STEPS, x_stride,
                           C: tl.constexpr, W: tl.constexpr, SILU: tl.constexpr,
                           GATHER: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """dL/dinitial_state [N, C, W-1]: slot W-1+p (p < 0) feeds z_t through tap t - p."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]        # [1, BC]
    cmask = cols < C
    bos = tl.load(cu_seqlens + n)
    length = tl.load(cu_seqlens + n + 1) - bos
    pos = tl.arange(0, BT)[:, None]                                  # first W-1 positions
    tmask = pos < tl.minimum(length, W - 1)
    seq = pos * 0 + n
    dz = _grad_pre_activation(x, x_row, init, weight, dy, seq, bos + pos, pos, cols, tmask, cmask,
                              x_stride, C, W, True, SILU, GATHER, BT, BC)
    out = dinit + (n.to(tl.int64) * C + tl.program_id(1) * BC + tl.arange(0, BC)) * (W - 1)
    for j in tl.static_range(W - 1):
        shift = pos - (j - (W - 1))                                  # tap index e = t - p
        w_e = tl.load(weight + cols * W + (W - 1 - shift),
                      mask=tmask & (shift <= W - 1) & cmask, other=0.0).to(tl.float32)
        feeds = tmask & (shift <= W - 1)                             # z_pos reads slot j
        tl.store(out + j, tl.sum(tl.where(feeds, w_e * dz, 0.0), axis=0),
                 mask=tl.reshape(cmask, [BC]))


@triton.jit(do_not_specialize=["N", "x_stride"])
def _conv_final_state_kernel(x, x_row, init, final, cu_seqlens, N, x_stride, C: tl.constexpr,
                             W: tl.constexpr, HAS_INIT: tl.constexpr, GATHER: tl.constexpr,
                             BC: tl.constexpr):
    """final[n, c, j] = input at position len - (W-1) + j of sequence n (or its history)."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    bos = tl.load(cu_seqlens + n)
    length = tl.load(cu_seqlens + n + 1) - bos
    for j in tl.static_range(W - 1):
        p = cols * 0 + (length - (W - 1) + j)                         # [BC], all equal
        if GATHER:
            row = tl.load(x_row + (bos + p), mask=cmask & (p >= 0), other=0).to(tl.int64)
            val = tl.load(x + row * x_stride + cols, mask=cmask & (p >= 0), other=0.0)
        else:
            val = tl.load(x + (bos + p).to(tl.int64) * x_stride + cols, mask=cmask & (p >= 0),
                          other=0.0)
        val = val.to(tl.float32)
        if HAS_INIT:
            val += tl.load(init + (n.to(tl.int64) * C + cols) * (W - 1) + (W - 1 + p),
                           mask=cmask & (p < 0), other=0.0).to(tl.float32)
        tl.store(final + (n.to(tl.int64) * C + cols) * (W - 1) + j, val.to(final.dtype.element_ty), mask=cmask)


def _block_c(C: int, cap: int = 64) -> int:
    return min(cap, triton.next_power_of_2(C))


def _tiles(config, C: int, W: int):
    """(R rows a step, BC channels, num_warps) of `config` for C channels and width W."""
    R, BC, warps = config
    return R, min(BC, triton.next_power_of_2(C)), warps if W <= 4 else 2 * warps


def _steps(TT: int, R: int, max_tiles: int, min_programs: int) -> int:
    """Steps of R rows per program (from shapes only): runs up to max_tiles steps long while
    each channel block keeps min_programs programs."""
    return max(1, min(max_tiles, triton.cdiv(TT, R) // min_programs))


def _bwd_steps(TT: int) -> int:
    return _steps(TT, BWD_CONFIG[0], BWD_MAX_TILES, BWD_MIN_PROGRAMS)


def conv_forward(x2: Tensor, x_row: Optional[Tensor], weight: Tensor, cu: Tensor, N: int,
                 init: Optional[Tensor], silu: bool) -> Tensor:
    """y [TT, C] of input rows x2 [*, C] (any row stride): packed row r reads x2[r], or
    x2[x_row[r]] with a row index (then TT = x_row.numel())."""
    TT = x2.shape[0] if x_row is None else x_row.numel()
    C, W = x2.shape[1], weight.shape[1]
    R, BC, warps = _tiles(FWD_CONFIG, C, W)
    tiles = _steps(TT, R, FWD_MAX_TILES, FWD_MIN_PROGRAMS)
    y = torch.empty(TT, C, dtype=x2.dtype, device=x2.device)          # [TT, C]
    if TT and C:
        _conv_fwd_stream_kernel[(triton.cdiv(TT, R * tiles), triton.cdiv(C, BC))](
            x2, _or_x(x_row, x2), weight, _or_x(init, x2), y, cu, TT, N, tiles, x2.stride(0),
            STEPS=search_steps(N), C=C, W=W, HAS_INIT=init is not None, SILU=silu,
            GATHER=x_row is not None, R=R, BC=BC, num_warps=warps)
    return y


def conv_l2norm_forward(x2: Tensor, x_row: Optional[Tensor], weight: Tensor, cu: Tensor, N: int,
                        head_dim: int, eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """silu(conv) of input rows x2 [*, C] (as `conv_forward`, no initial state), each head's
    head_dim columns L2-normalised in the same kernel: (y [TT, C], rstd [TT, C // head_dim]
    float32), what `l2norm_fwd` gives for the convolution's output, with the norm taken before
    the output is rounded to x2's dtype."""
    TT = x2.shape[0] if x_row is None else x_row.numel()
    C, W = x2.shape[1], weight.shape[1]
    if C % head_dim or head_dim != triton.next_power_of_2(head_dim) or head_dim > max(NORM_CONFIG):
        raise ValueError(f"conv_l2norm_forward: head_dim={head_dim} must be a power of two up "
                         f"to {max(NORM_CONFIG)} dividing the {C} channels")
    BT, warps = NORM_CONFIG[min(d for d in NORM_CONFIG if d >= head_dim)]
    y = torch.empty(TT, C, dtype=x2.dtype, device=x2.device)          # [TT, C]
    rstd = torch.empty(TT, C // head_dim, dtype=torch.float32, device=x2.device)
    if TT and C:
        _conv_fwd_kernel[(triton.cdiv(TT, BT), C // head_dim)](
            x2, _or_x(x_row, x2), weight, x2, y, cu, TT, N, x2.stride(0),
            STEPS=search_steps(N), C=C, W=W, HAS_INIT=False, SILU=True,
            GATHER=x_row is not None, BT=BT, BC=head_dim, NORM=True, rstd=rstd, eps=eps,
            num_warps=warps if W <= 4 else 2 * warps)
    return y, rstd


def conv_backward_programs(TT: int, W: int) -> int:
    """Programs along the rows of a backward over TT rows: the rows of its dw partials (W:
    the kernel width, which the row runs do not depend on)."""
    return triton.cdiv(TT, BWD_CONFIG[0] * _bwd_steps(TT))


def conv_backward(x2: Tensor, x_row: Optional[Tensor], weight: Tensor, init: Optional[Tensor],
                  dy: Tensor, dx: Tensor, cu: Tensor, N: int, silu: bool, want_dinit: bool,
                  dw_part: Optional[Tensor] = None):
    """Writes the gradient of each packed row's input into dx [TT, C] (any row stride: it may
    be a column range of a wider gradient); dy [TT, C] contiguous. Returns (dw [C, W] in
    weight's dtype, d initial_state or None). With `dw_part` [conv_backward_programs(TT, W), C,
    W] float32 (a column range of a wider buffer: several heads of one weight, summed once by
    the caller) the per-program partial sums go there and dw is returned as None."""
    TT, C = dx.shape
    W = weight.shape[1]
    R, BC, warps = _tiles(BWD_CONFIG, C, W)
    tiles = _bwd_steps(TT)
    programs = conv_backward_programs(TT, W)
    own_part = dw_part is None
    if own_part:
        # [programs, C, W]: every entry is written by exactly one program, hence no zero fill
        dw_part = torch.empty(programs, C, W, dtype=torch.float32, device=dx.device)
    elif (dw_part.shape != (programs, C, W) or dw_part.dtype != torch.float32
          or dw_part.stride()[1:] != (W, 1)):
        raise ValueError(f"short_conv (triton): dw_part {tuple(dw_part.shape)} / "
                         f"{dw_part.stride()} must be float32 [{programs}, {C}, {W}] with "
                         f"contiguous channel rows")
    steps = search_steps(N)
    if TT and C:
        _conv_bwd_stream_kernel[(programs, triton.cdiv(C, BC))](
            x2, _or_x(x_row, x2), weight, _or_x(init, x2), dy, dx, dw_part, cu, TT, N, tiles,
            x2.stride(0), STEPS=steps, C=C, W=W, HAS_INIT=init is not None, SILU=silu,
            GATHER=x_row is not None, DX_STRIDE=dx.stride(0), R=R, BC=BC,
            PART_C=dw_part.stride(0) // W, num_warps=warps)
    dinit = None
    if want_dinit:
        dinit32 = torch.empty(N, C, W - 1, dtype=torch.float32, device=dx.device)
        BC = _block_c(C)
        _conv_init_grad_kernel[(N, triton.cdiv(C, BC))](
            x2, _or_x(x_row, x2), weight, init, dy, dinit32, cu, N, steps, x2.stride(0), C=C,
            W=W, SILU=silu, GATHER=x_row is not None, BT=max(2, triton.next_power_of_2(W - 1)),
            BC=BC)
        dinit = dinit32.to(init.dtype)
    return (dw_part.sum(0).to(weight.dtype) if own_part else None), dinit


def _or_x(t: Optional[Tensor], x2: Tensor) -> Tensor:
    """An optional kernel operand, or x2 as a placeholder the kernel never reads."""
    return x2 if t is None else t


class _ShortConv(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x2, weight, cu, N, init, silu, x_row, slot_row):
        ctx.save_for_backward(x2, weight, cu, init, x_row, slot_row)
        ctx.meta = (N, silu)
        return conv_forward(x2, x_row, weight, cu, N, init, silu)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, cu, init, x_row, slot_row = ctx.saved_tensors
        N, silu = ctx.meta
        dx = torch.empty(dy.shape, dtype=x2.dtype, device=x2.device)    # [TT, C], per packed row
        dw, dinit = conv_backward(x2, x_row, weight, init, dy.contiguous(), dx, cu, N, silu,
                                  init is not None and ctx.needs_input_grad[4])
        if x_row is not None:
            dx = sum_over_slots(dx, slot_row, backend="triton")        # [rows of x2, C]
        return dx, dw, None, None, dinit, None, None, None


class _ShortConvSplit(torch.autograd.Function):
    """Consecutive column groups of x2 [TT, sum(sizes)], each convolved with its own weight or
    (weight None) copied through. The backward fills ONE dx: each group writes its own columns,
    so no cat of per-group gradients."""

    @staticmethod
    def forward(ctx, x2, cu, N, silu, sizes, *weights):
        ctx.set_materialize_grads(False)  # an unused output's gradient: None, not a zero tensor
        ctx.save_for_backward(x2, cu, *weights)
        ctx.meta = (N, silu, sizes)
        return tuple(x.clone(memory_format=torch.contiguous_format) if w is None
                     else conv_forward(x, None, w, cu, N, None, silu)
                     for x, w in zip(_column_groups(x2, sizes), weights))

    @staticmethod
    def backward(ctx, *dys):
        x2, cu, *weights = ctx.saved_tensors
        N, silu, sizes = ctx.meta
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)    # [TT, sum(sizes)]
        dws = [_group_backward(x, w, dy, d, cu, N, silu) for x, w, dy, d in
               zip(_column_groups(x2, sizes), weights, dys, _column_groups(dx, sizes))]
        return (dx, None, None, None, None, *dws)


def _column_groups(t: Tensor, sizes) -> Tuple[Tensor, ...]:
    """Column-range views of t [TT, sum(sizes)]."""
    return t.split(list(sizes), dim=1)


def _group_backward(x: Tensor, weight: Optional[Tensor], dy: Optional[Tensor], dx: Tensor,
                    cu: Tensor, N: int, silu: bool) -> Optional[Tensor]:
    """Fills one group's columns dx of the shared gradient; returns its dw (None without one)."""
    if dy is None:
        dx.zero_()
        return None if weight is None else torch.zeros_like(weight)
    if weight is None:
        dx.copy_(dy)
        return None
    return conv_backward(x, None, weight, None, dy.contiguous(), dx, cu, N, silu, False)[0]


def _final_state(x2: Tensor, x_row: Optional[Tensor], cu: Tensor, N: int, W: int,
                 init: Optional[Tensor]) -> Tensor:
    C = x2.shape[1]
    final = torch.empty(N, C, W - 1, dtype=x2.dtype, device=x2.device)
    if N and W > 1:
        BC = _block_c(C)
        _conv_final_state_kernel[(N, triton.cdiv(C, BC))](
            x2, _or_x(x_row, x2), _or_x(init, x2), final, cu, N, x2.stride(0), C=C, W=W,
            HAS_INIT=init is not None, GATHER=x_row is not None, BC=BC)
    return final


def check_inputs(x: Tensor, weights, cu_seqlens: Optional[Tensor], activation: Optional[str]):
    """What the Triton kernels need beyond the dispatcher's shape checks (also for the ops
    built on them)."""
    where = "short_conv (triton)"
    need = checker(where)
    need(activation in ("silu", None), f"activation must be 'silu' or None, got {activation!r}")
    need_triton_dtypes(where, x=x, **{f"weights[{i}]": w for i, w in enumerate(weights)})
    for w in weights:
        need(1 <= w.shape[1] <= MAX_WIDTH, f"kernel width W={w.shape[1]} must be in "
             f"1..{MAX_WIDTH}")
    need_device(where, x.device, cu_seqlens=cu_seqlens)


def _rows(x: Tensor) -> Tensor:
    """x [B, T, C] -> [B * T, C] rows with unit column stride (a view where possible)."""
    x2 = x.reshape(x.shape[0] * x.shape[1], x.shape[2])
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def short_conv(
    x: Tensor, weight: Tensor, *, cu_seqlens: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
    activation: Optional[str] = "silu", gather: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """x: [B, T, C] (B == 1 with cu_seqlens), weight: [C, W], states [N, C, W-1].
    Returns (y like x, final state [N, C, W-1] in x's dtype or None). With
    `gather` = (x_row [L], slot_row [T, S]) (checked by the dispatcher): x [1, T, C] holds the
    rows that the L packed rows read, y is [1, L, C]."""
    B, T, C = x.shape
    W = weight.shape[1]
    check_inputs(x, [weight], cu_seqlens, activation)
    x_row, slot_row = (None, None) if gather is None else (g.contiguous() for g in gather)
    TT = B * T if x_row is None else x_row.numel()
    cu = dense_cu_seqlens(B, TT // B, x.device) if cu_seqlens is None else as_int32(cu_seqlens)
    N = cu.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, C, W - 1):
        raise ValueError(f"short_conv: initial_state {tuple(initial_state.shape)} must be "
                         f"[N={N}, C={C}, W-1={W - 1}]")
    x2 = _rows(x)                                                     # [B * T, C]
    init = None if initial_state is None else initial_state.contiguous()
    y = _ShortConv.apply(x2, weight.contiguous(), cu, N, init, activation == "silu", x_row,
                         slot_row)
    final = None
    if output_final_state:
        tracked = torch.is_grad_enabled() and (x.requires_grad or (
            init is not None and init.requires_grad))
        if tracked:  # autograd's gathers, so a loss on the final state reaches x and init
            final = final_state(x2, cu, W, init, row_of=x_row).to(x.dtype)
        else:
            final = _final_state(x2, x_row, cu, N, W, init)
    return y.view(B, TT // B, C), final


def short_conv_split(
    x: Tensor, weights: Sequence[Optional[Tensor]], sizes: Sequence[int], *,
    cu_seqlens: Optional[Tensor] = None, activation: Optional[str] = "silu",
) -> Tuple[Tensor, ...]:
    """x: [B, T, sum(sizes)] (B == 1 with cu_seqlens); weights[i]: [sizes[i], W_i] or None
    (checked by the dispatcher). Returns one contiguous [B, T, sizes[i]] per group."""
    B, T, _ = x.shape
    check_inputs(x, [w for w in weights if w is not None], cu_seqlens, activation)
    cu = dense_cu_seqlens(B, T, x.device) if cu_seqlens is None else as_int32(cu_seqlens)
    ys = _ShortConvSplit.apply(_rows(x), cu, cu.numel() - 1, activation == "silu", tuple(sizes),
                               *(None if w is None else w.contiguous() for w in weights))
    return tuple(y.view(B, T, -1) for y in ys)


__all__ = ["short_conv", "short_conv_split", "check_inputs", "conv_forward", "conv_backward",
           "conv_l2norm_forward", "conv_backward_programs"]
