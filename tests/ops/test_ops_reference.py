"""The torch reference ops against naive per-token loops written here (independent code)."""
import pytest
import torch
import torch.nn.functional as F

from megatron_mom.ops import gated_delta_rule, gated_rmsnorm, l2norm, short_conv

f64 = torch.float64


def naive_gdr(q, k, v, g, beta, scale, S):
    """One sequence, one token at a time: q, k [T, H, K], v [T, H, V], g, beta [T, H]."""
    out = []
    for t in range(q.shape[0]):
        rows = []
        for h in range(q.shape[1]):
            Sh = S[h] * torch.exp(g[t, h])
            u = beta[t, h] * (v[t, h] - Sh.T @ k[t, h])
            Sh = Sh + torch.outer(k[t, h], u)
            rows.append(Sh.T @ q[t, h] * scale)
            S = torch.cat([S[:h], Sh[None], S[h + 1:]])
        out.append(torch.stack(rows))
    if not out:
        return v.new_zeros(0, *v.shape[1:]), S
    return torch.stack(out), S


def inputs(T, H, K, V, B=1, seed=0, dtype=f64, normalize_k=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    if normalize_k:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    gate = -torch.rand(B, T, H, generator=g, dtype=dtype) * 0.5
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    return q, k, v, gate, beta


@pytest.mark.parametrize("T,K,V,chunk", [(37, 8, 16, 16), (64, 16, 8, 16), (5, 8, 8, 64),
                                         (70, 32, 32, 64)])
def test_dense_matches_naive_with_states(T, K, V, chunk):
    B, H = 2, 3
    q, k, v, g, beta = inputs(T, H, K, V, B=B)
    h0 = torch.randn(B, H, K, V, dtype=f64)
    o, hT = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                             chunk_size=chunk, backend="torch")
    for b in range(B):
        o_ref, h_ref = naive_gdr(q[b], k[b], v[b], g[b], beta[b], K ** -0.5, h0[b])
        torch.testing.assert_close(o[b], o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(hT[b], h_ref, rtol=1e-10, atol=1e-10)


def test_varlen_matches_per_sequence_naive():
    H, K, V = 2, 8, 12
    cu = torch.tensor([0, 1, 17, 17, 50, 53])  # includes a length-1 and an empty sequence
    q, k, v, g, beta = inputs(53, H, K, V, seed=1)
    h0 = torch.randn(5, H, K, V, dtype=f64)
    o, hT = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                             cu_seqlens=cu, chunk_size=16, backend="torch", scale=0.3)
    for n in range(5):
        s, e = cu[n].item(), cu[n + 1].item()
        o_ref, h_ref = naive_gdr(q[0, s:e], k[0, s:e], v[0, s:e], g[0, s:e], beta[0, s:e], 0.3,
                                 h0[n])
        torch.testing.assert_close(o[0, s:e], o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(hT[n], h_ref, rtol=1e-10, atol=1e-10)


def test_qk_l2norm_option():
    q, k, v, g, beta = inputs(20, 2, 8, 8, normalize_k=False)
    o, _ = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, backend="torch", chunk_size=16)
    n = lambda z: z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6)
    o_ref, _ = naive_gdr(n(q)[0], n(k)[0], v[0], g[0], beta[0], 8 ** -0.5,
                         torch.zeros(2, 8, 8, dtype=f64))
    torch.testing.assert_close(o[0], o_ref, rtol=1e-10, atol=1e-10)


def test_float32_and_bfloat16_inputs_close_to_float64():
    q, k, v, g, beta = inputs(40, 2, 16, 16)
    o64, _ = gated_delta_rule(q, k, v, g, beta, backend="torch", chunk_size=16)
    o32, h32 = gated_delta_rule(*(x.float() for x in (q, k, v, g, beta)), backend="torch",
                                chunk_size=16, output_final_state=True)
    assert o32.dtype == torch.float32 and h32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, rtol=1e-5, atol=1e-5)
    obf, _ = gated_delta_rule(*(x.bfloat16() for x in (q, k, v)), g.float(), beta.float(),
                              backend="torch", chunk_size=16)
    assert obf.dtype == torch.bfloat16
    assert (obf.double() - o64).norm() / o64.norm() < 2e-2


