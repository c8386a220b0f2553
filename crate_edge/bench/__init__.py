"""Benchmark compiled artifacts against eager PyTorch on the same inputs and thread count.

    report = crate_edge.bench(["artifacts/onnxruntime", "artifacts/tvm"], batch=(1, 8, 32), threads=2)
    report.write("out/bench")          # bench.json, bench.md, bench.png
    print(report.table())

Contenders: every artifact given, run by its runtime alone, plus baselines on the artifacts'
source model (manifest["source_model"]): eager PyTorch running the upstream formulation (the
CRATE module as is: three ISTA GEMMs, explicit attention), eager folded ISTA + SDPA
(rewrites shift_patch_norm, fold_ista, sdpa_attention) and torch.compile of that folded model.

How it measures:
  * each contender lives in its own worker process (started one after the other), so its
    peak RSS (VmHWM, else ru_maxrss) is its own: interpreter + its runtime + its model +
    every timed call. Workers import only what their contender needs: an onnxruntime, TVM or
    Core ML artifact is loaded and run without importing torch;
  * load time (artifact/model load, runtime import reported apart) and first-inference time
    (the first call at each batch size, which includes lazy initialisation; for torch.compile
    it includes compilation);
  * timing in interleaved rounds: after a warm-up, every round gives each contender its share
    of the iterations in turn (the order rotates per round), so drift on a shared machine hits
    all contenders alike. Before each block the run waits until every worker is idle (thread
    pools spin for a while after their last job and would steal the next contender's cores),
    and records how much CPU the idle workers still used during the block (others_cpu_per_s).
    Percentiles over all timed calls; throughput = batch / p50; ratios against eager upstream's p50;
  * every contender's logits on the same input are compared with eager upstream's (max |diff|,
    top-1 agreement), so a fast wrong contender shows;
  * TVM RPC (rpc="host:port", rpc_key= for a tracker): the TVM artifacts' model.so is uploaded
    to a TVM RPC server and run by the Relax VM on the remote CPU; times come from the VM's
    time_evaluator on the remote device (network excluded); remote memory is not measured.

The package: this module runs a benchmark (bench() and its steps); contenders.py says what runs,
worker.py runs one contender per process, measure.py times a batch size across them, rpc.py is
the TVM RPC runner, report.py the result. None imports torch or the backends at import time (see
docs/on-device.md).

`crate_edge.bench` is the function bench (crate_edge/__init__ binds it over this package's name):
import the other names from here, `from crate_edge.bench import BenchReport`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CrateEdgeError
from ..host import LIBRARIES, host_info, usable_cores
from ..manifest import read_verified
from .contenders import (
    BASELINE_LABELS,
    BASELINES,
    FOLDED_REWRITES,
    _resolve_model,
    artifact_specs,
    baseline_specs,
    parse_batches,
    source_model,
)
from .measure import measure_batch
from .report import BenchReport
from .rpc import RPCRunner, parse_hostport
from .worker import _Proc, worker_env

__all__ = [
    "bench",
    "BenchReport",
    "parse_batches",
    "BASELINES",
    "BASELINE_LABELS",
    "FOLDED_REWRITES",
    "parse_hostport",
    "RPCRunner",
    "host_info",
    "LIBRARIES",
]


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Settings:
    """bench()'s arguments, checked and with their defaults filled in."""

    batches: tuple[int, ...]
    threads: int
    warmup: int
    iters: int | None
    seconds: float | None
    rounds: int
    baselines: tuple[str, ...]
    device: str
    rpc: str | None
    rpc_key: str | None
    rpc_timeout: float


