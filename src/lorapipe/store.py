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
- A manifest may also be a *pointer*: with a ``version`` key its files live under
  ``<dir>/<version>/`` (how :mod:`lorapipe.outputs` publishes on S3, where a set of objects
  cannot be swapped at once). :func:`resolve` and :func:`get_dir` follow it; readers of a
  stage's output start there.
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lorapipe.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    StorageError,
)

MANIFEST_NAME = "_MANIFEST.json"
VERSION_KEY = "version"  # in a manifest: the files are under <dir>/<version>/
SHA256_METADATA_KEY = "lorapipe-sha256"
MULTIPART_THRESHOLD = int(os.environ.get("LORAPIPE_S3_MULTIPART_THRESHOLD", 8 * 1024 * 1024))
HASH_CHUNK = 1024 * 1024
T = TypeVar("T")


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
                retries={"mode": "standard", "total_max_attempts": _max_attempts()},
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


def _max_attempts() -> int:
    """Attempts per S3 request (``LORAPIPE_S3_MAX_ATTEMPTS``, default 8): botocore retries
    throttling, 5xx and dropped connections with exponential backoff in between."""
    text = os.environ.get("LORAPIPE_S3_MAX_ATTEMPTS", "8")
    if not text.isdigit() or int(text) < 1:
        raise StorageError(
            f"LORAPIPE_S3_MAX_ATTEMPTS={text!r} is not a whole number >= 1; unset it or give e.g. 8"
        )
    return int(text)


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
        HTTPClientError,
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
    except (
        EndpointConnectionError,
        ConnectTimeoutError,
        BotoConnectionError,
        ReadTimeoutError,
        HTTPClientError,  # e.g. the connection closed in the middle of a request
    ):
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
    try:
        _s3_read(uri, lambda bucket, key: client().head_object(Bucket=bucket, Key=key))
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
    return _s3_read(
        uri, lambda bucket, key: client().get_object(Bucket=bucket, Key=key)["Body"].read()
    )


def _s3_read(uri: str, read: Callable[[str, str], T]) -> T:
    """``read(bucket, key)`` for ``uri``. A file that is not under its own key but is named
    in a published output's pointer manifest (``s3://b/lora/film.safetensors``) is read from
    the output's current version, so readers never need to know the version prefix."""
    bucket, key = split_s3(uri)
    try:
        with _s3_errors(uri):
            return read(bucket, key)
    except ObjectNotFoundError:
        moved = _follow_pointer(uri)
        if moved is None:
            raise
    with _s3_errors(moved):
        return read(*split_s3(moved))


def _follow_pointer(uri: str) -> str | None:
    """Where the nearest enclosing published output keeps ``uri`` now; None if no output
    with a pointer manifest lists it."""
    bucket, key = split_s3(uri)
    parts = key.rstrip("/").split("/")
    for depth in range(len(parts) - 1, -1, -1):
        output = "/".join([f"s3://{bucket}", *parts[:depth]])
        manifest = read_manifest(output)
        if manifest is None:
            continue
        relative = "/".join(parts[depth:])
        version = manifest.get(VERSION_KEY)
        if version is None or relative not in manifest["files"]:
            return None
        return join(output, version, relative)
    return None


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


def upload_file(local_path: str | os.PathLike, uri: str, sha256: str | None = None) -> None:
    """Copy a local file to ``uri``; on S3 multipart above the threshold, sha256 verified
    (``sha256``: the file's, when the caller has it already, e.g. from a manifest)."""
    source = Path(local_path)
    if not source.is_file():
        raise ObjectNotFoundError(f"{source} does not exist")
    if not is_s3(uri):
        _atomic_local_write(_local(uri), lambda tmp: shutil.copyfile(source, tmp))
        return
    bucket, key = split_s3(uri)
    checksum = sha256 or _sha256_file(source)
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

    def fetch(tmp: Path) -> None:
        def head_and_download(bucket: str, key: str) -> str | None:
            head = client().head_object(Bucket=bucket, Key=key)
            client().download_file(bucket, key, str(tmp), Config=_transfer_config())
            return head["Metadata"].get(SHA256_METADATA_KEY)

        expected = _s3_read(uri, head_and_download)
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
    head = _s3_read(uri, lambda bucket, key: client().head_object(Bucket=bucket, Key=key))
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
    return _s3_read(
        uri,
        lambda bucket, key: (
            client()
            .get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")["Body"]
            .read()
        ),
    )


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


def delete_many(uris: list[str]) -> None:
    """Delete many files; on S3 a thousand keys per request instead of one each."""
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        if not is_s3(uri):
            delete(uri)
            continue
        bucket, key = split_s3(uri)
        by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            with _s3_errors(f"s3://{bucket}/{batch[0]['Key']}"):
                answer = client().delete_objects(
                    Bucket=bucket, Delete={"Objects": batch, "Quiet": True}
                )
            if answer.get("Errors"):
                failed = answer["Errors"][0]
                raise StorageError(
                    f"could not delete s3://{bucket}/{failed.get('Key')} "
                    f"({failed.get('Code')}); check the bucket policy allows s3:DeleteObject"
                )


