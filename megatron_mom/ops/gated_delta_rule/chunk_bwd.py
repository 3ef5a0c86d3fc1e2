"""Backward kernels of the chunked gated delta rule (algebra in docs/kernels.md).

`state_bwd_kernel` walks the chunks in reverse, carrying dS (gradient of the state at the
chunk's exit) and producing per chunk dh (that dS) and dU = P^T dO + Kg dS'.
`chunk_bwd_kernel` then works on every chunk in parallel: dq, dk, dv, dbeta, dg from the saved
entry states h, dh, U, dU, T and the inputs.

Transposes of C x C matrices that come out of `tl.dot` go through a per-chunk scratch buffer
and are loaded back transposed, never `tl.trans`-ed in registers (Triton 3.4-3.7 on Hopper).
"""
from __future__ import annotations

import triton
import triton.language as tl

from megatron_mom.ops.gated_delta_rule.chunk_fwd import chunk_rows, load_decay


@triton.jit(do_not_specialize=["scale"])
def state_bwd_kernel(
    q, k, w, gam, do,                    # [TT,H,K] x3, [TT,H] f32, [TT,H,V]
    dht, dh_out, du_out, dh0,            # [N,H,K,V] f32, [NTU,H,K,V], [TT,H,V], [N,H,K,V] f32
    cu_seqlens, chunk_offsets, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (V block, head, sequence), chunks last to first:
    dU = P^T dO + Kg dS',  dS = Qg^T dO + e^Gam dS' - W^T dU."""
    vb = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.program_id(2)
    bos = tl.load(cu_seqlens + n)
    eos = tl.load(cu_seqlens + n + 1)
    first_chunk = tl.load(chunk_offsets + n)
    rows = tl.arange(0, C)
    kcols = tl.arange(0, K)
    vcols = vb * BV + tl.arange(0, BV)
    dt = w.dtype.element_ty
    anticausal = rows[:, None] <= rows[None, :]                      # (P^T)_ij needs j >= i
    state_offs = kcols[:, None] * V + vcols[None, :]

    if HAS_DHT:
        ds = tl.load(dht + (n.to(tl.int64) * H + h) * K * V + state_offs).to(tl.float32)
    else:
        ds = tl.zeros([K, BV], dtype=tl.float32)

    num_chunks = tl.cdiv(eos - bos, C)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        t0 = bos + c * C
        tok = (t0 + rows).to(tl.int64)
        valid = tok < eos
        last = tl.minimum(eos - t0, C) - 1
        tl.store(dh_out + ((first_chunk + c).to(tl.int64) * H + h) * K * V + state_offs,
                 ds.to(dh_out.dtype.element_ty))
        g_c, g_last = load_decay(gam, tok, valid, last, h, H, C)
        koffs = (tok * H + h)[:, None] * K + kcols[None, :]
        voffs = (tok * H + h)[:, None] * V + vcols[None, :]
        q_t = tl.load(q + koffs, mask=valid[:, None], other=0.0)
        k_t = tl.load(k + koffs, mask=valid[:, None], other=0.0)
        w_t = tl.load(w + koffs, mask=valid[:, None], other=0.0)
        do_t = tl.load(do + voffs, mask=valid[:, None], other=0.0).to(dt)
        decay_t = tl.where(anticausal, tl.exp(tl.where(anticausal, g_c[None, :] - g_c[:, None], 0.0)), 0.0)
        p_t = tl.dot(k_t, tl.trans(q_t), input_precision=PREC) * (decay_t * scale)   # P^T
        k_g = (k_t.to(tl.float32) * tl.exp(g_last - g_c)[:, None]).to(dt)
        du = tl.dot(p_t.to(dt), do_t, input_precision=PREC) + tl.dot(k_g, ds.to(dt), input_precision=PREC)
        tl.store(du_out + voffs, du.to(du_out.dtype.element_ty), mask=valid[:, None])
        q_g = (q_t.to(tl.float32) * (tl.exp(g_c) * scale)[:, None]).to(dt)
        ds = (ds * tl.exp(g_last) + tl.dot(tl.trans(q_g), do_t, input_precision=PREC)
              - tl.dot(tl.trans(w_t), du.to(dt), input_precision=PREC))

    if STORE_DH0:
        tl.store(dh0 + (n.to(tl.int64) * H + h) * K * V + state_offs, ds)


@triton.jit(do_not_specialize=["N", "STEPS", "scale"])
def chunk_bwd_kernel(
    q, k, v, beta, gam, t_mat,           # [TT,H,K] x2, [TT,H,V], [TT,H], [TT,H] f32, [NTU,H,C,C] f32
    h, dh, u, du, do,                    # [NTU,H,K,V] x2, [TT,H,V] x3
    dq, dk, dv, dbeta, dgam,             # [TT,H,K] x2, [TT,H,V], [TT,H] f32 x2
    scratch_cc, scratch_dw, scratch_dk,  # [NTU,H,2,C,C] f32, [TT,H,K] f32 x2
    cu_seqlens, chunk_offsets, N, STEPS, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (chunk, head). Phase A (V blocks): dP = dO U^T, dv = beta T^T dU and
    dU Vb^T. Phase B (K blocks x V blocks): dq, the Kg part of dk, dW = -dU S^T and dT.
    Phase C (K blocks): dA = -T^T dT T^T and the rest of dk; dbeta and dg along the way."""
    pid = tl.program_id(0)
    hh = tl.program_id(1)
    if pid >= tl.load(chunk_offsets + N):
        return
    tok, valid, last = chunk_rows(chunk_offsets, cu_seqlens, pid, N, STEPS, C)
    rows = tl.arange(0, C)
    dt = u.dtype.element_ty
    g_c, g_last = load_decay(gam, tok, valid, last, hh, H, C)
    b_c = tl.load(beta + tok * H + hh, mask=valid, other=0.0).to(tl.float32)
    e_g = tl.exp(g_c)
    e_rest = tl.exp(g_last - g_c)
    causal = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    decay = tl.where(causal, tl.exp(tl.where(causal, g_c[:, None] - g_c[None, :], 0.0)), 0.0)

    chunk_id = pid.to(tl.int64) * H + hh
    cc_base = scratch_cc + chunk_id * 2 * C * C
    cc_ptrs = rows[:, None] * C + rows[None, :]
    cc_ptrs_t = rows[None, :] * C + rows[:, None]
    t_base = t_mat + chunk_id * C * C
    t_tr = tl.load(t_base + cc_ptrs_t)                               # T^T [C, C]
    s_base = chunk_id * K * V

    # Phase A: over V blocks.
    dp = tl.zeros([C, C], dtype=tl.float32)
    dt_mat = tl.zeros([C, C], dtype=tl.float32)                      # dL/dT
    d_beta = tl.zeros([C], dtype=tl.float32)
    for vb in tl.static_range(V // BV):
        vcols = vb * BV + tl.arange(0, BV)
        voffs = (tok * H + hh)[:, None] * V + vcols[None, :]
        do_t = tl.load(do + voffs, mask=valid[:, None], other=0.0).to(dt)
        u_t = tl.load(u + voffs, mask=valid[:, None], other=0.0)
        du_t = tl.load(du + voffs, mask=valid[:, None], other=0.0)
        v_t = tl.load(v + voffs, mask=valid[:, None], other=0.0).to(tl.float32)
        dp += tl.dot(do_t, tl.trans(u_t), input_precision=PREC)
        du_f = du_t.to(tl.float32)
        dt_mat += tl.dot(du_f, tl.trans(v_t * b_c[:, None]), input_precision=PREC)
        dvb = tl.dot(t_tr, du_f, input_precision=PREC)               # dL/d(beta v)
        tl.store(dv + voffs, (dvb * b_c[:, None]).to(dv.dtype.element_ty), mask=valid[:, None])
        d_beta += tl.sum(dvb * v_t, axis=1)
    dpm = dp * decay * scale                                         # dL/d(q_i . k_j)
    tl.store(cc_base + cc_ptrs, dpm)

    # Phase B: over K blocks (inner V blocks).
    d_gam = tl.zeros([C], dtype=tl.float32)
    d_gam_last = tl.sum(tl.zeros([C], dtype=tl.float32), axis=0)     # sum dS' * S (times e^Gam)
    q_scale = e_g * scale
    k_scale = b_c * e_g
    for kb in tl.static_range(K // BK):
        kcols = kb * BK + tl.arange(0, BK)
        koffs = (tok * H + hh)[:, None] * K + kcols[None, :]
        dqg = tl.zeros([C, BK], dtype=tl.float32)                    # dO S^T
        dkg = tl.zeros([C, BK], dtype=tl.float32)                    # U dS'^T
        dw = tl.zeros([C, BK], dtype=tl.float32)                     # -dU S^T
        for vb in tl.static_range(V // BV):
            vcols = vb * BV + tl.arange(0, BV)
            voffs = (tok * H + hh)[:, None] * V + vcols[None, :]
            st_offs = s_base + kcols[:, None] * V + vcols[None, :]
            s_t = tl.load(h + st_offs)
            ds_t = tl.load(dh + st_offs)
            do_t = tl.load(do + voffs, mask=valid[:, None], other=0.0).to(dt)
            u_t = tl.load(u + voffs, mask=valid[:, None], other=0.0)
            du_t = tl.load(du + voffs, mask=valid[:, None], other=0.0)
            dqg += tl.dot(do_t, tl.trans(s_t), input_precision=PREC)
            dkg += tl.dot(u_t, tl.trans(ds_t), input_precision=PREC)
            dw -= tl.dot(du_t, tl.trans(s_t), input_precision=PREC)
            d_gam_last += tl.sum(tl.sum(ds_t.to(tl.float32) * s_t.to(tl.float32), axis=1), axis=0)
        q_t = tl.load(q + koffs, mask=valid[:, None], other=0.0).to(tl.float32)
        k_t = tl.load(k + koffs, mask=valid[:, None], other=0.0).to(tl.float32)
        pk = tl.dot(dpm, k_t, input_precision=PREC)
        tl.store(dq + koffs, (dqg * q_scale[:, None] + pk).to(dq.dtype.element_ty), mask=valid[:, None])
        d_gam += tl.sum(q_t * (dqg * q_scale[:, None] + pk), axis=1)
        kg_term = tl.sum(dkg * k_t * e_rest[:, None], axis=1)
        # Kg = e^(Gam - gam) k: -kg_term on gam_i, +sum(kg_term) on Gam (the last valid row).
        d_gam -= kg_term
        d_gam = tl.where(rows == last, d_gam + tl.sum(kg_term, axis=0), d_gam)
        dt_mat += tl.dot(dw, tl.trans(k_t * k_scale[:, None]), input_precision=PREC)
        tl.store(scratch_dk + koffs, dkg * e_rest[:, None], mask=valid[:, None])
        tl.store(scratch_dw + koffs, dw, mask=valid[:, None])

    # Phase C: dA = -T^T dT T^T, then the A, W and P^T parts of dk.
    t_nat = tl.load(t_base + cc_ptrs)
    x = tl.dot(dt_mat, t_tr, input_precision=PREC)
    da = -tl.dot(t_tr, x, input_precision=PREC)
    hm = tl.where(strict, da * decay, 0.0)                           # dL/d(beta_i k_i . k_j)
    gm = hm * b_c[:, None]                                           # dL/d(k_i . k_j) via A
    tl.debug_barrier()
    tl.store(cc_base + C * C + cc_ptrs, gm)
    tl.debug_barrier()
    gm_t = tl.load(cc_base + C * C + cc_ptrs_t)
    dpm_t = tl.load(cc_base + cc_ptrs_t)
    for kb in tl.static_range(K // BK):
        kcols = kb * BK + tl.arange(0, BK)
        koffs = (tok * H + hh)[:, None] * K + kcols[None, :]
        q_t = tl.load(q + koffs, mask=valid[:, None], other=0.0).to(tl.float32)
        k_t = tl.load(k + koffs, mask=valid[:, None], other=0.0).to(tl.float32)
        dw_t = tl.load(scratch_dw + koffs, mask=valid[:, None], other=0.0)
        dk_t = tl.load(scratch_dk + koffs, mask=valid[:, None], other=0.0)
        dkb = tl.dot(t_tr, dw_t, input_precision=PREC)               # dL/d(beta e^gam k)
        hk = tl.dot(hm, k_t, input_precision=PREC)
        gtk = tl.dot(gm_t, k_t, input_precision=PREC)
        ptq = tl.dot(dpm_t, q_t, input_precision=PREC)
        dk_t += dkb * k_scale[:, None] + hk * b_c[:, None] + gtk + ptq
        tl.store(dk + koffs, dk_t.to(dk.dtype.element_ty), mask=valid[:, None])
        kdkb = tl.sum(dkb * k_t, axis=1)
        khk = tl.sum(hk * k_t, axis=1)
        d_beta += kdkb * e_g + khk
        d_gam += kdkb * k_scale + khk * b_c - tl.sum(gtk * k_t, axis=1) - tl.sum(ptq * k_t, axis=1)
    d_gam = tl.where(rows == last, d_gam + d_gam_last * tl.exp(g_last), d_gam)
    d_gam = tl.where(valid, d_gam, 0.0)
    # g enters through the in-chunk cumsum: dg_t = sum_{i >= t} dgam_i.
    d_g = tl.sum(d_gam, axis=0) - tl.cumsum(d_gam, axis=0) + d_gam
    tl.store(dgam + tok * H + hh, d_g, mask=valid)
    tl.store(dbeta + tok * H + hh, d_beta, mask=valid)
