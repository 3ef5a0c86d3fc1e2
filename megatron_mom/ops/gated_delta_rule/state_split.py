"""Chunk-parallel state passing for the sequential state kernels (docs/kernels.md,
"Chunk-parallel state passing").

Per chunk the forward state update is affine in the entry state S:
    S' = e^Gam S + Kt^T (U0 - W S) = A_c S + B_c,   A_c = e^Gam I - Kt^T W,  B_c = Kt^T U0
(Kt = e^(Gam - gam) k rows). A run of chunks (a "piece") composes to S_end = A_p S_start + B_p,
and A_p, B_p follow the state's own recurrence: B_p is the state after the piece from a zero
start, column j of A_p the state after the piece from e_j with U0 = 0. The backward's
recurrence over the exit-state gradient dS' is affine too:
    dS = A_c^T dS' + D_c,   D_c = Q^T (scale e^gam dO) - W^T P^T dO,
so a piece maps dS_end to dS_start = A_p^T dS_end + D_p, the same two runs in reverse
(identity start with dO = 0, and zero start).

Three passes replace one program per (V block, head, sequence) walking every chunk:
  1. `piece_fwd_kernel` / `piece_bwd_kernel`, one program per (column block of [A_p | B_p],
     head, piece): the piece's transfer, fp32, into `ab` [NPU, H, K, K + V].
  2. `piece_scan_kernel`, one program per (V block, head, sequence): S_{p+1} = A_p S_p + B_p
     over the sequence's pieces (in reverse for the backward), storing each piece's entry
     state (exit gradient) and the final state (initial-state gradient).
  3. The unchanged `state_fwd_kernel` / `state_bwd_kernel` over the pieces as sequences,
     starting from pass 2's states: o, per-chunk h, U (dh, dU) exactly as without pieces.
Transposed operands are loaded from memory, never a transposed `tl.dot` result (Triton
3.4-3.7 on Hopper, see chunk_fwd.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from megatron_mom.ops.gated_delta_rule.chunk_fwd import chunk_of, load_decay


@triton.jit
def piece_start(vb, K: tl.constexpr, BV: tl.constexpr):
    """(columns of [A_p | B_p] in block vb, the block's start [K, BV]: identity columns in
    the A part, zeros in the B part)."""
    cols = vb * BV + tl.arange(0, BV)
    eye = tl.arange(0, K)[:, None] == cols[None, :]
    return cols, tl.where(eye, 1.0, 0.0)


@triton.jit
def store_transfer(ab, s, p, h, cols, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    rows = (p.to(tl.int64) * H + h) * K + tl.arange(0, K)
    tl.store(ab + rows[:, None] * (K + V) + cols[None, :], s)


@triton.jit
def fwd_transfer(s, k, w, u0, gam, bos, eos, h, vcols,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                 PREC: tl.constexpr, SQK: tl.constexpr, HAS_U0: tl.constexpr):
    """`state_fwd_kernel`'s recurrence over the chunks of tokens [bos, eos) from s [K, BV]:
    U = U0 - W S (U0 = 0 without HAS_U0), S' = e^Gam S + Kt^T U."""
    kcols = tl.arange(0, K)
    dt = w.dtype.element_ty
    for c in range(tl.cdiv(eos - bos, C)):
        tok, valid, last = chunk_of(bos, eos, c, C)
        g_c, g_last = load_decay(gam, tok, valid, last, h, H, C)
        w_s = tl.dot(tl.load(w + (tok * H + h)[:, None] * K + kcols[None, :],
                             mask=valid[:, None], other=0.0), s.to(dt), input_precision=PREC)
        if HAS_U0:
            u_new = tl.load(u0 + (tok * H + h)[:, None] * V + vcols[None, :],
                            mask=valid[:, None], other=0.0).to(tl.float32) - w_s
        else:
            u_new = -w_s
        u_k = (u_new * tl.where(valid, tl.exp(g_last - g_c), 0.0)[:, None]).to(dt)
        s = s * tl.exp(g_last)
        s += tl.dot(tl.trans(tl.load(k + (tok * SQK + h * K)[:, None] + kcols[None, :],
                                     mask=valid[:, None], other=0.0)), u_k, input_precision=PREC)
    return s


@triton.jit
def piece_fwd_kernel(
    k, w, u0, gam,                       # [TT,H,K] x2, [TT,H,V], [TT,H] f32
    ab,                                  # [NPU,H,K,K+V] f32: A_p columns, then B_p
    piece_cu,                            # [NPU+1] first token of each piece
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, SQK: tl.constexpr,
):
    """One program per (column block of [A_p | B_p], head, piece): the state recurrence over
    the piece's chunks from identity columns with U0 = 0 (A part) or from zero (B part); no
    o, no per-chunk stores. The two parts are two compiled loops, so the A part neither
    loads U0 nor subtracts zeros."""
    vb = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2)
    bos = tl.load(piece_cu + p)
    eos = tl.load(piece_cu + p + 1)
    if eos <= bos:                                                  # past the real pieces
        return
    cols, s = piece_start(vb, K, BV)
    if vb * BV < K:
        s = fwd_transfer(s, k, w, u0, gam, bos, eos, h, cols - K, H, K, V, C, PREC, SQK, False)
    else:
        s = fwd_transfer(s, k, w, u0, gam, bos, eos, h, cols - K, H, K, V, C, PREC, SQK, True)
    store_transfer(ab, s, p, h, cols, H, K, V)


