"""Plain PyTorch gated delta rule: the oracle for the Triton kernels, and the CPU path.

Math (per head): S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
o_t = S_t^T q_t * scale. States are [K, V] per head, zero unless an initial state is given.

Two forms live here:
- `recurrent_gated_delta_rule`: one token at a time; exact, slow, obviously right.
- `chunk_gated_delta_rule`: the chunked (WY) form the Triton kernels implement, written with
  torch ops so autograd gives its backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from megatron_mom.ops.common import compute_dtype


def recurrent_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Token-by-token recurrence on dense [B, T, H, *] inputs. Returns (o, final_state)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    ct = compute_dtype(v.dtype)
    q, k, v, g, beta = (x.to(ct) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(ct)
    outs = []
    for t in range(T):
        S = S * g[:, t, :, None, None].exp()
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * scale)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V, dtype=ct)
    return o, S


def chunk_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    initial_state: Optional[Tensor] = None, chunk_size: int = 64,
) -> Tuple[Tensor, Tensor]:
    """Chunked form on dense [B, T, H, *] inputs. Returns (o in compute dtype, final_state).

    Within a chunk with cumulative log-decay gam (gam_i = sum_{j<=i} g_j) and entry state S:
        A    = strictly_lower((beta k) k^T * exp(gam_i - gam_j));  Tm = (I + A)^-1
        U    = Tm (beta v) - Tm (beta exp(gam) k) S          (the delta-rule "new values")
        o    = scale * (exp(gam) q S + lower(q k^T * exp(gam_i - gam_j)) U)
        S'   = exp(gam_C) S + (exp(gam_C - gam) k)^T U
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    ct = compute_dtype(v.dtype)
    NT = (T + C - 1) // C
    pad = NT * C - T

    def chunks(x: Tensor) -> Tensor:  # [B, T, H, *] -> [B, H, NT, C, *]
        x = x.to(ct)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        x = x.transpose(1, 2)
        return x.reshape(B, H, NT, C, *x.shape[3:])

    # A token whose k, v, g or beta is non-finite is zeroed for the products (dense products
    # would carry 0 * NaN = NaN to the earlier rows of its chunk) and its output and every
    # later one, and the final state, are NaN, as in the token-by-token form.
    ok = (k.isfinite().all(-1) & v.isfinite().all(-1) & g.isfinite() & beta.isfinite())  # [B, T, H]
    poisoned = (~ok).cumsum(1) > 0
    k, v, g, beta = (x.where(ok if x.dim() == 3 else ok[..., None], 0) for x in (k, v, g, beta))
    # Zero padding is inert: g = 0 keeps the state, beta = 0 writes nothing.
    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    gam = g.cumsum(-1)                                              # [B, H, NT, C]
    idx = torch.arange(C, device=q.device)
    lower = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    diff = gam[..., :, None] - gam[..., None, :]                   # gam_i - gam_j
    decay_lower = diff.masked_fill(~lower, float("-inf")).exp()    # no overflow above diagonal
    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2)) * decay_lower * strict
    eye = torch.eye(C, dtype=ct, device=q.device)
    Tm = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False,
                                       unitriangular=True)
    W = Tm @ (kb * gam.exp()[..., None])                            # [B, H, NT, C, K]
    U0 = Tm @ (v * beta[..., None])                                 # [B, H, NT, C, V]
    QK = (q @ k.transpose(-1, -2)) * decay_lower                    # [B, H, NT, C, C]
    q_decay = q * gam.exp()[..., None]
    gam_last = gam[..., -1]                                         # [B, H, NT]
    k_decay = k * (gam_last[..., None] - gam).exp()[..., None]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(ct)
    outs = []
    for n in range(NT):
        U = U0[:, :, n] - W[:, :, n] @ S
        outs.append((q_decay[:, :, n] @ S + QK[:, :, n] @ U) * scale)
        S = S * gam_last[:, :, n, None, None].exp() + k_decay[:, :, n].transpose(-1, -2) @ U
    if not NT:   # no tokens: nothing to stack, the state passes through
        return v.new_zeros(B, 0, H, V, dtype=ct), S
    o = torch.stack(outs, dim=2).reshape(B, H, NT * C, V)[:, :, :T].transpose(1, 2)
    o = o.masked_fill(poisoned[..., None], float("nan"))
    S = S.masked_fill(poisoned[:, -1, :, None, None], float("nan"))
    return o, S


def varlen_to_padded(x: Tensor, cu_seqlens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """[1, T, ...] packed sequences -> ([N, Lmax, ...] zero padded, seq index, position).

    The torch path pads because it is the reference; the Triton kernels walk `cu_seqlens`
    directly. Reading Lmax is a host sync, acceptable here.
    """
    T = x.shape[1]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    N = lengths.numel()
    Lmax = int(lengths.max().item()) if N and T else 0
    tok = torch.arange(T, device=x.device)
    seq = torch.searchsorted(cu_seqlens[1:], tok, right=True)
    pos = tok - cu_seqlens[seq]
    out = x.new_zeros(N, Lmax, *x.shape[2:])
    out = out.index_put((seq, pos), x[0])
    return out, seq, pos
