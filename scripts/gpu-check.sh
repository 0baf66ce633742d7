#!/usr/bin/env bash
# GPU check on a CUDA machine: the fused-kernel tests (forward and every gradient against the
# plain references, raw and through Fusion), the attention-layer benchmark (12 heads of 64,
# r = 32, b = 256, contexts 1k to 32k, every variant, ratios against memory-lean softmax) and
# GPT-2 small training steps at 4k and 32k with recomputed blocks (learned polysketch with local
# blocks against memory-lean softmax). Takes a few minutes once built; results land in OUT
# (default gpu-check/).
#
#   scripts/gpu-check.sh [OUT]              build with --features cuda here, then run here
#   scripts/gpu-check.sh --bundle DIR       build only, and put the two binaries and a run.sh
#                                           into DIR, for a GPU machine without a Rust toolchain:
#                                           copy DIR there and run `DIR/run.sh [OUT]`
#
# cudarc picks the CUDA version from `nvcc --version` when it builds; without nvcc, set it to the
# GPU machine's version, e.g. CUDARC_CUDA_VERSION=13000 for CUDA 13.0.
set -euo pipefail
cd "$(dirname "$0")/.."

features="polysketch-attention/cuda,polysketch-train/cuda"
target="${CARGO_TARGET_DIR:-target}"

build() {
  cargo build --release --locked -p polysketch-train --features "$features" >&2
  cargo test --release --locked -p polysketch-attention --features cuda --test gpu_kernels \
    --no-run --message-format json-render-diagnostics |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_kernels" and m.get("executable"):
        print(m["executable"])' | tail -n 1
}

# The check itself, given the two binaries: written once, used here and inside a bundle.
read -r -d '' check <<'EOF' || true
set -euo pipefail
tests="$1"; polysketch="$2"; out="$3"
mkdir -p "$out"
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1' && [ -z "${LD_LIBRARY_PATH:-}" ]; then
  echo "warning: libcuda.so.1 not found by ldconfig; the CUDA runtime may fail to load" >&2
fi
echo "== kernel tests (CUDA)"
"$tests" --test-threads 1 cuda:: 2>&1 | tee "$out/kernel-tests.txt"
echo "== attention layer benchmark (CUDA)"
"$polysketch" bench layer --device cuda --min-seconds 1 --max-seconds 60 --out "$out" 2>&1 |
  tee "$out/bench-layer.txt"
echo "== GPT-2 small training step (CUDA, recomputed blocks)"
"$polysketch" bench step --device cuda --preset small --vocab 32768 --contexts 4096,32768 \
  --variants softmax,polysketch-learned-local --recompute --min-seconds 0 --max-seconds 120 \
  --out "$out" 2>&1 | tee "$out/bench-step.txt"
echo "results in $out"
EOF

if [ "${1:-}" = "--bundle" ]; then
  dir="${2:?usage: scripts/gpu-check.sh --bundle DIR}"
  tests="$(build)"
  mkdir -p "$dir"
  cp "$tests" "$dir/gpu_kernels"
  cp "$target/release/polysketch" "$dir/polysketch"
  strip "$dir/gpu_kernels" "$dir/polysketch" 2>/dev/null || true
  {
    echo '#!/usr/bin/env bash'
    echo 'here="$(cd "$(dirname "$0")" && pwd)"'
    echo 'set -- "$here/gpu_kernels" "$here/polysketch" "${1:-gpu-check}"'
    echo "$check"
  } > "$dir/run.sh"
  chmod +x "$dir/run.sh"
  echo "bundle in $dir: copy it to the GPU machine and run $dir/run.sh [OUT]"
else
  out="${1:-gpu-check}"
  tests="$(build)"
  bash -c "$check" check "$tests" "$target/release/polysketch" "$out"
fi
