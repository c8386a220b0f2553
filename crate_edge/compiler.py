"""`crate_edge.compile(model, target)`: rewrites -> torch.export (dynamic batch) -> backend ->
artifact directory with a manifest, ending with a parity check against the eager model."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from . import isa, rewrites
from ._version import __version__, code_sha256
from .backends import get_backend
from .backends.base import PRECISION_KEYS
from .checkpoint import load_model, model_hash
from .data import open_inputs
from .errors import BackendUnavailable, CrateEdgeError
from .export import export_module
from .host import host_info
from .manifest import ARTIFACT_FORMAT, MANIFEST, file_hashes
from .metrics import check_tolerances, logit_parity
from .outputs import atomic_dir, check_writable
from .quantize import QuantConfig, QuantPlan, calibration_set, quant_rewrites, quant_sites
from .runtime import Runner, load
from .targets import Target, load_target


class ParityError(CrateEdgeError):
    """A compiled artifact is outside its target's tolerances."""


def parity_set(cfg, data="embedded", limit: int | None = None):
    """The compile-time parity images as a crate_edge.data.InputSet: the first `limit` (default
    all) images of the test split of `data` (any data spec; an .npz or image folder is used whole)."""
    try:
        return open_inputs(data, cfg, "test").first(limit)
    except CrateEdgeError as e:
        raise CrateEdgeError(f"parity data: {e}") from None


def parity_images(cfg, data="embedded", limit: int | None = None):
    """(model inputs float32 NCHW, int64 labels or None when the data has none) of the parity set."""
    return parity_set(cfg, data, limit).tensors()


