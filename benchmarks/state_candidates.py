"""Candidate state kernels for the gated delta rule (issue 17/18), not yet measured on a GPU;
`bench_state_candidates.py` times them against the package's kernels at the MoM layer's shapes.

- `state_fwd_blocked` / `state_bwd_blocked`: the same recurrences as `state_fwd_kernel` /
  `state_bwd_kernel`, with the [K, BV] state held as K/64 separate [64, BV] tiles and q, k, W
  read in [C, 64] column blocks. Built for sm_90 with Triton 3.6 (benchmarks/kernel_resources.py)
  they need about half the shared memory of the current kernels (28.7 vs 53.2 KB at K = 256,
  BV = 32, one stage) and fewer registers (202 vs 255 there, with no spill; 160 vs 255 at
  BV = 16: 3 programs per SM instead of 2).
- `chunk_out_kernel` + `separate_output`: o = scale e^gam q S_c + P U computed chunk-parallel
  from the stored states after the chain, as fla does; the chain kernel then reads only k, W
  and U0 per chunk, so its two- and three-stage pipelined builds fit in shared memory (156 and
  226 KB at BV = 32; with o in the chain the two-stage build needs 242 KB, over the 227 KB a
  block may have, and runs unpipelined).
- The state's tiles load and store through `_load_tiles` / `_store_tiles` and its products
  go through `_kdots` (one dot per 64-column block); both kernels share them.

`install(T, ...)` swaps them into `megatron_mom.ops.gated_delta_rule.triton` (T) and returns a
function that restores the package's kernels; the CPU test
tests/ops/gated_delta_rule/test_state_candidates.py checks them against the reference under
the Triton interpreter.
"""
import torch
import triton
import triton.language as tl

from megatron_mom.ops.gated_delta_rule.chunk_fwd import chunk_rows, load_decay

@triton.jit
def _segment(cu_seqlens, chunk_offsets, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
             BV: tl.constexpr):
    """This program's (V block, head, segment): its first and end token, first chunk id, the
    V columns and the offsets of a [BK, BV] tile inside one [K, V] state."""
    vb = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.program_id(2)
    vcols = vb * BV + tl.arange(0, BV)
    sofs = tl.arange(0, BK)[:, None] * V + vcols[None, :]
    return (h, n, tl.load(cu_seqlens + n), tl.load(cu_seqlens + n + 1),
            tl.load(chunk_offsets + n), vcols, sofs)


@triton.jit
def _chunk(bos, eos, c, C: tl.constexpr):
    """Token ids [C] int64, valid-row mask and last valid row of chunk c of [bos, eos)."""
    t0 = bos + c * C
    tok = (t0 + tl.arange(0, C)).to(tl.int64)
    return tok, tok < eos, tl.minimum(eos - t0, C) - 1


@triton.jit
def _load_tiles(base, sofs, LOAD: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):
    """A [K, BV] state at base as K/64 float32 [64, BV] tiles (zeros past K, all zeros
    without LOAD)."""
    t0 = tl.zeros([BK, BV], dtype=tl.float32)
    t1 = tl.zeros([BK, BV], dtype=tl.float32)
    t2 = tl.zeros([BK, BV], dtype=tl.float32)
    t3 = tl.zeros([BK, BV], dtype=tl.float32)
    if LOAD:
        t0 = tl.load(base + sofs).to(tl.float32)
        if K > 64:
            t1 = tl.load(base + 64 * V + sofs).to(tl.float32)
        if K > 128:
            t2 = tl.load(base + 128 * V + sofs).to(tl.float32)
            t3 = tl.load(base + 192 * V + sofs).to(tl.float32)
    return t0, t1, t2, t3


@triton.jit
def _store_tiles(base, sofs, t0, t1, t2, t3, K: tl.constexpr, V: tl.constexpr):
    """Inverse of `_load_tiles`, in base's dtype."""
    dt = base.dtype.element_ty
    tl.store(base + sofs, t0.to(dt))
    if K > 64:
        tl.store(base + 64 * V + sofs, t1.to(dt))
    if K > 128:
        tl.store(base + 128 * V + sofs, t2.to(dt))
        tl.store(base + 192 * V + sofs, t3.to(dt))


