"""AOTInductor: torch.export -> a compiled .pt2 package (C++ on CPU here, CUDA on a GPU host)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CrateEdgeError
from ..export import export
from .base import Backend, Compiled

PACKAGE = "model.pt2"


class AOTIBackend(Backend):
    name = "aoti"
    packages = ("torch",)
    extra = "test"

    def dists(self):
        return ["torch"]

    def available(self):
        import shutil

        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return False, "no C++ compiler on PATH (AOTInductor compiles C++)"
        return True, ""

    def can_compile(self, target):
        ok, why = self.available()
        if ok and target.device == "cuda" and not torch.cuda.is_available():
            return False, "AOTInductor compiles a CUDA package on a CUDA host, and there is no CUDA GPU here"
        return ok, why

    def can_run(self, manifest: dict | None = None):
        ok, why = super().can_run()
        if ok and (manifest or {}).get("backend", {}).get("device") == "cuda" and not torch.cuda.is_available():
            return False, "this artifact was compiled for CUDA and there is no CUDA GPU here"
        return ok, why

    def compile(self, module, ep, example, target, out: Path, quant=None) -> Compiled:
        if quant is not None:
            raise CrateEdgeError(f"backend {self.name} has no reduced-precision path yet")
        device = target.device  # compile() has checked can_compile: a cuda target means a GPU here
        if device == "cuda":
            module = module.cuda()

            ep = export(module, example.cuda(), target.dynamic_batch)
        torch._inductor.aoti_compile_and_package(ep, package_path=str(out / PACKAGE))
        return Compiled(
            files=[PACKAGE],
            precision={"*": "fp32"},
            info={"device": device},
            verified={"execution": f"AOTInductor ({device}) on this machine"},
        )

    def load(self, art_dir: Path, manifest: dict, threads: int | None = None):
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
