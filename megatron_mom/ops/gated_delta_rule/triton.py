"""Triton backend of the gated delta rule: chunked forward and backward as one autograd
Function (gradients for q, k, v, g, beta and the initial state), packed sequences through
`cu_seqlens`, optional in-function L2 normalisation of q and k.

Kernels (chunk_fwd.py, chunk_bwd.py):
    forward   prepare_kernel (chunk-parallel) -> state_fwd_kernel (sequential over chunks)
              -> chunk_out_kernel (chunk-parallel, o from the stored states)
    backward  state_bwd_kernel (sequential, reverse) -> chunk_bwd_main_kernel ->
              chunk_bwd_wy_kernel (both chunk-parallel)
By default the forward keeps what the backward needs (per-chunk entry states h, U, W, T); with
`KernelOptions(recompute_states=True)` it keeps only the inputs and the backward reruns the
forward kernels first (less memory, one more forward's worth of time). The launch path reads no
device value on the host: grids come from shapes (chunk-count upper bound T_total // C + N).
The stages (`prepare`, `state_forward`, `state_backward`, `chunk_backward`, `backward_heads`)
are public for the ops built on them (`conv_gated_delta_rule`'s lean form).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from megatron_mom.ops.common import (TRITON_DTYPES, Segments, beside, checker, need_device,
                                     need_triton_dtypes)
from megatron_mom.ops.common.launch import launch
from megatron_mom.ops.common.segments import max_chunks
from megatron_mom.ops.gated_delta_rule.chunk_bwd import (chunk_bwd_dp_kernel,
                                                         chunk_bwd_main_kernel, chunk_bwd_wy_kernel,
                                                         p_t_do_kernel, state_bwd_kernel)
from megatron_mom.ops.gated_delta_rule.chunk_fwd import (chunk_out_kernel, prepare_kernel,
                                                         state_fwd_kernel)
from megatron_mom.ops.gated_delta_rule.state_split import (piece_bwd_kernel, piece_fwd_kernel,
                                                           piece_scan_kernel)
from megatron_mom.ops.l2norm.triton import l2norm_bwd_into, l2norm_fwd
from megatron_mom.ops.options import DEFAULT_OPTIONS, KernelOptions

HEAD_DIMS = (16, 32, 64, 128, 256)
CHUNK_SIZES = (16, 32, 64)
# float32 inputs with K > 128 run 16-token chunks (same math): with 64-token chunks their
# [C, K] float32 tiles spill registers on sm_90 (and that build crashed with an illegal address
# on the H100 under Triton 3.6.0); the 16-token build has no spills.
FP32_WIDE_CHUNK = 16


def effective_chunk_size(chunk_size: int, dtype: torch.dtype, K: int) -> int:
    return min(chunk_size, FP32_WIDE_CHUNK) if dtype == torch.float32 and K > 128 else chunk_size


def _state_config(options: KernelOptions, kernel: str, K: int, V: int,
                  dtype: torch.dtype) -> Dict[str, int]:
    cfg = options.entry("state_fp32" if dtype == torch.float32 else kernel, K)
    cfg["BV"] = min(V, cfg["BV"])
    return cfg


def _launch_opts(options: KernelOptions, kernel: str, cfg=None) -> Dict[str, int]:
    cfg = options.launch[kernel] if cfg is None else cfg
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _row_stride(x: Tensor, *more: Tensor) -> int:
    """Token-row stride (elements) of [TT, H, *] / [TT, H] tensors or head slices of wider ones,
    which the kernels take as a compile-time argument; tensors read through one argument (q and
    k, g and beta, dbeta and dg) must share it."""
    tail = 1
    for d in reversed(x.shape[2:]):
        tail *= d
    for t in (x,) + more:
        if t.stride(0) != x.stride(0) or t.shape[1:] != x.shape[1:] or (
                t.dim() > 1 and t.stride(1) != tail) or t.stride(-1) != 1:
            raise ValueError(f"gated_delta_rule (triton): internal layout {tuple(t.shape)} / "
                             f"{t.stride()} does not fit the kernels")
    return x.stride(0)


def _state_heads(P: Segments, *states: Optional[Tensor]) -> int:
    """Heads per sequence row of the [N, HN, K, V] initial/final states (head slices of full
    tensors in the backward by head groups)."""
    strides = {t.stride(0) // (P.K * P.V) for t in states if t is not None}
    if len(strides) > 1:
        raise ValueError("gated_delta_rule (triton): internal state layouts differ")
    return strides.pop() if strides else P.H


def prepare(P: Segments, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
            options: KernelOptions = DEFAULT_OPTIONS):
    """gam [TT,H] f32, W [TT,H,K], U0 [TT,H,V], T [NTU,H,C,C] (options.t_dtype: f32 or k's dtype),
    P [NTU,H,C,C]. q, k, v, g, beta may be head slices of wider tensors."""
    gam = torch.empty(P.TT, P.H, dtype=torch.float32, device=k.device)
    w = torch.empty_like(k)
    u0 = torch.empty_like(v)
    t_dtype = torch.float32 if options.t_dtype == "float32" else k.dtype
    t_mat = torch.empty(P.NTU, P.H, P.C, P.C, dtype=t_dtype, device=k.device)
    p_mat = torch.empty(P.NTU, P.H, P.C, P.C, dtype=k.dtype, device=k.device)
    cfg = options.launch["prepare"]
    t_work = torch.empty(P.NTU, P.H, P.C, 16, dtype=torch.float32, device=k.device)
    prepare_kernel[(P.NTU, P.H)](
        q, k, v, g, beta, gam, w, u0, t_mat, p_mat, t_work, P.cu, P.offsets, P.N, P.steps, scale,
        H=P.H, K=P.K, V=P.V, C=P.C, BK=min(cfg["BK"], P.K), BV=min(cfg["BV"], P.V),
        PREC=options.precision, SQK=_row_stride(q, k), SV=_row_stride(v),
        SGB=_row_stride(g, beta), **_launch_opts(options, "prepare"))
    return gam, w, u0, t_mat, p_mat


def new_states(P: Segments, k: Tensor, u0: Tensor) -> Tuple[Tensor, Tensor]:
    """Empty per-chunk states h [NTU,H,K,V] and U like u0, for `state_forward(store_states)`
    (made ahead of it where it runs on a side stream)."""
    return torch.empty(P.NTU, P.H, P.K, P.V, dtype=k.dtype, device=k.device), torch.empty_like(u0)


def _w_from_t(cfg, t_beta) -> Dict:
    """The state kernels' arguments that read T and beta in place of W (launch setting
    "w_from_t", where the caller passes t_beta = (T, beta)), or none."""
    if not cfg.get("w_from_t") or t_beta is None:
        return {}
    t_mat, beta = t_beta
    return dict(W_FROM_T=True, t_mat=t_mat, beta=beta, SGB=_row_stride(beta))


def state_forward(P: Segments, q, k, w, u0, gam, p_mat, h0, scale, *, store_o, store_states,
                  store_final, o=None, h=None, u=None, t_beta=None,
                  options: KernelOptions = DEFAULT_OPTIONS):
    """o [TT,H,V] (or None; written into `o` when given, e.g. a head slice of a wider output),
    h [NTU,H,K,V], U [TT,H,V] (or None; into `h`, `u` when given), final state [N,H,K,V] f32.
    Over whole sequences, or over pieces of them as `split_pieces` decides. With the states
    stored, o comes from them afterwards (`chunk_out_kernel`, chunk-parallel) and the chain
    skips it (for K >= launch["chunk_out"]["min_k"]); otherwise the chain computes o itself
    (launch entry "state_fwd_o"). t_beta = (T, beta): what the chain reads in place of W
    where the launch setting "w_from_t" says so."""
    dev = k.device
    if store_o and o is None:
        o = torch.empty_like(u0)
    if store_states and h is None:
        h, u = new_states(P, k, u0)
    ht = torch.empty(P.N, P.H, P.K, P.V, dtype=torch.float32, device=dev) if store_final else None
    o_after = store_o and store_states and P.K >= options.launch["chunk_out"]["min_k"]
    chain_o = store_o and not o_after
    cfg = _state_config(options, "state_fwd_o" if chain_o else "state_fwd", P.K, P.V, k.dtype)
    BV = cfg["BV"]
    dummy = u0
    HN = _state_heads(P, h0, ht)
    cu, starts, grid_n, pieces = P.cu, P.offsets, P.N, None
    L = split_pieces(P, options, BV)
    if L:
        # The pieces' entry states from their transfers, then the kernel below over pieces.
        pieces = P.pieces(L)
        ab = torch.empty(pieces.NPU, P.H, P.K, P.K + P.V, dtype=torch.float32, device=dev)
        BVp = min(BV, P.K)
        launch(piece_fwd_kernel, ((P.K + P.V) // BVp, P.H, pieces.NPU),
               k, w, u0, gam, ab, pieces.cu, H=P.H, K=P.K, V=P.V, C=P.C, BV=BVp,
               PREC=options.precision, SQK=_row_stride(q, k), num_warps=cfg["num_warps"],
               num_stages=cfg["num_stages"])
        h0 = _scan_pieces(P, pieces, ab, h0, ht, HN, reverse=False, options=options)
        del ab                                   # its memory is free for pass 3 (stream order)
        cu, starts, grid_n, HN, store_final = pieces.cu, pieces.first_chunk, pieces.NPU, P.H, False
        if not (store_o or store_states):
            return o, h, u, ht
    order = P.longest_first(pieces) if options.launch["state_order"]["longest_first"] else None
    launch(state_fwd_kernel, (P.V // BV, P.H, grid_n),
        q, k, w, u0, gam, p_mat, h0 if h0 is not None else dummy, o if chain_o else dummy,
        h if store_states else dummy, u if store_states else dummy,
        ht if store_final else dummy, cu if order is None else order, cu, starts, scale,
        H=P.H, K=P.K, V=P.V, C=P.C, BV=BV, ORDERED=order is not None, HAS_H0=h0 is not None,
        STORE_O=chain_o,
        STORE_STATES=store_states, STORE_FINAL=store_final, PREC=options.precision,
        SQK=_row_stride(q, k), SO=_row_stride(o) if chain_o else P.H * P.V,
        HN=HN, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **_w_from_t(cfg, t_beta))
    if o_after:
        out = options.launch["chunk_out"]
        BVo = min(out["BV"], P.V)
        chunk_out_kernel[(P.NTU, P.H, P.V // BVo)](
            q, gam, p_mat, h, u, o, P.cu, P.offsets, P.N, P.steps, scale,
            H=P.H, K=P.K, V=P.V, C=P.C, BK=min(out["BK"], P.K), BV=BVo, PREC=options.precision,
            SQK=_row_stride(q, k), SO=_row_stride(o), **_launch_opts(options, "chunk_out"))
    return o, h, u, ht


def state_backward(P: Segments, q, k, w, gam, p_mat, do, dht, scale, dh0, t_beta=None,
                   options: KernelOptions = DEFAULT_OPTIONS):
    """dh [NTU,H,K,V], dU [TT,H,V]; writes dL/d(initial state) into dh0 [N,H,K,V] f32 when
    given. Over whole sequences, or over pieces of them as `split_pieces` decides. t_beta:
    as for `state_forward`."""
    dev = k.device
    want_dh0 = dh0 is not None
    dh = torch.empty(P.NTU, P.H, P.K, P.V, dtype=k.dtype, device=dev)
    du = torch.empty(P.TT, P.H, P.V, dtype=do.dtype, device=dev)
    cfg = _state_config(options, "state_bwd", P.K, P.V, k.dtype)
    BV = cfg["BV"]
    HN = _state_heads(P, dht, dh0)
    cu, starts, grid_n, pieces = P.cu, P.offsets, P.N, None
    L = split_pieces(P, options, BV, backward=True)
    if L:
        # The pieces' exit gradients from their transfers, then the kernel below over pieces.
        pieces = P.pieces(L)
        ab = torch.empty(pieces.NPU, P.H, P.K, P.K + P.V, dtype=torch.float32, device=dev)
        BVp = min(BV, P.K)
        launch(piece_bwd_kernel, ((P.K + P.V) // BVp, P.H, pieces.NPU),
               q, k, w, gam, p_mat, do, ab, pieces.cu, pieces.first_chunk, scale,
               H=P.H, K=P.K, V=P.V, C=P.C, BV=BVp, PREC=options.precision,
               SQK=_row_stride(q, k), SDO=_row_stride(do), num_warps=cfg["num_warps"],
               num_stages=cfg["num_stages"])
        dht = _scan_pieces(P, pieces, ab, dht, dh0, HN, reverse=True, options=options)
        del ab
        cu, starts, grid_n, HN, want_dh0 = pieces.cu, pieces.first_chunk, pieces.NPU, P.H, False
    order = P.longest_first(pieces) if options.launch["state_order"]["longest_first"] else None
    du0 = bool(cfg["du0"])
    if du0:   # P^T dO chunk-parallel, before the chain (which then reads it instead of P)
        pre = options.launch["p_t_do"]
        BVd = min(pre["BV"], P.V)
        p_t_do_kernel[(P.NTU, P.H, P.V // BVd)](
            p_mat, do, du, P.cu, P.offsets, P.N, P.steps, H=P.H, V=P.V, C=P.C, BV=BVd,
            PREC=options.precision, SDO=_row_stride(do), **_launch_opts(options, "p_t_do"))
    launch(state_bwd_kernel, (P.V // BV, P.H, grid_n),
        q, k, w, gam, p_mat, do, dht if dht is not None else do, dh, du, dh0 if want_dh0 else do,
        cu if order is None else order, cu, starts, scale,
        H=P.H, K=P.K, V=P.V, C=P.C, BV=BV, ORDERED=order is not None,
        HAS_DHT=dht is not None, STORE_DH0=want_dh0,
        PREC=options.precision, SQK=_row_stride(q, k), SDO=_row_stride(do),
        HN=HN, DU0=du0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **_w_from_t(cfg, t_beta))
    return dh, du


def split_pieces(P: Segments, options: KernelOptions, BV: int, backward: bool = False) -> int:
    """Chunks per piece when the state kernels of this launch run over pieces (0: over whole
    sequences); "auto" asks `split_gain`, and splits the backward only up to the rule's
    `backward_max_k` (measured slower above it, docs/performance.md)."""
    if options.state_split == "off":
        return 0
    L = options.state_piece_chunks
    if options.state_split == "on":
        return L
    rule = options.launch["state_split"]
    if backward and P.K > rule["backward_max_k"]:
        return 0
    return L if split_gain(P, L, BV, rule) >= rule["gain"] else 0


def split_gain(P: Segments, L: int, BV: int, rule) -> float:
    """Predicted speedup of the split state kernels, a pure function of shapes: time in chunk
    steps, a launch of n programs taking ceil(n / slots) waves of its chain. Unsplit:
    V/BV x H x N programs; split: the transfers ((K+V)/BV' x H x NPU programs) and the pass
    over pieces (V/BV x H x NPU), chains of L chunks, plus one scan step per piece. The chain
    is the mean sequence's, T_total / N: exact for dense rows, and for packed ones a lower
    bound of the longest, so a few long segments among many short ones (the MoM layer's
    shared memory beside its routed ones) do not split work that is already spread out.
    Heads: the call's (`Segments.call_heads`), not the launch's, so the backward by head
    groups and the lean backward decide as the whole call does and keep its gradients bit
    for bit."""
    waves = lambda programs: -(-programs // rule["slots"])          # noqa: E731
    H = P.call_heads
    chain = max(1, -(-P.TT // (P.N * P.C)))
    pieces = max_chunks(P.TT, P.N, L * P.C)
    unsplit = chain * waves(P.V // BV * H * P.N)
    transfers = (P.K + P.V) // min(BV, P.K) * H * pieces
    split = (L * (waves(transfers) + waves(P.V // BV * H * pieces))
             + -(-chain // L) * rule["scan_step"])
    return unsplit / split


def _scan_pieces(P: Segments, pieces, ab, s_in, s_out, HN, *, reverse, options):
    """Pass 2: every piece's start state (forward; in reverse, its exit gradient) [NPU,H,K,V]
    f32 from the transfers `ab`, starting at s_in (or zero); the last one into s_out."""
    s_piece = torch.empty(pieces.NPU, P.H, P.K, P.V, dtype=torch.float32, device=ab.device)
    cfg = options.launch["state_scan"]
    BV = min(cfg["BV"], P.V)
    # The products of the fp32 transfers with fp32 states take fp32-accurate dots (tf32x3 for
    # tf32): this pass is tiny, and its roundings would otherwise add to the state's.
    prec = "ieee" if options.precision == "ieee" else "tf32x3"
    launch(piece_scan_kernel, (P.V // BV, P.H, P.N),
           ab, s_in if s_in is not None else ab, s_piece, s_out if s_out is not None else ab,
           pieces.offsets, H=P.H, K=P.K, V=P.V, BK=min(cfg["BK"], P.K), BV=BV,
           HAS_IN=s_in is not None, STORE_OUT=s_out is not None, REVERSE=reverse, PREC=prec,
           HN=HN, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return s_piece


def chunk_backward(P: Segments, q, k, v, beta, gam, t_mat, h, dh, u, du, do, scale, dk_dtype,
                   dq=None, dk=None, dv=None, dbeta=None, dg=None, k_l2norm=None,
                   options: KernelOptions = DEFAULT_OPTIONS):
    """Two chunk-parallel phases (dq, dv, direct dk, dW | WY part of dk, dbeta, dg), written
    into the given tensors (head slices of the full gradients) or into new ones.
    k_l2norm = (k_rstd [TT, H], dk_in [TT, H, K]): k is L2-normalised, and the second phase
    also writes the gradient of the unnormalised k into dk_in (dk then float32)."""
    dev = k.device
    f32 = dict(dtype=torch.float32, device=dev)
    cfg = options.launch["chunk_bwd"]
    BK, BV = min(cfg["BK"], P.K), min(cfg["BV"], P.V)
    # dq in q's dtype, also before the L2-norm backward (bf16: one more rounding, half the
    # traffic); float16 keeps float32 there for range. dk as asked: float32 under the fused L2
    # norm, where it doubles as phase A's partial-sum buffer.
    dq_dtype = torch.float32 if q.dtype == torch.float16 and dk_dtype == torch.float32 else q.dtype
    new = lambda t, d, dtype: t if t is not None else torch.empty(  # noqa: E731
        (P.TT, P.H) + ((d,) if d else ()), dtype=dtype, device=dev)
    dq, dk = new(dq, P.K, dq_dtype), new(dk, P.K, dk_dtype)
    dv = new(dv, P.V, v.dtype)
    dbeta, dg = new(dbeta, 0, torch.float32), new(dg, 0, torch.float32)
    # Split over K blocks, the main kernel's programs each write their part of dgam (summed in
    # order by the WY kernel: no atomics, the same bits every run).
    main = options.entry("chunk_bwd_main", P.K)
    parts = P.K // BK if main["split_k"] else 1
    dgam = torch.empty(parts, P.TT, P.H, **f32)
    scratch_cc = torch.empty(P.NTU, P.H, 2, P.C, P.C, **f32)
    # dW feeds only dots: bf16 halves its round trip; float16 could overflow, so it takes fp32.
    dw_dtype = torch.float32 if k.dtype == torch.float16 else k.dtype
    scratch_dw = torch.empty(P.TT, P.H, P.K, dtype=dw_dtype, device=dev)
    # Phase A's part of dk, which phase B adds to: in dk itself (each program re-reads only its
    # own rows) when dk is float32 (fused L2 norm, fp32 inputs) or bfloat16, else in fp32.
    in_dk = dk.dtype == torch.float32 or (dk.dtype == torch.bfloat16 and not options.dk_partial_fp32)
    scratch_dk = dk if in_dk else torch.empty(P.TT, P.H, P.K, **f32)
    seq = (P.cu, P.offsets, P.N, P.steps)
    prec = options.precision
    strides = dict(SQK=_row_stride(q, k), SGB=_row_stride(beta), SDQK=_row_stride(dq, dk),
                   SDB=_row_stride(dbeta, dg), SSK=_row_stride(scratch_dk))
    v_strides = dict(SV=_row_stride(v), SDO=_row_stride(do), SDV=_row_stride(dv))
    # dP first: computed once per chunk, where the split's K-block programs would each compute
    # it again; the value terms come with it.
    scratch_dp = None
    if main["dp_first"]:
        scratch_dp = torch.empty(P.NTU, P.H, 2, P.C, P.C, dtype=u.dtype, device=dev)
        launch(chunk_bwd_dp_kernel, (P.NTU, P.H),
               v, beta, gam, t_mat, u, du, do, dv, dbeta, scratch_cc, scratch_dp, *seq, scale,
               H=P.H, V=P.V, C=P.C, BV=BV, PREC=prec, SGB=strides["SGB"], SDB=strides["SDB"],
               **v_strides, **_launch_opts(options, "chunk_bwd_main", main))
    launch(chunk_bwd_main_kernel, (P.NTU * parts, P.H),
           q, k, v, beta, gam, t_mat, h, dh, u, du, do, dq, dv, dbeta, dgam,
           scratch_cc, scratch_dw, scratch_dk, u if scratch_dp is None else scratch_dp, *seq,
           scale, P.TT * P.H, H=P.H, K=P.K, V=P.V, C=P.C, BK=BK, BV=BV, PREC=prec,
           ONE_PASS=bool(main["one_pass"]), SPLIT_K=parts > 1, DP_FIRST=scratch_dp is not None,
           **v_strides, **strides, **_launch_opts(options, "chunk_bwd_main", main))
    del scratch_dp
    norm = {}
    if k_l2norm is not None:
        k_rstd, dk_in = k_l2norm
        if dk.dtype != torch.float32 or k_rstd.stride(-1) != 1:
            raise ValueError("gated_delta_rule (triton): internal: the fused L2-norm backward "
                             "needs a float32 dk and rstd with unit head stride")
        norm = dict(NORM=True, k_rstd=k_rstd, dk_in=dk_in, SKR=k_rstd.stride(0),
                    SDKI=_row_stride(dk_in))
    chunk_bwd_wy_kernel[(P.NTU, P.H)](
        k, beta, gam, t_mat, dk, dbeta, dgam, dg, scratch_cc, scratch_dw, scratch_dk,
        *seq, P.TT * P.H, H=P.H, K=P.K, C=P.C, BK=BK, PREC=prec, GAM_PARTS=parts, **strides,
        **norm, **_launch_opts(options, "chunk_bwd_wy"))
    return dq, dk


class _ChunkGatedDeltaRule(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm, chunk_size, options):
        B, T, H, K = k.shape
        V = v.shape[-1]
        P = Segments.of(k, v, cu_seqlens, chunk_size)
        q3 = q.reshape(P.TT, H, K).contiguous()                  # [TT, H, K]
        k3 = k.reshape(P.TT, H, K).contiguous()
        v3 = v.reshape(P.TT, H, V).contiguous()                  # [TT, H, V]
        g2 = g.reshape(P.TT, H).contiguous()                     # [TT, H]
        b2 = beta.reshape(P.TT, H).contiguous()
        q_rstd = k_rstd = None
        if use_qk_l2norm:
            q3, q_rstd = l2norm_fwd(q3)
            k3, k_rstd = l2norm_fwd(k3)
        h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()

        gam, w, u0, t_mat, p_mat = prepare(P, q3, k3, v3, g2, b2, scale, options)
        keep = not options.recompute_states
        o, h, u, ht = state_forward(P, q3, k3, w, u0, gam, p_mat, h0, scale, store_o=True,
                                    store_states=keep, store_final=output_final_state,
                                    t_beta=(t_mat, b2), options=options)
        if keep:
            ctx.save_for_backward(q3, k3, v3, g2, b2, h0, q_rstd, k_rstd, gam, w, t_mat, p_mat, h, u)
        else:
            ctx.save_for_backward(q3, k3, v3, g2, b2, h0, q_rstd, k_rstd)
        ctx.packed = P
        ctx.options = options
        ctx.meta = (B, T, scale, use_qk_l2norm, keep, initial_state is not None,
                    q.dtype, g.dtype, beta.dtype,
                    None if initial_state is None else initial_state.dtype)
        return o.view(B, T, H, V), ht

    @staticmethod
    def backward(ctx, d_o, d_ht):
        P = ctx.packed
        B, T, scale, use_l2, kept, has_h0, q_dtype, g_dtype, b_dtype, h0_dtype = ctx.meta
        saved = ctx.saved_tensors
        q3, k3, v3, g2, b2, h0, q_rstd, k_rstd = saved[:8]
        q3, k3 = q3.view(P.TT, P.H, P.K), k3.view(P.TT, P.H, P.K)
        if use_l2:
            q_rstd, k_rstd = q_rstd.view(P.TT, P.H), k_rstd.view(P.TT, P.H)
        if d_o is None:
            d_o = torch.zeros(P.TT, P.H, P.V, dtype=v3.dtype, device=v3.device)
        do3 = d_o.reshape(P.TT, P.H, P.V).to(v3.dtype).contiguous()
        dht = None if d_ht is None else d_ht.to(torch.float32).contiguous()
        inputs = (q3, k3, v3, g2, b2, do3, h0, dht, q_rstd, k_rstd)
        states = saved[8:] if kept else None
        meta = (scale, use_l2, has_h0, q_dtype)

        groups = head_groups(P.H, ctx.options.backward_head_groups)
        Hg = P.H // groups
        Pg = P.with_heads(Hg)
        # Gradients in q's dtype (l2 norm: its backward writes them; else the kernels do),
        # each made when a group first writes it (after that group's own buffers for dq, dk).
        dev, f32 = v3.device, torch.float32
        full = {}
        specs = {"dq": ((P.TT, P.H, P.K), q_dtype), "dk": ((P.TT, P.H, P.K), q_dtype),
                 "dv": ((P.TT, P.H, P.V), v3.dtype), "dbeta": ((P.TT, P.H), f32),
                 "dg": ((P.TT, P.H), f32), "dh0": ((P.N, P.H, P.K, P.V), f32)}
        # One group of heads at a time: the kernels read the group's inputs and write its
        # gradients in place (head slices, see chunk_fwd.py), and the group's own buffers are
        # freed (on return) before the next group's are made, so they take 1/groups of the
        # memory. Kept states are per-chunk tensors of all heads: a group takes a copy.
        for j in range(groups):
            heads = slice(j * Hg, (j + 1) * Hg)

            def out(name, heads=heads):
                if name not in full:
                    shape, dtype = specs[name]
                    full[name] = torch.empty(shape, dtype=dtype, device=dev)
                return full[name] if groups == 1 else full[name][:, heads]

            part = lambda x: x if groups == 1 or x is None else x[:, heads]   # noqa: E731
            own = lambda x: x if groups == 1 else x[:, heads].contiguous()    # noqa: E731
            backward_heads(Pg, tuple(part(x) for x in inputs),
                           None if states is None else tuple(own(x) for x in states), meta, out,
                           options=ctx.options)
        dq, dk, dv, dbeta, dg = (full[name] for name in ("dq", "dk", "dv", "dbeta", "dg"))
        dh0 = full.get("dh0")
        shape_k = (B, T, P.H, P.K)
        return (dq.view(shape_k), dk.view(shape_k), dv.view(B, T, P.H, P.V),
                dg.view(B, T, P.H).to(g_dtype), dbeta.view(B, T, P.H).to(b_dtype), None,
                None if dh0 is None else dh0.to(h0_dtype), None, None, None, None, None)


def head_groups(H: int, groups: int) -> int:
    """The number of head groups the backward runs: the largest divisor of H that is at most
    `groups` (KernelOptions.backward_head_groups)."""
    want = max(1, min(int(groups), H))
    return max(d for d in range(1, want + 1) if H % d == 0)


def backward_heads(P: Segments, inputs, states, meta, out, pending=(),
                   options: KernelOptions = DEFAULT_OPTIONS):
    """The backward over P.H heads from the (sliced) inputs and the forward's kept states or,
    when `states` is None, by rerunning the forward kernels. Writes into `out(name)`: the head
    slices of the full dq, dk, dv, dbeta, dg (and dh0), asked for only when written.
    `pending`: a list of functions whose launches (independent of this call's, their tensors
    made by the caller) run beside the sequential state kernels, which leave most of the GPU
    idle; emptied once the current stream waits for them, so that their tensors can be freed.
    `meta`: (scale, whether q and k were L2-normalised, whether there is an initial state,
    the dtype of q's gradient)."""
    q3, k3, v3, g2, b2, do3, h0, dht, q_rstd, k_rstd = inputs
    scale, use_l2, has_h0, q_dtype = meta
    streams = options.side_streams
    join = join_pending = None
    if pending:
        with beside(q3.device, 1, streams) as join_pending:
            for i in range(len(pending)):  # no loop variable: it would keep the last one alive
                pending[i]()
    if states is not None:
        gam, w, t_mat, p_mat, h, u = states
    else:
        gam, w, u0, t_mat, p_mat = prepare(P, q3, k3, v3, g2, b2, scale, options)
        h, u = new_states(P, k3, u0)
        # The state backward below does not read the states: the two sequential kernels, each
        # too few programs to fill the GPU, run side by side.
        with beside(k3.device, 0, streams) as join:
            state_forward(P, q3, k3, w, u0, gam, p_mat, h0, scale, store_o=False,
                          store_states=True, store_final=False, h=h, u=u, t_beta=(t_mat, b2),
                          options=options)
    dh, du = state_backward(P, q3, k3, w, gam, p_mat, do3, dht, scale,
                            out("dh0") if has_h0 else None, (t_mat, b2), options)
    if join_pending is not None:
        join_pending()
        pending.clear()
    if join is not None:
        join()
        del u0
    grads = dict(dv=out("dv"), dbeta=out("dbeta"), dg=out("dg"))
    if use_l2:
        # The kernels' dq, dk are gradients of the normalised q, k: the group's own buffers
        # (dk in float32), which the L2 norm's backward turns into the full gradients' slices
        # (k's in the chunk backward's last kernel, which holds the rows of dk).
        dq_n, _ = chunk_backward(P, q3, k3, v3, b2, gam, t_mat, h, dh, u, du, do3, scale,
                                 torch.float32, **grads, k_l2norm=(k_rstd, out("dk")),
                                 options=options)
        del h, dh, u, du, states
        l2norm_bwd_into(out("dq"), q3, q_rstd, dq_n)
    else:
        chunk_backward(P, q3, k3, v3, b2, gam, t_mat, h, dh, u, du, do3, scale, q_dtype,
                       dq=out("dq"), dk=out("dk"), **grads, options=options)


def check_dims(K: int, V: int, chunk_size: int, op: str = "gated_delta_rule") -> None:
    """The head dims and chunk size the kernels are built for (also for ops built on them)."""
    for name, dim in (("key head dim K", K), ("value head dim V", V)):
        if dim not in HEAD_DIMS:
            raise ValueError(f"{op} (triton): {name}={dim} is not supported; use one of "
                             f"{HEAD_DIMS}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"{op} (triton): chunk_size={chunk_size} is not supported; use one of "
                         f"{CHUNK_SIZES}")


def _check(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size):
    """What the Triton backend needs beyond the dispatcher's checks."""
    where = "gated_delta_rule (triton)"
    check_dims(k.shape[-1], v.shape[-1], chunk_size)
    need_triton_dtypes(where, q=q, k=k, v=v, g=g, beta=beta)
    if initial_state is not None:
        checker(where)(initial_state.dtype in TRITON_DTYPES + (torch.float64,),
                       f"initial_state has dtype {initial_state.dtype}")
    need_device(where, k.device, initial_state=initial_state, cu_seqlens=cu_seqlens)


def chunk_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None, use_qk_l2norm: bool = False, chunk_size: int = 64,
    lean_backward: bool = False, options: Optional[KernelOptions] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """q, k [B,T,H,K], v [B,T,H,V], g, beta [B,T,H] -> (o [B,T,H,V] in v's dtype,
    final state [N,H,K,V] float32 or None). Shapes are checked by the dispatcher.
    `options` (default `KernelOptions()`): how the kernels run. lean_backward: this call keeps
    only its inputs and runs its backward head by head (`options` with recompute_states=True
    and backward_head_groups=H)."""
    _check(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size)
    options = DEFAULT_OPTIONS if options is None else options
    if lean_backward:
        options = options.replace(recompute_states=True, backward_head_groups=k.shape[2])
    chunk_size = effective_chunk_size(int(chunk_size), k.dtype, k.shape[-1])
    o, ht = _ChunkGatedDeltaRule.apply(q, k, v, g, beta, float(scale), initial_state,
                                       bool(output_final_state), cu_seqlens, bool(use_qk_l2norm),
                                       chunk_size, options)
    return o, (ht if output_final_state else None)


# Process-wide switches this module does not have (execution choices travel with each call as
# KernelOptions), each with what to use: a clear error instead of a bare AttributeError.
_REMOVED = {
    "CONFIG": "megatron_mom.ops.KernelOptions (launch settings: TUNED_LAUNCH and "
              "KernelOptions.with_launch), passed as gated_delta_rule(..., options=...)",
    "set_recompute_states": "gated_delta_rule(..., options=KernelOptions(recompute_states=True))",
    "set_backward_head_groups": "gated_delta_rule(..., options=KernelOptions("
                                "backward_head_groups=n))",
    "OVERLAP": "KernelOptions(side_streams=False)",
}


def __getattr__(name):
    if name in _REMOVED:
        raise AttributeError(f"megatron_mom.ops.gated_delta_rule.triton.{name} was removed "
                             f"(execution choices travel with the call): use {_REMOVED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["chunk_gated_delta_rule", "head_groups", "check_dims", "effective_chunk_size",
           "prepare", "new_states", "state_forward", "state_backward", "chunk_backward",
           "backward_heads"]
