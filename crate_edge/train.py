"""`crate-edge train RECIPE.toml`: supervised training of a CRATE classifier.

A recipe is data (see recipes/*.toml): model, data, optimizer, schedule, augmentation, batch
size, epochs, seed. CUDA with bf16 autocast when present, fp32 on CPU. Under `torchrun` it
trains data-parallel (DDP: NCCL on GPUs, gloo on CPUs); rank 0 writes every file.

Output directory: the model in the crate-edge format (model.safetensors + config.json),
train_log.json (one record per epoch), and resume/ (weights + optimizer state as
safetensors, progress as JSON) written after every `checkpoint_every` epochs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import rewrites
from .checkpoint import model_hash, save_model
from .data import load_dataset, open_inputs, prepare
from .errors import CrateEdgeError
from .family import VARIANTS, build_model, variant_config
from .model import CrateConfig
from .outputs import atomic_dir, atomic_write, owned_dir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TRAIN_FUSION = ["sdpa_attention", "ista_gemm"]  # crate_edge.rewrites passes training runs through


@dataclass
class DataSpec:
    train: str = "fashion-mnist:train"
    val: str = "fashion-mnist:test"
    workers: int = 0
    limit: int | None = None  # use only the first N training images (smoke tests)


@dataclass
class Augment:
    random_crop_padding: int = 0  # pad by P then crop back at a random offset
    hflip: bool = False


@dataclass
class Optim:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0


@dataclass
class Schedule:
    kind: str = "cosine"  # cosine | constant
    warmup_epochs: float = 0.0
    min_lr: float = 0.0


@dataclass
class Recipe:
    name: str = "recipe"
    model: dict[str, Any] = field(default_factory=dict)  # {"variant": NAME, ...config overrides}
    data: DataSpec = field(default_factory=DataSpec)
    augment: Augment = field(default_factory=Augment)
    optim: Optim = field(default_factory=Optim)
    schedule: Schedule = field(default_factory=Schedule)
    epochs: int = 10
    batch_size: int = 128  # global batch, split across DDP ranks
    seed: int = 0
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | off
    compile: bool = False  # torch.compile the training step (optional: it fails on some stacks)
    fused: bool = True  # train through the TRAIN_FUSION rewrites (same function, faster)
    checkpoint_every: int = 1
    eval_every: int = 1
    threads: int | None = None

    def model_config(self) -> CrateConfig:
        kw = dict(self.model)
        variant = kw.pop("variant", None)
        family = kw.pop("family", "crate")
        if variant is not None and variant not in VARIANTS:
            raise CrateEdgeError(f"recipe {self.name}: unknown model variant {variant!r}")
        try:
            return variant_config(variant, family, **kw)
        except (TypeError, ValueError, KeyError) as e:
            raise CrateEdgeError(f"recipe {self.name}: bad [model]: {e}") from None


def _build(cls, d: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise CrateEdgeError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(names)}")
    kw = {}
    for k, v in d.items():
        sub = {"data": DataSpec, "augment": Augment, "optim": Optim, "schedule": Schedule}.get(k) if cls is Recipe else None
        if sub is not None:
            if not isinstance(v, dict):
                raise CrateEdgeError(f"{where}: [{k}] must be a table")
            v = _build(sub, v, f"{where} [{k}]")
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def load_recipe(path: str | os.PathLike) -> Recipe:
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise CrateEdgeError(f"recipe {p} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CrateEdgeError(f"recipe {p}: invalid TOML ({e})") from None
    doc.setdefault("name", p.stem)
    r = _build(Recipe, doc, str(p))
    r.model_config()  # validate early
    if r.amp not in ("auto", "bf16", "off"):
        raise CrateEdgeError(f"{p}: amp must be auto, bf16 or off")
    if r.schedule.kind not in ("cosine", "constant"):
        raise CrateEdgeError(f"{p}: [schedule] kind must be cosine or constant")
    if r.optim.name not in ("adamw", "sgd"):
        raise CrateEdgeError(f"{p}: [optim] name must be adamw or sgd")
    return r


def augment(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Batch augmentation on the model-input tensor (runs on the training device)."""
    b, _, h, w = x.shape
    if aug.random_crop_padding:
        p = aug.random_crop_padding
        xp = F.pad(x, (p, p, p, p), mode="constant", value=0.0)
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen).tolist()
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen).tolist()
        x = torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if aug.hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
    return x


def lr_at(r: Recipe, step: int, total: int, steps_per_epoch: int) -> float:
    warm = int(r.schedule.warmup_epochs * steps_per_epoch)
    if step < warm:
        return r.optim.lr * (step + 1) / warm
    if r.schedule.kind == "constant":
        return r.optim.lr
    t = (step - warm) / max(1, total - warm)
    return r.schedule.min_lr + 0.5 * (r.optim.lr - r.schedule.min_lr) * (1 + math.cos(math.pi * t))


