"""The whole layer through the Triton kernels (Triton's interpreter on CPU, float32) against the
same layer on the torch reference kernels: outputs, input and parameter gradients, dense
batches and packed documents, with the dense and the grouped projection, and the lean
backward."""
import pytest
import torch

from megatron_mom import MoMConfig
from test_mixer import HIDDEN, build_layer


@pytest.mark.parametrize("grouped, lean", [("off", False), ("on", False), ("on", True)])
@pytest.mark.parametrize("packed", [False, True])
def test_triton_layer_matches_torch_layer(megatron_single, packed, grouped, lean):
    from megatron.core.packed_seq_params import PackedSeqParams
    mom = MoMConfig(num_memories=3, topk=2, num_heads=2, head_dim=16, chunk_size=16,
                    backend="torch", grouped_projection=grouped)
    torch.manual_seed(0)
    ref = build_layer(mom, dtype=torch.float32)
    fast = build_layer(mom.replace(backend="triton", lean_backward=lean), dtype=torch.float32)
    fast.load_state_dict(ref.state_dict())
    T, B = (37, 1) if packed else (21, 2)
    cu = torch.tensor([0, 5, 6, 37], dtype=torch.int32) if packed else None
    params = None if cu is None else PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                    cu_seqlens_kv=cu)
    x = torch.randn(T, B, HIDDEN)
    dy = torch.randn(T, B, HIDDEN)
    assert fast._grouped_projection_applies(x) == (grouped == "on")
    results = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi, packed_seq_params=params)
        out.backward(dy)
        results.append((out, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (o_ref, dx_ref, g_ref), (o, dx, g) = results
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)
