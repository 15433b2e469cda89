"""Object storage: ``s3://bucket/key`` URIs and local paths behind one small API.

Every stage reads and writes through this module, so a dataset, a model or a checkpoint can
live on a laptop disk, in MinIO inside the cluster or on AWS S3 without the stage knowing.

- Endpoint: ``LORAPIPE_S3_ENDPOINT`` (or AWS's ``AWS_ENDPOINT_URL``); credentials: the standard
  AWS chain (env, shared files, instance/IRSA roles). Path-style addressing with a custom
  endpoint, as MinIO wants.
- Writes are atomic: local files through a temp name and ``os.replace``; S3 objects are whole
  or absent (a failed multipart upload is aborted by boto3's transfer manager).
- A "directory" written with :func:`put_dir` gets ``_MANIFEST.json`` LAST, listing every file
  with size and sha256, so readers can tell a complete directory from a partial one.
- A stage's output directory is published whole with :func:`staged_output` (or
  :func:`make_staging_dir` + :func:`publish_dir`): readers never see a half-written output, and
  only an older output of the same :class:`OutputKind` is ever replaced.
- Errors are one line, typed, and never contain credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapipe.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    LorapipeError,
    ObjectNotFoundError,
    StorageError,
)

MANIFEST_NAME = "_MANIFEST.json"
SHA256_METADATA_KEY = "lorapipe-sha256"
MULTIPART_THRESHOLD = int(os.environ.get("LORAPIPE_S3_MULTIPART_THRESHOLD", 8 * 1024 * 1024))
HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One file under a prefix: its URI, size in bytes and ETag (local files: mtime-size)."""

    uri: str
    size: int
    etag: str


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; a StorageError for a URI with no
    or no valid bucket, or a key with ``.``/``..`` segments: S3 would take those literally while
    every local copy of the key (``get_dir``, ``local_file``) resolves them."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"'{uri}' names no bucket; write s3://BUCKET/KEY")
    # what S3 and MinIO accept, legacy us-east-1 names (capitals, underscores) included
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]", bucket) or ".." in bucket:
        raise StorageError(
            f"'{uri}': '{bucket}' is not a bucket name (3-255 letters, digits, '.', '-' or "
            "'_', starting and ending with a letter or digit); write s3://BUCKET/KEY"
        )
    if any(segment in (".", "..") for segment in key.split("/")):
        raise StorageError(
            f"'{uri}': the key has a '.' or '..' segment; write the key without them "
            "(s3://BUCKET/some/key)"
        )
    return bucket, key


def _local(uri: str | os.PathLike) -> Path:
    return Path(str(uri).removeprefix("file://"))


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    base = str(base)
    if is_s3(base):
        pieces = [base.rstrip("/")] + [part.strip("/") for part in parts if part]
        return "/".join(pieces)
    return os.path.join(base, *parts)


def endpoint_url() -> str | None:
    return os.environ.get("LORAPIPE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


_clients: dict[tuple[str | None, int], Any] = {}
_clients_lock = threading.Lock()


def client() -> Any:
    """The boto3 S3 client for the current endpoint, built once per process."""
    import boto3
    from botocore.config import Config

    key = (endpoint_url(), os.getpid())
    with _clients_lock:
        if key not in _clients:
            config = Config(
                retries={"mode": "standard", "total_max_attempts": 8},
                connect_timeout=float(os.environ.get("LORAPIPE_S3_CONNECT_TIMEOUT", 5)),
                read_timeout=float(os.environ.get("LORAPIPE_S3_READ_TIMEOUT", 60)),
                s3={"addressing_style": "path" if endpoint_url() else "auto"},
                max_pool_connections=32,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            _clients[key] = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url(), config=config
            )
        return _clients[key]


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn botocore's many exceptions into one-line lorapipe errors without credentials.
    boto3's transfer manager wraps an upload's ClientError in S3UploadFailedError: that one is
    read for the ClientError inside it."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    try:
        try:
            yield
        except S3UploadFailedError as error:
            if isinstance(error.__context__, ClientError):
                raise error.__context__ from None
            raise StorageError(f"upload to {uri} failed ({error}); retry it") from None
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        bucket = split_s3(uri)[0]
        if code == "NoSuchBucket":
            raise BucketNotFoundError(
                f"bucket '{bucket}' does not exist (for {uri}); create it first"
            ) from None
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            raise ObjectNotFoundError(f"{uri} does not exist") from None
        if (
            code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")
            or status == 403
        ):
            raise AccessDeniedError(
                f"access to {uri} denied ({code}); check the S3 credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the Secret) and the bucket policy"
            ) from None
        raise StorageError(f"S3 request for {uri} failed: {code or status}") from None
    except NoCredentialsError:
        raise AccessDeniedError(
            f"no S3 credentials for {uri}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or mount the S3 Secret"
        ) from None
    except (EndpointConnectionError, ConnectTimeoutError, BotoConnectionError, ReadTimeoutError):
        where = endpoint_url() or "the default AWS S3 endpoint"
        raise EndpointUnreachableError(
            f"cannot reach S3 endpoint {where} (for {uri}); check LORAPIPE_S3_ENDPOINT "
            "and that the server is up"
        ) from None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_local_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename into place, so ``path`` is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def exists(uri: str | os.PathLike) -> bool:
    uri = str(uri)
    if not is_s3(uri):
        return _local(uri).exists()
    bucket, key = split_s3(uri)
    try:
        with _s3_errors(uri):
            client().head_object(Bucket=bucket, Key=key)
    except ObjectNotFoundError:
        return False
    return True


def read_bytes(uri: str | os.PathLike) -> bytes:
    uri = str(uri)
    if not is_s3(uri):
        try:
            return _local(uri).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{uri} does not exist") from None
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    uri = str(uri)
    if not is_s3(uri):
        _atomic_local_write(_local(uri), lambda tmp: tmp.write_bytes(data))
        return
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        client().put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            Metadata={SHA256_METADATA_KEY: hashlib.sha256(data).hexdigest()},
        )


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_THRESHOLD,
        max_concurrency=4,
    )


