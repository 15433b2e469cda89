"""Object storage: one API over s3:// and local paths, tested against a real S3 HTTP server."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from lorapipe import store
from lorapipe.errors import (
    BucketNotFoundError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    StorageError,
)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(params=["local", "s3"])
def base_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests run on a local folder and on a bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


def test_bytes_and_text_round_trip(base_uri: str) -> None:
    uri = store.join(base_uri, "a", "b.txt")
    store.write_text(uri, "héllo")
    assert store.exists(uri)
    assert store.read_text(uri) == "héllo"
    store.delete(uri)
    assert not store.exists(uri)


def test_missing_key_names_the_uri(base_uri: str) -> None:
    uri = store.join(base_uri, "missing.bin")
    with pytest.raises(ObjectNotFoundError, match="missing.bin does not exist"):
        store.read_bytes(uri)


def test_a_20mb_file_round_trips_in_parts_with_its_checksum(
    base_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    payload = os.urandom(20 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(payload)
    uri = store.join(base_uri, "big.bin")
    store.upload_file(tmp_path / "big.bin", uri)
    store.download_file(uri, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == payload
    if store.is_s3(uri):
        bucket, key = store.split_s3(uri)
        etag = store.client().head_object(Bucket=bucket, Key=key)["ETag"]
        assert etag.strip('"').endswith("-4"), "uploaded as 4 parts"


def test_a_corrupted_object_fails_its_checksum(s3_bucket: str, tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"original")
    uri = store.join(s3_bucket, "f.bin")
    store.upload_file(tmp_path / "f.bin", uri)
    bucket, key = store.split_s3(uri)
    metadata = store.client().head_object(Bucket=bucket, Key=key)["Metadata"]
    store.client().put_object(Bucket=bucket, Key=key, Body=b"tampered", Metadata=metadata)
    with pytest.raises(StorageError, match="sha256 check"):
        store.download_file(uri, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists(), "nothing half-written"


def test_listing_pages_through_1500_keys(s3_bucket: str) -> None:
    bucket, _ = store.split_s3(s3_bucket)
    for index in range(1500):
        store.client().put_object(Bucket=bucket, Key=f"many/{index:05d}", Body=b"")
    store.write_text(store.join(s3_bucket, "other"), "not under the prefix")
    listed = store.list_uris(store.join(s3_bucket, "many"))
    assert len(listed) == 1500
    assert listed[0] == f"{s3_bucket}/many/00000"
    assert listed == sorted(listed)


def test_put_dir_writes_the_manifest_last_and_get_dir_restores_the_tree(
    base_uri: str, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    (source / "nested").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "nested" / "b.bin").write_bytes(os.urandom(1000))
    uri = store.join(base_uri, "tree")

    store.put_dir(source, uri)
    assert store.is_complete(uri)
    manifest = json.loads(store.read_text(store.join(uri, store.MANIFEST_NAME)))
    assert sorted(manifest["files"]) == ["a.txt", "nested/b.bin"]

    store.get_dir(uri, tmp_path / "back")
    back = _tree(tmp_path / "back")
    back.pop(store.MANIFEST_NAME)
    assert back == _tree(source)


def test_a_directory_without_manifest_is_not_complete(base_uri: str) -> None:
    uri = store.join(base_uri, "partial")
    store.write_text(store.join(uri, "only-part.txt"), "x")
    assert not store.is_complete(uri)


def test_local_file_and_local_dir_give_readable_paths(base_uri: str, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    store.put_dir(tmp_path / "d", store.join(base_uri, "d"))
    with store.local_file(store.join(base_uri, "d", "x.txt")) as path:
        assert path.read_text() == "x"
    with store.local_dir(store.join(base_uri, "d")) as directory:
        assert (directory / "x.txt").read_text() == "x"


def test_copy_between_local_and_s3(s3_bucket: str, tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("payload")
    store.copy(str(tmp_path / "x.txt"), store.join(s3_bucket, "x.txt"))
    store.copy(store.join(s3_bucket, "x.txt"), store.join(s3_bucket, "y.txt"))
    store.copy(store.join(s3_bucket, "y.txt"), str(tmp_path / "y.txt"))
    assert (tmp_path / "y.txt").read_text() == "payload"


def test_missing_bucket_says_to_create_it(s3_server: str) -> None:
    with pytest.raises(
        BucketNotFoundError, match="bucket 'no-such-bucket' does not exist.*create it"
    ):
        store.read_bytes("s3://no-such-bucket/key")


@pytest.mark.parametrize("size", [10, 6 * 1024 * 1024], ids=["small", "multipart"])
def test_an_upload_to_a_missing_bucket_says_to_create_it(
    s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """boto3's transfer manager wraps the NoSuchBucket in its S3UploadFailedError."""
    monkeypatch.setattr(store, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "f.bin").write_bytes(b"x" * size)
    message = "bucket 'no-such-bucket' does not exist.*create it"
    with pytest.raises(BucketNotFoundError, match=message):
        store.upload_file(tmp_path / "folder" / "f.bin", "s3://no-such-bucket/f.bin")
    with pytest.raises(BucketNotFoundError, match=message):
        store.put_dir(tmp_path / "folder", "s3://no-such-bucket/folder")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://../x", "'..' is not a bucket name"),
        ("s3://./x", "'.' is not a bucket name"),
        ("s3:///x", "names no bucket"),
        ("s3://", "names no bucket"),
        ("s3://ab/x", "'ab' is not a bucket name"),
        ("s3://-bucket/x", "'-bucket' is not a bucket name"),
        ("s3://my..bucket/x", "'my..bucket' is not a bucket name"),
        ("s3://bucket/../x", "'..' segment"),
        ("s3://bucket/a/../../x", "'..' segment"),
        ("s3://bucket/a/./x", "'.' or '..' segment"),
        ("s3://bucket/a/..", "'..' segment"),
    ],
)
def test_a_uri_without_a_valid_bucket_or_with_dot_segments_is_one_line(
    uri: str, message: str
) -> None:
    with pytest.raises(StorageError, match=re.escape(message)) as error:
        store.split_s3(uri)
    assert "\n" not in str(error.value) and "s3://BUCKET/" in str(error.value)