def abort_uploads(prefix_uri: str) -> int:
    """Abort the multipart uploads left under an S3 prefix by a crashed writer (they hold
    storage until aborted); returns how many. Local prefixes have none."""
    if not is_s3(prefix_uri):
        return 0
    bucket, key = split_s3(prefix_uri)
    prefix = key.rstrip("/") + "/" if key else ""
    aborted = 0
    with _s3_errors(prefix_uri):
        pages = (
            client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                client().abort_multipart_upload(
                    Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted += 1
    return aborted


def manifest_for(local_dir: Path) -> dict[str, Any]:
    """``{"files": {relative path: {"size", "sha256"}}}`` for every file under ``local_dir``."""
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
    manifest = manifest_for(source)
    upload_files(source, dest_uri, manifest["files"], max_workers)
    write_text(join(dest_uri, MANIFEST_NAME), json.dumps(manifest, indent=1, sort_keys=True))


def upload_files(
    source: Path, dest_uri: str, files: dict[str, dict[str, Any]], max_workers: int = 8
) -> None:
    """Upload ``source/<name>`` to ``dest_uri/<name>`` for every manifest entry, in parallel,
    with the sha256 the manifest already computed (each file is hashed once)."""
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        uploads = [
            pool.submit(upload_file, source / name, join(dest_uri, name), entry["sha256"])
            for name, entry in sorted(files.items())
        ]
        for future in uploads:
            future.result()


def read_manifest(uri: str | os.PathLike) -> dict[str, Any] | None:
    """The ``_MANIFEST.json`` of the directory ``uri``; None where it has none."""
    manifest_uri = join(str(uri), MANIFEST_NAME)
    try:
        if is_s3(manifest_uri):
            bucket, key = split_s3(manifest_uri)
            with _s3_errors(manifest_uri):
                text = client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        else:
            text = _local(manifest_uri).read_text(encoding="utf-8")
    except (ObjectNotFoundError, FileNotFoundError, NotADirectoryError):
        return None
    try:
        manifest = json.loads(text)
        files = manifest["files"]
        version = manifest.get(VERSION_KEY)
        if not isinstance(files, dict) or not (version is None or _is_segment(version)):
            raise ValueError("'files' must map names to entries, 'version' be one path segment")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StorageError(
            f"{manifest_uri} is not a valid manifest ({error}); publish the output again"
        ) from None
    return manifest


def _is_segment(text: object) -> bool:
    return (
        isinstance(text, str)
        and re.fullmatch(r"[A-Za-z0-9._-]+", text) is not None
        and (text not in (".", ".."))
    )


def resolve(uri: str | os.PathLike) -> str:
    """Where ``uri`` is now, following pointer manifests (outputs published on S3).

    A directory whose manifest is a pointer -> ``uri/<version>``; a file named by its path in
    such an output (``s3://b/lora/film.safetensors``) -> the current version's copy; anything
    else, and every local path, -> ``uri`` itself."""
    uri = str(uri)
    if not is_s3(uri):
        return uri
    manifest = read_manifest(uri)
    if manifest is not None:
        version = manifest.get(VERSION_KEY)
        return join(uri, version) if version is not None else uri
    bucket, key = split_s3(uri)
    if not key.strip("/"):
        return uri
    try:
        with _s3_errors(uri):
            client().head_object(Bucket=bucket, Key=key)
        return uri
    except ObjectNotFoundError:
        return _follow_pointer(uri) or uri


def get_dir(src_uri: str, local_dir: str | os.PathLike, max_workers: int = 8) -> None:
    """Copy the directory ``src_uri`` into ``local_dir``, checked against its manifest.

    A pointer manifest is followed: exactly the files of the current version are fetched, and
    the local copy gets a plain manifest. Without a manifest every file below is copied."""
    destination = Path(local_dir)
    base = str(src_uri).rstrip("/")
    manifest = read_manifest(base)
    if manifest is not None and manifest.get(VERSION_KEY) is not None:
        root = join(base, manifest[VERSION_KEY])
        relative = sorted(manifest["files"])
        manifest = {"files": manifest["files"]}
    else:
        root = base
        relative = [info.uri[len(base) :].lstrip("/") for info in list_objects(base)]
        relative = [name for name in relative if name != MANIFEST_NAME]
    if not relative and manifest is None:
        raise ObjectNotFoundError(f"{src_uri} has no files")
    for name in relative:
        target = (destination / name).resolve()
        if not target.is_relative_to(destination.resolve()):
            raise StorageError(f"{src_uri}: key '{name}' would leave {destination}; refusing it")
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for future in [
            pool.submit(download_file, join(root, name), destination / name) for name in relative
        ]:
            future.result()
    if manifest is None:
        return
    for name, entry in manifest["files"].items():
        path = destination / name
        if not path.is_file() or _sha256_file(path) != entry["sha256"]:
            raise StorageError(
                f"{join(root, name)} does not match {MANIFEST_NAME}; the directory was "
                "changed after it was written, write it again"
            )
    (destination / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))


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


def safe_name(text: str, default: str = "manual") -> str:
    """``text`` as one safe path segment (a pipeline run id: ``run/1 (retry)`` -> ``run-1-retry``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return safe or default