def bench(
    artifacts,
    batch=(1,),
    threads: int | None = None,
    warmup: int = 3,
    iters: int | None = None,
    seconds: float | None = None,
    rounds: int = 5,
    model=None,
    baselines=BASELINES,
    rpc: str | None = None,
    rpc_key: str | None = None,
    label: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    rpc_timeout: float = 120.0,
) -> BenchReport:
    """Time `artifacts` (directories) and the baselines on the same inputs and thread count.

    batch: batch sizes (int, "1,8,32" or a sequence). threads: for every contender (default:
    the usable cores). Timing: `warmup` calls, then `iters` calls per contender (default 30) or
    about `seconds` of calls per contender, split over `rounds` interleaved rounds. model: the
    artifacts' source model (path or CRATE module; default: the embedded model, checked against
    manifest["source_model"]). baselines: any of "upstream", "folded", "compile" (() for none).
    rpc/rpc_key: run the TVM artifacts on a TVM RPC server (or a tracker's device with that key)
    instead of here (rpc_timeout: seconds to wait for the remote session and model load).
    device: where the torch baselines run ("cpu" or "cuda")."""
    say = _say if progress else (lambda s: None)
    if isinstance(artifacts, (str, os.PathLike)):
        artifacts = [artifacts]
    artifacts = [Path(a) for a in artifacts]
    if not artifacts:
        raise CrateEdgeError("no artifact to benchmark")
    s = _check_settings(batch, threads, warmup, iters, seconds, rounds, baselines, device, rpc, rpc_key, rpc_timeout)
    manifests = [read_verified(a) for a in artifacts]
    sha, shape, cfg = source_model(manifests)

    tmp = Path(tempfile.mkdtemp(prefix="crate-bench-"))
    procs: dict[str, _Proc] = {}
    try:
        specs, src_label = _resolve_contenders(artifacts, manifests, s, model, label, sha, shape, cfg, tmp)
        inputs = _write_inputs(tmp, s.batches, shape)
        contenders, skipped = _start_workers(specs, procs, s, tmp, say)
        by_name = {c["name"]: c for c in contenders}
        for b in s.batches:
            results, logits = measure_batch(procs, b, inputs[b], s.warmup, s.rounds, s.iters, s.seconds, say)
            for n, r in results.items():
                by_name[n]["results"][str(b)] = r
            _check_against_upstream(results, logits)
        _record_peak_memory(procs, by_name)
    finally:
        for p in procs.values():
            p.close()
        _remove_tmp(tmp)
    return _assemble_report(s, sha, shape, cfg, src_label, contenders, skipped)


def _check_settings(batch, threads, warmup, iters, seconds, rounds, baselines, device, rpc, rpc_key, rpc_timeout) -> _Settings:
    batches = parse_batches(batch)
    if iters is not None and seconds is not None:
        raise CrateEdgeError("give iterations or seconds, not both")
    if seconds is not None and not seconds > 0:
        raise CrateEdgeError(f"seconds must be > 0, got {seconds}")
    iters = 30 if iters is None and seconds is None else iters
    if iters is not None and iters < 1:
        raise CrateEdgeError(f"iters must be >= 1, got {iters}")
    if warmup < 0 or rounds < 1:
        raise CrateEdgeError("warmup must be >= 0 and rounds >= 1")
    rounds = min(rounds, iters) if iters else rounds
    baselines = tuple(baselines or ())
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise CrateEdgeError(f"unknown baseline(s) {', '.join(bad)}; known: {', '.join(BASELINES)}")
    if device not in ("cpu", "cuda"):
        raise CrateEdgeError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and baselines:
        import torch

        if not torch.cuda.is_available():
            raise CrateEdgeError("device cuda: torch sees no CUDA GPU here (torch " + torch.__version__ + ")")
    if rpc_key and not rpc:
        raise CrateEdgeError("--rpc-key needs --rpc TRACKER_HOST:PORT")
    if rpc:
        parse_hostport(rpc)
    threads = int(threads) if threads else usable_cores()
    if threads < 1:
        raise CrateEdgeError(f"threads must be >= 1, got {threads}")
    return _Settings(batches, threads, warmup, iters, seconds, rounds, baselines, device, rpc, rpc_key, rpc_timeout)


def _resolve_contenders(artifacts, manifests, s: _Settings, model, label, sha, shape, cfg, tmp: Path):
    """The contenders' (name, worker spec, info), baselines first, and the source model's label."""
    src_label = label or f"CRATE dim={cfg['dim']} depth={cfg['depth']} at {shape[1]}x{shape[2]}"
    specs = []
    if s.baselines:
        mpath, mlabel = _resolve_model(model, sha, tmp)
        src_label = label or f"{mlabel} ({src_label})"
        specs = baseline_specs(s.baselines, mpath, s.device)
    return specs + artifact_specs(artifacts, manifests, s.rpc, s.rpc_key), src_label


def _write_inputs(tmp: Path, batches: tuple[int, ...], shape: tuple) -> dict[int, Path]:
    """One standard-normal float32 input per batch size (seed 0), saved for the workers to load."""
    rng = np.random.default_rng(0)
    inputs = {}
    for b in batches:
        inputs[b] = tmp / f"x_b{b}.npy"
        np.save(inputs[b], rng.standard_normal((b, *shape)).astype(np.float32))
    return inputs