@triton.jit
def bwd_transfer(ds, q, k, w, gam, p_mat, do, bos, eos, first_chunk, h, vcols, scale,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                 PREC: tl.constexpr, SQK: tl.constexpr, SDO: tl.constexpr,
                 HAS_DO: tl.constexpr):
    """`state_bwd_kernel`'s recurrence over the chunks of [bos, eos), last to first, from
    ds [K, BV]: dU = Kt dS' + P^T dO, dS = e^Gam dS' + Q^T (scale e^gam dO) - W^T dU
    (without HAS_DO: dO = 0, so neither P nor q is read)."""
    rows = tl.arange(0, C)
    kcols = tl.arange(0, K)
    dt = w.dtype.element_ty
    cc_offs = rows[:, None] * C + rows[None, :]
    num_chunks = tl.cdiv(eos - bos, C)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        tok, valid, last = chunk_of(bos, eos, c, C)
        g_c, g_last = load_decay(gam, tok, valid, last, h, H, C)
        koffs = (tok * SQK + h * K)[:, None] + kcols[None, :]           # q, k
        du = tl.dot(tl.load(k + koffs, mask=valid[:, None], other=0.0), ds.to(dt),
                    input_precision=PREC) * tl.exp(g_last - g_c)[:, None]
        ds = ds * tl.exp(g_last)
        if HAS_DO:
            chunk_id = (first_chunk + c).to(tl.int64) * H + h
            do_t = tl.load(do + (tok * SDO + h * V)[:, None] + vcols[None, :],
                           mask=valid[:, None], other=0.0)
            du += tl.dot(tl.trans(tl.load(p_mat + chunk_id * C * C + cc_offs)), do_t.to(dt),
                         input_precision=PREC)
            do_q = (do_t.to(tl.float32) * (tl.exp(g_c) * scale)[:, None]).to(dt)
            ds += tl.dot(tl.trans(tl.load(q + koffs, mask=valid[:, None], other=0.0)), do_q,
                         input_precision=PREC)
        ds -= tl.dot(tl.trans(tl.load(w + (tok * H + h)[:, None] * K + kcols[None, :],
                                      mask=valid[:, None], other=0.0)), du.to(dt),
                     input_precision=PREC)
    return ds


@triton.jit(do_not_specialize=["scale"])
def piece_bwd_kernel(
    q, k, w, gam, p_mat, do,             # [TT,H,K] x3, [TT,H] f32, [NTU,H,C,C], [TT,H,V]
    ab,                                  # [NPU,H,K,K+V] f32: A_p^T columns, then D_p
    piece_cu, piece_chunk, scale,        # [NPU+1] first token / global first chunk per piece
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, SQK: tl.constexpr, SDO: tl.constexpr,
):
    """One program per (column block of [A_p^T | D_p], head, piece), chunks last to first:
    the gradient recurrence from identity columns with dO = 0 (A part: two dots per chunk)
    or from zero (D part: four); no dh, dU stores."""
    vb = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2)
    bos = tl.load(piece_cu + p)
    eos = tl.load(piece_cu + p + 1)
    if eos <= bos:
        return
    first_chunk = tl.load(piece_chunk + p)
    cols, ds = piece_start(vb, K, BV)
    if vb * BV < K:
        ds = bwd_transfer(ds, q, k, w, gam, p_mat, do, bos, eos, first_chunk, h, cols - K,
                          scale, H, K, V, C, PREC, SQK, SDO, False)
    else:
        ds = bwd_transfer(ds, q, k, w, gam, p_mat, do, bos, eos, first_chunk, h, cols - K,
                          scale, H, K, V, C, PREC, SQK, SDO, True)
    store_transfer(ab, ds, p, h, cols, H, K, V)


@triton.jit
def piece_scan_kernel(
    ab,                                  # [NPU,H,K,K+V] f32: [A_p | B_p] per piece
    s_in, s_piece, s_out,                # [N,HN,K,V], [NPU,H,K,V] f32, [N,HN,K,V] f32
    piece_offsets,                       # [N+1] running piece count per sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_IN: tl.constexpr, STORE_OUT: tl.constexpr, REVERSE: tl.constexpr,
    PREC: tl.constexpr, HN: tl.constexpr,
):
    """One program per (V block, head, sequence) walks its pieces (last to first when
    REVERSE), from s_in (or zero): stores each piece's start state S_p in s_piece, then
    S <- A_p S_p + B_p, and the last S in s_out. A_p S_p is summed over [BK]-row tiles of
    S_p read back from s_piece (a register tile cannot be sliced), so A_p is never held
    whole: [K, BK] tiles, fp32."""
    vb = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.program_id(2)
    first = tl.load(piece_offsets + n)
    count = tl.load(piece_offsets + n + 1) - first
    kcols = tl.arange(0, K)
    vcols = vb * BV + tl.arange(0, BV)
    state_offs = kcols[:, None] * V + vcols[None, :]
    if HAS_IN:
        s = tl.load(s_in + (n.to(tl.int64) * HN + h) * K * V + state_offs).to(tl.float32)
    else:
        s = tl.zeros([K, BV], dtype=tl.float32)
    for i in range(count):
        if REVERSE:
            p = first + count - 1 - i
        else:
            p = first + i
        head_piece = p.to(tl.int64) * H + h
        piece_state = s_piece + head_piece * K * V
        tl.store(piece_state + state_offs, s)
        tl.debug_barrier()                                       # S_p visible to all threads
        ab_rows = ab + (head_piece * K + kcols)[:, None] * (K + V)
        s = tl.load(ab_rows + K + vcols[None, :])                # B_p
        for kb in tl.static_range(K // BK):
            kk = kb * BK + tl.arange(0, BK)
            s += tl.dot(tl.load(ab_rows + kk[None, :]),
                        tl.load(piece_state + kk[:, None] * V + vcols[None, :]),
                        input_precision=PREC)
    if STORE_OUT:
        tl.store(s_out + (n.to(tl.int64) * HN + h) * K * V + state_offs, s)