def upload_file(local_path: str | os.PathLike, uri: str) -> None:
    """Copy a local file to ``uri``; on S3 multipart above the threshold, sha256 verified."""
    source = Path(local_path)
    if not source.is_file():
        raise ObjectNotFoundError(f"{source} does not exist")
    if not is_s3(uri):
        _atomic_local_write(_local(uri), lambda tmp: shutil.copyfile(source, tmp))
        return
    bucket, key = split_s3(uri)
    checksum = _sha256_file(source)
    with _s3_errors(uri):
        client().upload_file(
            str(source),
            bucket,
            key,
            ExtraArgs={"Metadata": {SHA256_METADATA_KEY: checksum}},
            Config=_transfer_config(),
        )
        stored = client().head_object(Bucket=bucket, Key=key)
    if stored["ContentLength"] != source.stat().st_size:
        raise StorageError(f"upload of {source} to {uri} came out truncated; retry the upload")


def download_file(uri: str, local_path: str | os.PathLike) -> None:
    """Copy ``uri`` to a local file atomically; the sha256 recorded at upload is verified."""
    destination = Path(local_path)
    if not is_s3(uri):
        source = _local(uri)
        if not source.is_file():
            raise ObjectNotFoundError(f"{uri} does not exist")
        _atomic_local_write(destination, lambda tmp: shutil.copyfile(source, tmp))
        return
    bucket, key = split_s3(uri)

    def fetch(tmp: Path) -> None:
        with _s3_errors(uri):
            expected = (
                client().head_object(Bucket=bucket, Key=key)["Metadata"].get(SHA256_METADATA_KEY)
            )
            client().download_file(bucket, key, str(tmp), Config=_transfer_config())
        if expected and _sha256_file(tmp) != expected:
            raise StorageError(
                f"{uri} failed its sha256 check after download; retry, then re-upload it"
            )

    _atomic_local_write(destination, fetch)


def object_info(uri: str | os.PathLike) -> ObjectInfo:
    """One file's listing entry (size and ETag), without reading it."""
    uri = str(uri)
    if not is_s3(uri):
        info = _local_object(_local(uri))
        if info is None:
            raise ObjectNotFoundError(f"{uri} does not exist")
        return info
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        head = client().head_object(Bucket=bucket, Key=key)
    return ObjectInfo(uri, head["ContentLength"], head["ETag"].strip('"'))


def read_range(uri: str | os.PathLike, start: int, length: int) -> bytes:
    """``length`` bytes of a file from ``start`` (fewer at its end), without fetching the rest."""
    uri = str(uri)
    if not is_s3(uri):
        try:
            with _local(uri).open("rb") as file:
                file.seek(start)
                return file.read(length)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{uri} does not exist") from None
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        answer = client().get_object(
            Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}"
        )
        return answer["Body"].read()


