"""The contract every backend keeps, checked the same way for each: declared capabilities that
the shipped target files stay within, availability as data, and on the cheapest real model:
compile, load through crate_edge.runtime, run, refuse a wrong input shape in one line, and
refuse an artifact whose files no longer match its manifest. A backend that cannot compile
here is skipped with the reason."""

import json

import numpy as np
import pytest
import torch

import crate_edge
from crate_edge.backends import BACKENDS, get_backend
from crate_edge.backends.base import ACTIVATION_SCALING, DEVICES, PRECISION_KEYS, PRECISIONS, Availability, Capabilities
from crate_edge.errors import CrateEdgeError
from crate_edge.quantize import SCHEMES
from crate_edge.runtime import load
from crate_edge.targets import list_targets, load_target

# the float target that exercises each backend on this CPU (TensorRT: its ONNX network)
PRIMARY = {
    "onnxruntime": "onnxruntime",
    "executorch": "executorch",
    "tvm": "tvm",
    "coreml": "coreml",
    "tensorrt": "tensorrt",
    "aoti": "aoti",
}


def test_every_registered_backend_has_a_contract_target():
    assert set(PRIMARY) == set(BACKENDS)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_capabilities_are_declared_data_that_the_target_files_stay_within(name):
    be = get_backend(name)
    cap = be.capabilities
    assert isinstance(cap, Capabilities)
    assert cap.devices and set(cap.devices) <= set(DEVICES)
    assert cap.precisions and set(cap.precisions) <= set(PRECISIONS)
    assert set(cap.quant_schemes) <= set(SCHEMES) and set(cap.quant_schemes.values()) <= set(ACTIVATION_SCALING)
    assert cap.compile_needs and cap.run_needs and cap.distributions and cap.extra
    json.dumps(cap.to_dict())  # data, not code
    for t in (load_target(n) for n in list_targets()):
        if t.backend != name:
            continue
        assert t.precision in cap.precisions, t.name
        assert t.device in cap.devices, t.name
        if t.quantize:
            assert t.quantize["scheme"] in cap.quant_schemes, t.name


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_availability_is_data(name):
    be = get_backend(name)
    for av in (
        be.available(),
        be.available(run=True),
        be.available(load_target(PRIMARY[name])),
        be.available(load_target(PRIMARY[name]), run=True),
    ):
        assert isinstance(av, Availability) and isinstance(av.ok, bool)
        assert av.ok or (av.reason and "\n" not in av.reason)
        ok, why = av  # unpacks
        assert bool(av) is ok


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from tests.procs import small_model_and_data

    tmp = tmp_path_factory.mktemp("contract")
    return (*small_model_and_data(tmp), tmp)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_compile_load_run_refuse(name, small):
    model_dir, data, tmp = small
    t = load_target(PRIMARY[name])
    be = get_backend(name)
    ok, why = be.available(t)
    if not ok:
        pytest.skip(f"{name} cannot compile here: {why}")
    art = crate_edge.compile(model_dir, t, out=tmp / name, parity_data=str(data), log=lambda s: None)
    m = art.manifest
    # compile: the files it listed exist and are hashed; one precision-map shape
    assert m["backend"]["name"] == name and m["files"]
    for f in m["files"]:
        assert (art.path / f).exists(), f
    assert sorted(m["precision"]) == sorted(PRECISION_KEYS) and m["precision"]["default"] in PRECISIONS
    assert m["parity"]["passed"], m["parity"]
    # load and run (a stand-in executor where this backend cannot execute here, labelled so)
    runner = load(art.path, reference_ok=True)
    if not be.available(t, run=True).ok:
        assert runner.executor != name and runner.detail == "reference"
    model = crate_edge.load_model(model_dir)
    x = np.load(data)["x"][:3]
    got = runner(x)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-2
    # bad input: one line, no traceback
    with pytest.raises(CrateEdgeError, match="shape") as e:
        runner(x[:, :, :-1])
    assert "\n" not in str(e.value)
    # manifest verification: a changed file is refused before anything runs
    victim = art.path / sorted(m["files"])[0]
    if victim.is_dir():
        victim = next(p for p in sorted(victim.rglob("*")) if p.is_file())
    data_bytes = bytearray(victim.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    victim.write_bytes(bytes(data_bytes))
    with pytest.raises(CrateEdgeError, match="sha256|hash|changed|modified"):
        load(art.path, reference_ok=True)