def compile(
    model=None,
    target: str | Target = "onnxruntime",
    out: str | os.PathLike | None = None,
    probe: bool = False,
    parity_data: str = "embedded",
    parity_limit: int | None = None,
    keep_failed: bool = False,
    log=None,
    extra_files: dict[str, str] | None = None,
    calibration_data=None,
    calibration_images: int | None = None,
) -> Runner:
    """Compile a CRATE (module, path, or None for the embedded model) for `target` (name or
    path to a target .toml) into the artifact directory `out` (default artifacts/<target>).
    Ends with a parity check on the held-out slice; raises ParityError beyond tolerance
    (the artifact is then not written unless keep_failed).

    `out` must be missing, empty or an artifact crate-edge wrote (else CrateEdgeError, nothing
    touched); it is replaced in one atomic step once the artifact is complete and checked, so an
    interrupted or failed compile leaves the previous artifact as it was. `extra_files`
    ({name: text}) are written into the artifact directory with it (a quantization search log).

    Data (any crate_edge.data spec: a named set, an .npz of float32 model inputs `x` with optional
    labels `y` or of uint8 `images`, an image folder, an IDX directory): `parity_data` is what
    the compile-time parity check runs on (test split; `parity_limit` images at most; without
    labels top-1 is not computed); `calibration_data` and `calibration_images` override the
    target's [quantize] calibration_data (train split) and calibration_images, for quantized
    targets only (CrateEdgeError on a float target). Both are opened and checked before anything
    is exported or written; the manifest records each (quantization.calibration, parity.data)."""
    say = log or (lambda s: print(s, file=sys.stderr))
    t = target if isinstance(target, Target) else load_target(target)
    be = get_backend(t.backend)
    check_offer(be, t)
    ok, why = be.available(t)
    if not ok:
        raise BackendUnavailable(f"target {t.name}: {why}")
    src = model if isinstance(model, torch.nn.Module) else load_model(model)
    src = src.eval()
    cfg = src.cfg
    out = check_writable(out or f"artifacts/{t.name}")  # refuse a foreign directory before any work

    qc = QuantConfig.from_target(t)
    if qc is None and (calibration_data is not None or calibration_images is not None):
        given = "calibration_data" if calibration_data is not None else "calibration_images"
        raise CrateEdgeError(
            f"target {t.name} is not quantized (no [quantize] table): {given} (--{given.replace('_', '-')}) "
            "applies to reduced-precision targets only"
        )
    if qc is not None and calibration_data is not None:
        qc = qc.replace(
            calibration_data=os.fspath(calibration_data)
            if isinstance(calibration_data, os.PathLike)
            else getattr(calibration_data, "spec", calibration_data)
        )
    if qc is not None and calibration_images is not None:
        if int(calibration_images) < 1:
            raise CrateEdgeError(f"calibration_images must be at least 1, got {calibration_images}")
        qc = qc.replace(calibration_images=int(calibration_images))
    names = quant_rewrites(t.rewrites, qc, src.cfg.FAMILY)
    module = rewrites.apply(src, names)
    if probe:
        module = rewrites.Probe(module)
    plan = cal = None
    if qc is not None:
        cal = calibration_set(cfg, qc, data=calibration_data)  # opened and checked before anything is written
        say(
            f"[{t.name}] {qc.scheme}: calibration on {'all ' if cal.selection == 'all' else ''}{len(cal)}"
            f"{'' if cal.selection == 'all' else ' ' + cal.selection} images of {cal.spec}" + (f" ({cal.split} split)" if cal.split else "")
        )
        plan = QuantPlan(qc, quant_sites(module, qc), cal.tensors()[0], cal.record())
    par = parity_set(cfg, parity_data, parity_limit)
    par_x, par_y = par.tensors()  # decoded here, so that bad images fail the compile before anything is written
    if cal is not None and par.same_data(cal):
        say(f"[{t.name}] note: calibration and parity use the same data ({par.spec}): parity is not measured on held-out images")
    if not par.has_labels:
        say(f"[{t.name}] note: {par.spec} has no labels: parity compares logits only (no top-1 accuracy)")
    bs = t.example_batch
    if t.dynamic_batch is not None:
        bs = min(max(bs, t.dynamic_batch[0]), t.dynamic_batch[1])
    example = torch.randn(bs, *cfg.input_shape, generator=torch.Generator().manual_seed(0))
    say(
        f"[{t.name}] torch.export (batch {'dynamic ' + str(list(t.dynamic_batch)) if t.dynamic_batch else bs}), rewrites: {', '.join(names) or 'none'}"
    )
    exported = export_module(module, example, t.dynamic_batch)

    with atomic_dir(out, "artifact", say=say) as tmp:
        say(f"[{t.name}] lowering with {be.name}")
        comp = be.compile(exported, t, tmp, quant=plan)
        if sorted(comp.precision) != sorted(PRECISION_KEYS):
            raise CrateEdgeError(f"backend {be.name}: its precision map has keys {sorted(comp.precision)}, not {list(PRECISION_KEYS)}")
        manifest: dict[str, Any] = {
            "format": ARTIFACT_FORMAT,
            "version": 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "crate_edge": __version__,
            "crate_edge_code": code_sha256(),
            "backend": {"name": be.name, "versions": be.versions(), **comp.info},
            "target": {"name": t.name, "file": Path(t.path).name, "sha256": t.sha256, "definition": t.raw},
            "source_model": {"sha256": model_hash(src), "config": cfg.to_dict()},
            "input": {
                "name": "images",
                "shape": [bs, *cfg.input_shape],
                "dtype": "float32",
                "batch_range": list(comp.batch_range or t.dynamic_batch or (bs, bs)),
                "preprocessing": {"scale": 1 / 255, "mean": cfg.mean, "std": cfg.std},
            },
            "outputs": ["logits"] + (rewrites.probe_output_names(src) if probe else []),
            "probe": probe,
            "precision": comp.precision,
            "rewrites": names,
            "quantization": plan.manifest(comp.precision) if plan is not None else None,
            "requires": isa.requirement(comp.isa, comp.isa_extra),
            "verified": comp.verified,
            "not_verified": comp.not_verified,
            "files": file_hashes(tmp, comp.files),
            "host": host_info(torch_info=True),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))

        # parity against the eager reference model on the held-out slice
        x, labels = par_x, par_y
        art = load(tmp, reference_ok=True)
        say(f"[{t.name}] parity on {len(x)} images of {par.spec} via {art.executor}")
        with torch.no_grad():
            ref = torch.cat([src(x[i : i + 256]) for i in range(0, len(x), 256)]).numpy()
        got = art(x.numpy())
        p = logit_parity(ref, got, None if labels is None else labels.numpy())
        fails = check_tolerances(p, t.tolerances)
        p.update(executor=art.executor, data=par.record(), tolerances=t.tolerances, passed=not fails, failures=fails)
        manifest["parity"] = p
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        for name, text in (extra_files or {}).items():  # beside the artifact, outside its hashed files
            (tmp / name).write_text(text)
        if fails and not keep_failed:
            raise ParityError(f"{t.name}: parity failed on {p['n']} images ({art.executor}): " + "; ".join(fails))
    say(
        f"[{t.name}] wrote {out}: top-1 agreement {100 * p['top1_agreement']:.2f}%, max |diff| {p['max_abs']:.2e}, "
        f"min cosine {p['min_cosine']:.6f} ({art.executor})"
    )
    for k, v in comp.not_verified.items():
        say(f"[{t.name}] NOT verified here: {k}: {v}")
    final = load(out, reference_ok=True)
    if fails:
        raise ParityError(f"{t.name}: parity failed (artifact kept at {out}): " + "; ".join(fails))
    return final