def list_objects(prefix_uri: str | os.PathLike) -> list[ObjectInfo]:
    """Every file below a prefix (recursive), sorted by URI."""
    prefix_uri = str(prefix_uri)
    if not is_s3(prefix_uri):
        root = _local(prefix_uri)
        files = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        return [info for info in map(_local_object, files) if info is not None]
    bucket, key = split_s3(prefix_uri)
    prefix = key.rstrip("/") + "/" if key else ""
    found: list[ObjectInfo] = []
    with _s3_errors(prefix_uri):
        for page in (
            client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        ):
            found.extend(
                ObjectInfo(f"s3://{bucket}/{item['Key']}", item["Size"], item["ETag"].strip('"'))
                for item in page.get("Contents", [])
            )
    return sorted(found, key=lambda info: info.uri)


def _local_object(path: Path) -> ObjectInfo | None:
    """A regular file's listing entry; None for directories and for files that vanished
    since the directory was read (a run may be writing next to a reader)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(status.st_mode):
        return None
    return ObjectInfo(str(path), status.st_size, f"{status.st_mtime_ns}-{status.st_size}")


def list_uris(prefix_uri: str | os.PathLike) -> list[str]:
    return [info.uri for info in list_objects(prefix_uri)]


def copy(src_uri: str, dst_uri: str) -> None:
    if is_s3(src_uri) and is_s3(dst_uri):
        src_bucket, src_key = split_s3(src_uri)
        dst_bucket, dst_key = split_s3(dst_uri)
        with _s3_errors(src_uri):
            client().copy(
                {"Bucket": src_bucket, "Key": src_key},
                dst_bucket,
                dst_key,
                Config=_transfer_config(),
            )
    elif is_s3(dst_uri):
        with local_file(src_uri) as path:
            upload_file(path, dst_uri)
    else:
        download_file(src_uri, _local(dst_uri))


def delete(uri: str) -> None:
    if not is_s3(uri):
        path = _local(uri)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        client().delete_object(Bucket=bucket, Key=key)


def _manifest_for(local_dir: Path) -> dict[str, Any]:
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return {
        "files": {
            p.relative_to(local_dir).as_posix(): {
                "size": p.stat().st_size,
                "sha256": _sha256_file(p),
            }
            for p in files
        }
    }


def put_dir(local_dir: str | os.PathLike, dest_uri: str, max_workers: int = 8) -> None:
    """Copy a local tree to ``dest_uri`` and write ``_MANIFEST.json`` last."""
    source = Path(local_dir)
    if not source.is_dir():
        raise ObjectNotFoundError(f"{source} is not a directory")
    manifest = _manifest_for(source)
    names = list(manifest["files"])
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for future in [pool.submit(upload_file, source / n, join(dest_uri, n)) for n in names]:
            future.result()
    write_text(join(dest_uri, MANIFEST_NAME), json.dumps(manifest, indent=1, sort_keys=True))


def get_dir(src_uri: str, local_dir: str | os.PathLike, max_workers: int = 8) -> None:
    """Copy every file under ``src_uri`` into ``local_dir``; checked against the manifest."""
    destination = Path(local_dir)
    base = str(src_uri).rstrip("/")
    objects = list_objects(base)
    if not objects:
        raise ObjectNotFoundError(f"{src_uri} has no files")
    relative = [info.uri[len(base) :].lstrip("/") for info in objects]
    for name in relative:
        target = (destination / name).resolve()
        if not target.is_relative_to(destination.resolve()):
            raise StorageError(f"{src_uri}: key '{name}' would leave {destination}; refusing it")
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for future in [
            pool.submit(download_file, join(base, name), destination / name) for name in relative
        ]:
            future.result()
    if MANIFEST_NAME in relative:
        manifest = json.loads((destination / MANIFEST_NAME).read_text())
        for name, entry in manifest["files"].items():
            path = destination / name
            if not path.is_file() or _sha256_file(path) != entry["sha256"]:
                raise StorageError(
                    f"{join(base, name)} does not match {MANIFEST_NAME}; the directory was "
                    "changed after it was written, write it again"
                )


def is_complete(uri: str) -> bool:
    return exists(join(uri, MANIFEST_NAME))


@contextlib.contextmanager
def local_file(uri: str | os.PathLike) -> Iterator[Path]:
    """A readable local path for ``uri`` (a temporary download for S3)."""
    uri = str(uri)
    if not is_s3(uri):
        path = _local(uri)
        if not path.is_file():
            raise ObjectNotFoundError(f"{uri} does not exist")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lorapipe-") as tmp:
        path = Path(tmp) / Path(split_s3(uri)[1]).name
        download_file(uri, path)
        yield path


@contextlib.contextmanager
def local_dir(uri: str | os.PathLike) -> Iterator[Path]:
    """A readable local directory for ``uri`` (a temporary download for S3)."""
    uri = str(uri)
    if not is_s3(uri):
        path = _local(uri)
        if not path.is_dir():
            raise ObjectNotFoundError(f"{uri} is not a directory")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lorapipe-") as tmp:
        get_dir(uri, tmp)
        yield Path(tmp)


# --------------------------------------------------------------------------- staged outputs


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
    # a file that readers key on: on S3 the older output's copy is deleted first and the new
    # one written after everything else (and after the manifest), so no reader pairs it with
    # the other version's files
    written_last: str | None = None


def check_replaceable(dest_uri: str, kind: OutputKind) -> None:
    """Raise ``kind.error`` unless ``dest_uri`` is absent, empty or an older output of
    ``kind``: all its markers present (on S3 an interrupted replacement also counts: its
    manifest and every marker but ``written_last``)."""
    dest_uri = str(dest_uri)
    if is_s3(dest_uri):
        base = dest_uri.rstrip("/") + "/"
        names = {uri.removeprefix(base) for uri in list_uris(dest_uri)}
        others = [m for m in kind.markers if m != kind.written_last]
        recognised = set(kind.markers) <= names or (
            kind.written_last is not None and {MANIFEST_NAME, *others} <= names
        )
    else:
        destination = _local(dest_uri)
        if destination.exists() and not destination.is_dir():
            raise kind.error(f"'{dest_uri}' is a file; give a folder")
        names = set(os.listdir(destination)) if destination.is_dir() else set()
        recognised = all((destination / m).is_file() for m in kind.markers)
    if names and not recognised:
        raise kind.error(kind.refusal.format(uri=dest_uri, name=kind.name))


def make_staging_dir(dest_uri: str, kind: OutputKind) -> Path:
    """A private directory to assemble an output in, after checking that ``dest_uri`` may be
    replaced: a hidden sibling of a local destination (publishing is then a rename on one
    filesystem), a temporary directory for S3."""
    dest_uri = str(dest_uri)
    check_replaceable(dest_uri, kind)
    if is_s3(dest_uri):
        return Path(tempfile.mkdtemp(prefix="lorapipe-output-"))
    destination = _local(dest_uri)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    return staging


def publish_dir(staging: Path, dest_uri: str, kind: OutputKind) -> None:
    """Publish the assembled ``staging`` directory as the output at ``dest_uri``.

    Local: ``staging`` (from :func:`make_staging_dir`) is renamed into place; an older output
    is moved aside first and deleted only once the new one is there. S3: every file is
    uploaded, the manifest after them (``written_last`` after that), then objects of the older
    output that the new one does not have are deleted. ``staging`` is consumed locally and
    left to the caller on S3.
    """
    dest_uri = str(dest_uri)
    check_replaceable(dest_uri, kind)  # again: something may have appeared meanwhile
    if is_s3(dest_uri):
        _publish_s3(staging, dest_uri, kind)
        return
    destination = _local(dest_uri)
    if not destination.exists():
        os.rename(staging, destination)
        return
    retired = destination.parent / f".{destination.name}.{uuid.uuid4().hex[:8]}.old"
    os.rename(destination, retired)
    try:
        os.rename(staging, destination)
    except OSError:
        os.rename(retired, destination)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _publish_s3(staging: Path, dest_uri: str, kind: OutputKind) -> None:
    last = staging / kind.written_last if kind.written_last else None
    if last is not None and last.is_file():
        last_uri = join(dest_uri, kind.written_last)
        delete(last_uri)
        with tempfile.TemporaryDirectory(prefix="lorapipe-last-") as aside:
            held = Path(aside) / last.name
            shutil.move(last, held)
            try:
                put_dir(staging, dest_uri)
                upload_file(held, last_uri)
            finally:
                shutil.move(held, last)
    else:
        put_dir(staging, dest_uri)
    new = {join(dest_uri, p.relative_to(staging).as_posix()) for p in staging.rglob("*")}
    new.add(join(dest_uri, MANIFEST_NAME))
    for uri in list_uris(dest_uri):
        if uri not in new:
            delete(uri)


@contextlib.contextmanager
def staged_output(dest_uri: str, kind: OutputKind) -> Iterator[Path]:
    """A local directory to write an output into; published whole at ``dest_uri`` when the
    block succeeds, removed either way (see :func:`publish_dir`)."""
    staging = make_staging_dir(dest_uri, kind)
    try:
        yield staging
        publish_dir(staging, dest_uri, kind)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def safe_name(text: str, default: str = "manual") -> str:
    """``text`` as one safe path segment (a pipeline run id: ``run/1 (retry)`` -> ``run-1-retry``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return safe or default
