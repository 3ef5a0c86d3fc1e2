"""Backward kernels of the chunked gated delta rule (algebra in docs/kernels.md).

`state_bwd_kernel` walks the chunks in reverse, carrying dS (gradient of the state at the
chunk's exit) and producing per chunk dh (that dS) and dU = P^T dO + Kg dS'.
Two chunk-parallel kernels then work on every chunk: `chunk_bwd_main_kernel` (dq, dv, the
direct parts of dk, dW) and `chunk_bwd_wy_kernel` (the WY/T parts of dk, dbeta, dg), from the
saved entry states h, dh, U, dU, T and the inputs.

Transposes of C x C matrices that come out of `tl.dot` go through a per-chunk scratch buffer
and are loaded back transposed, never `tl.trans`-ed in registers (Triton 3.4-3.7 on Hopper).
"""
from __future__ import annotations

import triton
import triton.language as tl

from megatron_mom.ops.gated_delta_rule.chunk_fwd import (chunk_of, chunk_rows, finite,
                                                         load_decay, state_program)


@triton.jit(do_not_specialize=["scale"])
def state_bwd_kernel(
    q, k, w, gam, p_mat, do,             # [TT,H,K] x3, [TT,H] f32, [NTU,H,C,C], [TT,H,V]
    dht, dh_out, du_out, dh0,            # [N,H,K,V] f32, [NTU,H,K,V], [TT,H,V], [N,H,K,V] f32
    order, cu_seqlens, chunk_offsets, scale,   # order [N] int32 (ORDERED): program -> sequence
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    ORDERED: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
    SQK: tl.constexpr, SDO: tl.constexpr, HN: tl.constexpr, DU0: tl.constexpr,
    W_FROM_T: tl.constexpr = False, t_mat=None, beta=None, SGB: tl.constexpr = 0,
):
    """One program per (V block, head, sequence), chunks last to first:
    dU = P^T dO + e^(Gam-gam) k dS',  dS = e^Gam dS' + q^T (scale e^gam dO) - W^T dU.
    P^T is the transposed view of the loaded P (never a transposed dot result). DU0: P^T dO,
    which does not depend on the chain, is in du_out already (`p_t_do_kernel`): the chain
    reads it instead of P, which leaves shared memory for wider V blocks. W_FROM_T: W^T dU
    as k^T ((beta e^gam) (T^T dU)), as in `state_fwd_kernel`."""
    h, n, bos, eos, first_chunk, vcols, state_offs = state_program(order, cu_seqlens,
                                                                   chunk_offsets, V, K, BV,
                                                                   ORDERED)
    rows = tl.arange(0, C)
    kcols = tl.arange(0, K)
    dt = w.dtype.element_ty
    cc_offs = rows[:, None] * C + rows[None, :]

    if HAS_DHT:
        ds = tl.load(dht + (n.to(tl.int64) * HN + h) * K * V + state_offs).to(tl.float32)
    else:
        ds = tl.zeros([K, BV], dtype=tl.float32)

    num_chunks = tl.cdiv(eos - bos, C)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        tok, valid, last = chunk_of(bos, eos, c, C)
        chunk_id = (first_chunk + c).to(tl.int64) * H + h
        ds_d = ds.to(dt)
        tl.store(dh_out + chunk_id * K * V + state_offs, ds_d.to(dh_out.dtype.element_ty))
        g_c, g_last = load_decay(gam, tok, valid, last, h, H, C)
        koffs = (tok * SQK + h * K)[:, None] + kcols[None, :]           # q, k
        woffs = (tok * H + h)[:, None] * K + kcols[None, :]
        voffs = (tok * H + h)[:, None] * V + vcols[None, :]
        do_t = tl.load(do + (tok * SDO + h * V)[:, None] + vcols[None, :], mask=valid[:, None],
                       other=0.0)
        k_t = tl.load(k + koffs, mask=valid[:, None], other=0.0)
        du = tl.dot(k_t, ds_d, input_precision=PREC) * tl.exp(g_last - g_c)[:, None]
        if DU0:
            du += tl.load(du_out + voffs, mask=valid[:, None], other=0.0).to(tl.float32)
        else:
            du += tl.dot(tl.trans(tl.load(p_mat + chunk_id * C * C + cc_offs)), do_t.to(dt),
                         input_precision=PREC)
        tl.store(du_out + voffs, du.to(du_out.dtype.element_ty), mask=valid[:, None])
        do_q = (do_t.to(tl.float32) * (tl.exp(g_c) * scale)[:, None]).to(dt)
        ds = ds * tl.exp(g_last)
        ds += tl.dot(tl.trans(tl.load(q + koffs, mask=valid[:, None], other=0.0)), do_q, input_precision=PREC)
        if W_FROM_T:
            b_c = tl.load(beta + tok * SGB + h, mask=valid, other=0.0).to(tl.float32)
            t_t = tl.load(t_mat + chunk_id * C * C + cc_offs).to(dt)
            y = tl.dot(tl.trans(t_t), du.to(dt), input_precision=PREC) * (b_c * tl.exp(g_c))[:, None]
            y = tl.where(finite(y), y, 0.0)
            ds -= tl.dot(tl.trans(tl.where(finite(k_t), k_t, 0.0)), y.to(dt), input_precision=PREC)
        else:
            ds -= tl.dot(tl.trans(tl.load(w + woffs, mask=valid[:, None], other=0.0)), du.to(dt),
                         input_precision=PREC)

    if STORE_DH0:
        tl.store(dh0 + (n.to(tl.int64) * HN + h) * K * V + state_offs, ds)