@triton.jit
def _kdot(a_ptr, offs_rows, mask_rows, kb: tl.constexpr, BK: tl.constexpr, s_d, PREC: tl.constexpr):
    cols = kb * BK + tl.arange(0, BK)
    return tl.dot(tl.load(a_ptr + offs_rows[:, None] + cols[None, :], mask=mask_rows[:, None], other=0.0),
                  s_d, input_precision=PREC)


@triton.jit
def _kdots(a_ptr, offs_rows, mask_rows, t0, t1, t2, t3, K: tl.constexpr, BK: tl.constexpr,
           PREC: tl.constexpr):
    """a[rows, :K] @ the [K, BV] state held as tiles t0..t3: one dot per 64-column block."""
    acc = _kdot(a_ptr, offs_rows, mask_rows, 0, BK, t0, PREC)
    if K > 64:
        acc += _kdot(a_ptr, offs_rows, mask_rows, 1, BK, t1, PREC)
    if K > 128:
        acc += _kdot(a_ptr, offs_rows, mask_rows, 2, BK, t2, PREC)
        acc += _kdot(a_ptr, offs_rows, mask_rows, 3, BK, t3, PREC)
    return acc


@triton.jit
def _kupdate(s, k_ptr, offs_rows, mask_rows, kb: tl.constexpr, BK: tl.constexpr, decay, u_k, PREC: tl.constexpr):
    cols = kb * BK + tl.arange(0, BK)
    k_t = tl.load(k_ptr + offs_rows[None, :] + cols[:, None], mask=mask_rows[None, :], other=0.0)  # [BK, C]
    return s * decay + tl.dot(k_t, u_k, input_precision=PREC)


@triton.jit(do_not_specialize=["scale"])
def state_fwd_blocked(
    q, k, w, u0, gam, p_mat, h0, o, h_out, u_out, ht,
    cu_seqlens, chunk_offsets, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_O: tl.constexpr, STORE_STATES: tl.constexpr,
    STORE_FINAL: tl.constexpr, PREC: tl.constexpr,
    SQK: tl.constexpr, SO: tl.constexpr, HN: tl.constexpr,
):
    BK: tl.constexpr = 64 if K > 64 else K
    h, n, bos, eos, first_chunk, vcols, sofs = _segment(cu_seqlens, chunk_offsets, V, C, BK, BV)
    rows = tl.arange(0, C)
    dt = w.dtype.element_ty
    cc_offs = rows[:, None] * C + rows[None, :]
    s0, s1, s2, s3 = _load_tiles(h0 + (n.to(tl.int64) * HN + h) * K * V, sofs, HAS_H0, K, V,
                                 BK, BV)
    for c in range(tl.cdiv(eos - bos, C)):
        tok, valid, last = _chunk(bos, eos, c, C)
        chunk_id = (first_chunk + c).to(tl.int64) * H + h
        s0_d = s0.to(dt)
        s1_d = s1.to(dt)
        s2_d = s2.to(dt)
        s3_d = s3.to(dt)
        if STORE_STATES:
            _store_tiles(h_out + chunk_id * K * V, sofs, s0_d, s1_d, s2_d, s3_d, K, V)
        g_c, g_last = load_decay(gam, tok, valid, last, h, H, C)
        kro = tok * SQK + h * K
        wro = (tok * H + h) * K
        voffs = (tok * H + h)[:, None] * V + vcols[None, :]
        u_new = tl.load(u0 + voffs, mask=valid[:, None], other=0.0).to(tl.float32)
        u_new -= _kdots(w, wro, valid, s0_d, s1_d, s2_d, s3_d, K, BK, PREC)
        if STORE_STATES:
            tl.store(u_out + voffs, u_new.to(u_out.dtype.element_ty), mask=valid[:, None])
        if STORE_O:
            o_t = (_kdots(q, kro, valid, s0_d, s1_d, s2_d, s3_d, K, BK, PREC)
                   * (tl.exp(g_c) * scale)[:, None])
            o_t += tl.dot(tl.load(p_mat + chunk_id * C * C + cc_offs), u_new.to(dt), input_precision=PREC)
            tl.store(o + (tok * SO + h * V)[:, None] + vcols[None, :], o_t.to(o.dtype.element_ty),
                     mask=valid[:, None])
        u_k = (u_new * tl.where(valid, tl.exp(g_last - g_c), 0.0)[:, None]).to(dt)
        dec = tl.exp(g_last)
        s0 = _kupdate(s0, k, kro, valid, 0, BK, dec, u_k, PREC)
        if K > 64:
            s1 = _kupdate(s1, k, kro, valid, 1, BK, dec, u_k, PREC)
        if K > 128:
            s2 = _kupdate(s2, k, kro, valid, 2, BK, dec, u_k, PREC)
            s3 = _kupdate(s3, k, kro, valid, 3, BK, dec, u_k, PREC)
    if STORE_FINAL:
        _store_tiles(ht + (n.to(tl.int64) * HN + h) * K * V, sofs, s0, s1, s2, s3, K, V)


