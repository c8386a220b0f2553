"""AOTInductor: torch.export -> a compiled .pt2 package (C++ on CPU here, CUDA on a GPU host)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CrateEdgeError
from ..export import export
from .base import Availability, Backend, Capabilities, Compiled, device_of, precision_map

PACKAGE = "model.pt2"


class AOTIBackend(Backend):
    name = "aoti"
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        precisions=("fp32",),
        compile_needs=("torch",),
        run_needs=("torch",),
        distributions=("torch",),
        extra="test",
    )

    def available(self, target=None, run: bool = False, manifest: dict | None = None) -> Availability:
        """AOTInductor compiles C++ (a compiler on PATH); a CUDA package is compiled and run on a
        CUDA host."""
        import shutil

        if not run and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return Availability(False, "no C++ compiler on PATH (AOTInductor compiles C++)")
        device = device_of(target, manifest)
        if device == "cuda" and not torch.cuda.is_available():
            what = "runs" if run else "compiles"
            return Availability(False, f"AOTInductor {what} a CUDA package on a CUDA host, and there is no CUDA GPU here")
        return super().available(target, run, manifest)

    def compile(self, exported, target, out: Path, quant=None) -> Compiled:
        module, ep, example = exported.module, exported.program, exported.example
        if quant is not None:
            raise CrateEdgeError(f"backend {self.name} has no reduced-precision path yet")
        device = target.device  # compile() has asked available(target): a cuda target means a GPU here
        if device == "cuda":
            module = module.cuda()

            ep = export(module, example.cuda(), target.dynamic_batch)
        torch._inductor.aoti_compile_and_package(ep, package_path=str(out / PACKAGE))
        return Compiled(
            files=[PACKAGE],
            precision=precision_map("fp32"),
            info={"device": device},
            verified={"execution": f"AOTInductor ({device}) on this machine"},
        )

    def runner(self, art_dir: Path, manifest: dict, threads: int | None = None):
        device = manifest["backend"].get("device", "cpu")
        if threads:  # the package's CPU kernels run on torch's intra-op pool
            torch.set_num_threads(int(threads))
        runner = torch._inductor.aoti_load_package(str(art_dir / PACKAGE))

        def call(x: torch.Tensor):
            with torch.no_grad():
                out = runner(x)
            return out if isinstance(out, (list, tuple)) else [out]

        def run(x: np.ndarray):
            return [o.cpu().numpy() for o in call(torch.from_numpy(x).to(device))]

        if device == "cuda":
            run.device_call = (device, call)  # for `bench`: time the GPU on GPU-resident inputs
        return run
