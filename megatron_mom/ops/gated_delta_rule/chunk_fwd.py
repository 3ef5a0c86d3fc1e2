"""Forward kernels of the chunked gated delta rule (see docs/kernels.md for the algebra).

Per chunk of C tokens (local cumulative log-decay gam, last valid value Gam):
    A   = strictly_lower(beta_i (k_i . k_j) exp(gam_i - gam_j));   T = (I + A)^-1
    W   = T (beta exp(gam) k),  U0 = T (beta v)                     -> `prepare_kernel`
    U   = U0 - W S;  o = scale (exp(gam) q S + (M * q k^T) U)
    S'  = exp(Gam) S + (exp(Gam - gam) k)^T U                       -> `state_fwd_kernel`
    o from the stored states, chunk-parallel (training forward)     -> `chunk_out_kernel`

Layouts: token-major [TT, H, *] for per-token tensors (TT = packed tokens), chunk-major
[NTU, H, ...] for per-chunk tensors (NTU = chunk-count upper bound; chunk id = program id).
The kernels' own intermediates (gam, W, U, T, P, h, ...) are [.., H, ..] for the H heads of the
launch; the inputs and gradients may be a head slice of wider tensors (the backward by head
groups reads and writes the full tensors in place): their token-row strides in elements are
compile-time arguments (SQK for q and k, SV, SGB for g and beta, ...), and HN is the head count
of the [N, HN, K, V] initial and final states.
No kernel transposes a `tl.dot` result before feeding it to another `tl.dot` (Triton 3.4-3.7
miscompiles that on Hopper): transposed operands are always loaded from memory.
"""
from __future__ import annotations

import triton
import triton.language as tl

from megatron_mom.ops.common.search import sequence_of


@triton.jit
def finite(x):
    """Elementwise: x is neither NaN nor +-Inf."""
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def chunk_of(bos, eos, c, C: tl.constexpr):
    """Token ids [C] int64, valid-row mask and last valid row of chunk c of tokens [bos, eos)."""
    t0 = bos + c * C
    tok = (t0 + tl.arange(0, C)).to(tl.int64)
    return tok, tok < eos, tl.minimum(eos - t0, C) - 1


@triton.jit
def chunk_rows(chunk_offsets, cu_seqlens, pid, N, STEPS, C: tl.constexpr):
    """(token ids [C] int64, valid-row mask [C], last valid row) of chunk `pid`."""
    n = sequence_of(chunk_offsets, pid, N, STEPS)
    return chunk_of(tl.load(cu_seqlens + n), tl.load(cu_seqlens + n + 1),
                    pid - tl.load(chunk_offsets + n), C)


@triton.jit
def load_decay(gam, tok, valid, last, h, H: tl.constexpr, C: tl.constexpr):
    """Cumulative log-decay of a chunk [C] and its last valid value; rows past the end of the
    sequence repeat that value so every exp(gam_i - gam_j) with i >= j stays <= 1."""
    g = tl.load(gam + tok * H + h, mask=valid, other=0.0)
    g_last = tl.sum(tl.where(tl.arange(0, C) == last, g, 0.0), axis=0)
    return tl.where(valid, g, g_last), g_last


@triton.jit
def invert_unit_lower(a_base, NB: tl.constexpr, BS: tl.constexpr):
    """(I + A_b)^-1 for NB strictly lower triangular [BS, BS] fp32 blocks stored one after
    another at a_base, by forward substitution (exact fp32 arithmetic, no tensor cores):
    row i = e_i - sum_{j<i} a_ij row_j. The NB blocks share the BS - 1 sequential steps; row i
    of each block is read from memory (L1) straight into the layout of `inv` (repeated along
    the last axis), so no step converts a layout: 0.07 ms less at D128 than a [NB, BS] load."""
    r = tl.arange(0, BS)
    eye = (r[:, None] == r[None, :]).to(tl.float32)
    inv = tl.zeros([NB, BS, BS], dtype=tl.float32) + eye[None, :, :]
    blk = tl.arange(0, NB)[:, None, None] * (BS * BS)
    for i in range(1, BS):
        a_i = tl.load(a_base + blk + i * BS + r[None, :, None] + 0 * r[None, None, :])  # a_ij at [b, j, :]
        upd = tl.sum(a_i * inv, axis=1)                                 # sum_j a_ij inv[j, :]
        inv = tl.where(r[None, :, None] == i, inv - upd[:, None, :], inv)
    return inv