@triton.jit
def _ktdot(a_ptr, offs_rows, mask_rows, kb: tl.constexpr, BK: tl.constexpr, x, PREC: tl.constexpr):
    """a[rows, kb-th BK columns]^T @ x [C, BV], the transpose loaded from memory."""
    cols = kb * BK + tl.arange(0, BK)
    a_t = tl.load(a_ptr + offs_rows[None, :] + cols[:, None], mask=mask_rows[None, :], other=0.0)
    return tl.dot(a_t, x, input_precision=PREC)


@triton.jit
def state_bwd_blocked(
    q, k, w, gam, p_mat, do,
    dht, dh_out, du_out, dh0,
    cu_seqlens, chunk_offsets, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
    SQK: tl.constexpr, SDO: tl.constexpr, HN: tl.constexpr,
):
    BK: tl.constexpr = 64 if K > 64 else K
    h, n, bos, eos, first_chunk, vcols, sofs = _segment(cu_seqlens, chunk_offsets, V, C, BK, BV)
    rows = tl.arange(0, C)
    dt = w.dtype.element_ty
    cc_offs = rows[:, None] * C + rows[None, :]
    d0, d1, d2, d3 = _load_tiles(dht + (n.to(tl.int64) * HN + h) * K * V, sofs, HAS_DHT, K, V,
                                 BK, BV)
    num_chunks = tl.cdiv(eos - bos, C)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        tok, valid, last = _chunk(bos, eos, c, C)
        chunk_id = (first_chunk + c).to(tl.int64) * H + h
        d0_d = d0.to(dt)
        d1_d = d1.to(dt)
        d2_d = d2.to(dt)
        d3_d = d3.to(dt)
        _store_tiles(dh_out + chunk_id * K * V, sofs, d0_d, d1_d, d2_d, d3_d, K, V)
        g_c, g_last = load_decay(gam, tok, valid, last, h, H, C)
        kro = tok * SQK + h * K
        wro = (tok * H + h) * K
        voffs = (tok * H + h)[:, None] * V + vcols[None, :]
        do_t = tl.load(do + (tok * SDO + h * V)[:, None] + vcols[None, :], mask=valid[:, None],
                       other=0.0)
        du = (_kdots(k, kro, valid, d0_d, d1_d, d2_d, d3_d, K, BK, PREC)
              * tl.exp(g_last - g_c)[:, None])
        du += tl.dot(tl.trans(tl.load(p_mat + chunk_id * C * C + cc_offs)), do_t.to(dt), input_precision=PREC)
        tl.store(du_out + voffs, du.to(du_out.dtype.element_ty), mask=valid[:, None])
        do_q = (do_t.to(tl.float32) * (tl.exp(g_c) * scale)[:, None]).to(dt)
        du_d = du.to(dt)
        dec = tl.exp(g_last)
        d0 = d0 * dec + _ktdot(q, kro, valid, 0, BK, do_q, PREC) - _ktdot(w, wro, valid, 0, BK, du_d, PREC)
        if K > 64:
            d1 = d1 * dec + _ktdot(q, kro, valid, 1, BK, do_q, PREC) - _ktdot(w, wro, valid, 1, BK, du_d, PREC)
        if K > 128:
            d2 = d2 * dec + _ktdot(q, kro, valid, 2, BK, do_q, PREC) - _ktdot(w, wro, valid, 2, BK, du_d, PREC)
            d3 = d3 * dec + _ktdot(q, kro, valid, 3, BK, do_q, PREC) - _ktdot(w, wro, valid, 3, BK, du_d, PREC)
    if STORE_DH0:
        _store_tiles(dh0 + (n.to(tl.int64) * HN + h) * K * V, sofs, d0, d1, d2, d3, K, V)


