"""A stage's output directory: assembled in private, published whole, one version at a time.

Every stage that writes an output (ingest, tag and augment their datasets, select its LoRA,
generate its images) goes through :class:`OutputStaging` (or :func:`staged_output`), so the
guarantees hold in one place:

- **Whole or not at all.** Files are written into a private staging directory; nothing is
  visible at the destination until the stage succeeds, and an exception publishes nothing.
- **The old version until the new one is whole.** Locally the staging directory is swapped
  with the old output in one ``renameat2(RENAME_EXCHANGE)`` (two renames where the system has
  no exchange). On S3, where many objects cannot change at once, the files go under a fresh
  version prefix, ``<dest>/v-<time>-<id>/``, and the pointer ``<dest>/_MANIFEST.json`` is
  written last, in one PUT; readers follow it (:func:`lorapipe.store.resolve`). At every
  moment exactly one whole version is readable.
- **Exactly what the manifest lists.** After a publish the output holds its manifest's files
  and nothing else: the old version, leftovers of crashed publishes (orphaned versions, hidden
  ``.<name>.*.tmp`` staging folders, abandoned multipart uploads) are deleted then, never before.
- **Only an older output of the same kind is replaced**, never a user's photos or another
  stage's output (:class:`OutputKind`).
- **One writer.** The output is held (:mod:`lorapipe.writer_lock`) from the first check to the
  end; a second run into it stops at once, naming the holder, and a run whose S3 lease was
  taken over finds out before it moves the pointer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from lorapipe import __version__, store, writer_lock
from lorapipe.errors import LorapipeError, StorageError

VERSION_PATTERN = re.compile(r"v-\d{8}T\d{6}Z-[0-9a-f]{8}")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class OutputKind:
    """What a stage's output directory is, so that an older output of the same kind, and
    nothing else (a user's photos, another stage's output), is ever replaced."""

    name: str  # for messages, e.g. "a lorapipe dataset"
    markers: tuple[str, ...]  # files every output of this kind has
    error: type[LorapipeError] = StorageError
    refusal: str = (
        "'{uri}' holds files that are not {name}; write to a new or empty folder "
        "(lorapipe replaces only an older output of the same kind)"
    )


class OutputStaging:
    """A private directory (``path``) to assemble the output at ``dest_uri`` in.

    ``publish()`` makes it the output; ``discard()`` drops it. Use :func:`staged_output`
    where the output is written inside one ``with`` block.
    """

    def __init__(self, dest_uri: str, kind: OutputKind) -> None:
        self.dest_uri = str(dest_uri)
        self.kind = kind
        self._held = contextlib.ExitStack()
        self._lock = self._held.enter_context(writer_lock.hold(self.dest_uri))
        try:
            check_replaceable(self.dest_uri, kind)
            self.path = _make_staging_dir(self.dest_uri)
        except BaseException:
            self._held.close()
            raise

    def publish(self) -> None:
        """Publish ``path`` as the output (see the module docstring); ``path`` is consumed."""
        try:
            check_replaceable(self.dest_uri, self.kind)  # again: something may have appeared
            manifest = store.manifest_for(self.path)
            if store.is_s3(self.dest_uri):
                _publish_s3(self.path, self.dest_uri, manifest, self._lock)
            else:
                _write_json(self.path / store.MANIFEST_NAME, manifest)
                _publish_local(self.path, Path(_local(self.dest_uri)))
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop the staging directory and let the output go."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._held.close()

    def __enter__(self) -> OutputStaging:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.publish()
        else:
            self.discard()


@contextlib.contextmanager
def staged_output(dest_uri: str, kind: OutputKind) -> Iterator[Path]:
    """A local directory to write an output into; published whole at ``dest_uri`` when the
    block succeeds, removed either way."""
    with OutputStaging(dest_uri, kind) as staging:
        yield staging.path


def check_replaceable(dest_uri: str, kind: OutputKind) -> None:
    """Raise ``kind.error`` unless ``dest_uri`` is absent, empty, an older output of ``kind``
    (all its markers present) or only the leftovers of a first publish that crashed."""
    dest_uri = str(dest_uri)
    if store.is_s3(dest_uri):
        names, recognised = _s3_contents(dest_uri, kind)
    else:
        destination = Path(_local(dest_uri))
        if destination.exists() and not destination.is_dir():
            raise kind.error(f"'{dest_uri}' is a file; give a folder")
        names = set(os.listdir(destination)) if destination.is_dir() else set()
        recognised = all((destination / marker).is_file() for marker in kind.markers)
    if names and not recognised:
        raise kind.error(kind.refusal.format(uri=dest_uri, name=kind.name))


def _s3_contents(dest_uri: str, kind: OutputKind) -> tuple[set[str], bool]:
    """(names under the prefix, whether they are an output of ``kind`` or crash leftovers)."""
    base = dest_uri.rstrip("/") + "/"
    names = {uri.removeprefix(base) for uri in store.list_uris(dest_uri)}
    names.discard(writer_lock.LEASE_NAME)
    manifest = store.read_manifest(dest_uri) if store.MANIFEST_NAME in names else None
    if manifest is not None and manifest.get(store.VERSION_KEY) is not None:
        return names, set(kind.markers) <= set(manifest["files"])
    leftovers = all(VERSION_PATTERN.fullmatch(name.split("/", 1)[0]) for name in names)
    return names, leftovers or set(kind.markers) <= names


def _make_staging_dir(dest_uri: str) -> Path:
    """A hidden sibling of a local destination (publishing is then a rename on one
    filesystem); a temporary directory for S3."""
    if store.is_s3(dest_uri):
        return Path(tempfile.mkdtemp(prefix="lorapipe-output-"))
    destination = Path(_local(dest_uri))
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    return staging


# --------------------------------------------------------------------------- local


def _publish_local(staging: Path, destination: Path) -> None:
    if not destination.exists():
        os.rename(staging, destination)
    elif _exchange(staging, destination):
        shutil.rmtree(staging)  # the old output, now at the staging path
    else:
        retired = destination.parent / f".{destination.name}.{uuid.uuid4().hex[:8]}.old"
        os.rename(destination, retired)
        try:
            os.rename(staging, destination)
        except OSError:
            os.rename(retired, destination)
            raise
        shutil.rmtree(retired)
    _remove_local_leftovers(destination)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the C library or the filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    status = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _remove_local_leftovers(destination: Path) -> None:
    """Staging and retired folders of earlier publishes of this output that crashed."""
    hidden = glob.escape(f".{destination.name}.")
    for pattern in (f"{hidden}*.tmp", f"{hidden}*.old"):
        for leftover in destination.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _local(uri: str) -> str:
    return uri.removeprefix("file://")


# --------------------------------------------------------------------------- S3


def _publish_s3(staging: Path, dest_uri: str, manifest: dict, lock: writer_lock.WriterLock) -> None:
    """Upload under a fresh version prefix, then swap the pointer, then delete the rest."""
    version = new_version()
    store.upload_files(staging, store.join(dest_uri, version), manifest["files"])
    pointer = {store.VERSION_KEY: version, **manifest, "written_by": f"lorapipe {__version__}"}
    lock.check()  # a run whose lease was taken over must not move the pointer
    store.write_text(store.join(dest_uri, store.MANIFEST_NAME), json.dumps(pointer, indent=1))
    keep = {store.join(dest_uri, store.MANIFEST_NAME), store.join(dest_uri, writer_lock.LEASE_NAME)}
    keep.update(store.join(dest_uri, version, name) for name in manifest["files"])
    store.delete_many([uri for uri in store.list_uris(dest_uri) if uri not in keep])
    store.abort_uploads(dest_uri)


def new_version() -> str:
    """A fresh version prefix: sortable by time, unique by its random part."""
    return f"v-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=1, sort_keys=True), encoding="utf-8")