@triton.jit(do_not_specialize=["N", "STEPS"])
def p_t_do_kernel(
    p_mat, do, du,                       # [NTU,H,C,C], [TT,H,V] (row stride SDO), [TT,H,V]
    cu_seqlens, chunk_offsets, N, STEPS,
    H: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    SDO: tl.constexpr,
):
    """dU's part P^T dO of every chunk, the state backward's only term without the chain, one
    program per (chunk, head, V block), into du (which `state_bwd_kernel` with DU0 completes).
    P^T is the transposed view of the loaded P."""
    pid = tl.program_id(0)
    hh = tl.program_id(1)
    if pid >= tl.load(chunk_offsets + N):
        return
    tok, valid, last = chunk_rows(chunk_offsets, cu_seqlens, pid, N, STEPS, C)
    rows = tl.arange(0, C)
    vcols = tl.program_id(2) * BV + tl.arange(0, BV)
    chunk_id = pid.to(tl.int64) * H + hh
    p_t = tl.trans(tl.load(p_mat + chunk_id * C * C + rows[:, None] * C + rows[None, :]))
    do_t = tl.load(do + (tok * SDO + hh * V)[:, None] + vcols[None, :], mask=valid[:, None],
                   other=0.0)
    du_t = tl.dot(p_t, do_t.to(p_t.dtype), input_precision=PREC)
    tl.store(du + (tok * H + hh)[:, None] * V + vcols[None, :], du_t.to(du.dtype.element_ty),
             mask=valid[:, None])


@triton.jit
def chunk_setup(chunk_offsets, cu_seqlens, gam, beta, scratch_cc, pid, hh, N, STEPS,
                H: tl.constexpr, C: tl.constexpr, SGB: tl.constexpr):
    """Rows, decay and the two per-chunk C x C scratch slots shared by the backward phases."""
    tok, valid, last = chunk_rows(chunk_offsets, cu_seqlens, pid, N, STEPS, C)
    g_c, g_last = load_decay(gam, tok, valid, last, hh, H, C)
    b_c = tl.load(beta + tok * SGB + hh, mask=valid, other=0.0).to(tl.float32)
    chunk_id = pid.to(tl.int64) * H + hh
    slot0 = scratch_cc + chunk_id * 2 * C * C
    return tok, valid, last, g_c, g_last, b_c, chunk_id, slot0


@triton.jit
def state_grad_terms(dkg, u, voffs, valid, dh_ptrs, s_t, PREC: tl.constexpr):
    """Over one [BK, BV] block of a chunk's state S (s_t) and its exit gradient dS' (at
    dh_ptrs): dkg + U dS'^T [C, BK] (accumulated inside the dot) and sum(dS' * S), the state
    decay's dgam term."""
    ds_t = tl.load(dh_ptrs)
    dkg = tl.dot(tl.load(u + voffs, mask=valid[:, None], other=0.0), tl.trans(ds_t), dkg,
                 input_precision=PREC)
    return dkg, tl.sum(tl.sum(ds_t.to(tl.float32) * s_t.to(tl.float32), axis=1), axis=0)


