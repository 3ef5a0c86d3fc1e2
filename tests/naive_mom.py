"""An independent, deliberately naive MoM layer written from the method's equations.

It shares no code with megatron_mom: Python loops over batch rows, memories and tokens, the
official parameter names, float64. Tests compare the real layer (loaded through the converter)
against it.
"""
import math

import torch
import torch.nn.functional as F


def official_params(mom, hidden, seed=0, dtype=torch.float64):
    """Random official-format weights with realistic scales."""
    g = torch.Generator().manual_seed(seed)
    H, K, V, W, M = mom.num_heads, mom.head_dim, int(mom.head_dim * mom.expand_v), mom.conv_size, mom.num_memories
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=dtype) * std)
    lin = lambda out: rnd(out, hidden, std=hidden ** -0.5)
    p = {"q_proj.weight": lin(H * K), "gate.weight": lin(M),
         "A_log": torch.log(torch.rand(H, generator=g, dtype=dtype) * 15 + 1),
         "dt_bias": rnd(H, std=0.5) - 2.0,
         "q_conv1d.weight": rnd(H * K, 1, W, std=W ** -0.5),
         "k_conv1d.weight": rnd(H * K, 1, W, std=W ** -0.5),
         "v_conv1d.weight": rnd(H * V, 1, W, std=W ** -0.5),
         "o_norm.weight": 1 + rnd(V, std=0.1), "o_proj.weight": rnd(hidden, H * V, std=(H * V) ** -0.5)}
    if mom.use_output_gate:
        p["g_proj.weight"] = lin(H * V)
    for m in range(M):
        p[f"k_proj.{m}.weight"], p[f"v_proj.{m}.weight"] = lin(H * K), lin(H * V)
        p[f"b_proj.{m}.weight"], p[f"a_proj.{m}.weight"] = lin(H), lin(H)
    if mom.shared_memory:
        p["shared_k.weight"], p["shared_v.weight"] = lin(H * K), lin(H * V)
        p["shared_b.weight"], p["shared_a.weight"] = lin(H), lin(H)
    return p


def causal_conv_silu(x, w):
    """x: [n, C] one subsequence; w: [C, 1, W]; zero history before its first token."""
    n, C = x.shape
    W = w.shape[-1]
    out = torch.zeros_like(x)
    for i in range(n):
        for j in range(W):
            src = i - (W - 1) + j
            if src >= 0:
                out[i] = out[i] + w[:, 0, j] * x[src]
    return F.silu(out)


def l2n(z):
    return z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6)


def memory_readout(xs, p, mom, wk, wv, wb, wa):
    """Run one memory over its routed subsequence xs [n, D]; returns o [n, H, V]."""
    H, K = mom.num_heads, mom.head_dim
    V = int(K * mom.expand_v)
    n = xs.shape[0]
    q = causal_conv_silu(xs @ p["q_proj.weight"].T, p["q_conv1d.weight"]).view(n, H, K)
    k = causal_conv_silu(xs @ wk.T, p["k_conv1d.weight"]).view(n, H, K)
    v = causal_conv_silu(xs @ wv.T, p["v_conv1d.weight"]).view(n, H, V)
    beta = torch.sigmoid(xs @ wb.T)                                   # [n, H]
    g = -torch.exp(p["A_log"]) * F.softplus(xs @ wa.T + p["dt_bias"])  # [n, H]
    q, k = l2n(q), l2n(k)
    out = []
    for h in range(H):
        S = xs.new_zeros(K, V)
        rows = []
        for i in range(n):
            S = torch.exp(g[i, h]) * S
            u = beta[i, h] * (v[i, h] - S.T @ k[i, h])
            S = S + torch.outer(k[i, h], u)
            rows.append(S.T @ q[i, h] / math.sqrt(K))
        out.append(torch.stack(rows))
    return torch.stack(out, dim=1)                                    # [n, H, V]