# ------------------------------------------------------------------ resume state (no pickle)


def _save_resume(out: Path, model, opt: torch.optim.Optimizer, state: dict):
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"optim.{pid}.{name}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    state = {**state, "param_groups": osd["param_groups"], "rng": torch.get_rng_state().tolist()}
    with atomic_dir(out / "resume", "resume") as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state))


def _load_resume(out: Path, model, opt: torch.optim.Optimizer) -> dict | None:
    from safetensors.torch import load_file

    d = out / "resume"
    if not (d / "state.json").exists():
        return None
    try:
        state = json.loads((d / "state.json").read_text())
        tensors = load_file(str(d / "state.safetensors"))
    except Exception as e:  # noqa: BLE001 - written atomically, so only outside hands get here
        raise CrateEdgeError(f"{d}: unreadable resume state ({str(e).splitlines()[0][:200]}); use --no-resume or a new --out") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    osd: dict[str, Any] = {"state": {}, "param_groups": state.pop("param_groups")}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            osd["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(osd)
    torch.set_rng_state(torch.tensor(state.pop("rng"), dtype=torch.uint8))
    return state


# ------------------------------------------------------------------ the loop


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return world, rank


@torch.no_grad()
@torch.no_grad()
def evaluate(model, inputs, batch_size: int = 256, device="cpu", progress: bool = False) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of `model` on labelled inputs (a crate_edge.data.InputSet)."""
    model.eval()
    correct = n = 0
    loss = 0.0
    it = inputs.batches(batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=-(-len(inputs) // batch_size), desc="eval", unit="batch", file=sys.stderr, leave=False)
    for x, y in it:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        n += len(y)
    return {"top1": correct / max(1, n), "loss": loss / max(1, n), "n": n}


def train(
    recipe: Recipe | str | os.PathLike,
    out_dir: str | os.PathLike,
    resume: bool = True,
    epochs: int | None = None,
    until: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train per the recipe; returns the final log record. Python equivalent of `crate-edge train`.
    `epochs` overrides the recipe (and so its schedule); `until` stops after that epoch on the
    recipe's own schedule, to be continued later from OUT/resume."""
    from tqdm import tqdm

    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if epochs is not None:
        r = dataclasses.replace(r, epochs=epochs)
    world, rank = _dist()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if r.threads:
        torch.set_num_threads(r.threads)
    use_bf16 = r.amp == "bf16" or (r.amp == "auto" and device.type == "cuda")
    cfg = r.model_config()
    out = Path(out_dir)

    torch.manual_seed(r.seed)
    model = build_model(cfg).to(device)
    # train through a faster form of the same function over the same parameters; `model` stays the
    # reference formulation that is evaluated and shipped
    fwd = rewrites.apply(model, TRAIN_FUSION, share_parameters=True) if r.fused else model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embedding" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embedding" not in n and "cls_token" not in n)]
    groups = [{"params": decay, "weight_decay": r.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if r.optim.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=r.optim.lr, betas=tuple(r.optim.betas))
    else:
        opt = torch.optim.SGD(groups, lr=r.optim.lr, momentum=0.9, nesterov=True)

    train_ds = load_dataset(r.data.train, "train", cfg.image_size, cfg.channels)
    if r.data.limit:
        train_ds = torch.utils.data.Subset(train_ds, range(min(r.data.limit, len(train_ds))))
    val_ds = open_inputs(r.data.val, cfg, "test").require_labels("validation", cfg.num_classes) if r.data.val else None

    # rank 0 owns OUT for the whole run: refused if it holds files crate-edge did not write, or
    # if another process is training into it
    claim = owned_dir(out, "train-run", dirs=("resume", "model")) if rank == 0 else contextlib.nullcontext()
    with claim:
        start_epoch, log = 0, []
        if resume and rank == 0:
            st = _load_resume(out, model, opt)
            if st is not None:
                same = json.loads(json.dumps(dataclasses.asdict(r))) | {"epochs": st["recipe"]["epochs"]}
                if st.get("recipe") != same:
                    raise CrateEdgeError(f"{out}/resume was written by a different recipe; use a new --out or --no-resume")
                start_epoch, log = st["epoch"], st["log"]
                print(f"resuming {out} at epoch {start_epoch}", file=sys.stderr)
        if world > 1:  # every rank starts from rank 0's weights and epoch
            for p in model.state_dict().values():
                torch.distributed.broadcast(p, 0)
            t = torch.tensor([start_epoch], device=device)
            torch.distributed.broadcast(t, 0)
            start_epoch = int(t.item())

        ddp = torch.nn.parallel.DistributedDataParallel(fwd) if world > 1 else fwd
        step_fn = torch.compile(ddp) if r.compile else ddp
        local_bs = r.batch_size // world
        if local_bs * world != r.batch_size:
            raise CrateEdgeError(f"batch_size {r.batch_size} is not divisible by {world} ranks")
        sampler = (
            torch.utils.data.DistributedSampler(train_ds, world, rank, shuffle=True, seed=r.seed, drop_last=True) if world > 1 else None
        )
        steps_per_epoch = len(train_ds) // r.batch_size
        if steps_per_epoch == 0:
            raise CrateEdgeError(f"training set ({len(train_ds)} images) is smaller than one batch ({r.batch_size})")
        total = steps_per_epoch * r.epochs
        record: dict[str, Any] = {}

        for epoch in range(start_epoch, min(r.epochs, until or r.epochs)):
            fwd.train()
            gen = torch.Generator().manual_seed(r.seed * 7919 + 1000 * rank + epoch)  # resumable augmentation
            if sampler is not None:
                sampler.set_epoch(epoch)
                order = list(iter(sampler))
            else:
                order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(r.seed * 100003 + epoch)).tolist()
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"epoch {epoch + 1}/{r.epochs}",
                unit="step",
                file=sys.stderr,
                disable=not progress or rank != 0,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
            )
            t0, seen, run_loss, run_correct = time.time(), 0, 0.0, 0
            for i in bar:
                idx = order[i * local_bs : (i + 1) * local_bs]
                imgs, labels = _gather(train_ds, idx)
                x = augment(prepare(imgs, cfg).to(device, non_blocking=True), r.augment, gen)
                y = labels.to(device, non_blocking=True)
                lr = lr_at(r, epoch * steps_per_epoch + i, total, steps_per_epoch)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = step_fn(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=r.optim.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if r.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), r.optim.grad_clip)
                opt.step()
                if not torch.isfinite(loss):
                    raise CrateEdgeError(f"loss became {loss.item()} at epoch {epoch + 1} step {i}; lower the learning rate")
                seen += len(y) * world
                run_loss += loss.item()
                run_correct += (logits.argmax(-1) == y).sum().item()
                bar.set_postfix(
                    loss=f"{run_loss / (i + 1):.4f}",
                    acc=f"{run_correct / ((i + 1) * len(y)):.3f}",
                    img_s=f"{seen / (time.time() - t0):.0f}",
                    lr=f"{lr:.2e}",
                )
            dt = time.time() - t0
            record = {
                "epoch": epoch + 1,
                "train_loss": run_loss / steps_per_epoch,
                "train_acc": run_correct / (steps_per_epoch * local_bs),
                "images_per_s": seen / dt,
                "seconds": dt,
                "lr": lr,
                "device": str(device),
                "world_size": world,
            }
            if rank == 0 and val_ds is not None and ((epoch + 1) % r.eval_every == 0 or epoch + 1 == r.epochs):
                ev = evaluate(model, val_ds, device=device)
                record.update(val_top1=ev["top1"], val_loss=ev["loss"])
            if rank == 0:
                log.append(record)
                print(json.dumps(record), file=sys.stderr, flush=True)
                if (epoch + 1) % r.checkpoint_every == 0 or epoch + 1 in (r.epochs, until):
                    _save_resume(out, model, opt, {"epoch": epoch + 1, "log": log, "recipe": dataclasses.asdict(r)})
                    atomic_write(out / "train_log.json", json.dumps({"recipe": dataclasses.asdict(r), "log": log}, indent=1))
        final = {**(log[-1] if log else record), "weights_sha256": model_hash(model)}  # every rank: DDP keeps them equal
        finished = bool(log) and log[-1]["epoch"] == r.epochs
        if rank == 0 and finished:  # a run stopped by `until` leaves only resume/, not a model
            save_model(
                model.cpu(), out / "model", metadata={"recipe": r.name, "epochs": r.epochs, "final": record or (log[-1] if log else {})}
            )
        if rank == 0:
            atomic_write(out / "train_log.json", json.dumps({"recipe": dataclasses.asdict(r), "log": log}, indent=1))
        if world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return final


def _gather(ds, idx):
    """Batch lookup: one tensor index for in-memory data, per-item decoding otherwise."""
    base, offset = ds, None
    if isinstance(ds, torch.utils.data.Subset):
        base, offset = ds.dataset, ds.indices
    if hasattr(base, "images"):
        ii = torch.tensor([offset[i] for i in idx] if offset is not None else idx)
        return base.images[ii], base.labels[ii]
    items = [ds[i] for i in idx]
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
