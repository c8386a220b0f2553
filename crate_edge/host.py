"""What this machine is: CPU model, cores, ISA flags, GPU, platform, Python and library versions.

A leaf that imports no torch (crate_edge.bench records it in a torch-free process): torch's
version, thread count and CUDA device name are added only where torch is already imported, or
when asked for with torch_info=True."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

LIBRARIES = ["torch", "numpy", "onnxruntime", "onnx", "executorch", "torchao", "apache-tvm", "coremltools", "tensorrt"]
# the ISA extensions that decide which kernels a runtime picks (x86 and Arm names as /proc/cpuinfo spells them)
_ISA_PREFIXES = ("avx", "amx", "fma", "sse4", "neon", "asimd", "sve", "sme", "i8mm", "bf16", "fphp", "dotprod", "asimddp")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_and_isa() -> tuple[str, list[str]]:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        txt = Path("/proc/cpuinfo").read_text()
        for line in txt.splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "Model", "Hardware") and ":" in line:
                cpu = line.split(":", 1)[1].strip()
                if key == "model name":
                    break
        fl = next((l.split(":", 1)[1].split() for l in txt.splitlines() if l.split(":", 1)[0].strip() in ("flags", "Features")), [])
        flags = sorted(f for f in fl if f.startswith(_ISA_PREFIXES) or f in ("f16c",))
    except OSError:
        if platform.system() == "Darwin":
            try:
                cpu = (
                    subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5).stdout.strip()
                    or cpu
                )
            except (OSError, subprocess.SubprocessError):
                pass
    return cpu, flags


def _gpu() -> str | None:
    """The first NVIDIA GPU as nvidia-smi names it (name, memory, driver), or a Jetson's release."""
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if Path("/etc/nv_tegra_release").exists():
        return "NVIDIA Jetson (" + Path("/etc/nv_tegra_release").read_text().split(",")[0].strip("# ") + ")"
    return None


def _libraries() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for d in LIBRARIES:
        try:
            libs[d] = version(d)
        except PackageNotFoundError:
            pass
    return libs


def host_info(torch_info: bool | None = None) -> dict[str, Any]:
    """platform, machine, cpu, cores, cores_usable, isa, gpu, python and libraries (installed
    versions, read without importing them). torch_info: also "torch" (version) and "threads"
    (torch's intra-op threads), and the CUDA device torch sees as "gpu" where nvidia-smi named
    none; None (the default) adds them only if torch is already imported, True imports it,
    False never adds them."""
    cpu, flags = _cpu_and_isa()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable_cores(),
        "isa": flags,
        "gpu": _gpu(),
        "python": platform.python_version(),
        "libraries": _libraries(),
    }
    if torch_info is None:
        torch_info = sys.modules.get("torch") is not None
    if torch_info:
        import torch

        if info["gpu"] is None and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        info.update(torch=torch.__version__, threads=torch.get_num_threads())
    return info