def naive_mom(x, p, mom, eps=None):
    """x: [B, T, D] -> (out [B, T, D], load-balancing loss, z loss, routed counts [M])."""
    B, T, D = x.shape
    M, k = mom.num_memories, mom.topk
    H, V = mom.num_heads, int(mom.head_dim * mom.expand_v)
    eps = mom.norm_eps if eps is None else eps
    logits = x @ p["gate.weight"].T                                   # [B, T, M]
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    top_w = top_p / top_p.sum(-1, keepdim=True)
    y = x.new_zeros(B, T, H, V)
    counts = torch.zeros(M)
    for b in range(B):
        for m in range(M):
            steps = [t for t in range(T) if m in top_i[b, t].tolist()]
            counts[m] += len(steps)
            if not steps:
                continue
            o = memory_readout(x[b, steps], p, mom, p[f"k_proj.{m}.weight"], p[f"v_proj.{m}.weight"],
                               p[f"b_proj.{m}.weight"], p[f"a_proj.{m}.weight"])
            for i, t in enumerate(steps):
                slot = top_i[b, t].tolist().index(m)
                y[b, t] = y[b, t] + top_w[b, t, slot] * o[i]
        if mom.shared_memory:
            y[b] = y[b] + memory_readout(x[b], p, mom, p["shared_k.weight"], p["shared_v.weight"],
                                         p["shared_b.weight"], p["shared_a.weight"])
    z = y / torch.sqrt((y * y).mean(-1, keepdim=True) + eps) * p["o_norm.weight"]
    if mom.use_output_gate:
        z = z * F.silu((x @ p["g_proj.weight"].T).view(B, T, H, V))
    out = z.reshape(B, T, H * V) @ p["o_proj.weight"].T
    f = counts.to(x.dtype) / (B * T * k)
    P = probs.reshape(-1, M).mean(0)
    lb = mom.aux_loss_coeff * M * (f * P).sum()
    zl = mom.z_loss_coeff * torch.logsumexp(logits, -1).square().mean()
    return out, lb, zl, counts


# ------------------------------------------------------------------ a whole fla MoM model
# Written from fla's MomForCausalLM definition (MomBlock: attn_norm -> attn -> residual ->
# mlp_norm -> SwiGLU MLP -> residual; final norm; lm_head, tied to the embeddings when
# tie_word_embeddings), reading its config.json names and weight names. Float64, one token at
# a time; it shares no code with megatron_mom.

def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotate(x, position, theta):
    """RoPE on one token's heads x [h, d]: the two halves of each head rotate together."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = position * inv_freq
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def naive_attention(x, p, num_heads, num_kv_heads, theta):
    """Causal softmax attention over one sequence x [T, D] (GQA: query head h reads key/value
    head h // (num_heads / num_kv_heads))."""
    T, D = x.shape
    d = D // num_heads
    q = (x @ p["q_proj.weight"].T).view(T, num_heads, d)
    k = (x @ p["k_proj.weight"].T).view(T, num_kv_heads, d)
    v = (x @ p["v_proj.weight"].T).view(T, num_kv_heads, d)
    q = torch.stack([rotate(q[t], t, theta) for t in range(T)])
    k = torch.stack([rotate(k[t], t, theta) for t in range(T)])
    group = num_heads // num_kv_heads
    out = x.new_zeros(T, num_heads, d)
    for t in range(T):
        for h in range(num_heads):
            kv = h // group
            scores = torch.stack([q[t, h] @ k[s, kv] for s in range(t + 1)]) / math.sqrt(d)
            weights = torch.softmax(scores, dim=0)
            out[t, h] = sum(weights[s] * v[s, kv] for s in range(t + 1))
    return out.reshape(T, D) @ p["o_proj.weight"].T


def _mom_settings(config):
    from types import SimpleNamespace
    return SimpleNamespace(
        num_memories=config["num_memories"], topk=config["topk"], num_heads=config["num_heads"],
        head_dim=config["head_dim"], expand_v=config["expand_v"], conv_size=config["conv_size"],
        shared_memory=config["shared_mem"], use_output_gate=config["use_output_gate"],
        norm_eps=config["norm_eps"], aux_loss_coeff=0.0, z_loss_coeff=0.0)


def naive_gpt(input_ids, weights, config):
    """Logits [B, T, vocab] of fla's MomForCausalLM for token ids [B, T]; `weights`: its state
    dict (any float dtype, computed in float64), `config`: its config.json as a dict."""
    w = {k: v.double() for k, v in weights.items()}
    eps = config["norm_eps"]
    attn = config.get("attn") or {"layers": []}
    mom = _mom_settings(config)
    h = w["model.embeddings.weight"][input_ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {k[len(p + "attn."):]: v for k, v in w.items() if k.startswith(p + "attn.")}
        x = rms_norm(h, w[p + "attn_norm.weight"], eps)
        if i in attn["layers"]:
            y = torch.stack([naive_attention(x[b], layer, attn["num_heads"],
                                             attn.get("num_kv_heads") or attn["num_heads"],
                                             attn.get("rope_theta", 10000.0))
                             for b in range(x.shape[0])])
        else:
            y = naive_mom(x, layer, mom, eps=eps)[0]
        h = h + y
        x = rms_norm(h, w[p + "mlp_norm.weight"], eps)
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embeddings.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return h @ head.T