@triton.jit
def solve_by_blocks(a, d_base, C: tl.constexpr, PREC: tl.constexpr):
    """(I + a)^-1 by blocks of 16: exact inverses of the diagonal blocks (through the fp32
    scratch d_base [C/16, 16, 16], since register tiles cannot be sliced), then
    (I + A) = (I + A_d)(I + N), N = A_d^-1 A_off, N^4 = 0 for C <= 64, so
    T = (I - N)(I + N^2) A_d^-1."""
    rows = tl.arange(0, C)
    blk_of = rows // 16
    diag = blk_of[:, None] == blk_of[None, :]
    d_ptrs = d_base + blk_of[:, None] * 256 + (rows % 16)[:, None] * 16 + (rows % 16)[None, :]
    tl.store(d_ptrs, a, mask=diag)
    tl.debug_barrier()
    inv_d = invert_unit_lower(d_base, C // 16, 16)
    tl.debug_barrier()                                             # all rows read before
    r16 = tl.arange(0, 16)
    tl.store(d_base + tl.arange(0, C // 16)[:, None, None] * 256 + r16[None, :, None] * 16
             + r16[None, None, :], inv_d)
    tl.debug_barrier()
    d_inv = tl.load(d_ptrs, mask=diag, other=0.0)
    n_mat = tl.dot(d_inv, tl.where(blk_of[:, None] > blk_of[None, :], a, 0.0), input_precision=PREC)
    n_sq = tl.dot(n_mat, n_mat, input_precision=PREC)
    y = d_inv + tl.dot(n_sq, d_inv, input_precision=PREC)
    return y - tl.dot(n_mat, y, input_precision=PREC)


@triton.jit(do_not_specialize=["N", "STEPS", "scale"])
def prepare_kernel(
    q, k, v, g, beta,                    # [TT,H,K] x2, [TT,H,V], [TT,H], [TT,H]
    gam_out, w_out, u_out, t_out, p_out,  # [TT,H] f32, [TT,H,K], [TT,H,V], [NTU,H,C,C], [NTU,H,C,C]
    t_work,                              # [NTU,H,C,16] f32: the solve's diagonal blocks
    cu_seqlens, chunk_offsets, N, STEPS, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    SQK: tl.constexpr, SV: tl.constexpr, SGB: tl.constexpr,
):
    """One program per (chunk, head): cumulative decay, T = (I + A)^-1, W, U0 and the
    intra-chunk read-out P = scale * lower(q k^T * exp(gam_i - gam_j))."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if pid >= tl.load(chunk_offsets + N):
        return
    tok, valid, last = chunk_rows(chunk_offsets, cu_seqlens, pid, N, STEPS, C)
    rows = tl.arange(0, C)

    # Rows whose k, v, g or beta hold a non-finite value are zeroed for every product here
    # (in a dense tile product a masked-out 0 times NaN is NaN, which would reach the earlier
    # rows) and marked: from the first marked row on, the stored gam is NaN, so the outputs
    # from that row on and the chunk's exit state come out NaN in state_fwd_kernel while the
    # earlier rows are exactly what they are for any finite input there.
    g_c = tl.load(g + tok * SGB + h, mask=valid, other=0.0).to(tl.float32)
    b_c = tl.load(beta + tok * SGB + h, mask=valid, other=0.0).to(tl.float32)
    bad = ~(finite(g_c) & finite(b_c))                             # [C]
    g_c = tl.where(finite(g_c), g_c, 0.0)
    b_c = tl.where(finite(b_c), b_c, 0.0)
    gam = tl.cumsum(g_c, axis=0)                                   # [C]; constant past the end

    chunk_id = pid.to(tl.int64) * H + h
    causal = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    decay = tl.where(causal, tl.exp(tl.where(causal, gam[:, None] - gam[None, :], 0.0)), 0.0)
    qk = tl.zeros([C, C], dtype=tl.float32)                        # q_i . k_j
    kk = tl.zeros([C, C], dtype=tl.float32)                        # k_i . k_j
    for kb in tl.static_range(K // BK):
        cols = kb * BK + tl.arange(0, BK)
        offs = (tok * SQK + h * K)[:, None] + cols[None, :]
        k_t = tl.load(k + offs, mask=valid[:, None], other=0.0)
        bad |= tl.max(tl.where(finite(k_t), 0, 1), axis=1) > 0
        k_t = tl.where(finite(k_t), k_t, 0.0)
        k_tt = tl.trans(k_t)
        qk += tl.dot(tl.load(q + offs, mask=valid[:, None], other=0.0), k_tt, input_precision=PREC)
        kk += tl.dot(k_t, k_tt, input_precision=PREC)
    cc_offs = rows[:, None] * C + rows[None, :]
    tl.store(p_out + chunk_id * C * C + cc_offs, (qk * decay * scale).to(p_out.dtype.element_ty))
    a = tl.where(strict, kk * decay * b_c[:, None], 0.0)           # [C, C] strictly lower
    # By substitution, not by a power series: (I - A)(I + A^2)(I + A^4)... is exact in exact
    # arithmetic but, with no decay and near-parallel keys, sums terms of ~1e17 that cancel.
    t_mat = solve_by_blocks(a, t_work + chunk_id * C * 16, C, PREC)
    tl.store(t_out + chunk_id * C * C + cc_offs, t_mat.to(t_out.dtype.element_ty))

    # W and U0 are stored in the inputs' dtype, so their dots take T in that dtype too (one
    # rounding of the same size as the store's; T itself is stored as CONFIG["t_dtype"] says).
    dt = w_out.dtype.element_ty
    t_op = t_mat.to(dt)
    kscale = b_c * tl.exp(gam)
    for kb in tl.static_range(K // BK):
        cols = kb * BK + tl.arange(0, BK)
        k_t = tl.load(k + (tok * SQK + h * K)[:, None] + cols[None, :], mask=valid[:, None],
                      other=0.0).to(tl.float32)
        k_t = tl.where(finite(k_t), k_t, 0.0)
        w_t = tl.dot(t_op, (k_t * kscale[:, None]).to(dt), input_precision=PREC)
        tl.store(w_out + (tok * H + h)[:, None] * K + cols[None, :], w_t.to(w_out.dtype.element_ty),
                 mask=valid[:, None])
    for vb in tl.static_range(V // BV):
        cols = vb * BV + tl.arange(0, BV)
        v_t = tl.load(v + (tok * SV + h * V)[:, None] + cols[None, :], mask=valid[:, None],
                      other=0.0).to(tl.float32)
        bad |= tl.max(tl.where(finite(v_t), 0, 1), axis=1) > 0
        v_t = tl.where(finite(v_t), v_t, 0.0)
        u_t = tl.dot(t_op, (v_t * b_c[:, None]).to(dt), input_precision=PREC)
        tl.store(u_out + (tok * H + h)[:, None] * V + cols[None, :], u_t.to(u_out.dtype.element_ty),
                 mask=valid[:, None])
    poisoned = tl.cumsum(bad.to(tl.int32), axis=0) > 0
    tl.store(gam_out + tok * H + h, tl.where(poisoned, tl.full([C], float("nan"), tl.float32), gam),
             mask=valid)


# The sequential state kernels hold a [K, BV] state as K/64 tiles of [64, BV] (one tile below
# K = 64) and read q, k, W in [C, 64] column blocks: whole [C, 256] tiles took 255 registers
# and spilled at K = 256 on sm_90 (benchmarks/kernel_resources.py, docs/performance.md).
@triton.jit
def state_program(order, cu_seqlens, chunk_offsets, V: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, ORDERED: tl.constexpr):
    """This program's head, sequence (program_id(2), or order[program_id(2)] with ORDERED),
    its first and end token and first chunk id, the V columns it owns and the offsets of a
    [BK, BV] tile inside one [K, V] state."""
    vb = tl.program_id(0)
    vcols = vb * BV + tl.arange(0, BV)
    tile_offs = tl.arange(0, BK)[:, None] * V + vcols[None, :]
    n = tl.load(order + tl.program_id(2)) if ORDERED else tl.program_id(2)
    return (tl.program_id(1), n, tl.load(cu_seqlens + n), tl.load(cu_seqlens + n + 1),
            tl.load(chunk_offsets + n), vcols, tile_offs)


@triton.jit
def load_tiles(base, tile_offs, LOAD: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    """The [K, BV] state at base as float32 tiles s0..s3 (unused ones zero; all zero without
    LOAD)."""
    s0 = tl.zeros([BK, BV], dtype=tl.float32)
    s1 = tl.zeros([BK, BV], dtype=tl.float32)
    s2 = tl.zeros([BK, BV], dtype=tl.float32)
    s3 = tl.zeros([BK, BV], dtype=tl.float32)
    if LOAD:
        s0 = tl.load(base + tile_offs).to(tl.float32)
        if K > 64:
            s1 = tl.load(base + 64 * V + tile_offs).to(tl.float32)
        if K > 128:
            s2 = tl.load(base + 128 * V + tile_offs).to(tl.float32)
            s3 = tl.load(base + 192 * V + tile_offs).to(tl.float32)
    return s0, s1, s2, s3


@triton.jit
def store_tiles(base, tile_offs, s0, s1, s2, s3, K: tl.constexpr, V: tl.constexpr):
    """Inverse of `load_tiles`, in base's dtype."""
    dt = base.dtype.element_ty
    tl.store(base + tile_offs, s0.to(dt))
    if K > 64:
        tl.store(base + 64 * V + tile_offs, s1.to(dt))
    if K > 128:
        tl.store(base + 128 * V + tile_offs, s2.to(dt))
        tl.store(base + 192 * V + tile_offs, s3.to(dt))


@triton.jit
def rows_dot_tile(a, row_offs, valid, kb: tl.constexpr, BK: tl.constexpr, s_tile,
                  PREC: tl.constexpr):
    """a[rows, kb-th BK columns] @ s_tile [BK, BV]."""
    cols = kb * BK + tl.arange(0, BK)
    a_t = tl.load(a + row_offs[:, None] + cols[None, :], mask=valid[:, None], other=0.0)
    return tl.dot(a_t, s_tile, input_precision=PREC)


@triton.jit
def rows_dot_state(a, row_offs, valid, s0, s1, s2, s3, K: tl.constexpr, BK: tl.constexpr,
                   PREC: tl.constexpr):
    """a[rows, :K] [C, K] @ the state held as tiles -> [C, BV] float32."""
    acc = rows_dot_tile(a, row_offs, valid, 0, BK, s0, PREC)
    if K > 64:
        acc += rows_dot_tile(a, row_offs, valid, 1, BK, s1, PREC)
    if K > 128:
        acc += rows_dot_tile(a, row_offs, valid, 2, BK, s2, PREC)
        acc += rows_dot_tile(a, row_offs, valid, 3, BK, s3, PREC)
    return acc


@triton.jit
def load_row_tiles(a, row_offs, valid, K: tl.constexpr, BK: tl.constexpr):
    """a[rows, :K] as [C, BK] column tiles t0..t3 (unused ones are t0 again)."""
    cols = tl.arange(0, BK)
    base = a + row_offs[:, None] + cols[None, :]
    t0 = tl.load(base, mask=valid[:, None], other=0.0)
    t1 = t0
    t2 = t0
    t3 = t0
    if K > 64:
        t1 = tl.load(base + BK, mask=valid[:, None], other=0.0)
    if K > 128:
        t2 = tl.load(base + 2 * BK, mask=valid[:, None], other=0.0)
        t3 = tl.load(base + 3 * BK, mask=valid[:, None], other=0.0)
    return t0, t1, t2, t3


@triton.jit
def rows_t_dot(a, row_offs, valid, kb: tl.constexpr, BK: tl.constexpr, x, PREC: tl.constexpr):
    """a[rows, kb-th BK columns]^T @ x [C, BV] -> [BK, BV], the transpose loaded from memory."""
    cols = kb * BK + tl.arange(0, BK)
    a_t = tl.load(a + row_offs[None, :] + cols[:, None], mask=valid[None, :], other=0.0)
    return tl.dot(a_t, x, input_precision=PREC)


@triton.jit(do_not_specialize=["scale"])
def state_fwd_kernel(
    q, k, w, u0, gam, p_mat,             # [TT,H,K] x3, [TT,H,V], [TT,H] f32, [NTU,H,C,C]
    h0, o, h_out, u_out, ht,             # [N,H,K,V] f32, [TT,H,V], [NTU,H,K,V], [TT,H,V], [N,H,K,V]
    order, cu_seqlens, chunk_offsets, scale,   # order [N] int32 (ORDERED): program -> sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    ORDERED: tl.constexpr, HAS_H0: tl.constexpr, STORE_O: tl.constexpr, STORE_STATES: tl.constexpr,
    STORE_FINAL: tl.constexpr, PREC: tl.constexpr,
    SQK: tl.constexpr, SO: tl.constexpr, HN: tl.constexpr,
    W_FROM_T: tl.constexpr = False, t_mat=None, beta=None, SGB: tl.constexpr = 0,
):
    """One program per (V block, head, sequence) walks the chunks in order, carrying its
    [K, BV] block of the state S in registers: U = U0 - W S, (STORE_O) o = e^gam scale q S
    + P U, S' = e^Gam S + (e^(Gam - gam) k)^T U. Decays scale rows of [C, BV] tiles, so q, k,
    W and P go from memory to the dots as loaded. Where the states are stored, o comes from
    `chunk_out_kernel` instead: without q and P the chain's loads fit a pipelined build.
    W_FROM_T: W S as T ((beta e^gam) (k S)) from T [NTU, H, C, C] and beta (row stride SGB),
    reading T (C x C) where W is C x K; rows whose product is not finite drop out of it as
    `prepare_kernel` drops them from W."""
    BK: tl.constexpr = 64 if K > 64 else K
    h, n, bos, eos, first_chunk, vcols, tile_offs = state_program(order, cu_seqlens,
                                                                  chunk_offsets, V, BK, BV,
                                                                  ORDERED)
    rows = tl.arange(0, C)
    dt = w.dtype.element_ty
    s0, s1, s2, s3 = load_tiles(h0 + (n.to(tl.int64) * HN + h) * K * V, tile_offs, HAS_H0,
                                K, V, BK, BV)
    for c in range(tl.cdiv(eos - bos, C)):
        tok, valid, last = chunk_of(bos, eos, c, C)
        chunk_id = (first_chunk + c).to(tl.int64) * H + h
        s0_d = s0.to(dt)
        s1_d = s1.to(dt)
        s2_d = s2.to(dt)
        s3_d = s3.to(dt)
        if STORE_STATES:
            store_tiles(h_out + chunk_id * K * V, tile_offs, s0_d, s1_d, s2_d, s3_d, K, V)
        g_c, g_last = load_decay(gam, tok, valid, last, h, H, C)
        qk_rows = tok * SQK + h * K
        w_rows = (tok * H + h) * K
        voffs = (tok * H + h)[:, None] * V + vcols[None, :]
        u_new = tl.load(u0 + voffs, mask=valid[:, None], other=0.0).to(tl.float32)
        if W_FROM_T:
            k0, k1, k2, k3 = load_row_tiles(k, qk_rows, valid, K, BK)
            ks = tl.dot(k0, s0_d, input_precision=PREC)
            if K > 64:
                ks += tl.dot(k1, s1_d, input_precision=PREC)
            if K > 128:
                ks += tl.dot(k2, s2_d, input_precision=PREC)
                ks += tl.dot(k3, s3_d, input_precision=PREC)
            b_c = tl.load(beta + tok * SGB + h, mask=valid, other=0.0).to(tl.float32)
            ks = ks * (b_c * tl.exp(g_c))[:, None]
            ks = tl.where(finite(ks), ks, 0.0)
            t_t = tl.load(t_mat + chunk_id * C * C + rows[:, None] * C + rows[None, :]).to(dt)
            u_new -= tl.dot(t_t, ks.to(dt), input_precision=PREC)
        else:
            u_new -= rows_dot_state(w, w_rows, valid, s0_d, s1_d, s2_d, s3_d, K, BK, PREC)
        if STORE_STATES:
            tl.store(u_out + voffs, u_new.to(u_out.dtype.element_ty), mask=valid[:, None])
        if STORE_O:
            o_t = (rows_dot_state(q, qk_rows, valid, s0_d, s1_d, s2_d, s3_d, K, BK, PREC)
                   * (tl.exp(g_c) * scale)[:, None])
            p_t = tl.load(p_mat + chunk_id * C * C + rows[:, None] * C + rows[None, :])
            o_t += tl.dot(p_t, u_new.to(dt), input_precision=PREC)
            tl.store(o + (tok * SO + h * V)[:, None] + vcols[None, :],
                     o_t.to(o.dtype.element_ty), mask=valid[:, None])
        u_k = (u_new * tl.where(valid, tl.exp(g_last - g_c), 0.0)[:, None]).to(dt)
        decay = tl.exp(g_last)
        if W_FROM_T:
            # k's tiles as loaded for W S above: one load of k a step
            s0 = s0 * decay + tl.dot(tl.trans(k0), u_k, input_precision=PREC)
            if K > 64:
                s1 = s1 * decay + tl.dot(tl.trans(k1), u_k, input_precision=PREC)
            if K > 128:
                s2 = s2 * decay + tl.dot(tl.trans(k2), u_k, input_precision=PREC)
                s3 = s3 * decay + tl.dot(tl.trans(k3), u_k, input_precision=PREC)
        else:
            s0 = s0 * decay + rows_t_dot(k, qk_rows, valid, 0, BK, u_k, PREC)
            if K > 64:
                s1 = s1 * decay + rows_t_dot(k, qk_rows, valid, 1, BK, u_k, PREC)
            if K > 128:
                s2 = s2 * decay + rows_t_dot(k, qk_rows, valid, 2, BK, u_k, PREC)
                s3 = s3 * decay + rows_t_dot(k, qk_rows, valid, 3, BK, u_k, PREC)
    if STORE_FINAL:
        store_tiles(ht + (n.to(tl.int64) * HN + h) * K * V, tile_offs, s0, s1, s2, s3, K, V)


@triton.jit(do_not_specialize=["N", "STEPS", "scale"])
def chunk_out_kernel(
    q, gam, p_mat, h, u, o,              # [TT,H,K], [TT,H] f32, [NTU,H,C,C], [NTU,H,K,V], [TT,H,V] x2
    cu_seqlens, chunk_offsets, N, STEPS, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr, SQK: tl.constexpr, SO: tl.constexpr,
):
    """o = e^gam scale q S_c + P U of each chunk from its stored entry state S_c and U: one
    program per (chunk, head, V block), all in parallel once the chain has run."""
    pid = tl.program_id(0)
    hh = tl.program_id(1)
    if pid >= tl.load(chunk_offsets + N):
        return
    tok, valid, last = chunk_rows(chunk_offsets, cu_seqlens, pid, N, STEPS, C)
    g_c, g_last = load_decay(gam, tok, valid, last, hh, H, C)
    chunk_id = pid.to(tl.int64) * H + hh
    rows = tl.arange(0, C)
    vcols = tl.program_id(2) * BV + tl.arange(0, BV)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for kb in tl.static_range(K // BK):
        kcols = kb * BK + tl.arange(0, BK)
        q_t = tl.load(q + (tok * SQK + hh * K)[:, None] + kcols[None, :], mask=valid[:, None],
                      other=0.0)
        s_t = tl.load(h + chunk_id * K * V + kcols[:, None] * V + vcols[None, :])
        acc += tl.dot(q_t, s_t, input_precision=PREC)
    acc = acc * (tl.exp(g_c) * scale)[:, None]
    u_t = tl.load(u + (tok * H + hh)[:, None] * V + vcols[None, :], mask=valid[:, None], other=0.0)
    p_t = tl.load(p_mat + chunk_id * C * C + rows[:, None] * C + rows[None, :])
    acc += tl.dot(p_t, u_t.to(h.dtype.element_ty), input_precision=PREC)
    tl.store(o + (tok * SO + hh * V)[:, None] + vcols[None, :], acc.to(o.dtype.element_ty),
             mask=valid[:, None])
