"""Apache TVM (Relax): torch.export -> Relax (from_exported_program, dynamic batch kept) -> one
shared library run by the Relax VM, for a CPU (llvm) or a CUDA target.

TVM's default CPU pipeline schedules nothing (measured ~30x slower than eager), and
this wheel's dlight CPU rules have no matmul. So the CPU build schedules every kernel itself:

  * every matmul (linear layers and both attention matmuls) as a register-tiled GEMM: a 6x16
    micro-kernel (12 AVX2 accumulators), B packed into 16-column panels, epilogues (bias, ReLU,
    residual) fused into the tile write-back, tiles in parallel; constant weights are packed
    once at compile time (SplitLayoutRewritePreproc + FoldConstant), not on every call;
  * softmax and LayerNorm row by row (dlight's CPU Reduction, minus the predicated vector splits
    TVM would scalarise), with softmax's exp as a polynomial LLVM can vectorise (topi.fast_exp);
  * the llvm target gets fast-math-reassoc/nsz unless it says otherwise, so LLVM vectorises the
    row reductions (sums in a different order; no NaN/Inf assumptions).

Reduced precision (target tvm-int8, [quantize] scheme = "int8", llvm with AVX2): the quantization
policy's site GEMMs become hand-written int8 x int8 -> int32 kernels (AVX-512 VNNI vpdpbusd, or
AVX2 vpmaddwd), see quant.py;
the rest of the program is the fp32 build above.

MetaSchedule tuning is optional on top (options tune_trials, tuning_db); its records only replace
a kernel's default schedule where they measured faster.

Options (target.options):
  target       TVM target as a table, e.g. {kind = "llvm"} or {kind = "cuda", arch = "sm_90"}; the CPU
               level is the target file's isa key (native, x86-64-v3, x86-64-v4); TVM 0.27
               rejects the old string form
  tune_trials  MetaSchedule trials on this machine (0: none; needs input.dynamic_batch = false)
  tuning_db    a MetaSchedule database directory to reuse (its records are copied into the
               artifact's tuning_db/, where new records are also written)
  threads      runtime threads (default: TVM_NUM_THREADS or OMP_NUM_THREADS if set, else every CPU
               this process may use; TVM alone would take half the hardware threads)

Modules: target (the TVM target from a target table), schedule (legalisation and the CPU schedule
rules), quant (the int8 reduced-precision rewrite and its kernels), metaschedule (tuning and the
tuning database), lower (Relax import, passes, build), backend (TVMBackend).
"""

from __future__ import annotations

from .backend import CPU_TWIN, LIBRARY, TUNING_DB, TVMBackend, vm_runner
from .lower import build, fused
from .metaschedule import tune, winners
from .quant import (
    HANDWRITTEN,
    KERNELS,
    QMR,
    QRB,
    QUANT_SCHEMES,
    _qgemm_int8,
    _qgemm_vnni,
    kernel_for,
    pack_int8_weight,
    pack_int8_weight_vnni,
    quantize_module,
)
from .schedule import MR, NR, ROW_BLOCK, cpu_rules, legalize_map
from .target import has_amx, make_target

__all__ = [
    "CPU_TWIN",
    "HANDWRITTEN",
    "KERNELS",
    "LIBRARY",
    "MR",
    "NR",
    "QMR",
    "QRB",
    "QUANT_SCHEMES",
    "ROW_BLOCK",
    "TUNING_DB",
    "TVMBackend",
    "_qgemm_int8",
    "_qgemm_vnni",
    "kernel_for",
    "has_amx",
    "build",
    "cpu_rules",
    "fused",
    "legalize_map",
    "make_target",
    "pack_int8_weight",
    "pack_int8_weight_vnni",
    "quantize_module",
    "tune",
    "vm_runner",
    "winners",
]
