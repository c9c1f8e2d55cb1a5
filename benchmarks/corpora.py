"""Public-domain English corpora of different kinds, as lists of documents, for the quality benchmarks.

- `kjv`: the King James Bible, one verse a document (recipes/data/bible_en_es.jsonl).
- `devil`: Ambrose Bierce, *The Devil's Dictionary* (1911): satirical definitions and verse. Debian package
  `dict-devil`, public domain (its copyright file says so).
- `jargon`: *The Jargon File* 4.4.7: hacker slang, technical prose. Debian package `dict-jargon`, public domain.

The two dictionaries come from Debian's archive (`apt-get download` needs no root; `dpkg-deb -x` unpacks it) into
benchmarks/.data/ and are read from their dictd files (gzip-compatible). A document is one dictionary entry, its
wrapped lines joined; the database's own header entries (`00-database-*`) are left out.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / ".data"
KJV = HERE.parent / "recipes" / "data" / "bible_en_es.jsonl"
DICTD = {"devil": "dict-devil", "jargon": "dict-jargon"}
DOMAINS = ("kjv", "devil", "jargon")


def documents(domain: str) -> list[str]:
    """The domain's documents in their canonical order (shuffle before splitting)."""
    if domain == "kjv":
        with open(KJV, encoding="utf-8") as handle:
            return [json.loads(line)["translation"]["en"] for line in handle]
    if domain in DICTD:
        return dictionary_entries(_dictd_text(domain))
    raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")


def _dictd_text(domain: str) -> str:
    path = DATA_DIR / f"{domain}.txt"
    if not path.exists():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", DICTD[domain]], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
            with gzip.open(Path(tmp, "usr", "share", "dictd", f"{domain}.dict.dz"), "rt", encoding="utf-8",
                           errors="replace") as handle:
                path.write_text(handle.read(), encoding="utf-8")
    return path.read_text(encoding="utf-8")


def dictionary_entries(text: str) -> list[str]:
    """Split a dictd text into entries: an entry starts at an unindented line after a blank line."""
    entries, current = [], []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        starts_entry = line and not line[0].isspace() and (i == 0 or not lines[i - 1].strip())
        if starts_entry and current:
            entries.append(current)
            current = []
        current.append(line)
    if current:
        entries.append(current)
    out = []
    for entry in entries:
        if entry[0].startswith("00-database") or entry[0].startswith("00database"):
            continue
        paragraphs = re.split(r"\n\s*\n", "\n".join(entry))
        body = "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
        if len(body.split()) >= 4:
            out.append(body)
    return out
