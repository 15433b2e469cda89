"""The sha256 of a model file, remembered by path, size and modification time.

It keys the converted copy of a single-file checkpoint and gives WebUI's ``Model hash`` (its
first 10 hex digits). Hashing a 7 GB SDXL file takes seconds and every stage resolves the base
model again, so the digest is kept in the model cache, as WebUI keeps its ``cache.json``; a file
that changed (other size or mtime) is hashed again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_CHUNK = 1 << 20


def file_sha256(path: Path, cache_root: Path) -> str:
    """The sha256 hex digest of the local file ``path``."""
    status = path.stat()
    identity = f"{path.resolve()}\0{status.st_size}\0{status.st_mtime_ns}"
    record = cache_root / "sha256" / hashlib.sha256(identity.encode()).hexdigest()[:32]
    if record.is_file():
        return record.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(f".{record.name}.{os.getpid()}")
    partial.write_text(digest.hexdigest() + "\n")
    os.replace(partial, record)
    return digest.hexdigest()
