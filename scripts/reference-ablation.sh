#!/usr/bin/env bash
# The reference ablation: trains every run of configs/ablation.toml (tiny model, 1k and 4k
# context, four attention variants, two seeds, equal token budgets) on the CPU, then copies the
# summary table and the charts into docs/ablation/. Finished runs are skipped and interrupted
# ones resumed, so the script can be stopped and started again.
#
#   scripts/reference-ablation.sh [RUNS_DIR]     (default runs/ablation)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/ablation}"
cargo run --release --locked -p polysketch-train -- sweep \
  --config configs/tiny.toml --grid configs/ablation.toml \
  --set train.eval_batches=4 --out "$out"
mkdir -p docs/ablation
cp "$out/summary.md" "$out/summary.csv" "$out/val_loss.svg" "$out/tokens_per_sec.svg" docs/ablation/
echo "docs/ablation/ updated from $out"
