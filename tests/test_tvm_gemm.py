"""TVM's hand-written fp32 GEMM (crate_edge/backends/tvm/gemm.py): the kernel against float64 numpy
for every epilogue and row tail, the Relax rewrite's epilogue fusion on a small graph, a real CRATE
through options.gemm both ways, and the option's refusal. The kernel is AVX-512 code: on a host
without AVX-512 it is built (x86-64-v4) but not run, and those tests say so."""

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'crate-edge[tvm]')")

from crate_edge import CrateEdgeError, load_model  # noqa: E402
from crate_edge import isa as isa_mod  # noqa: E402
from crate_edge.backends.tvm import gemm  # noqa: E402
from crate_edge.backends.tvm.lower import _import, build  # noqa: E402
from crate_edge.backends.tvm.target import make_target  # noqa: E402
from crate_edge.compiler import compile  # noqa: E402

QUIET = dict(log=lambda s: None)
V4 = not isa_mod.missing(isa_mod.requirement("x86-64-v4"))
needs_v4 = pytest.mark.skipif(not V4, reason="this host has no AVX-512 (x86-64-v4): the kernel is built, not run")


def _reference(a, w, bias, r, epilogue):
    y = a.astype(np.float64) @ w.astype(np.float64).T
    if epilogue:
        y = y + bias
    if epilogue.startswith("residual"):
        y = y + r
    return np.maximum(y, 0) if epilogue.endswith("relu") else y


@pytest.mark.parametrize("epilogue", gemm.EPILOGUES)
def test_kernel_matches_float64_for_every_epilogue_and_row_tail(epilogue):
    K, N = 40, 64
    tgt = make_target({"kind": "llvm"}, "x86-64-v4")
    lib = tvm.compile(tvm.IRModule({"main": gemm.gemm_f32(K, N, "main", epilogue)}), target=tgt)
    if not V4:
        pytest.skip("this host has no AVX-512 (x86-64-v4): the kernel was built, not run")
    rng = np.random.default_rng(len(epilogue))
    w = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    dev = tvm.cpu()
    # 1 row, under one 7-row buffer, one buffer + a row, whole 14-row tiles, a tail of 8 rows past
    # the last tile, more rows than one task's block (ROWS) with a tail
    for m in (1, 6, 7, 8, 14, 22, 197, gemm.ROWS + 3):
        a = rng.standard_normal((m, K)).astype(np.float32)
        r = rng.standard_normal((m, N)).astype(np.float32)
        args = [tvm.runtime.tensor(a, dev), tvm.runtime.tensor(gemm.pack_weight(w), dev)]
        if epilogue:
            args.append(tvm.runtime.tensor(bias, dev))
        if epilogue.startswith("residual"):
            args.append(tvm.runtime.tensor(r, dev))
        c = tvm.runtime.tensor(np.full((m, N), np.nan, np.float32), dev)  # every element must be written
        lib(*args, c)
        ref = _reference(a, w, bias, r, epilogue)
        assert np.abs(c.numpy() - ref).max() <= 1e-5 * np.abs(ref).max(), (m, epilogue)


class Block(torch.nn.Module):
    """qkv-like map without bias, an out map + residual, a folded-ISTA-like relu(x W + b), and a
    head whose 10 columns are no whole panel (stays a matmul)."""

    def __init__(self):
        super().__init__()
        self.u = torch.nn.Linear(64, 64, bias=False)
        self.o = torch.nn.Linear(64, 64)
        self.i = torch.nn.Linear(64, 96)
        self.h = torch.nn.Linear(96, 10)

    def forward(self, x):
        x = x + self.o(self.u(x))
        return self.h(torch.relu(self.i(x)))


def test_rewrite_fuses_bias_residual_and_relu_and_keeps_what_does_not_fit():
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 9, 64)
    mod, _ = _import(torch.export.export(m, (x,)))
    tgt = make_target({"kind": "llvm"}, "x86-64-v4")
    out, counts = gemm.handwritten_gemms(mod, tgt)
    assert counts == {"": 1, "bias": 0, "bias_relu": 1, "residual": 1, "residual_relu": 0}, counts
    names = [gv.name_hint for gv in out.get_global_vars()]
    assert "gemm_f32_k64_n64_residual" in names and "gemm_f32_k64_n96_bias_relu" in names, names
    assert not [n for n in names if "n10" in n], names  # the head is left to the schedule
    # an AVX2 target takes none: the kernel is AVX-512 code
    assert gemm.handwritten_gemms(mod, make_target({"kind": "llvm"}, "x86-64-v3"))[1] == dict.fromkeys(gemm.EPILOGUES, 0)
    ex = build(out, tgt)
    if not V4:
        pytest.skip("this host has no AVX-512 (x86-64-v4): the rewritten module was built, not run")
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))
    got = (got[0] if not hasattr(got, "numpy") else got).numpy()
    assert np.abs(got - m(x).detach().numpy()).max() <= 1e-5


@pytest.fixture(scope="module")
def ref(ref_ckpt):
    return load_model(ref_ckpt, heads=4)


def _target(tmp_path, how):
    p = tmp_path / f"tvm-gemm-{how}.toml"
    p.write_text(f'backend = "tvm"\nisa = "x86-64-v4"\nrewrites = ["shift_patch_norm", "fold_ista"]\n[options]\ngemm = "{how}"\n')
    return p


@needs_v4
def test_crate_through_both_gemm_options_agrees(ref, tmp_path):
    hand = compile(ref, _target(tmp_path, "handwritten"), out=tmp_path / "h", parity_limit=100, **QUIET)
    sched = compile(ref, _target(tmp_path, "schedule"), out=tmp_path / "s", parity_limit=100, **QUIET)
    counts = hand.manifest["backend"]["gemm_f32"]
    # per layer: the q = k = v map, the out map with MSSA's residual, the folded ISTA with its ReLU
    assert counts[""] == counts["residual"] == counts["bias_relu"] == ref.cfg.depth, counts
    assert "gemm_f32" not in sched.manifest["backend"]
    assert hand.manifest["parity"]["passed"] and hand.manifest["parity"]["max_abs"] <= 1e-4
    x = torch.randn(3, *ref.cfg.input_shape, generator=torch.Generator().manual_seed(1)).numpy()
    assert np.abs(hand(x) - sched(x)).max() <= 1e-5


def test_unknown_gemm_option(ref, tmp_path):
    with pytest.raises(CrateEdgeError, match="options.gemm = 'blas'; known: handwritten, schedule"):
        compile(ref, _target(tmp_path, "blas"), out=tmp_path / "a", parity_limit=20, **QUIET)
    assert not (tmp_path / "a").exists()
