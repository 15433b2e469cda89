"""The input of ``lorapipe ingest`` as a local folder: a folder as it is, an archive extracted,
an S3 prefix fetched lazily. Nothing outside the input is ever read: a symlink leading out of
it, an archive member or S3 key with an absolute or ``..`` path and a link member are refused
and reported (``unsafe_path``) before any reading."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from lorapipe import store
from lorapipe.errors import InputError
from lorapipe.ingestion.drops import UNREADABLE, UNSAFE_PATH, Drop, one_line
from lorapipe.metadata_csv import METADATA_CSV

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


@dataclass
class Input:
    """The input as a local folder: every name is a file under ``root`` (for S3 once fetched)."""

    root: Path
    names: list[str]  # candidate image files, relative POSIX paths, sorted
    drops: list[Drop]  # files refused before reading them
    metadata: tuple[str, str] | None  # (uri, name for messages) of the metadata.csv beside them
    s3_prefix: str | None = None

    def path(self, name: str) -> Path:
        """The local file for ``name``; an S3 object is downloaded now, one at a time."""
        local = self.root / name
        if self.s3_prefix is not None and not local.exists():
            store.download_file(store.join(self.s3_prefix, name), local)
        return local

    def escapes(self, name: str) -> bool:
        """Whether ``name`` resolves outside the input, through a symlink or otherwise."""
        return not (self.root / name).resolve().is_relative_to(self.root)

    def known(self) -> set[str]:
        return set(self.names) | {drop.file for drop in self.drops}


@contextlib.contextmanager
def open_input(input_uri: str) -> Iterator[Input]:
    """The input as a local folder: a folder as it is, an archive extracted, an S3 prefix
    fetched lazily into a temporary folder."""
    if input_uri.lower().endswith(ARCHIVE_SUFFIXES):
        with (
            store.local_file(input_uri) as archive,
            tempfile.TemporaryDirectory(prefix="lorapipe-ingest-") as tmp,
        ):
            yield _extract_archive(archive, Path(tmp).resolve(), input_uri)
    elif store.is_s3(input_uri):
        with tempfile.TemporaryDirectory(prefix="lorapipe-ingest-") as tmp:
            yield _s3_input(input_uri, Path(tmp).resolve())
    else:
        yield _local_input(input_uri)


def _local_input(input_uri: str) -> Input:
    given = Path(input_uri.removeprefix("file://"))
    if not given.is_dir():
        problem = "is not a folder" if given.exists() else "does not exist"
        raise InputError(
            f"input '{input_uri}' {problem}; give a folder of images, an archive "
            f"({', '.join(ARCHIVE_SUFFIXES)}) or an s3:// prefix"
        )
    root = given.resolve()
    names: list[str] = []
    drops: list[Drop] = []
    # os.walk does not descend into symlinked folders; one leading outside is reported
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        drops += [drop for entry in subdirs if (drop := _escape(here / entry, root))]
        for entry in files:
            path = here / entry
            drop = _escape(path, root)
            if drop is None and not path.is_file():
                name = path.relative_to(root).as_posix()
                drop = Drop(name, UNREADABLE, "not a regular file (or a broken link)")
            if drop:
                drops.append(drop)
            else:
                names.append(path.relative_to(root).as_posix())
    return _with_metadata(root, sorted(names), drops, str(root / METADATA_CSV))


def _escape(path: Path, root: Path) -> Drop | None:
    """The drop for a symlink under ``root`` that leads outside it, or None."""
    if path.resolve().is_relative_to(root):
        return None
    target = os.readlink(path) if path.is_symlink() else path.resolve()
    detail = f"symlink to {target}, outside the input"
    return Drop(path.relative_to(root).as_posix(), UNSAFE_PATH, detail)


def _s3_input(prefix_uri: str, root: Path) -> Input:
    prefix = prefix_uri.rstrip("/")
    objects = store.list_objects(prefix)
    if not objects:
        raise InputError(f"no objects under '{prefix_uri}'; check the bucket and the prefix")
    names: list[str] = []
    drops: list[Drop] = []
    for info in objects:
        name = info.uri[len(prefix) + 1 :]
        if name.endswith("/"):
            continue  # a "folder" marker object
        unsafe = unsafe_name(name)
        if unsafe:
            drops.append(Drop(name, UNSAFE_PATH, f"key has {unsafe}"))
        else:
            names.append(clean_name(name))
    source = _with_metadata(root, names, drops, store.join(prefix, METADATA_CSV))
    source.s3_prefix = prefix
    return source


def _extract_archive(archive: Path, root: Path, input_uri: str) -> Input:
    """Extract the regular members with safe names into ``root``; report the others."""
    names: list[str] = []
    drops: list[Drop] = []
    try:
        if input_uri.lower().endswith(".zip"):
            _extract_zip(archive, root, names, drops)
        else:
            _extract_tar(archive, root, names, drops)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        raise InputError(
            f"'{input_uri}' is not a readable archive ({one_line(error)}); check the file"
        ) from None
    source = _with_metadata(root, sorted(set(names)), drops, str(root / METADATA_CSV))
    if source.metadata:
        source.metadata = (source.metadata[0], f"{METADATA_CSV} in {input_uri}")
    return source


def _extract_zip(archive: Path, root: Path, names: list[str], drops: list[Drop]) -> None:
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.infolist():
            if member.is_dir():
                continue
            is_link = stat.S_ISLNK(member.external_attr >> 16)
            refused = _member_refusal(member.filename, "a symlink" if is_link else None)
            if refused:
                drops.append(refused)
                continue
            _extract_member(lambda m=member: bundle.open(m), member.filename, root, names, drops)


def _extract_tar(archive: Path, root: Path, names: list[str], drops: list[Drop]) -> None:
    with tarfile.open(archive, "r:*") as bundle:
        for member in bundle:
            if member.isdir():
                continue
            kind = None
            if member.issym() or member.islnk():
                kind = "a link"
            elif not member.isfile():
                kind = "a special file"
            refused = _member_refusal(member.name, kind)
            if refused:
                drops.append(refused)
                continue
            _extract_member(lambda m=member: bundle.extractfile(m), member.name, root, names, drops)


def _member_refusal(name: str, kind: str | None) -> Drop | None:
    """A drop for an archive member that would write outside the folder (zip-slip) or is not a
    plain file, or None for a member that is safe to extract."""
    unsafe = unsafe_name(name)
    if unsafe:
        return Drop(name, UNSAFE_PATH, f"archive member with {unsafe}; not extracted")
    if kind:
        return Drop(name, UNSAFE_PATH, f"archive member is {kind}; not extracted")
    return None


def _extract_member(
    open_member: Callable[[], Any], name: str, root: Path, names: list[str], drops: list[Drop]
) -> None:
    """Stream one member to disk; a damaged member is dropped, the rest still extracts."""
    clean = clean_name(name)
    target = root / clean
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open_member() as member, open(target, "wb") as out:
            shutil.copyfileobj(member, out)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        drops.append(Drop(clean, UNREADABLE, f"damaged archive member ({one_line(error)})"))
        return
    names.append(clean)


def _with_metadata(root: Path, names: list[str], drops: list[Drop], uri: str) -> Input:
    """The input with ``metadata.csv`` taken out of the images and remembered as captions."""
    metadata = None
    if METADATA_CSV in names:
        names = [name for name in names if name != METADATA_CSV]
        metadata = (uri, uri)
    return Input(root, names, drops, metadata)


def unsafe_name(name: str) -> str | None:
    """Why a path from an archive, an S3 key or metadata.csv could leave the input, or None."""
    slashed = name.replace("\\", "/")
    if slashed.startswith("/") or PureWindowsPath(name).drive:
        return "an absolute path"
    if ".." in slashed.split("/"):
        return "'..' in the path"
    return None


def clean_name(name: str) -> str:
    """``./a//b.png`` and ``a\\b.png`` -> ``a/b.png``: one spelling per file."""
    return PurePosixPath(name.replace("\\", "/")).as_posix()
