"""The TVM target of a target table, and the backend's progress lines."""

from __future__ import annotations

import sys

from ...errors import CrateEdgeError
from ...isa import host_has_amx


def _say(msg: str) -> None:
    print(f"[tvm] {msg}", file=sys.stderr, flush=True)


# isa levels of another architecture: the llvm target, and the cross compiler that links the library
CROSS = {
    "aarch64": {
        "target": {"mtriple": "aarch64-linux-gnu", "mcpu": "generic", "mattr": ["+neon"]},
        "cc": "aarch64-linux-gnu-gcc",
        "package": "gcc-aarch64-linux-gnu",  # Debian's
    }
}


def cross_compiler(isa: str):
    """export_library's fcompile for a cross build (None for this host's architecture);
    BackendUnavailable when the cross compiler is not installed."""
    import shutil

    from ...errors import BackendUnavailable

    c = CROSS.get(isa)
    if c is None:
        return None
    if shutil.which(c["cc"]) is None:
        raise BackendUnavailable(
            f"backend tvm unavailable for isa {isa}: it links with {c['cc']}, which is not on PATH (Debian: apt install {c['package']})"
        )
    from tvm.support import cc

    return cc.cross_compiler(c["cc"])


def make_target(spec, isa: str = "native"):
    """tvm.target.Target from the target table. An llvm target's CPU is the target file's `isa`
    (crate_edge.isa): "native" becomes this CPU's name, "x86-64-v3"/"x86-64-v4" are LLVM's CPU
    levels, "aarch64" an Armv8-A NEON cross target (CROSS); options.target.mcpu may say "native"
    (the old spelling) but no other CPU."""
    import tvm
    from tvm.target import codegen

    if not isinstance(spec, dict) or "kind" not in spec:
        raise CrateEdgeError(
            f'tvm: options.target must be a table such as {{kind = "llvm", mcpu = "native"}}, got {spec!r} '
            "(TVM 0.27 rejects target strings)"
        )
    spec = dict(spec)
    host = spec.pop("host", None)
    if spec["kind"] == "llvm":
        if spec.get("mcpu", "native") != "native":
            raise CrateEdgeError(
                f"tvm: set the CPU with the target's isa key (native, x86-64-v3, x86-64-v4), not options.target.mcpu = {spec['mcpu']!r}"
            )
        if isa in CROSS:
            spec.update(CROSS[isa]["target"])
        else:
            spec["mcpu"] = codegen.llvm_get_system_cpu() if isa == "native" else isa
        if isa == "native" and host_has_amx():
            # LLVM names the CPU from its model number, which a virtual machine may report as an
            # older one (model 167, "rocketlake", on an AMX Xeon here): the tiles come from the flags
            spec["mattr"] = sorted(set(spec.get("mattr", [])) | {"+amx-tile", "+amx-int8"})
        # lets LLVM vectorise the LayerNorm/softmax row sums; the GEMMs are vectorised by hand
        spec.setdefault("fast-math-reassoc", True)
        spec.setdefault("fast-math-nsz", True)
    elif host is None:
        host = {"kind": "llvm"}
    try:
        return tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)
    except Exception as e:  # TVM's message names the bad key
        raise CrateEdgeError(f"tvm: invalid target {spec}: {str(e).splitlines()[0]}") from None


KERNELS = {  # the int8 kernels by what the target CPU has (its isa level), best first (quant.py, attention.py)
    "amx": "AMX tdpbusd on 16 x 64-byte tiles (16,384 u8 x s8 products per instruction), AVX-512 VNNI for the rest",
    "avx512vnni": "AVX-512 VNNI vpdpbusd (u8 x s8 -> s32, 64 products per instruction)",
    "avx2": "AVX2 vpmaddwd (int16 pairs -> s32, 16 products per instruction)",
}


def kernel_for(target) -> str:
    """The int8 GEMM kernel the target CPU can run: VNNI where it has AVX-512 VNNI, else AVX2."""
    from tvm.target import codegen

    if all(codegen.target_has_features(f, target) for f in ("avx512f", "avx512bw", "avx512vnni")):
        return "avx512vnni"
    return "avx2"


def has_amx(target) -> bool:
    """The target CPU has AMX int8 tiles (a native build on such a host: make_target)."""
    from tvm.target import codegen

    return all(codegen.target_has_features(f, target) for f in ("amx-tile", "amx-int8"))


VNNI = "llvm.x86.avx512.vpdpbusd.512"  # the LLVM intrinsic of vpdpbusd on zmm


def amx(name: str, *args):
    """An AMX instruction in TIR: the LLVM intrinsic llvm.x86.<name> (tile numbers are immediates:
    constants, or the variable of an unrolled loop). The tiles' shapes come from the configuration
    loaded before (amx_tile_config, then amx("ldtilecfg", ..))."""
    from tvm.script import tirx as T

    return T.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def amx_tile_config():
    """A T.macro filling a 64-byte AMX tile configuration: palette 1, every tile 16 rows x 64 bytes
    (colsb of tile t at byte 16 + 2t, rows at 48 + t; a kernel overrides single tiles after it)."""
    from tvm.script import tirx as T

    @T.macro
    def fill(cfg):
        for i in range(64):
            cfg[i] = T.uint8(0)
        cfg[0] = T.uint8(1)
        for k in range(8):
            cfg[16 + 2 * k] = T.uint8(64)
            cfg[48 + k] = T.uint8(16)

    return fill