def check_offer(be, t) -> None:
    """A target file asks only for what its backend declares (Backend.capabilities): its
    precision, its [quantize] scheme, its device. One line otherwise, before any work."""
    cap = be.capabilities
    if t.precision not in cap.precisions:
        raise CrateEdgeError(
            f"target {t.name}: precision {t.precision} is not supported by backend {be.name} (it compiles {', '.join(cap.precisions)})"
        )
    qc = QuantConfig.from_target(t)
    if qc is not None and qc.scheme not in cap.quant_schemes:
        raise CrateEdgeError(
            f"target {t.name}: quantize.scheme {qc.scheme} is not supported by backend {be.name} "
            f"(it quantizes: {', '.join(cap.quant_schemes) or 'nothing'})"
        )
    if qc is not None and qc.attention != "float" and not cap.quant_attention:
        raise CrateEdgeError(f'target {t.name}: quantize.attention = "{qc.attention}" is not supported by backend {be.name} (float only)')
    if t.device not in cap.devices:
        raise CrateEdgeError(
            f"target {t.name}: device {t.device} is not supported by backend {be.name} (it runs on {', '.join(cap.devices)})"
        )


def compile_each(model, targets, root, prefix: str = "", reuse: bool = False, log=None, **kw):
    """Compile `model` for each target into root/<prefix><target>; for the measurement scripts.
    Returns ({target: Runner}, {target: why it was skipped}): a target whose backend is not
    installed here, or whose compile or parity check fails, is skipped with the reason (logged),
    never dropped silently. reuse: load an existing artifact of the same model and target file
    instead of compiling again. Other keywords go to `compile`."""
    say = log or (lambda s: print(s, file=sys.stderr))
    src = model if isinstance(model, torch.nn.Module) else load_model(model)
    h = model_hash(src) if reuse else None
    arts, skipped = {}, {}
    for name in targets:
        t = name if isinstance(name, Target) else load_target(name)
        ok, why = get_backend(t.backend).available(t)
        if not ok:
            skipped[t.name] = why
            say(f"[skip] {t.name}: {why}")
            continue
        d = Path(root) / f"{prefix}{t.name}"
        try:
            if reuse and (d / MANIFEST).exists():
                art = load(d, reference_ok=True)  # as compile() returns it: a labelled stand-in where it cannot run here
                m = art.manifest
                same = (m["source_model"]["sha256"], m["target"]["sha256"], bool(m.get("probe"))) == (h, t.sha256, bool(kw.get("probe")))
                # never code built for another CPU, by other crate-edge code or other backend libraries
                built_here = m.get("crate_edge_code") == code_sha256() and m["backend"].get("versions") == get_backend(t.backend).versions()
                if same and built_here and isa.fits_host(m):
                    arts[t.name] = art
                    say(f"[{t.name}] reusing {d}")
                    continue
            t0 = datetime.datetime.now()
            arts[t.name] = compile(src, t, out=d, log=say, **kw)
            say(f"[{t.name}] compiled in {(datetime.datetime.now() - t0).total_seconds():.0f} s ({arts[t.name].executor})")
        except CrateEdgeError as e:
            skipped[t.name] = f"compile failed: {str(e).splitlines()[0][:300]}"
            say(f"[skip] {t.name}: {skipped[t.name]}")
    return arts, skipped
