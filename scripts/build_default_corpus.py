"""Build ``accel_tp/assets/default_corpus.txt.gz``, the embedded default training corpus.

Source and licence
------------------
The text is the Python language-reference help topics that ship with CPython in
``pydoc_data.topics.topics`` (the text behind ``help("if")`` etc.), generated from the
CPython documentation. It is Copyright (c) Python Software Foundation and distributed
under the PSF License Agreement / Zero-Clause BSD (the licence of the Python
documentation), which permits redistribution; see https://docs.python.org/3/license.html.

Format
------
UTF-8 text, gzip-compressed (``mtime=0`` so the bytes are reproducible). Documents are
separated by one blank line (``"\\n\\n"``); a document never contains a blank line but may
span several lines (a section heading or signature line, then a paragraph). The file
holds nothing but documents.

Procedure (deterministic: topics are visited in sorted key order)
-----------------------------------------------------------------
* each topic is split into paragraphs at blank lines;
* heading underlines (``****``, ``====``...) are dropped and the heading text, like an API
  signature line (``str.rfind(sub[, start[, end]])``) or a very short lead-in
  ("See also:"), is prefixed to the next prose paragraph;
* code is dropped with cheap heuristics: interactive sessions (``>>>``), grammar rules
  (``::=``), literal blocks (indented deeper than the preceding paragraph, which ends
  with ``:``), and paragraphs that are mostly symbols or start with Python keywords;
* whitespace is normalised (every paragraph becomes a single line of single spaces);
* paragraphs longer than ``MAX_DOC_CHARS`` are split at sentence boundaries;
* repeated documents (several topics share sections) are kept once, first copy wins.

The output depends on the CPython version that runs this script (the topics change
between releases); the committed asset was built with the version named in
``--check`` output. Rebuilding changes the corpus hash, so cached default tokenizers are
retrained automatically.

Usage::

    python scripts/build_default_corpus.py            # (re)write the asset
    python scripts/build_default_corpus.py --check    # compare with the committed asset
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import statistics
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_PATH = REPO_ROOT / "accel_tp" / "assets" / "default_corpus.txt.gz"

MAX_DOC_CHARS = 400  # longer paragraphs are split at sentence boundaries
MIN_CHUNK_CHARS = 100  # smallest sentence-chunk budget when splitting long paragraphs
MIN_DOC_CHARS = 40  # shorter standalone pieces are prefixed to the next paragraph
MAX_PREFIX_LINES = 3  # more heading/signature lines in a row than this is a code listing

_UNDERLINE_RE = re.compile(r"^([*=\-^~#\"'`+])\1{2,}$")
_SIGNATURE_RE = re.compile(r"^((class|classmethod|staticmethod|async|await) )?[\w.]+(\(.*\))?( \[[^ ]*\])*$")
_CODE_START_RE = re.compile(
    r"^(>>>|\.\.\. |def |class |import |from \S+ import|return\b|if .*:$|for .*:$|while .*:$|"
    r"try:|except\b|finally:|with .*:$|async |await |@\w|#|print\(|raise |\w+ = |\w+\.\w+\(.*\)$)"
)
_SENTENCE_SPLIT_RE = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\betc\.)(?<=[.!?])\s+(?=[A-Z\"(*])")
_LIST_MARKER_RE = re.compile(r"^(\*|-|\d+\.|\(\d+\)|\[\d+\]|[a-z]\.)\s")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _alpha_ratio(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c.isalpha() or c in "_.,;:'\"’()-–" for c in chars) / len(chars)


def _is_literal_block(lines: list[str], prev_prose: list[str] | None) -> bool:
    """Interactive session, grammar rule, or Sphinx literal block (indented deeper than the
    preceding prose paragraph, which ends with ':')."""
    first = lines[0].strip()
    if "::=" in "\n".join(lines) or first.startswith((">>>", "...")):
        return True
    return (
        prev_prose is not None
        and not _LIST_MARKER_RE.match(first)
        and _indent(lines[0]) > _indent(prev_prose[0])
        and prev_prose[-1].rstrip().endswith(":")
        and len(_normalise(" ".join(prev_prose)).split()) > 3  # not a "Note:" style label
    )


def _looks_like_code(lines: list[str]) -> bool:
    """Mostly lines that start like Python statements, or mostly symbols."""
    if _LIST_MARKER_RE.match(lines[0].strip()):
        return False
    code_lines = sum(bool(_CODE_START_RE.match(line.strip())) for line in lines)
    return code_lines * 2 >= len(lines) or _alpha_ratio("\n".join(lines)) < 0.85


def _is_prefix(lines: list[str]) -> bool:
    """Short heading/signature lines that introduce the next paragraph."""
    if len(lines) > MAX_PREFIX_LINES:
        return False
    return all(_SIGNATURE_RE.match(line.strip()) and len(line.strip()) < 80 for line in lines)


def _split_long(paragraph: str) -> list[str]:
    """Split a long paragraph at sentence boundaries into chunks of varied length.

    The chunk budget is drawn deterministically (CRC32 of the paragraph) from
    ``[MIN_CHUNK_CHARS, MAX_DOC_CHARS]`` so that document lengths stay varied.
    """
    if len(paragraph) <= MAX_DOC_CHARS:
        return [paragraph]
    budget = MIN_CHUNK_CHARS + zlib.crc32(paragraph.encode("utf-8")) % (MAX_DOC_CHARS - MIN_CHUNK_CHARS)
    chunks: list[str] = []
    current = ""
    for sentence in _SENTENCE_SPLIT_RE.split(paragraph):
        if current and len(current) + 1 + len(sentence) > budget:
            chunks.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        chunks.append(current)
    return chunks


def topic_documents(text: str) -> Iterator[str]:
    """Yield the prose documents of one help topic."""
    prefix: list[str] = []
    prev_prose: list[str] | None = None
    for block in re.split(r"\n[ \t]*\n", text):
        # drop blank lines and ASCII-table rows ("+----+", "| a | b |")
        lines = [line.rstrip() for line in block.split("\n") if line.strip() and line.strip()[0] not in "+|"]
        if not lines:
            continue
        # heading: "Title\n*****"
        if len(lines) >= 2 and _UNDERLINE_RE.match(lines[-1].strip()):
            prefix = [_normalise(" ".join(lines[:-1]))]
            prev_prose = None
            continue
        if _is_literal_block(lines, prev_prose):
            prefix = []  # a lead-in that introduced dropped code is dropped too
            continue
        if _is_prefix(lines):
            prefix = [*prefix, *(_normalise(line) for line in lines)][-MAX_PREFIX_LINES:]
            prev_prose = lines
            continue
        if _looks_like_code(lines):
            prefix = []
            continue
        paragraph = _normalise(" ".join(lines))
        prev_prose = lines
        if len(paragraph) < MIN_DOC_CHARS:
            prefix = [*prefix, paragraph][-MAX_PREFIX_LINES:]
            continue
        chunks = _split_long(paragraph)
        chunks[0] = "\n".join([*prefix, chunks[0]])
        prefix = []
        yield from chunks


def build_documents() -> list[str]:
    """All documents, topics in sorted key order."""
    docs: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        for doc in topic_documents(topics[key]):
            doc = doc.strip()
            body = doc.rsplit("\n", 1)[-1]
            # Several topics repeat whole sections (e.g. "customization" and "specialnames"):
            # keep the first copy only. No document may be empty or contain a blank line.
            if doc and "\n\n" not in doc and body not in seen:
                seen.add(body)
                docs.append(doc)
    return docs


def encode(docs: list[str]) -> bytes:
    return "\n\n".join(docs).encode("utf-8") + b"\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT_PATH)
    parser.add_argument("--check", action="store_true", help="only compare with the existing asset")
    args = parser.parse_args()

    docs = build_documents()
    raw = encode(docs)
    lengths = [len(d) for d in docs]
    print(
        f"python {sys.version.split()[0]}: {len(topics)} topics -> {len(docs)} documents, "
        f"{len(raw)} bytes, chars/doc mean {statistics.mean(lengths):.0f} "
        f"median {statistics.median(lengths):.0f} min {min(lengths)} max {max(lengths)}, "
        f"sha256 {hashlib.sha256(raw).hexdigest()[:16]}"
    )
    if args.check:
        existing = gzip.decompress(args.output.read_bytes()) if args.output.exists() else b""
        same = existing == raw
        print("asset is up to date" if same else "asset differs from a fresh build")
        return 0 if same else 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    compressed = gzip.compress(raw, compresslevel=9, mtime=0)
    args.output.write_bytes(compressed)
    print(f"wrote {args.output} ({len(compressed)} bytes compressed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
