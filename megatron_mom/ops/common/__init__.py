"""What the ops share, in one public place (no Megatron imports, nothing from an op package):

    checks    checker() and the dtype, device and cu_seqlens checks behind every op's errors;
              FLOAT_DTYPES, TRITON_DTYPES; compute_dtype() (float64 for float64, else float32)
    dispatch  the one backend dispatch: resolve_backend(), triton_impl(), triton_module();
              interpreting() (TRITON_INTERPRET=1)
    segments  packed sequences: cu_seqlens helpers and `Segments`, the chunk bookkeeping of
              the chunked kernels' launches
    streams   beside(): independent launches on a side CUDA stream
    launch    launch(): a pipelined Triton build with its one-stage fallback (imports Triton)
    search    Triton device functions: the binary search over sequence offsets (imports Triton)

This package's own namespace holds the torch-only pieces, so the torch references import it
without Triton.
"""
from megatron_mom.ops.common.checks import (FLOAT_DTYPES, TRITON_DTYPES, checker, compute_dtype,
                                            need_cu_seqlens, need_device, need_triton_dtypes)
from megatron_mom.ops.common.dispatch import (BACKENDS, interpreting, resolve_backend,
                                              triton_impl, triton_module)
from megatron_mom.ops.common.segments import (Segments, as_int32, chunk_offsets,
                                              dense_cu_seqlens, max_chunks, search_steps)
from megatron_mom.ops.common.streams import beside

__all__ = ["FLOAT_DTYPES", "TRITON_DTYPES", "checker", "compute_dtype", "need_cu_seqlens",
           "need_device", "need_triton_dtypes", "BACKENDS", "interpreting", "resolve_backend",
           "triton_impl", "triton_module", "Segments", "as_int32", "chunk_offsets",
           "dense_cu_seqlens", "max_chunks", "search_steps", "beside"]
