"""Two text domains from files already on the machine, for the natural-text forgetting benchmark (no downloads).

- **P, prose**: English licence and package documentation under ``/usr/share``, in two parts of about equal
  size: (1) ``common-licenses/*``, ``doc/*/copyright`` and ``doc/*/README*``; (2) package change logs and news,
  ``doc/*/changelog*`` and ``doc/*/NEWS*`` (``.gz`` decompressed). Licence texts and change-log entries repeat
  across packages, so paragraphs are deduplicated (the first occurrence in sorted path order is kept). Each part
  is split into training and held-out text on its own, so both splits mix the parts alike.
- **C, code**: Python sources of the standard library, ``/usr/lib/python3.*/**/*.py`` (test suites and
  installed third-party packages left out).

Why this pair: both are plain text a byte-level model can learn in minutes, and they differ in what there is to
know (natural English against Python's syntax and identifiers) while sharing an alphabet and some vocabulary, so
tuning on C can both help and overwrite what a model learnt on P.

Each domain becomes ``{"text": ...}`` JSONL records of whole lines packed into chunks of at most ``--chunk``
UTF-8 bytes (one byte is one token of the embedded byte tokenizer, so a chunk plus BOS and EOS fits a 512-token
window). Held-out files are chosen by a hash of the source path, so no held-out chunk shares a file with a
training chunk. Everything is deterministic for a given machine's files.

    python experiments/forgetting/natural_data.py --out .natural-data

writes ``prose_train.jsonl``, ``prose_heldout.jsonl``, ``code_train.jsonl``, ``code_heldout.jsonl`` and
``manifest.json`` (files, chunk counts, bytes).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

PROSE_GLOBS = ("/usr/share/common-licenses/*", "/usr/share/doc/*/copyright", "/usr/share/doc/*/README*")
PROSE_LOG_GLOBS = ("/usr/share/doc/*/changelog*", "/usr/share/doc/*/NEWS*")
CODE_GLOBS = ("/usr/lib/python3.*/**/*.py",)
CODE_SKIP = ("/test/", "/tests/", "/site-packages/", "/dist-packages/", "/idle_test/", "/lib2to3/tests/")


def _read_text(path: str) -> str | None:
    """The file as UTF-8 text (``.gz`` decompressed), or None when it is not readable UTF-8 text."""
    try:
        raw = Path(path).read_bytes()
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    text = text.replace("\r\n", "\n").replace("\x00", "")
    return text if text.strip() else None


def source_files(globs: Iterable[str], skip: Iterable[str] = ()) -> list[str]:
    paths = {p for g in globs for p in glob.glob(g, recursive=True)}
    return sorted(p for p in paths if os.path.isfile(p) and not any(s in p for s in skip))


def prose_documents(paths: list[str], seen: set[bytes] | None = None) -> Iterator[tuple[str, str]]:
    """(path, text) with paragraphs already seen (in an earlier file, or in ``seen``) removed."""
    seen = set() if seen is None else seen
    for path in paths:
        text = _read_text(path)
        if text is None:
            continue
        kept = []
        for para in text.split("\n\n"):
            key = hashlib.sha1(" ".join(para.split()).encode()).digest()
            if para.strip() and key not in seen:
                seen.add(key)
                kept.append(para)
        if kept:
            yield path, "\n\n".join(kept)


def code_documents(paths: list[str]) -> Iterator[tuple[str, str]]:
    for path in paths:
        text = _read_text(path)
        if text is not None:
            yield path, text


def chunks(text: str, limit: int) -> Iterator[str]:
    """Whole lines packed into chunks of at most ``limit`` UTF-8 bytes; a longer line is cut at character
    boundaries. Chunks holding only whitespace are dropped."""
    buf: list[str] = []
    size = 0

    def pieces(line: str) -> Iterator[str]:
        while len(line.encode()) > limit:
            cut = limit
            while len(line[:cut].encode()) > limit:
                cut -= 1
            yield line[:cut]
            line = line[cut:]
        yield line

    for raw in text.splitlines(keepends=True):
        for line in pieces(raw):
            n = len(line.encode())
            if size + n > limit and buf:
                out = "".join(buf)
                if out.strip():
                    yield out
                buf, size = [], 0
            buf.append(line)
            size += n
    out = "".join(buf)
    if out.strip():
        yield out


def held_out(path: str, share: float) -> bool:
    """Stable per-path choice: the same file is held out on every run."""
    h = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big")
    return h / 2**64 < share


def split_domain(docs: Iterable[tuple[str, str]], limit: int, share: float, max_train_bytes: int,
                 max_heldout_bytes: int) -> tuple[list[str], list[str], dict]:
    train: list[str] = []
    heldout: list[str] = []
    sizes = {"train": 0, "heldout": 0}
    files = {"train": 0, "heldout": 0}
    for path, text in docs:
        side = "heldout" if held_out(path, share) else "train"
        cap = max_heldout_bytes if side == "heldout" else max_train_bytes
        if sizes[side] >= cap:
            continue
        files[side] += 1
        target = heldout if side == "heldout" else train
        for c in chunks(text, limit):
            target.append(c)
            sizes[side] += len(c.encode())
    return train, heldout, {"bytes": sizes, "files": files, "chunks": {"train": len(train), "heldout": len(heldout)}}


def write_jsonl(texts: list[str], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def prepare(out: Path, *, chunk: int = 510, heldout_share: float = 0.08, prose_mb: float = 12.0,
            code_mb: float = 6.0, heldout_kb: float = 256.0, prose_globs=PROSE_GLOBS, log_globs=PROSE_LOG_GLOBS,
            code_globs=CODE_GLOBS) -> dict:
    """Write the four JSONL files and ``manifest.json`` into ``out``; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"chunk_bytes": chunk, "heldout_share": heldout_share, "domains": {}}
    seen: set[bytes] = set()  # shared by the two prose parts: a paragraph counts once in the whole domain
    half_mb, half_kb = prose_mb / 2, heldout_kb / 2
    parts = {  # name: (documents, training cap MiB, held-out cap KiB, globs for the error message)
        "prose/docs": (prose_documents(source_files(prose_globs), seen), half_mb, half_kb, prose_globs),
        "prose/logs": (prose_documents(source_files(log_globs), seen), half_mb, half_kb, log_globs),
        "code": (code_documents(source_files(code_globs, CODE_SKIP)), code_mb, heldout_kb, code_globs),
    }
    texts: dict[str, tuple[list[str], list[str]]] = {}
    for name, (docs, cap_mb, cap_kb, globs) in parts.items():
        train, heldout, info = split_domain(docs, chunk, heldout_share, int(cap_mb * 2**20), int(cap_kb * 2**10))
        if not train or not heldout:
            raise SystemExit(f"{name}: not enough text found under {globs}")
        domain = name.split("/")[0]
        t, h = texts.setdefault(domain, ([], []))
        t += train
        h += heldout
        manifest["domains"][name] = info
    for domain, (train, heldout) in texts.items():
        write_jsonl(train, out / f"{domain}_train.jsonl")
        write_jsonl(heldout, out / f"{domain}_heldout.jsonl")
    tmp = out / "manifest.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out / "manifest.json")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(".natural-data"))
    p.add_argument("--chunk", type=int, default=510, help="UTF-8 bytes per chunk at most")
    p.add_argument("--prose-mb", type=float, default=12.0, help="cap on prose training text (MiB)")
    p.add_argument("--code-mb", type=float, default=6.0, help="cap on code training text (MiB)")
    p.add_argument("--heldout-kb", type=float, default=256.0, help="cap on each held-out set (KiB)")
    args = p.parse_args(argv)
    manifest = prepare(args.out, chunk=args.chunk, prose_mb=args.prose_mb, code_mb=args.code_mb,
                       heldout_kb=args.heldout_kb)
    print(json.dumps(manifest["domains"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
