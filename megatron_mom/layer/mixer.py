"""MixtureOfMemories: the MoM sequence mixer in the `self_attention` slot of a TransformerLayer.

The forward's steps for x [s, b, D] (equations in docs/method.md):
    route    router(x) -> logits -> top-k memories and weights (+ load-balancing / z loss)
    layout   pack each token into its k (+1 shared) memory segments, memory-major (packing.py)
    project  in_proj(x) -> q | gate of every token, k | v | b | a of every packed row
             (column-parallel; dense: every memory for every token, then the packed rows
             selected; grouped: only the packed rows, one grouped GEMM by memory)
    memories short conv + SiLU per segment (q read through the layout's row index) ->
             l2norm(q, k) -> gated delta rule per segment (ops.conv_gated_delta_rule)
    mix      y = sum_j w_j o_j (+ o_shared), back in token order
    output   gated RMSNorm -> out_proj                                           (row-parallel)
Under context parallelism the steps run on the whole sequence for 1/cp of the heads
(`parallel.ContextParallel`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.utils.checkpoint
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_mom.layer import inference, metrics, packing, parallel
from megatron_mom.config import MoMConfig
from megatron_mom.ops import conv_gated_delta_rule, gated_rmsnorm
from megatron_mom.ops.common import resolve_backend
from megatron_mom.layer.projection import GroupedProjection, GroupedRows, in_proj_sections
from megatron_mom.layer.router import MoMRouter, Routing, attach_loss, route, router_losses


@dataclass
class MoMSubmodules:
    """Projections of a MoM mixer: column-parallel in, row-parallel out. An in_proj with the
    grouped form (`projection.GroupedProjection`, as the specs build it) lets the layer project
    only the routed rows in training (MoMExecution.grouped_projection); any other
    column-parallel linear runs the dense projection."""

    in_proj: Union[ModuleSpec, type] = IdentityOp
    out_proj: Union[ModuleSpec, type] = IdentityOp


def check_kernel_sizes(mom: MoMConfig, device: torch.device) -> None:
    """With backend "auto" a layer on a CUDA device runs the Triton kernels: refuse sizes they
    cannot run when it is built, not at its first forward."""
    if mom.backend == "auto" and device.type == "cuda" and \
            resolve_backend("gated_delta_rule", "auto", suits=True) == "triton":
        mom.check_triton_sizes("backend='auto' on a CUDA device")


class MixtureOfMemories(MegatronModule):
    """Mixture-of-Memories sequence mixer. Input and output [s, b, D]; returns (out, bias)."""

    def __init__(
        self,
        config,
        submodules: MoMSubmodules,
        layer_number: Optional[int] = None,
        mom: Optional[MoMConfig] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        **kwargs,  # cp_comm_type, pp_layer_offset, name, ...: keywords other versions pass
    ):
        super().__init__(config)
        self.mom = mom = mom if mom is not None else MoMConfig()
        if not isinstance(mom, MoMConfig):
            raise TypeError(f"MixtureOfMemories: mom must be a MoMConfig, got {type(mom).__name__}")
        self.layer_number = layer_number
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(
                required_pgs=["tp", "cp", "tp_cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.tp_size = self.tp_group.size()
        self.tp_rank = self.tp_group.rank()
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp_size = self.cp_group.size() if self.cp_group is not None else 1
        self.cp_rank = self.cp_group.rank() if self.cp_group is not None else 0
        mom.check_parallel(self.tp_size, self.cp_size)
        if config.params_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"MixtureOfMemories: unsupported params_dtype {config.params_dtype}")

        # Parameters hold this TP rank's heads; under context parallelism each CP rank runs the
        # recurrence for a 1/cp share of those heads over the whole sequence.
        H = mom.num_heads // self.tp_size
        self.num_heads = H // self.cp_size                       # heads this rank computes
        K, V = mom.key_dim, mom.value_dim
        self.sections = in_proj_sections(mom, self.tp_size)     # rows of this rank's weight
        in_dim = sum(rows for _, rows in self.sections) * self.tp_size
        self.cp = parallel.ContextParallel(self.cp_group, self.sections)

        self.router = MoMRouter(config, mom)
        self.in_proj = build_module(
            submodules.in_proj, config.hidden_size, in_dim, config=config,
            init_method=config.init_method, gather_output=False, bias=False,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1", tp_group=self.tp_group)
        self.out_proj = build_module(
            submodules.out_proj, mom.num_heads * V, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2", tp_group=self.tp_group)

        W = mom.conv_size
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        check_kernel_sizes(mom, torch.device(device))
        new = lambda *shape: torch.nn.Parameter(torch.empty(*shape, dtype=config.params_dtype,
                                                            device=device))
        self.conv_q, self.conv_k, self.conv_v = new(H * K, W), new(H * K, W), new(H * V, W)
        self.A_log, self.dt_bias = new(H), new(H)
        for p in (self.conv_q, self.conv_k, self.conv_v, self.A_log, self.dt_bias):
            parallel.mark_tp_sharded(p)
        self.out_norm_weight = new(V)  # gamma, shared by all heads (replicated)
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    @torch.no_grad()
    def reset_parameters(self):
        """Initialise the MoM-owned parameters from the full (all-rank) tensors, so that the same
        seed gives the same model at every tensor-parallel size."""
        if not self.config.perform_initialization:
            return
        mom, tp, r = self.mom, self.tp_size, self.tp_rank
        H, K, V, W = mom.num_heads, mom.key_dim, mom.value_dim, mom.conv_size
        gen_device = "cpu"
        bound = 1.0 / math.sqrt(W)  # torch Conv1d's default for a depthwise kernel
        for p, channels in ((self.conv_q, H * K), (self.conv_k, H * K), (self.conv_v, H * V)):
            full = torch.empty(channels, W, device=gen_device).uniform_(-bound, bound)
            p.copy_(parallel.local_slice(full, r, tp))
        A = torch.empty(H, device=gen_device).uniform_(1, 16)
        self.A_log.copy_(parallel.local_slice(torch.log(A), r, tp))
        # dt in [1e-3, 1e-1] log-uniform, stored through the inverse of softplus.
        dt = torch.exp(torch.rand(H, device=gen_device) * (math.log(0.1) - math.log(1e-3))
                       + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias.copy_(parallel.local_slice(dt + torch.log(-torch.expm1(-dt)), r, tp))
        self.out_norm_weight.fill_(1.0)
        if self.config.use_cpu_initialization:
            # At TP=1 too: the redraw keeps the CPU generator's stream (and so every later
            # layer's weights) the same at every tensor-parallel size.
            self._init_in_proj_by_section()

    def _init_in_proj_by_section(self):
        """Megatron splits a column-parallel weight into contiguous row blocks; ours is a
        concatenation of per-head sections, so take each section's slice of a full weight."""
        full_sections = in_proj_sections(self.mom, 1)
        full = torch.empty(sum(n for _, n in full_sections), self.config.hidden_size)
        self.config.init_method(full)
        parts, start = [], 0
        for _, rows in full_sections:
            parts.append(parallel.local_slice(full[start:start + rows], self.tp_rank, self.tp_size))
            start += rows
        self.in_proj.weight.copy_(torch.cat(parts))

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                inference_context=None, packed_seq_params=None, **kwargs):
        """hidden_states: [s, b, D] (s is the local shard under sequence or context parallelism).

        `attention_mask` is not used: the mixer is causal by construction. With an
        `inference_context` (Megatron's static batching) the layer continues each sequence from
        its cached memory states and updates them (prefill of any length, then decode)."""
        self._check_input(hidden_states)
        inference_context = inference_context or kwargs.get("inference_params")
        if inference_context is not None:
            return self._forward_inference(hidden_states, inference_context)
        routed, s, b = self._route(hidden_states)
        layout = self._layout(routed.memory, s, b, _document_bounds(packed_seq_params, b,
                                                                   self.cp_size))
        if self._recomputes_core():
            # No randomness in the core: no RNG state to save and restore (a host read per
            # layer, and one that CUDA graph capture would refuse).
            z = torch.utils.checkpoint.checkpoint(self._core, hidden_states, layout,
                                                  routed.weight, s, b, use_reentrant=False,
                                                  preserve_rng_state=False)
        else:
            z = self._core(hidden_states, layout, routed.weight, s, b)
        return self.out_proj(self.cp.heads_to_sequence(z))

    def _core(self, hidden_states: Tensor, layout: packing.PackedLayout, weight: Tensor,
              s: int, b: int) -> Tensor:
        """Projection, memory path, mix and read-out norm: z [s, b, H*V] (all heads' tokens of
        the whole sequence under context parallelism, before heads_to_sequence)."""
        q_tok, gate, kvba = self._project(hidden_states, layout)
        o = self._memories(q_tok, kvba, (layout.token, layout.slot_row),
                           layout.cu_seqlens)                             # [L, H, V]
        y = packing.mix(o, layout, weight, out_dtype=o.dtype,
                        backend=self.mom.execution.backend)               # [N, H, V]
        return self._read_out(y, gate, s, b)

    def _recomputes_core(self) -> bool:
        """Megatron's selective recompute of "core_attn" (`--recompute-activations`, or
        `--recompute-granularity selective` with core_attn among `--recompute-modules`) asks
        each layer to rerun its sequence-mixing core in the backward instead of keeping what
        that core saves. The MoM layer's core runs from its input projection to its read-out
        norm (`_core`): what it saves is dominated by the projection's outputs (q and the gate
        of every token, k | v | b | a of every packed row: 8x the hidden size a token at the
        paper's settings, where attention's q | k | v are 3x), so keeping only the layer's
        input (which the router keeps anyway) and the read-out (out_proj's input) saves the
        most for one more projection GEMM. Under FP8 or FP4 Transformer Engine's recomputed
        projections need its own checkpoint (their scaling state), so there the layer keeps
        every activation, as without recompute."""
        config = self.config
        return (self.training and torch.is_grad_enabled()
                and getattr(config, "recompute_granularity", None) == "selective"
                and "core_attn" in (getattr(config, "recompute_modules", None) or ())
                and not _low_precision(config))

    def _route(self, hidden_states: Tensor):
        """Every token of the whole sequence (gathered under SP and CP) routed: (Routing whose
        weights carry the router losses into the backward, s, b). Tokens are time-major,
        n = t * b + i, so [s, b, ...] -> [s * b, ...] is a view."""
        mom = self.mom
        logits_local = self.router(hidden_states)                          # [s_local, b, M]
        logits = parallel.full_sequence(logits_local, self.tp_group, self.config.sequence_parallel)
        logits = self.cp.gather_logits(logits)                             # [s, b, M]
        s, b, _ = logits.shape
        routed = route(logits.reshape(s * b, -1), mom)
        losses = router_losses(logits_local.reshape(-1, mom.num_memories),
                               routed.tokens_per_memory, b * s, mom)
        # Logged only where the graph is built: under activation recompute the forward runs
        # twice (first without grad), and a step must count once (as Megatron's routers do).
        if self.training and torch.is_grad_enabled():
            if losses is not None:
                metrics.record_router(self.layer_number, self.config, losses,
                                      reduce_group=self._router_reduce_group())
            self.router.count(routed.tokens_per_memory)
        weight = attach_loss(routed.weight, losses.total if losses else None)
        return Routing(routed.memory, weight, routed.tokens_per_memory), s, b

    def _layout(self, memory: Tensor, s: int, b: int,
                cu_docs: Optional[Tensor]) -> packing.PackedLayout:
        """The packed (token, memory) rows of the routed tokens: one segment per (memory,
        sequence), each batch row (or packed document) its own sequence."""
        seq_id, num_seqs = packing.sequence_ids(b, s, cu_docs, memory.device)
        return packing.pack(memory, seq_id, num_seqs, self.mom.num_memory_weights)

    def _check_input(self, hidden_states: Tensor) -> None:
        D = self.config.hidden_size
        if not (isinstance(hidden_states, Tensor) and hidden_states.dim() == 3
                and hidden_states.shape[0] > 0 and hidden_states.shape[1] > 0
                and hidden_states.shape[2] == D):
            got = (tuple(hidden_states.shape) if isinstance(hidden_states, Tensor)
                   else type(hidden_states).__name__)
            raise ValueError(f"MixtureOfMemories: hidden_states must be a non-empty "
                             f"[sequence, batch, hidden_size={D}] tensor, got {got}")

    def _project(self, hidden_states: Tensor, layout: packing.PackedLayout):
        """q [N, H*K] and output gate [N, H, V] (or None) of every token, k | v | b | a
        [L, H*(K+V+2)] of every packed row, each from its own memory's projection."""
        mom, H, V = self.mom, self.num_heads, self.mom.value_dim
        if self._grouped_projection_applies(hidden_states):              # context_parallel 1
            head_rows = H * mom.key_dim + (H * V if mom.use_output_gate else 0)
            rows = GroupedRows(layout, head_rows, mom.num_memory_weights, self.tp_group,
                               self.config.sequence_parallel)
            q_gate, kvba = self.in_proj(hidden_states, rows=rows)
            q_tok, gate, _ = self._split_projection(q_gate)
            return q_tok, gate, kvba
        proj, _ = self.in_proj(hidden_states)                              # [s_local, b, P]
        proj = self.cp.projection_to_heads(proj)                           # [s, b, P / cp]
        q_tok, gate, mem = self._split_projection(proj.reshape(-1, proj.shape[-1]))
        return q_tok, gate, packing.select(mem, layout)

    def _router_reduce_group(self):
        """The ranks whose router-loss shares add up to the loss (they routed other tokens)."""
        sp = self.config.sequence_parallel and self.tp_size > 1
        if self.cp_size > 1:
            return self.pg_collection.tp_cp if sp else self.cp_group
        return self.tp_group if sp else None

    def _split_projection(self, proj: Tensor):
        """[N, P] -> q [N, H*K], output gate [N, H, V] (or None), per-memory [N, E, H*(K+V+2)]
        (None when P holds only q | gate)."""
        mom, H, K, V = self.mom, self.num_heads, self.mom.key_dim, self.mom.value_dim
        N = proj.shape[0]
        # One split: its backward is one cat, where slices would each zero-fill a full-size
        # gradient and autograd would add those up.
        sizes = [H * K] + ([H * V] if mom.use_output_gate else [])
        rest = proj.shape[1] - sum(sizes)
        parts = proj.split(sizes + ([rest] if rest else []), dim=-1)
        gate = parts[1].view(N, H, V) if mom.use_output_gate else None
        mem = parts[-1].view(N, mom.num_memory_weights, -1) if rest else None
        return parts[0], gate, mem

    def _grouped_projection_applies(self, x: Tensor) -> bool:
        """Whether this training step projects the memories' k, v, b, a per routed row
        (in_proj's grouped form) instead of for every memory (the dense reference)."""
        mode = self.mom.execution.grouped_projection
        if (mode == "off" or self.cp_size > 1 or _low_precision(self.config)
                or not isinstance(self.in_proj, GroupedProjection)):
            return False
        w, bias = getattr(self.in_proj, "weight", None), getattr(self.in_proj, "bias", None)
        if not isinstance(w, Tensor) or w.dim() != 2 or (bias is not None and bias.numel()):
            return False
        # _grouped_mm needs 16-byte row strides: x rows and the weight read column-major (D),
        # the output's gradient (C per memory: contiguous, as autograd assembles it).
        H, K, V = self.num_heads, self.mom.key_dim, self.mom.value_dim
        if (w.shape[0] != sum(rows for _, rows in self.sections) or w.shape[1] % 8
                or H * (K + V + 2) * w.element_size() % 16
                or w.dtype != x.dtype or x.dtype == torch.float64
                or not hasattr(torch, "_grouped_mm")):
            return False
        if mode == "on":
            return True
        # Elsewhere torch runs a loop over groups that reads the offsets on the host (a sync).
        return (x.is_cuda and x.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(x.device)[0] in (9, 10))

    def _memories(self, q_tok: Tensor, kvba: Tensor, gather, cu_seqlens: Optional[Tensor],
                  mode: str = "train", state=None) -> Tensor:
        """The memory path (`ops.conv_gated_delta_rule`): every segment's read-out o [L, H, V]
        from q's token rows (read through `gather`'s row index) and each packed row's
        k | v | b | a. Prefill and step continue from `state` (a MemoryState) and update it."""
        mom, run, local = self.mom, self.mom.execution, self.cp.local_heads
        return conv_gated_delta_rule(
            q_tok, kvba, gather, cu_seqlens, local(self.conv_q), local(self.conv_k),
            local(self.conv_v), local(self.A_log), local(self.dt_bias), num_heads=self.num_heads,
            chunk_size=mom.chunk_size, lean_backward=run.lean_backward and mode == "train",
            backend=run.backend, options=run.kernels, mode=mode, state=state)

    def _read_out(self, y: Tensor, gate: Optional[Tensor], s: int, b: int) -> Tensor:
        """Gated RMSNorm of the mixed read-out [N, H, V] (time-major) -> [s, b, H*V], as a
        view."""
        gamma = parallel.tp_replicated(self.out_norm_weight, self.tp_group)
        z = gated_rmsnorm(y, gate, gamma, self.mom.norm_eps, backend=self.mom.execution.backend)
        return z.reshape(s, b, -1)

    # ------------------------------------------------------------------ decoding
    def _forward_inference(self, hidden_states: Tensor, ctx):
        if self.config.sequence_parallel or self.cp_size > 1:
            raise NotImplementedError("MixtureOfMemories: decoding needs sequence_parallel=False "
                                      "and context_parallel_size=1")
        mom = self.mom
        s, b, _ = hidden_states.shape
        cache = inference.layer_cache(ctx, self.layer_number, b, self._new_cache)
        logits = self.router(hidden_states).reshape(s * b, -1)             # time-major tokens
        routed = route(logits, mom)
        proj, _ = self.in_proj(hidden_states)
        q_tok, gate, mem = self._split_projection(proj.reshape(s * b, -1))
        if s == 1:
            y = self._decode_step(q_tok, mem, routed, cache)
        else:
            layout = self._layout(routed.memory, s, b, None)
            state = cache.segments()                         # one per (memory, sequence)
            o = self._memories(q_tok, packing.select(mem, layout),
                               (layout.token, layout.slot_row), layout.cu_seqlens,
                               mode="prefill", state=state)
            cache.write_segments(state)
            y = packing.mix(o, layout, routed.weight, out_dtype=o.dtype,
                            backend=mom.execution.backend)
        return self.out_proj(self._read_out(y, gate, s, b))

    def _new_cache(self, batch: int) -> "inference.MoMCache":
        return inference.MoMCache.empty(
            batch, self.mom.num_memory_weights, self.num_heads, self.mom.key_dim,
            self.mom.value_dim, self.mom.conv_size, self.in_proj.weight.dtype,
            self.in_proj.weight.device)

    def _decode_step(self, q_tok, mem, plan, cache) -> Tensor:
        """One token per sequence: update only its S = k (+1) memories, in place, with shapes
        that do not depend on the routing (CUDA-graph capturable)."""
        B, S = plan.memory.shape
        kvba = mem.gather(1, plan.memory[..., None].expand(B, S, mem.shape[-1])).view(B * S, -1)
        rows = torch.arange(B * S, device=kvba.device)        # (token, slot) rows, token-major
        state = cache.routed(plan.memory)
        o = self._memories(q_tok, kvba, (rows // S, rows.view(B, S)), None, mode="step",
                           state=state)
        cache.write_routed(plan.memory, state)
        o = o.view(B, S, *o.shape[1:])
        return (o.to(plan.weight.dtype) * plan.weight[..., None, None]).sum(1).to(o.dtype)

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None,
                           tp_group=None):
        """Distributed-checkpoint view: per-head parameters sharded over TP, the packed input
        projection saved per section so a checkpoint reloads at another TP size."""
        from megatron.core.transformer.utils import (
            make_sharded_tensors_for_checkpoint,
            sharded_state_dict_default,
        )

        tp_group = tp_group if tp_group is not None else self.tp_group
        metadata = dict(metadata or {})
        if "dp_cp_group" not in metadata:
            metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(
                with_context_parallel=True)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        tp_axis = {name: 0 for name in ("conv_q", "conv_k", "conv_v", "A_log", "dt_bias")}
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, tp_axis, sharded_offsets, tp_group=tp_group,
            dp_cp_group=metadata["dp_cp_group"])
        for name, module in self.named_children():
            sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets,
                                                      metadata, tp_group=tp_group))
        key = f"{prefix}in_proj.weight"
        sharded[key] = parallel.split_sharded_tensor(sharded[key], self.sections)
        return sharded


def _low_precision(config) -> bool:
    """Whether Transformer Engine runs the linears in FP8 or FP4 (its quantization recipes)."""
    return bool(getattr(config, "fp8", None) or getattr(config, "fp4", None))


def _document_bounds(packed_seq_params, b: int, cp: int) -> Optional[Tensor]:
    """cu_seqlens of packed documents (THD: each document its own sequence), or None."""
    if packed_seq_params is None:
        return None
    cu = packed_seq_params.cu_seqlens_q_padded
    cu = packed_seq_params.cu_seqlens_q if cu is None else cu
    if b != 1 or cp > 1:
        raise ValueError("MixtureOfMemories: packed sequences (THD) need batch 1 and "
                         f"context_parallel_size 1, got batch {b}, context parallel {cp}")
    return cu
