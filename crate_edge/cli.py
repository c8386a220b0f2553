"""`crate-edge`: a thin layer over the Python API; each command names its Python equivalent.

Errors in the user's input or environment print one line (`error: ...`) and exit 2; set
CRATE_EDGE_DEBUG=1 to see the traceback of an unexpected failure. Output is crate-edge's own
lines only; `crate-edge -v CMD` also shows the libraries' warnings and logs (crate_edge.quiet).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .errors import CrateEdgeError
from .outputs import atomic_dir, check_writable


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except CrateEdgeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # an unexpected failure still gets one line, not a traceback
            if os.environ.get("CRATE_EDGE_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            from .quiet import active

            more = ", -v for the libraries' output" if active() else ""
            click.echo(f"error: {type(e).__name__}: {msg[:300]} (set CRATE_EDGE_DEBUG=1 for the traceback{more})", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crate-edge")
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Also show what the libraries underneath print: their warnings, log records, progress bars and native stderr.",
)
@click.pass_context
def main(ctx, verbose):
    """crate-edge: train, compile, quantize, check and benchmark CRATE models."""
    if not verbose:
        from .quiet import quiet

        ctx.with_resource(quiet())


def _model_options(f):
    f = click.option(
        "--pool", type=click.Choice(["cls", "mean"]), default=None, help="Pooling of an upstream checkpoint (default cls, as upstream)."
    )(f)
    f = click.option(
        "--heads", type=int, default=None, help="Attention heads of an upstream checkpoint (not recoverable from its shapes)."
    )(f)
    return f


def _calibration_options(f):
    f = click.option(
        "--calibration-images",
        type=int,
        default=None,
        metavar="N",
        help="Calibration image count of a quantized target, instead of its [quantize].calibration_images.",
    )(f)
    return click.option(
        "--calibration-data",
        default=None,
        metavar="SPEC",
        help="Calibration data of a quantized target (train split), instead of its [quantize].calibration_data: " + _DATA_SPECS,
    )(f)


def _load(model, heads=None, pool=None):
    from .checkpoint import load_model

    return load_model(None if model in (None, "embedded") else model, heads=heads, pool=pool)


# ------------------------------------------------------------------ model commands

_DATA_SPECS = (
    "fashion-mnist[:split], mnist[:split], embedded, FILE.npz (float32 x (N,C,H,W) model inputs + optional "
    "labels y, or uint8 images + labels), an image folder DIR/<class>/<image>, or an IDX directory."
)


@main.command("import")
@click.argument("ckpt", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory (crate-edge format).")
@click.option(
    "--mean",
    default=None,
    metavar="M1,M2,M3",
    help="Per-channel input mean the model was trained with (images in [0, 1]), "
    "e.g. ImageNet's 0.485,0.456,0.406; stored with the model and applied to image data.",
)
@click.option("--std", default=None, metavar="S1,S2,S3", help="Per-channel input std, with --mean.")
@click.option(
    "--image-size",
    default=None,
    metavar="H[,W]",
    help="Input size, when the patch grid is not square (the token count gives only H*W).",
)
@_model_options
def import_cmd(ckpt, out, mean, std, image_size, heads, pool):
    """Convert an upstream CRATE or CRATE-α checkpoint to the crate-edge format (the family
    is told by the keys).

    Python: crate_edge.import_checkpoint(ckpt, out, heads=, pool=, mean=, std=, image_size=)"""
    from .checkpoint import import_checkpoint, load_model
    from .family import title

    check_writable(out)
    norm = {k: _floats(v, f"--{k}") for k, v in (("mean", mean), ("std", std)) if v is not None}
    if len(norm) == 1:
        raise CrateEdgeError("give --mean and --std together")
    if image_size is not None:
        hw = _floats(image_size, "--image-size")
        if len(hw) not in (1, 2) or any(v != int(v) or v < 1 for v in hw):
            raise CrateEdgeError(f"--image-size {image_size!r}: expected H or H,W (positive integers)")
        norm["image_size"] = int(hw[0]) if len(hw) == 1 else (int(hw[0]), int(hw[1]))
    path = import_checkpoint(ckpt, out, heads=heads, pool=pool, **norm)
    cfg = load_model(path).cfg
    click.echo(
        f"wrote {path}: {title(cfg)} dim={cfg.dim} depth={cfg.depth} heads={cfg.heads}x{cfg.dim_head} "
        f"patch={cfg.patch_size} image={cfg.image_size} channels={cfg.channels} classes={cfg.num_classes} pool={cfg.pool}"
        + (f" mean={list(cfg.mean)} std={list(cfg.std)}" if cfg.mean is not None else "")
    )


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CrateEdgeError(f"{what} {text!r}: expected comma-separated numbers") from None


@main.command()
def variants():
    """List the named CRATE and CRATE-α variants and their parameter counts.

    Python: crate_edge.create_model(name)"""
    import torch

    from .family import VARIANTS, create_model

    for name in VARIANTS:
        with torch.device("meta"):  # shapes only: the large variants need no memory
            m = create_model(name)
        c = m.cfg
        click.echo(
            f"{name:<18} dim={c.dim:<5} depth={c.depth:<3} heads={c.heads}x{c.dim_head:<3} "
            f"image={c.image_size}/{c.patch_size} ch={c.channels} params={sum(p.numel() for p in m.parameters()):,}"
        )


@main.command()
@click.argument("model", required=False, default="embedded")
@click.option("--data", default="embedded", show_default=True, metavar="SPEC", help="Data (test split): " + _DATA_SPECS)
@click.option("--n", "n_images", default=256, show_default=True, help="Number of images to measure on.")
@click.option("--out", default="out/inspect", show_default=True, type=click.Path(file_okay=False))
@_model_options
def inspect(model, data, n_images, out, heads, pool):
    """Per-layer coding rate and sparsity of MODEL (CRATE-α: and the residual of its code z2), as a
    table, JSON and PNG.

    Python: crate_edge.whitebox.measure(model, images)"""
    from .data import open_inputs
    from .whitebox import measure

    check_writable(out)
    m = _load(model, heads, pool)
    x, _ = open_inputs(data, m.cfg, "test").first(n_images).tensors()
    n = len(x)
    wb = measure(m, x)
    with atomic_dir(out, "report") as tmp:
        (tmp / "whitebox.json").write_text(json.dumps({"model": str(model), "data": data, **wb.to_dict()}, indent=1))
        wb.plot(tmp / "whitebox.png", title=f"{Path(str(model)).name} on {n} images of {data}")
    click.echo(wb.table())
    click.echo(f"wrote {out}/whitebox.json and {out}/whitebox.png")


@main.command("eval")
@click.argument("model", required=False, default="embedded")
@click.option("--data", default="fashion-mnist:test", show_default=True, metavar="SPEC", help="Labelled data (test split): " + _DATA_SPECS)
@click.option("--batch-size", default=256, show_default=True)
@_model_options
def eval_cmd(model, data, batch_size, heads, pool):
    """Top-1 accuracy of MODEL on a labelled dataset.

    Python: crate_edge.evaluate(model, data)"""
    from . import evaluate

    m = _load(model, heads, pool)
    r = evaluate(m, data, batch_size=batch_size, progress=True)
    click.echo(f"top-1 {100 * r['top1']:.2f}% on {r['n']} images of {data} (mean loss {r['loss']:.4f})")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output directory (default runs/<recipe>).")
@click.option("--epochs", type=int, default=None, help="Override the recipe's epoch count.")
@click.option("--until", type=int, default=None, help="Stop after this epoch (same schedule); resume later.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from OUT/resume if present.")
def train(recipe, out, epochs, until, resume):
    """Train a CRATE from a TOML recipe (CUDA when present; torchrun for DDP).

    Python: crate_edge.train.train(recipe, out)"""
    from .train import load_recipe
    from .train import train as run

    r = load_recipe(recipe)
    out = out or f"runs/{r.name}"
    check_writable(out)
    last = run(r, out, resume=resume, epochs=epochs, until=until)
    if int(os.environ.get("RANK", "0")) == 0:
        what = f"{out}/model (crate-edge format) and " if (Path(out) / "model").exists() and not until else f"{out}/resume and "
        click.echo(f"wrote {what}{out}/train_log.json; last epoch: {json.dumps(last)}")


@main.command()
@click.option("--targets", "targets", default=None, metavar="A,B,C", help="Targets to include (default: every target).")
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False), help="Report and artifact directory.")
@click.option("--model", "-m", default="embedded", show_default=True, help="crate-edge model dir/.safetensors or upstream checkpoint.")
@click.option("--threads", type=int, default=None, help="Threads for every benchmarked contender (default: the usable cores).")
def demo(targets, out, model, threads):
    """The whole toolchain on the embedded model: compile to every target that compiles here,
    check parity (per layer for reduced precision), benchmark side by side with eager PyTorch at
    batch 1 and 32, and write OUT/report.html, report.md and report.json. A second run reuses
    the artifacts of the first.

    Python: crate_edge.demo.demo(targets=None, out="out/demo")"""
    from .demo import demo as run

    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    rep = run(names, out=out, model=None if model == "embedded" else model, threads=threads)
    click.echo(rep.table())
    click.echo(f"wrote {out}/report.html, report.md, report.json ({rep.data['seconds']['total']:.0f} s)")


# ------------------------------------------------------------------ compiler commands


@main.command()
def targets():
    """List every target, whether it can compile and run here, and if not, why.

    Python: crate_edge.targets.list_targets(), crate_edge.backends.get_backend(name).available(target)
    and .capabilities"""
    from .backends import get_backend
    from .targets import list_targets, load_target

    for name in list_targets():
        t = load_target(name)
        be = get_backend(t.backend)
        ok, why = be.available(t)
        run_ok, run_why = be.available(t, run=True)
        status = "compile: yes" if ok else f"compile: NO ({why})"
        status += ", run: yes" if run_ok else f", run: NO ({run_why})"
        click.echo(f"{name:<16} {t.backend:<12} {t.precision:<5} {t.device:<5} {status}")


@main.command("compile")
@click.option("--target", "-t", required=True, help="Target name (see `crate-edge targets`) or a path to a target .toml.")
@click.option("--model", "-m", default="embedded", show_default=True, help="crate-edge model dir/.safetensors or upstream checkpoint.")
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False), help="Artifact directory (default artifacts/<target>).")
@click.option(
    "--probe",
    is_flag=True,
    help="Also output per-layer MSSA features and ISTA outputs (CRATE-α: codes z2 and residuals), and report per-layer parity.",
)
@click.option(
    "--layers/--no-layers",
    default=None,
    help="Per-layer parity of a plain build through its probe twin (compiled in a scratch directory, then removed). "
    "Default: on for reduced-precision targets.",
)
@click.option(
    "--parity-data",
    default="embedded",
    show_default=True,
    metavar="SPEC",
    help="Data for the compile-time parity check (test split): " + _DATA_SPECS,
)
@_calibration_options
@click.option("--keep-failed", is_flag=True, help="Keep the artifact even when parity fails (the command still exits non-zero).")
@_model_options
def compile_cmd(target, model, out, probe, layers, parity_data, calibration_data, calibration_images, keep_failed, heads, pool):
    """Compile MODEL for TARGET into an artifact directory, with a parity check, per layer too
    (ISTA support IoU, coding rate, and for CRATE-α the residual of z2): from the artifact itself
    with --probe, else, for reduced-precision targets or with --layers, from its probe twin.

    Python: crate_edge.compile(model, target, out=..., calibration_data=..., parity_data=...),
    then crate_edge.parity.parity(artifact, reference=model, data=...) for a probe build, or
    crate_edge.parity.layer_parity(model, target, artifact, ...) for a plain one"""
    from .compiler import compile as run
    from .parity import layer_parity
    from .quantize import QuantConfig
    from .targets import load_target

    m = _load(model, heads, pool)
    art = run(
        m,
        target,
        out=out,
        probe=probe,
        parity_data=parity_data,
        keep_failed=keep_failed,
        calibration_data=calibration_data,
        calibration_images=calibration_images,
    )
    nv = art.manifest.get("not_verified", {})
    passed = art.manifest["parity"]["passed"]
    if probe:
        from .parity import parity

        rep = parity([art], reference=m, data=parity_data, progress=False)
        click.echo(rep.table())
        passed = passed and rep.passed
    elif layers or (layers is None and QuantConfig.from_target(load_target(target)) is not None):
        rep, diff = layer_parity(
            m, target, art, parity_data=parity_data, calibration_data=calibration_data, calibration_images=calibration_images
        )
        click.echo(rep.table())
        click.echo(
            f"per layer: measured on the artifact's probe twin (the same target and calibration, with per-layer outputs); "
            f"its logits differ from the artifact's by at most {diff:.2e}"
        )
        passed = passed and rep.passed
    click.echo(
        f"{art.path}: {art.target} artifact, parity {'passed' if passed else 'FAILED'}"
        + (f"; not verified here: {', '.join(nv)}" if nv else "")
    )
    if not passed:
        raise SystemExit(1)


@main.command("quantize")
@click.option("--target", "-t", required=True, help="A reduced-precision target (one with a [quantize] table).")
@click.option("--model", "-m", default="embedded", show_default=True, help="crate-edge model dir/.safetensors or upstream checkpoint.")
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False), help="Artifact directory (default artifacts/<target>).")
@click.option(
    "--data", default="fashion-mnist:train", show_default=True, metavar="SPEC", help="Images the budget is measured on: " + _DATA_SPECS
)
@click.option("--limit", default=2000, show_default=True, help="How many of them.")
@_calibration_options
@click.option(
    "--budget",
    "budget",
    multiple=True,
    metavar="KEY=VALUE",
    help="Budget override, e.g. max_top1_drop=0.003 min_support_iou=0.9 max_coding_rate_rel=0.02 (repeatable).",
)
@_model_options
def quantize_cmd(target, model, out, data, limit, calibration_data, calibration_images, budget, heads, pool):
    """Accuracy-driven quantization: raise the most sensitive blocks to float until the budget
    holds; writes the artifact with OUT/search.json (every attempt). Exits 1 if nothing passes
    (the best configuration is saved anyway).

    Python: crate_edge.search.search(model, target, out, budget=...)"""
    from .search import search

    bud = {}
    for kv in budget:
        k, sep, v = kv.partition("=")
        try:
            bud[k.strip()] = float(v)
        except ValueError:
            raise CrateEdgeError(f"--budget {kv!r}: expected KEY=NUMBER") from None
        if not sep:
            raise CrateEdgeError(f"--budget {kv!r}: expected KEY=NUMBER")
    m = _load(model, heads, pool)
    try:
        r = search(
            m,
            target,
            out,
            budget=bud or None,
            data=data,
            limit=limit,
            log=lambda s: click.echo(s, err=True),
            calibration_data=calibration_data,
            calibration_images=calibration_images,
        )
    except CrateEdgeError as e:
        if "no configuration met the budget" in str(e):
            click.echo(f"quantize FAILED: {e}", err=True)
            sys.exit(1)
        raise
    click.echo(
        f"{r['artifact']}: float blocks {r['chosen_float_layers'] or 'none'} after {len(r['attempts'])} attempt(s); "
        f"log {r['artifact']}/search.json"
    )


@main.command("run")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--data", default="embedded", show_default=True, metavar="SPEC", help="Data (test split): " + _DATA_SPECS)
@click.option("--n", "n_images", default=10, show_default=True, help="Number of images.")
def run_cmd(artifact, data, n_images):
    """Print the ARTIFACT's predictions on images from --data.

    Python: crate_edge.runtime.load(artifact)(images)"""
    import numpy as np

    from .data import open_inputs
    from .family import config_from_dict
    from .runtime import load

    art = load(artifact)
    cfg = config_from_dict(art.manifest["source_model"]["config"])
    x, y = open_inputs(data, cfg, "test").first(n_images).tensors()
    n = len(x)
    labels = None if y is None else y.tolist()
    logits = art(x.numpy())
    e = np.exp(logits - logits.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    for i in range(n):
        k = int(probs[i].argmax())
        click.echo(f"{i:>4}  predicted {k:<3} p={probs[i, k]:.3f}" + (f"  label {labels[i]}" if labels is not None else ""))
    if labels is not None:
        click.echo(f"top-1 {100 * np.mean(logits.argmax(1) == np.array(labels)):.1f}% on {n} images ({art.executor})")
    else:
        click.echo(f"{n} images of {data}, no labels: top-1 not computed ({art.executor})")


@main.command("parity")
@click.argument("artifacts", nargs=-1, required=True)
@click.option(
    "--reference",
    "-r",
    default=None,
    help="Reference model (crate-edge dir/.safetensors or upstream checkpoint); "
    "default: the embedded model, which must be the artifacts' source.",
)
@click.option(
    "--data",
    default="fashion-mnist",
    show_default=True,
    metavar="SPEC",
    help="Data (test split; without labels top-1 is not computed): " + _DATA_SPECS,
)
@click.option("--limit", type=int, default=None, help="At most this many images (default: all).")
@click.option("--batch-size", type=int, default=None, help="Images per batch (default: sized to memory, at most 256).")
@click.option(
    "--out",
    default="out/parity",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for parity.json, parity.md and parity.png.",
)
@click.option(
    "--tol",
    "tols",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a target tolerance: max_abs, min_top1_agreement, min_cosine, max_top1_drop, "
    "min_support_iou, max_coding_rate_rel, min_sqnr_db.",
)
@_model_options
def parity_cmd(artifacts, reference, data, limit, batch_size, out, tols, heads, pool):
    """Accuracy parity of ARTIFACT(s) against the eager fp32 reference, per layer for probe builds
    (writes parity.json, parity.md, parity.png; exits 1 when a tolerance fails).

    Python: crate_edge.parity.parity(artifacts, reference=, data=, tolerances=)"""
    from .parity import parity

    tol = {}
    for t in tols:
        key, eq, val = t.partition("=")
        if not eq:
            raise CrateEdgeError(f"--tol {t!r}: expected KEY=VALUE")
        tol[key.strip()] = val.strip()
    check_writable(out)
    ref = reference if heads is None and pool is None else _load(reference, heads, pool)
    report = parity(list(artifacts), reference=ref, data=data, limit=limit, batch_size=batch_size, tolerances=tol, progress=True)
    report.write(out)
    click.echo(report.table())
    click.echo(f"wrote {out}/parity.json, {out}/parity.md and {out}/parity.png")
    if not report.passed:
        click.echo(f"parity FAILED: {report.message()}", err=True)
        sys.exit(1)


@main.command("bench")
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--batch", default="1", show_default=True, help="Comma-separated batch sizes, e.g. 1,8,32.")
@click.option("--threads", type=int, default=None, help="Threads for every contender (default: the usable cores).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed calls per contender and batch.")
@click.option("--iters", type=int, default=None, help="Timed calls per contender and batch (default 30).")
@click.option("--seconds", type=float, default=None, help="Instead of --iters: about this many seconds per contender and batch.")
@click.option("--rounds", type=int, default=5, show_default=True, help="Interleaved rounds the timed calls are split over.")
@click.option(
    "--model",
    "-m",
    default=None,
    help="The artifacts' source model for the baselines (default: the embedded model, which must then be their source).",
)
@click.option(
    "--baselines",
    default="upstream,folded,compile",
    show_default=True,
    help="Comma-separated eager baselines (upstream, folded, compile), or none.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the torch baselines run.")
@click.option("--rpc", default=None, metavar="HOST:PORT", help="Run the TVM artifacts on this TVM RPC server (with --rpc-key: tracker).")
@click.option("--rpc-key", default=None, help="Device key to request from the RPC tracker given by --rpc.")
@click.option("--out", default="out/bench", show_default=True, type=click.Path(file_okay=False))
def bench_cmd(artifacts, batch, threads, warmup, iters, seconds, rounds, model, baselines, device, rpc, rpc_key, out):
    """Latency (p50/p90/p99), throughput, load and first-call time, peak memory and size of
    ARTIFACT(s) against eager PyTorch, timed interleaved (writes bench.json, bench.md, bench.png).

    Python: crate_edge.bench(artifacts, batch=, threads=, iters=|seconds=, model=, rpc=)"""
    from .bench import bench, parse_batches

    check_writable(out)
    bl = () if baselines.strip() in ("", "none") else tuple(b.strip() for b in baselines.split(",") if b.strip())
    report = bench(
        list(artifacts),
        batch=parse_batches(batch),
        threads=threads,
        warmup=warmup,
        iters=iters,
        seconds=seconds,
        rounds=rounds,
        model=model,
        baselines=bl,
        device=device,
        rpc=rpc,
        rpc_key=rpc_key,
    )
    report.write(out)
    click.echo(report.table())
    click.echo(f"wrote {out}/bench.json, {out}/bench.md and {out}/bench.png")


@main.command("profile")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--data", default="embedded", show_default=True, metavar="SPEC", help="Inputs and fidelity data (test split): " + _DATA_SPECS)
@click.option("--batch", type=int, default=1, show_default=True, help="Images per run.")
@click.option("--iters", type=int, default=20, show_default=True, help="Profiled runs (after 3 warmup runs).")
@click.option("--threads", type=int, default=None, help="Runtime threads (default: the target's setting).")
@click.option(
    "--reference",
    "-r",
    default=None,
    help="Reference model for the fidelity columns (default: the embedded model, which must be the artifact's source).",
)
@click.option("--no-fidelity", is_flag=True, help="Latency only: skip the per-block fidelity against the reference.")
@click.option(
    "--out",
    default="out/profile",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for profile.json, profile.md and profile.png.",
)
def profile_cmd(artifact, data, batch, iters, threads, reference, no_fidelity, out):
    """Per-block and per-op-kind latency of ARTIFACT from its runtime's own profiler (ONNX Runtime,
    ExecuTorch ETDump, TVM's VM), beside each block's fidelity (per layer for probe builds).

    Python: crate_edge.profile.profile(artifact, data=, batch=, iters=, threads=, reference=)"""
    from .profile import profile

    check_writable(out)
    report = profile(artifact, data=data, batch=batch, iters=iters, threads=threads, reference=reference, fidelity=not no_fidelity)
    report.write(out)
    click.echo(report.table())
    click.echo(f"wrote {out}/profile.json, {out}/profile.md and {out}/profile.png")


if __name__ == "__main__":
    main()