def test_gradcheck_dense_and_varlen():
    H, K, V = 1, 4, 3
    q, k, v, g, beta = (x.requires_grad_() for x in inputs(11, H, K, V, seed=2))
    h0 = torch.randn(1, H, K, V, dtype=f64, requires_grad=True)

    def f(q, k, v, g, beta, h0):
        o, h = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                chunk_size=16, use_qk_l2norm=True, backend="torch")
        return o, h

    assert torch.autograd.gradcheck(f, (q, k, v, g, beta, h0))
    cu = torch.tensor([0, 4, 11])
    h0v = torch.randn(2, H, K, V, dtype=f64, requires_grad=True)

    def fv(q, k, v, g, beta, h0):
        return gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                cu_seqlens=cu, chunk_size=16, backend="torch")

    assert torch.autograd.gradcheck(fv, (q, k, v, g, beta, h0v))


def test_gated_delta_rule_rejects_bad_inputs():
    q, k, v, g, beta = inputs(8, 2, 4, 4)
    with pytest.raises(ValueError, match="q .* and k .* must match"):
        gated_delta_rule(q, k[..., :3], v, g, beta, backend="torch")
    with pytest.raises(ValueError, match="g .* and beta .* must be"):
        gated_delta_rule(q, k, v, g[:, :4], beta, backend="torch")
    with pytest.raises(ValueError, match="unsupported dtype"):
        gated_delta_rule(q.long(), k.long(), v.long(), g, beta, backend="torch")
    with pytest.raises(ValueError, match="batch must be 1"):
        gated_delta_rule(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                         v.expand(2, -1, -1, -1), g.expand(2, -1, -1), beta.expand(2, -1, -1),
                         cu_seqlens=torch.tensor([0, 8]), backend="torch")
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(1, 2, 4, 5), backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        gated_delta_rule(q, k, v, g, beta, backend="cuda")


def naive_conv(x, w, hist):
    """x: [n, C]; w: [C, W]; hist: [C, W-1] previous inputs (oldest first)."""
    W = w.shape[1]
    full = torch.cat([hist.T, x])                                     # [W-1+n, C]
    y = torch.stack([(full[i:i + W].T * w).sum(-1) for i in range(x.shape[0])]) if len(x) else x
    return F.silu(y), full[-(W - 1):].T if W > 1 else hist


@pytest.mark.parametrize("W", [2, 4])
def test_short_conv_segments_and_states(W):
    C = 5
    cu = torch.tensor([0, 2, 9, 9, 14])  # a sequence shorter than the kernel, and an empty one
    x = torch.randn(1, 14, C, dtype=f64)
    w = torch.randn(C, W, dtype=f64)
    h0 = torch.randn(4, C, W - 1, dtype=f64)
    for init in (None, h0):
        y, hT = short_conv(x, w, cu_seqlens=cu, initial_state=init, output_final_state=True,
                           backend="torch")
        for n in range(4):
            s, e = cu[n].item(), cu[n + 1].item()
            hist = torch.zeros(C, W - 1, dtype=f64) if init is None else init[n]
            y_ref, h_ref = naive_conv(x[0, s:e], w, hist)
            torch.testing.assert_close(y[0, s:e], y_ref)
            torch.testing.assert_close(hT[n], h_ref)


def test_short_conv_batched_equals_per_row():
    x = torch.randn(3, 7, 4, dtype=f64)
    w = torch.randn(4, 4, dtype=f64)
    y, _ = short_conv(x, w, backend="torch")
    for b in range(3):
        torch.testing.assert_close(y[b], naive_conv(x[b], w, torch.zeros(4, 3, dtype=f64))[0])


def test_gated_rmsnorm_and_l2norm():
    y = torch.randn(6, 3, 8, dtype=f64)
    gate = torch.randn(6, 3, 8, dtype=f64)
    w = torch.randn(8, dtype=f64)
    ref = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * w * gate * torch.sigmoid(gate)
    torch.testing.assert_close(gated_rmsnorm(y, gate, w, 1e-5, backend="torch"), ref)
    torch.testing.assert_close(gated_rmsnorm(y, None, w, 1e-5, backend="torch"),
                               y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    torch.testing.assert_close(l2norm(y, backend="torch"),
                               y / torch.sqrt(y.pow(2).sum(-1, keepdim=True) + 1e-6))
