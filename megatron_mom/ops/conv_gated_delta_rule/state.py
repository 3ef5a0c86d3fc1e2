"""What the modes of `conv_gated_delta_rule` share: the column layout of the packed k | v | b | a
rows, beta and the decay from b and a, `MemoryState` (where a segment's memory continues from
and what it ends with) and the short convolution that continues from its history."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mom.ops.common import compute_dtype
from megatron_mom.ops.short_conv import short_conv


def kvba_columns(H: int, K: int, V: int) -> List[int]:
    """Column sizes of the packed k | v | b | a rows (the memories' projection output)."""
    return [H * K, H * V, H, H]


def beta_and_decay(b: Tensor, a: Tensor, A_log: Tensor, dt_bias: Tensor) -> Tuple[Tensor, Tensor]:
    """beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias), in float32 (float64 for
    float64 inputs). b, a: [..., H]; A_log, dt_bias: [H]."""
    ct = compute_dtype(b.dtype)
    return torch.sigmoid(b.to(ct)), -A_log.to(ct).exp() * F.softplus(a.to(ct) + dt_bias.to(ct))


def conv_continuing(x: Tensor, weight: Tensor, history: Tensor, *, backend: str,
                    cu_seqlens: Optional[Tensor] = None, gather: Optional[Tensor] = None) -> Tensor:
    """SiLU short convolution of segments that continue from `history` [N, C, W-1], which then
    receives each segment's last W-1 inputs. With cu_seqlens, x [T, C] holds the N segments
    packed (rows through `gather` when given); without, x [N, C] is one step of each."""
    y, final = short_conv(x[None] if cu_seqlens is not None else x[:, None], weight,
                          cu_seqlens=cu_seqlens, gather=gather, activation="silu",
                          initial_state=history, output_final_state=True, backend=backend)
    history.copy_(final)
    return y


@dataclass
class MemoryState:
    """The memory of N segments between calls: the recurrent state and the last W-1 inputs of
    each short convolution (oldest first; zeros before a segment's first token).

    recurrent [N, H, K, V] in float32 (float64 for float64 models); conv_q, conv_k [N, H*K, W-1]
    and conv_v [N, H*V, W-1] in the inputs' dtype. `conv_gated_delta_rule` reads them as the
    segments' initial state and writes the final state into the same tensors."""

    recurrent: Tensor
    conv_q: Tensor
    conv_k: Tensor
    conv_v: Tensor

    @classmethod
    def zeros(cls, segments: int, H: int, K: int, V: int, W: int, dtype: torch.dtype,
              device=None) -> "MemoryState":
        """Fresh memories (nothing seen yet); `dtype` is the inputs' (the models') dtype."""
        z = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)
        return cls(recurrent=z(segments, H, K, V, dt=compute_dtype(dtype)),
                   conv_q=z(segments, H * K, W - 1), conv_k=z(segments, H * K, W - 1),
                   conv_v=z(segments, H * V, W - 1))

    def tensors(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(recurrent, conv_q, conv_k, conv_v)."""
        return self.recurrent, self.conv_q, self.conv_k, self.conv_v

    def map(self, fn) -> "MemoryState":
        """A MemoryState of fn(t) for each of the four tensors (e.g. a row selection)."""
        return MemoryState(*(fn(t) for t in self.tensors()))

    def copy_(self, other: "MemoryState") -> None:
        """Write `other`'s values into these tensors (in place: CUDA-graph safe)."""
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)


__all__ = ["MemoryState", "kvba_columns", "beta_and_decay", "conv_continuing"]