@pytest.mark.parametrize(
    "uri", ["s3://bucket", "s3://bucket/", "s3://my.bucket-1/a/b.c", "s3://Legacy_Bucket/.x/..y"]
)
def test_ordinary_uris_split(uri: str) -> None:
    bucket, key = store.split_s3(uri)
    assert f"s3://{bucket}/{key}".rstrip("/") == uri.rstrip("/")


def test_refused_endpoint_fails_fast_naming_it_and_never_the_secret(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("LORAPIPE_S3_ENDPOINT", endpoint)
    started = time.monotonic()
    with pytest.raises(EndpointUnreachableError) as error:
        store.read_bytes("s3://bucket/key")
    assert time.monotonic() - started < 30  # a bound on hanging, not a benchmark
    message = str(error.value)
    assert endpoint in message and "LORAPIPE_S3_ENDPOINT" in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    assert os.environ["AWS_ACCESS_KEY_ID"] not in message


class _FlakyProxy(http.server.ThreadingHTTPServer):
    """Answers the first ``failures`` requests with 503 (or resets their connection, with
    ``mode="reset"``), then forwards to the real server."""

    def __init__(self, upstream: str, failures: int, mode: str = "503") -> None:
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.mode = mode
        self.upstream = urlsplit(upstream)
        self.failures_left = failures
        self.requests_seen = 0
        self.lock = threading.Lock()


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: _FlakyProxy

    def log_message(self, *args: object) -> None:
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.requests_seen += 1
            fail = self.server.failures_left > 0
            self.server.failures_left -= int(fail)
        if fail and self.server.mode == "reset":
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )  # close with RST: the client sees "connection reset by peer"
            self.close_connection = True
            return
        if fail:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = http.client.HTTPConnection(
            self.server.upstream.hostname, self.server.upstream.port
        )
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        headers["Host"] = self.server.upstream.netloc
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle


@pytest.fixture
def flaky_endpoint(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[_FlakyProxy]:
    proxy = _FlakyProxy(s3_server, failures=3)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("LORAPIPE_S3_ENDPOINT", f"http://127.0.0.1:{proxy.server_address[1]}")
    yield proxy
    proxy.shutdown()


def test_503_bursts_are_retried_until_the_request_succeeds(
    s3_bucket: str, flaky_endpoint: _FlakyProxy
) -> None:
    uri = store.join(s3_bucket, "through-proxy.txt")
    store.write_text(uri, "made it")
    assert flaky_endpoint.requests_seen == 4, "three 503s, then the real PUT"
    assert store.read_text(uri) == "made it"


def test_connections_reset_mid_request_are_retried_until_it_succeeds(
    s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = _FlakyProxy(s3_server, failures=2, mode="reset")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("LORAPIPE_S3_ENDPOINT", f"http://127.0.0.1:{proxy.server_address[1]}")
    try:
        uri = store.join(s3_bucket, "after-resets.txt")
        store.write_text(uri, "made it")
        assert proxy.requests_seen == 3, "two resets, then the real PUT"
        assert store.read_text(uri) == "made it"
    finally:
        proxy.shutdown()


@pytest.mark.faults
def test_an_endpoint_that_never_answers_times_out_instead_of_hanging(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts connections (the kernel does), never reads or answers
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setenv("LORAPIPE_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("LORAPIPE_S3_READ_TIMEOUT", "1")
    started = time.monotonic()
    try:
        with pytest.raises(StorageError) as error:
            store.read_bytes("s3://bucket/key")
    finally:
        silent.close()
    assert time.monotonic() - started < 60  # a bound on hanging, not a benchmark
    assert endpoint in str(error.value)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(error.value)


def test_files_written_locally_get_the_usual_permissions(tmp_path: Path) -> None:
    store.write_text(str(tmp_path / "report.md"), "# report\n")
    mode = (tmp_path / "report.md").stat().st_mode & 0o777
    assert mode == 0o666 & ~_current_umask()


def _current_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