def _start_workers(specs, procs: dict, s: _Settings, tmp: Path, say) -> tuple[list[dict], dict[str, str]]:
    """One worker per contender, started one after the other and kept in `procs` (the caller
    closes them); a contender that cannot load here is skipped, with the reason."""
    env = worker_env(s.threads)
    contenders: list[dict] = []
    skipped: dict[str, str] = {}
    for name, spec, info in specs:
        say(f"loading {name}")
        p = _Proc(name, env, tmp / f"worker{len(procs) + len(skipped)}.log")
        # an RPC server busy with another session, or an unreachable one, must not hang the run
        r = p.ask(op="init", threads=s.threads, timeout=s.rpc_timeout if spec.get("kind") == "rpc" else None, **spec)
        if not r.get("ok"):
            p.close()
            skipped[name] = r["error"]
            say(f"skip {name}: {r['error']}")
            continue
        procs[name] = p
        contenders.append(
            {
                "name": name,
                **info,
                "executor": r.get("executor"),
                "import_s": r["import_s"],
                "load_s": r["load_s"],
                "rss_before_load_mb": r.get("rss_before_load_mb"),
                "rss_after_load_mb": r.get("rss_after_load_mb"),
                "torch_imported": r.get("torch_imported"),
                "remote": spec.get("kind") == "rpc",
                "results": {},
            }
        )
    if not contenders:
        raise CrateEdgeError("nothing could run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return contenders, skipped


def _check_against_upstream(results: dict[str, dict], logits: dict[str, np.ndarray]) -> None:
    """Every contender that ran against eager upstream, where it ran too: max |logit diff| and
    top-1 agreement on the same input, and the speed-up of its p50."""
    up = BASELINE_LABELS["upstream"]
    live = [n for n, r in results.items() if "error" not in r]
    if up not in live:
        return
    ref = logits[up]
    for n in live:
        if n in logits and logits[n].shape == ref.shape:
            results[n]["max_abs_vs_upstream"] = float(np.abs(logits[n] - ref).max())
            results[n]["top1_agreement_vs_upstream"] = float(np.mean(logits[n].argmax(-1) == ref.argmax(-1)))
    base = results[up]["p50_ms"]
    for n in live:
        results[n]["speedup_vs_upstream"] = base / results[n]["p50_ms"]


def _record_peak_memory(procs: dict, by_name: dict[str, dict]) -> None:
    """Ends each worker; records its peak RSS (a remote contender: the local client's) and GPU peak."""
    for n, p in procs.items():
        r = p.ask(op="done")
        c = by_name[n]
        if r.get("ok"):
            if c["remote"]:
                c.update(peak_rss_mb=None, local_client_peak_rss_mb=r.get("vmhwm_mb") or r.get("ru_maxrss_mb"), gpu_peak_mb=None)
            else:
                c.update(peak_rss_mb=r.get("vmhwm_mb") or r.get("ru_maxrss_mb"), gpu_peak_mb=r.get("gpu_peak_mb"))


def _remove_tmp(tmp: Path) -> None:
    for f in tmp.glob("*"):
        if f.is_file():
            f.unlink()
    if (tmp / "model").is_dir():
        import shutil

        shutil.rmtree(tmp / "model", ignore_errors=True)
    try:
        tmp.rmdir()
    except OSError:
        pass


def _assemble_report(s: _Settings, sha: str, shape: tuple, cfg: dict, src_label: str, contenders: list, skipped: dict) -> BenchReport:
    data = {
        "crate_edge": _version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": host_info(torch_info=False),
        "settings": {
            "batch": list(s.batches),
            "threads": s.threads,
            "warmup": s.warmup,
            "iters": s.iters,
            "seconds": s.seconds,
            "rounds": s.rounds,
            "input": f"standard normal float32 (seed 0), shape (batch, {', '.join(map(str, shape))})",
            "rpc": s.rpc,
            "rpc_key": s.rpc_key,
            "baseline_device": s.device,
            "gpu_timing": "GPU contenders (torch on cuda, AOTInductor CUDA, TensorRT): input resident on the GPU, "
            "wall time of one call plus a synchronize (launches and kernels, no host<->device "
            "copies; first_ms includes them)",
        },
        "source_model": {"sha256": sha, "config": cfg, "label": src_label},
        "contenders": contenders,
        "skipped": skipped,
        "memory_note": (
            "peak resident set size (VmHWM) of the contender's own worker process: Python, the libraries it "
            "imports, its model and every timed call; torch-free runtimes do not import torch. "
            "Remote (RPC) contenders: not measured."
        ),
    }
    return BenchReport(data)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("crate-edge")
    except Exception:
        return "unknown"
