"""Which CPU an artifact's compiled code needs, and whether this host has it.

Two backends bake a vector ISA into machine code at compile time: TVM (its llvm library) and
AOTInductor (its .so). A target's `isa` key says which level they may assume:

  native      the build host's CPU (the default: fastest here, and only here)
  x86-64-v3   AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE (Haswell, Zen 1 and later)
  x86-64-v4   x86-64-v3 plus AVX-512 F/BW/CD/DQ/VL (Skylake-SP, Zen 4 and later)
  aarch64     64-bit Arm with NEON (Armv8-A): a TVM cross build (aarch64-linux-gnu-gcc links it),
              whose code cannot run on an x86 build host

The other backends (ONNX Runtime, ExecuTorch/XNNPACK, Core ML, TensorRT) pick kernels at run
time and need only the architecture. Every manifest records `requires`: {"arch", "isa" (level),
"features" (the /proc/cpuinfo flags the code may use), "built_on" (the build host's CPU)};
`check` refuses, in one line naming the missing features, to load an artifact on a host without
them, before any compiled code is touched.

CRATE_EDGE_CPU_FLAGS="avx2 fma ..." makes this module see only those flags (a host to check
artifacts for, and the tests' fake host); it changes nothing else, but for whether a TVM `native`
build adds AMX (backends/tvm/target.py).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .errors import CrateEdgeError

LEVELS: dict[str, tuple[str, ...]] = {
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),  # abm: /proc/cpuinfo's LZCNT
}
LEVELS["x86-64-v4"] = LEVELS["x86-64-v3"] + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
LEVELS["aarch64"] = ("asimd",)  # /proc/cpuinfo's NEON
LEVEL_ARCH = {"x86-64-v3": "x86_64", "x86-64-v4": "x86_64", "aarch64": "aarch64"}
ISA_LEVELS = ("native", *LEVELS)
# what compiled code for "native" may use: the SIMD and bit-manipulation families (x86, Arm)
_NATIVE_PREFIXES = {
    "x86_64": ("avx", "amx", "fma", "f16c", "bmi", "abm", "movbe", "sse", "ssse3", "gfni", "vaes", "vpclmulqdq"),
    "aarch64": ("asimd", "sve", "sme", "i8mm", "bf16", "fphp", "dotprod"),
}
ENV = "CRATE_EDGE_CPU_FLAGS"


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo spells them (or CRATE_EDGE_CPU_FLAGS)."""
    fake = os.environ.get(ENV)
    if fake is not None:
        return set(fake.replace(",", " ").split())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() in ("flags", "Features"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_features(flags: set[str] | None = None) -> list[str]:
    """The features code compiled for this CPU (mcpu/march native) may use."""
    prefixes = _NATIVE_PREFIXES.get(host_arch(), ())
    return sorted(f for f in (host_flags() if flags is None else flags) if f.startswith(prefixes))


def level_of_host() -> str:
    """The highest named level this host meets ("native" only when it meets none)."""
    have = host_flags()
    return next((lvl for lvl in reversed(LEVELS) if LEVEL_ARCH[lvl] == host_arch() and set(LEVELS[lvl]) <= have), "native")


def requirement(level: str | None, extra: list[str] | tuple[str, ...] = ()) -> dict:
    """The manifest's `requires` for code built here at `level` (None: run-time dispatch, the
    architecture only); `extra`: features the build added beyond the level (e.g. AOTInductor's
    -mavx512vnni)."""
    from .host import host_info

    feats: list[str] = []
    if level == "native":
        feats = native_features()
    elif level in LEVELS:
        feats = list(LEVELS[level])
    elif level is not None:
        raise CrateEdgeError(f"unknown isa {level!r}; known: {', '.join(ISA_LEVELS)}")
    return {
        "arch": LEVEL_ARCH.get(level or "", host_arch()),
        "isa": level or "any",
        "features": sorted(set(feats) | set(extra)),
        "built_on": host_info().get("cpu"),
    }


def missing(req: dict) -> list[str]:
    """The features of `req` this host lacks (["arch x86_64"] for another architecture)."""
    if not req:
        return []
    if req.get("arch") and req["arch"] != host_arch():
        return [f"arch {req['arch']}"]
    return sorted(set(req.get("features") or ()) - host_flags())


def check(manifest: dict, where) -> None:
    """Refuse an artifact whose compiled code needs CPU features this host lacks."""
    req = manifest.get("requires") or {}
    gone = missing(req)
    if not gone:
        return
    if gone[0].startswith("arch "):
        raise CrateEdgeError(f"{where} was compiled for {req['arch']}, this host is {host_arch()}: rebuild it here")
    hint = f'rebuild it here, or build it with isa = "{level_of_host()}"' if level_of_host() != "native" else "rebuild it here"
    raise CrateEdgeError(
        f"{where} needs CPU features this host lacks: {', '.join(gone)} (built for isa {req.get('isa')} on {req.get('built_on')}); {hint}"
    )


def fits_host(manifest: dict) -> bool:
    """A cached artifact may be reused here: its code runs on this CPU, and code built for the
    build host's own CPU ("native") was built on one with this host's features."""
    req = manifest.get("requires")
    if not req or missing(req):
        return False
    return req.get("isa") != "native" or sorted(req.get("features") or ()) == native_features()


AMX = ("amx_tile", "amx_int8")  # /proc/cpuinfo's AMX tiles and their int8 dot product
_amx_granted = False


def host_has_amx() -> bool:
    """This host (its flags, or CRATE_EDGE_CPU_FLAGS) has AMX int8 tiles."""
    return host_arch() == "x86_64" and set(AMX) <= host_flags()


def request_amx() -> None:
    """Ask Linux for this process's AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA): without it the first AMX instruction kills the process with SIGILL.
    Once per process, for every thread; a no-op on a host without AMX. Code that may run AMX
    tiles (TVM's AMX int8 GEMMs) calls this before its library is loaded."""
    global _amx_granted
    if _amx_granted or not host_has_amx() or platform.system() != "Linux":
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    if libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) != 0:
        err = ctypes.get_errno()
        raise CrateEdgeError(
            f"this CPU has AMX but Linux refused this process its tile state (arch_prctl: {os.strerror(err)}); "
            'build the artifact with isa = "x86-64-v4" (no AMX) or run it on a kernel with AMX support (5.16 or later)'
        )
    _amx_granted = True