@triton.jit(do_not_specialize=["N", "STEPS", "scale"])
def chunk_out_kernel(q, gam, p_mat, h, u, o, cu_seqlens, chunk_offsets, N, STEPS, scale,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                     SQK: tl.constexpr, SO: tl.constexpr):
    pid = tl.program_id(0)
    hh = tl.program_id(1)
    vb = tl.program_id(2)
    if pid >= tl.load(chunk_offsets + N):
        return
    tok, valid, last = chunk_rows(chunk_offsets, cu_seqlens, pid, N, STEPS, C)
    g_c, g_last = load_decay(gam, tok, valid, last, hh, H, C)
    chunk_id = pid.to(tl.int64) * H + hh
    rows = tl.arange(0, C)
    vcols = vb * BV + tl.arange(0, BV)
    dt = h.dtype.element_ty
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for kb in tl.static_range(K // BK):
        kc = kb * BK + tl.arange(0, BK)
        q_t = tl.load(q + (tok * SQK + hh * K)[:, None] + kc[None, :], mask=valid[:, None], other=0.0)
        s_t = tl.load(h + chunk_id * K * V + kc[:, None] * V + vcols[None, :])
        acc += tl.dot(q_t, s_t, input_precision=PREC)
    acc = acc * (tl.exp(g_c) * scale)[:, None]
    u_t = tl.load(u + (tok * H + hh)[:, None] * V + vcols[None, :], mask=valid[:, None], other=0.0)
    acc += tl.dot(tl.load(p_mat + chunk_id * C * C + rows[:, None] * C + rows[None, :]), u_t.to(dt),
                  input_precision=PREC)
    tl.store(o + (tok * SO + hh * V)[:, None] + vcols[None, :], acc.to(o.dtype.element_ty),
             mask=valid[:, None])


def separate_output(T, chain_forward, BK=64, BV=64, num_warps=4, num_stages=2):
    """A `state_forward` that runs the chain without o, then `chunk_out_kernel` (where the
    states are stored anyway: the training forward)."""
    def state_forward(P, q, k, w, u0, gam, p_mat, h0, scale, *, store_o, store_states,
                      store_final, o=None, h=None, u=None, options=T.DEFAULT_OPTIONS):
        if not (store_o and store_states) or T.split_pieces(P, options, 32):
            return chain_forward(P, q, k, w, u0, gam, p_mat, h0, scale, store_o=store_o,
                                 store_states=store_states, store_final=store_final, o=o, h=h,
                                 u=u, options=options)
        _, h, u, ht = chain_forward(P, q, k, w, u0, gam, p_mat, h0, scale, store_o=False,
                                    store_states=True, store_final=store_final, h=h, u=u,
                                    options=options)
        if o is None:
            o = torch.empty_like(u0)
        bv = min(BV, P.V)
        chunk_out_kernel[(P.NTU, P.H, P.V // bv)](
            q, gam, p_mat, h, u, o, P.cu, P.offsets, P.N, P.steps, scale, H=P.H, K=P.K, V=P.V,
            C=P.C, BK=min(BK, P.K), BV=bv, PREC=options.precision, SQK=T._row_stride(q, k),
            SO=T._row_stride(o), num_warps=num_warps, num_stages=num_stages)
        return o, h, u, ht
    return state_forward


def install(T, blocked_fwd=True, blocked_bwd=True, separate_o=False):
    """Swap the candidates into the gated delta rule's Triton module T; returns the undo."""
    saved = (T.state_fwd_kernel, T.state_bwd_kernel, T.state_forward)
    if blocked_fwd:
        T.state_fwd_kernel = state_fwd_blocked
    if blocked_bwd:
        T.state_bwd_kernel = state_bwd_blocked
    if separate_o:
        T.state_forward = separate_output(T, saved[2])

    def undo():
        T.state_fwd_kernel, T.state_bwd_kernel, T.state_forward = saved
    return undo