@triton.jit
def dp_pair(do, u, tok, valid, g_c, do_row, hh, scale, H: tl.constexpr, V: tl.constexpr,
            C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dL/d(q_i . k_j) of a chunk [C, C] and its transpose, decayed, causal and scaled: dP =
    dO U^T and U dO^T as two dots over V blocks, so no dot result is transposed. Returned in
    U's dtype: they only feed dots, and two fp32 [C, C] tiles held across the main kernel's K
    loop would spill its accumulators."""
    dt = u.dtype.element_ty
    rows = tl.arange(0, C)
    dp = tl.zeros([C, C], dtype=tl.float32)                          # dO U^T
    dpt = tl.zeros([C, C], dtype=tl.float32)                         # U dO^T
    for vb in range(V // BV):
        vcols = vb * BV + tl.arange(0, BV)
        voffs = (tok * H + hh)[:, None] * V + vcols[None, :]
        do_t = tl.load(do + do_row[:, None] + vcols[None, :], mask=valid[:, None], other=0.0).to(dt)
        u_t = tl.load(u + voffs, mask=valid[:, None], other=0.0)
        dp += tl.dot(do_t, tl.trans(u_t), input_precision=PREC)
        dpt += tl.dot(u_t, tl.trans(do_t), input_precision=PREC)
    causal = rows[:, None] >= rows[None, :]
    dp = tl.where(causal, dp * tl.exp(tl.where(causal, g_c[:, None] - g_c[None, :], 0.0)), 0.0)
    anti = rows[:, None] <= rows[None, :]
    dpt = tl.where(anti, dpt * tl.exp(tl.where(anti, g_c[None, :] - g_c[:, None], 0.0)), 0.0)
    return (dp * scale).to(dt), (dpt * scale).to(dt)


@triton.jit
def value_terms(v, du, t_mat, dv, dbeta, tok, valid, b_c, hh, chunk_id, slot0,
                H: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr, SV: tl.constexpr, SDV: tl.constexpr, SDB: tl.constexpr):
    """dv = beta T^T dU, dbeta's v part and dL/dT's U0 part dU (beta v)^T (into slot 0) of a
    chunk."""
    rows = tl.arange(0, C)
    cc_ptrs = rows[:, None] * C + rows[None, :]
    t_ptr = t_mat + chunk_id * C * C
    v_row = tok * SV + hh * V
    dt_mat = tl.zeros([C, C], dtype=tl.float32)                      # dU v^T
    d_beta = tl.zeros([C], dtype=tl.float32)
    for vb in range(V // BV):
        vcols = vb * BV + tl.arange(0, BV)
        voffs = (tok * H + hh)[:, None] * V + vcols[None, :]
        v_t = tl.load(v + v_row[:, None] + vcols[None, :], mask=valid[:, None], other=0.0)
        du_t = tl.load(du + voffs, mask=valid[:, None], other=0.0)
        dt_mat += tl.dot(du_t, tl.trans(v_t), input_precision=PREC)
        t_t = tl.trans(tl.load(t_ptr + cc_ptrs))
        if t_mat.dtype.element_ty == du.dtype.element_ty:
            dvb = tl.dot(t_t, du_t, input_precision=PREC)  # bf16 T and dU: exact products
        else:
            dvb = tl.dot(t_t.to(tl.float32), du_t.to(tl.float32), input_precision=PREC)
        tl.store(dv + (tok * SDV + hh * V)[:, None] + vcols[None, :],
                 (dvb * b_c[:, None]).to(dv.dtype.element_ty), mask=valid[:, None])
        d_beta += tl.sum(dvb * v_t.to(tl.float32), axis=1)
    tl.store(slot0 + cc_ptrs, dt_mat * b_c[None, :])
    tl.store(dbeta + tok * SDB + hh, d_beta, mask=valid)


@triton.jit(do_not_specialize=["N", "STEPS", "scale"])
def chunk_bwd_dp_kernel(
    v, beta, gam, t_mat, u, du, do,      # [TT,H,V], [TT,H] x2 (gam f32), [NTU,H,C,C], [TT,H,V] x3
    dv, dbeta, scratch_cc, scratch_dp,   # [TT,H,V], [TT,H] f32, [NTU,H,2,C,C] f32, [NTU,H,2,C,C]
    cu_seqlens, chunk_offsets, N, STEPS, scale,
    H: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    SV: tl.constexpr, SGB: tl.constexpr, SDO: tl.constexpr, SDV: tl.constexpr,
    SDB: tl.constexpr,
):
    """Phase A's work over V alone, one program per (chunk, head), before the main kernel
    (launch["chunk_bwd_main"]["dp_first"]): dP and its transpose into scratch_dp, which the
    main kernel's programs read instead of computing them (split over K blocks, each would
    compute them again), and the value terms."""
    pid = tl.program_id(0)
    hh = tl.program_id(1)
    if pid >= tl.load(chunk_offsets + N):
        return
    tok, valid, last, g_c, g_last, b_c, chunk_id, slot0 = chunk_setup(
        chunk_offsets, cu_seqlens, gam, beta, scratch_cc, pid, hh, N, STEPS, H, C, SGB)
    dp, dpt = dp_pair(do, u, tok, valid, g_c, tok * SDO + hh * V, hh, scale, H, V, C, BV, PREC)
    rows = tl.arange(0, C)
    cc_ptrs = rows[:, None] * C + rows[None, :]
    tl.store(scratch_dp + chunk_id * 2 * C * C + cc_ptrs, dp)
    tl.store(scratch_dp + chunk_id * 2 * C * C + C * C + cc_ptrs, dpt)
    value_terms(v, du, t_mat, dv, dbeta, tok, valid, b_c, hh, chunk_id, slot0, H, V, C, BV,
                PREC, SV, SDV, SDB)


@triton.jit(do_not_specialize=["N", "STEPS", "scale", "GAM_PART"])
def chunk_bwd_main_kernel(
    q, k, v, beta, gam, t_mat,           # [TT,H,K] x2, [TT,H,V], [TT,H], [TT,H] f32, [NTU,H,C,C]
    h, dh, u, du, do,                    # [NTU,H,K,V] x2, [TT,H,V] x3
    dq, dv, dbeta, dgam,                 # [TT,H,K], [TT,H,V], [TT,H] f32 x2
    scratch_cc, scratch_dw, scratch_dk,  # [NTU,H,2,C,C] f32, [TT,H,K] (dw dtype), [TT,H,K] f32
    scratch_dp,                          # [NTU,H,2,C,C] in U's dtype (DP_FIRST)
    cu_seqlens, chunk_offsets, N, STEPS, scale, GAM_PART,   # dgam: [K//BK or 1, TT, H]
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, ONE_PASS: tl.constexpr,
    SPLIT_K: tl.constexpr, DP_FIRST: tl.constexpr,
    SQK: tl.constexpr, SV: tl.constexpr, SGB: tl.constexpr, SDO: tl.constexpr,
    SDQK: tl.constexpr, SDV: tl.constexpr, SDB: tl.constexpr, SSK: tl.constexpr,
):
    """Phase A, one program per (chunk, head), or with SPLIT_K per (chunk, head, K block).
    dP = dO U^T with its transpose (`dp_pair`), and in the (first) program of K block 0 the
    value terms (`value_terms`), unless DP_FIRST: then `chunk_bwd_dp_kernel` did both and dP
    comes from scratch_dp. Then per K block: dq, the Kg and P parts of dk (scratch),
    dW = -dU S^T (scratch) and dgam of q, Kg, P and e^Gam S, into dgam's partial of the
    program's K block (GAM_PART apart). SPLIT_K's programs each read h and dh once, and a
    chunk's K-block programs run side by side, so the dO, U and dU they all read come from L2;
    without DP_FIRST each of them would compute dP again, with it dP makes one round trip of
    two [C, C] tiles a chunk."""
    NKB: tl.constexpr = K // BK if SPLIT_K else 1
    pid = tl.program_id(0) // NKB                                    # the chunk
    kb0 = tl.program_id(0) % NKB                                     # its K block (SPLIT_K)
    hh = tl.program_id(1)
    if pid >= tl.load(chunk_offsets + N):
        return
    tok, valid, last, g_c, g_last, b_c, chunk_id, slot0 = chunk_setup(
        chunk_offsets, cu_seqlens, gam, beta, scratch_cc, pid, hh, N, STEPS, H, C, SGB)
    rows = tl.arange(0, C)
    dt = u.dtype.element_ty
    qk_row = tok * SQK + hh * K                                      # q, k (and dq, dk below)
    do_row = tok * SDO + hh * V

    if DP_FIRST:
        cc_ptrs = rows[:, None] * C + rows[None, :]
        dp = tl.load(scratch_dp + chunk_id * 2 * C * C + cc_ptrs)
        dpt = tl.load(scratch_dp + chunk_id * 2 * C * C + C * C + cc_ptrs)
    else:
        dp, dpt = dp_pair(do, u, tok, valid, g_c, do_row, hh, scale, H, V, C, BV, PREC)
        if kb0 == 0:
            value_terms(v, du, t_mat, dv, dbeta, tok, valid, b_c, hh, chunk_id, slot0, H, V, C,
                        BV, PREC, SV, SDV, SDB)

    k_decay = tl.where(valid, tl.exp(g_last - g_c), 0.0)
    d_gam = tl.zeros([C], dtype=tl.float32)
    # dgam of Gam (last row). Its state-decay term e^Gam sum(dS' * S) is summed here, where h
    # is at hand: in state_bwd_kernel, which would have to load h, it cost more (0.12 against
    # 0.02 ms at B4 T4096 H16 D128 on the H100).
    rows_sum = tl.sum(tl.zeros([C], dtype=tl.float32), axis=0)
    s_base = chunk_id * K * V
    KB_STEPS: tl.constexpr = K // BK // NKB                          # 1 with SPLIT_K
    for step in range(KB_STEPS):
        kcols = (kb0 * KB_STEPS + step) * BK + tl.arange(0, BK)
        koffs = (tok * H + hh)[:, None] * K + kcols[None, :]         # dW scratch
        qk_offs = qk_row[:, None] + kcols[None, :]
        dqg = tl.zeros([C, BK], dtype=tl.float32)                    # dO S^T
        dw = tl.zeros([C, BK], dtype=tl.float32)                     # -dU S^T
        dkg = tl.zeros([C, BK], dtype=tl.float32)                    # U dS'^T
        # One pass over V (ONE_PASS: three accumulators, h, dh, dO, dU and U read once per K
        # block), or two, each with two accumulators: a smaller live set, h read twice.
        for vb in range(V // BV):
            vcols = vb * BV + tl.arange(0, BV)
            voffs = (tok * H + hh)[:, None] * V + vcols[None, :]
            st_offs = s_base + kcols[:, None] * V + vcols[None, :]
            s_t = tl.load(h + st_offs)
            dqg += tl.dot(tl.load(do + do_row[:, None] + vcols[None, :], mask=valid[:, None],
                                  other=0.0).to(dt),
                          tl.trans(s_t), input_precision=PREC)
            dw -= tl.dot(tl.load(du + voffs, mask=valid[:, None], other=0.0), tl.trans(s_t),
                         input_precision=PREC)
            if ONE_PASS:
                dkg, rows_t = state_grad_terms(dkg, u, voffs, valid, dh + st_offs, s_t, PREC)
                rows_sum += rows_t * tl.exp(g_last)
        tl.store(scratch_dw + koffs, dw.to(scratch_dw.dtype.element_ty), mask=valid[:, None])
        k_t = tl.load(k + qk_offs, mask=valid[:, None], other=0.0)
        q_t = tl.load(q + qk_offs, mask=valid[:, None], other=0.0)
        dq_t = dqg * (tl.exp(g_c) * scale)[:, None] + tl.dot(dp, k_t, input_precision=PREC)
        tl.store(dq + (tok * SDQK + hh * K)[:, None] + kcols[None, :], dq_t.to(dq.dtype.element_ty),
                 mask=valid[:, None])
        d_gam += tl.sum(dq_t * q_t.to(tl.float32), axis=1)

        if not ONE_PASS:
            for vb in range(V // BV):
                vcols = vb * BV + tl.arange(0, BV)
                voffs = (tok * H + hh)[:, None] * V + vcols[None, :]
                st_offs = s_base + kcols[:, None] * V + vcols[None, :]
                s_t = tl.load(h + st_offs)
                dkg, rows_t = state_grad_terms(dkg, u, voffs, valid, dh + st_offs, s_t, PREC)
                rows_sum += rows_t * tl.exp(g_last)
        k_f = k_t.to(tl.float32)
        dkg = dkg * k_decay[:, None]
        kg_term = tl.sum(dkg * k_f, axis=1)
        rows_sum += tl.sum(kg_term, axis=0)
        dk_p = tl.dot(dpt, q_t, input_precision=PREC)               # P's part of dk
        tl.store(scratch_dk + (tok * SSK + hh * K)[:, None] + kcols[None, :], dkg + dk_p,
                 mask=valid[:, None])
        # Kg = e^(Gam - gam) k puts -kg_term on gam_i and +sum(kg_term) on Gam; P's decay
        # e^(gam_i - gam_j) puts +q_i . dq_i on row i and -k_j . dk_p_j on column j.
        d_gam -= kg_term + tl.sum(dk_p * k_f, axis=1)
    d_gam = tl.where(rows == last, d_gam + rows_sum, d_gam)
    tl.store(dgam + kb0 * GAM_PART + tok * H + hh, d_gam, mask=valid)


@triton.jit(do_not_specialize=["N", "STEPS", "GAM_PART"])
def chunk_bwd_wy_kernel(
    k, beta, gam, t_mat,                 # [TT,H,K], [TT,H], [TT,H] f32, [NTU,H,C,C]
    dk, dbeta, dgam, dg,                 # [TT,H,K], [TT,H] f32, [GAM_PARTS,TT,H] f32, [TT,H] f32
    scratch_cc, scratch_dw, scratch_dk,
    cu_seqlens, chunk_offsets, N, STEPS, GAM_PART,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    GAM_PARTS: tl.constexpr,
    SQK: tl.constexpr, SGB: tl.constexpr, SDQK: tl.constexpr, SDB: tl.constexpr,
    SSK: tl.constexpr,
    NORM: tl.constexpr = False, k_rstd=None, dk_in=None, SKR: tl.constexpr = 0,
    SDKI: tl.constexpr = 0,
):
    """Phase B, one program per (chunk, head): dL/dT (slot 0 + dW Kbg^T), dA = -T^T dT T^T,
    then over K blocks the rest of dk; dbeta and dg (reverse in-chunk cumsum of dgam, phase
    A's GAM_PARTS partials summed in order).

    NORM: k is the L2-normalised input (rstd k_rstd [TT, H], row stride SKR); after dk (its
    gradient, float32) is written, a second pass over its K blocks writes the gradient of the
    unnormalised input, rstd * (dk - k (k . dk)), into dk_in (row stride SDKI). The first
    pass's blocks are re-read from the program's own rows, still in L2."""
    pid = tl.program_id(0)
    hh = tl.program_id(1)
    if pid >= tl.load(chunk_offsets + N):
        return
    tok, valid, last, g_c, g_last, b_c, chunk_id, slot0 = chunk_setup(
        chunk_offsets, cu_seqlens, gam, beta, scratch_cc, pid, hh, N, STEPS, H, C, SGB)
    rows = tl.arange(0, C)
    cc_ptrs = rows[:, None] * C + rows[None, :]
    t_ptr = t_mat + chunk_id * C * C
    slot1 = slot0 + C * C
    k_scale = b_c * tl.exp(g_c)
    dwt = scratch_dw.dtype.element_ty

    dt_mat = tl.load(slot0 + cc_ptrs)
    for kb in tl.static_range(K // BK):
        kcols = kb * BK + tl.arange(0, BK)
        koffs = (tok * H + hh)[:, None] * K + kcols[None, :]         # dW scratch
        k_t = tl.load(k + (tok * SQK + hh * K)[:, None] + kcols[None, :], mask=valid[:, None],
                      other=0.0).to(tl.float32)
        dt_mat += tl.dot(tl.load(scratch_dw + koffs, mask=valid[:, None], other=0.0),
                         tl.trans((k_t * k_scale[:, None]).to(dwt)), input_precision=PREC)
    t_f = tl.load(t_ptr + cc_ptrs).to(tl.float32)
    x = tl.dot(dt_mat, tl.trans(t_f), input_precision=PREC)
    da = -tl.dot(tl.trans(t_f), x, input_precision=PREC)
    strict = rows[:, None] > rows[None, :]
    hm = tl.where(strict, da * tl.exp(tl.where(strict, g_c[:, None] - g_c[None, :], 0.0)), 0.0)
    # Only the transposed use goes through memory; the rest stays in registers. The three
    # C x C operands of the K loop are rounded to the dW dtype once (bf16 dots; fp32 inputs
    # keep fp32).
    tl.store(slot1 + cc_ptrs, hm * b_c[:, None])                     # dL/d(k_i . k_j) via A
    tl.debug_barrier()
    gt_op = tl.trans(tl.load(slot1 + cc_ptrs)).to(dwt)
    hm_op = hm.to(dwt)                                               # dL/d(beta_i k_i . k_j)
    tt_op = tl.trans(tl.load(t_ptr + cc_ptrs).to(dwt))

    d_beta = tl.load(dbeta + tok * SDB + hh, mask=valid, other=0.0)
    d_gam = tl.load(dgam + tok * H + hh, mask=valid, other=0.0)
    k_dk = tl.zeros([C], dtype=tl.float32)                           # k . dk (NORM)
    for part in tl.static_range(1, GAM_PARTS):
        d_gam += tl.load(dgam + part * GAM_PART + tok * H + hh, mask=valid, other=0.0)
    for kb in tl.static_range(K // BK):
        kcols = kb * BK + tl.arange(0, BK)
        koffs = (tok * H + hh)[:, None] * K + kcols[None, :]         # dW scratch
        k_ld = tl.load(k + (tok * SQK + hh * K)[:, None] + kcols[None, :], mask=valid[:, None],
                       other=0.0)
        k_t = k_ld.to(tl.float32)
        k_op = k_ld.to(dwt)
        dkb = tl.dot(tt_op, tl.load(scratch_dw + koffs, mask=valid[:, None], other=0.0),
                     input_precision=PREC)                           # dL/d(beta e^gam k)
        kdkb = tl.sum(dkb * k_t, axis=1)
        d_beta += kdkb * tl.exp(g_c)
        d_gam += kdkb * k_scale
        dk_t = (tl.load(scratch_dk + (tok * SSK + hh * K)[:, None] + kcols[None, :],
                        mask=valid[:, None], other=0.0).to(tl.float32)
                + dkb * k_scale[:, None])
        hk = tl.dot(hm_op, k_op, input_precision=PREC)
        khk = tl.sum(hk * k_t, axis=1)
        d_beta += khk
        d_gam += khk * b_c
        dk_t += hk * b_c[:, None]
        gtk = tl.dot(gt_op, k_op, input_precision=PREC)
        d_gam -= tl.sum(gtk * k_t, axis=1)
        dk_t += gtk
        tl.store(dk + (tok * SDQK + hh * K)[:, None] + kcols[None, :], dk_t.to(dk.dtype.element_ty),
                 mask=valid[:, None])
        if NORM:
            k_dk += tl.sum(k_t * dk_t, axis=1)
    if NORM:
        tl.debug_barrier()                  # the first pass's stores, seen by every thread
        r = tl.load(k_rstd + tok * SKR + hh, mask=valid, other=0.0)
        for kb in tl.static_range(K // BK):
            kcols = kb * BK + tl.arange(0, BK)
            k_t = tl.load(k + (tok * SQK + hh * K)[:, None] + kcols[None, :], mask=valid[:, None],
                          other=0.0).to(tl.float32)
            dk_t = tl.load(dk + (tok * SDQK + hh * K)[:, None] + kcols[None, :],
                           mask=valid[:, None], other=0.0)
            tl.store(dk_in + (tok * SDKI + hh * K)[:, None] + kcols[None, :],
                     (r[:, None] * (dk_t - k_t * k_dk[:, None])).to(dk_in.dtype.element_ty),
                     mask=valid[:, None])
    d_gam = tl.where(valid, d_gam, 0.0)
    # g enters through the in-chunk cumsum: dg_t = sum_{i >= t} dgam_i.
    d_g = tl.sum(d_gam, axis=0) - tl.cumsum(d_gam, axis=0) + d_gam
    tl.store(dg + tok * SDB + hh, d_g, mask=valid)
    tl.store(dbeta + tok * SDB + hh, d_beta, mask=valid)
