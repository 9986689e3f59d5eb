#!/usr/bin/env bash
# The one-shot GPU check: the parity suite on the device in f32 and f16, and the networks'
# speed at 512 px, one summary line per part.
#
#   tools/gpu_check.sh build [--device cpu]      # where cargo and the registry are: build the
#                                                # binaries (CUDA + cuDNN unless --device cpu)
#                                                # into gpu-check/bin (stripped, small enough to
#                                                # carry to a device machine without a network)
#   tools/gpu_check.sh run   [--device cuda:0]   # on the device machine: run them
#   tools/gpu_check.sh all   [--device D]        # both, here
#
# Everything `run` calls also runs on the CPU (`--device cpu`), so only the device changes on
# the day a GPU is lent. Fixtures: $IP2P_FIXTURES, else ../shared/fixtures, else
# shared/fixtures. The build reuses $IP2P_GPU_TARGET (default /var/tmp/ip2p-gpu-target).
# Designed to finish `run` in well under 10 minutes of GPU time.
set -uo pipefail
cd "$(dirname "$0")/.."

what="${1:-all}"
shift || true
device="cuda:0"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
out="gpu-check"
bin="$out/bin"

build() {
  local target="${IP2P_GPU_TARGET:-/var/tmp/ip2p-gpu-target}" features=()
  if [ "$device" != "cpu" ]; then
    features=(--features cuda,cudnn)
    if ! command -v nvcc >/dev/null 2>&1; then
      # nvcc from PyPI's CUDA wheels, as .ci/run does.
      local venv="${IP2P_CUDA_VENV:-/var/tmp/ip2p-cuda-venv}"
      [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet --disable-pip-version-check nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl
      local root
      root="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
      export PATH="$root/bin:$PATH" CUDA_HOME="$root" CUDA_PATH="$root"
      export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
    fi
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  fi
  mkdir -p "$bin"
  CARGO_TARGET_DIR="$target" cargo build --release --locked "${features[@]}" --bin ip2p || return 1
  local parity
  parity="$(CARGO_TARGET_DIR="$target" cargo test --release --locked "${features[@]}" --test parity --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "parity" and m.get("executable"):
        print(m["executable"])' | tail -1)"
  [ -n "$parity" ] || { echo "the parity test binary was not built" >&2; return 1; }
  cp "$target/release/ip2p" "$parity" "$bin/" && mv "$bin/$(basename "$parity")" "$bin/parity"
  strip "$bin/ip2p" "$bin/parity" 2>/dev/null || true
  du -sh "$bin"/*
}

fixtures() {
  for f in "${IP2P_FIXTURES:-}" ../shared/fixtures shared/fixtures; do
    if [ -n "$f" ] && [ -d "$f/parity" ]; then (cd "$f" && pwd); return; fi
  done
  echo "no fixtures (set IP2P_FIXTURES)" >&2
  return 1
}

run() {
  local fix summary=() t0 rc line
  fix="$(fixtures)" || return 1
  mkdir -p "$out"
  t0=$(date +%s)
  IP2P_FIXTURES="$fix" IP2P_TEST_DEVICE="$device" "$bin/parity" > "$out/parity.log" 2>&1
  rc=$?
  line="$(grep -E '^parity: [0-9]+ passed' "$out/parity.log" | tail -1)"
  summary+=("parity on $device (f32 and f16): ${line#parity: } (exit $rc, $(( $(date +%s) - t0 )) s; $out/parity.log)")
  for dtype in f32 f16; do
    t0=$(date +%s)
    "$bin/ip2p" bench --device "$device" --dtype "$dtype" --res 512 --reps 3 \
      --shapes "$fix/sd15-shapes" --tokenizer "$fix/clip-tokenizer" > "$out/bench-$dtype.jsonl" 2> "$out/bench-$dtype.log"
    rc=$?
    line="$(python3 - "$out/bench-$dtype.jsonl" <<'PY'
import json, sys
parts = []
for l in open(sys.argv[1]):
    try:
        m = json.loads(l)
    except ValueError:
        continue
    if "s" in m:
        parts.append(f'{m["component"]} {m["s"]:.4f} s')
print(", ".join(parts) or "no figures")
PY
)"
    summary+=("bench on $device $dtype 512 px: $line (exit $rc, $(( $(date +%s) - t0 )) s)")
  done
  echo
  echo "=== gpu check summary ($device)"
  printf '%s\n' "${summary[@]}"
}

case "$what" in
  build) build ;;
  run) run ;;
  all) build && run ;;
  *) echo "usage: tools/gpu_check.sh build|run|all [--device D]" >&2; exit 2 ;;
esac
