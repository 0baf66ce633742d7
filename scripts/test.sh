#!/usr/bin/env bash
# The whole test suite: every crate's tests, and the fused GPU kernels on the wgpu backend
# against the plain references. Without a GPU the kernels run on Mesa's software Vulkan driver
# (llvmpipe); where no Vulkan driver is installed the script installs Mesa's with apt-get when it
# runs as root, and otherwise says what to install.
#
#   scripts/test.sh [CARGO TEST ARGUMENTS...]
set -euo pipefail
cd "$(dirname "$0")/.."

has_vulkan() {
  ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' &&
    { compgen -G '/usr/share/vulkan/icd.d/*.json' || compgen -G '/etc/vulkan/icd.d/*.json'; } >/dev/null
}
if ! has_vulkan; then
  packages=(mesa-vulkan-drivers libvulkan1)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing a software Vulkan driver for the GPU kernel tests: ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${packages[@]}" ||
      { apt-get update && apt-get install -y --no-install-recommends "${packages[@]}"; }
  else
    echo "error: no Vulkan driver found; the GPU kernel tests need one. Install Mesa's software" >&2
    echo "driver (Debian/Ubuntu: sudo apt-get install ${packages[*]}) and run again." >&2
    exit 1
  fi
fi
# Mesa warns on every device creation when this is unset
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

cargo test --release --locked --workspace \
  --features polysketch-attention/wgpu,polysketch-train/wgpu "$@"
