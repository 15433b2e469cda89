"""A stage's output: published whole, the old version readable until then, exactly the
manifest's files after, on a local folder and on a real S3 HTTP server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorapipe import outputs, store
from lorapipe.errors import ConfigError, StorageError
from lorapipe.writer_lock import LEASE_NAME

KIND = outputs.OutputKind(name="a test output", markers=("report.json",))


@pytest.fixture(params=["local", "s3"])
def base_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests run on a local folder and on a bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


def _write_output(staging: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)


def published_files(uri: str) -> dict[str, str]:
    """The output's files as a reader sees them, after checking that the output holds exactly
    what its manifest lists (plus the manifest itself)."""
    root = store.resolve(uri)
    manifest = store.read_manifest(uri)
    assert manifest is not None, f"{uri} has no manifest"
    listed = {store.join(root, name) for name in manifest["files"]}
    assert set(store.list_uris(uri)) == listed | {store.join(uri, store.MANIFEST_NAME)}
    return {name: store.read_text(store.join(root, name)) for name in manifest["files"]}


def test_a_staged_output_appears_whole_and_replaces_an_older_one(base_uri: str) -> None:
    uri = store.join(base_uri, "out")
    with outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "1", "old.txt": "x", "sub/a.txt": "a"})
        visible = store.list_uris(uri)  # before the block ends: at most the writer's lease
        assert visible in ([], [store.join(uri, LEASE_NAME)])
    assert published_files(uri) == {"report.json": "1", "old.txt": "x", "sub/a.txt": "a"}

    with outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "2", "sub/a.txt": "b"})
    assert published_files(uri) == {"report.json": "2", "sub/a.txt": "b"}  # old.txt is gone


def test_a_failed_output_publishes_nothing_and_leaves_no_staging(base_uri: str) -> None:
    uri = store.join(base_uri, "out")
    with outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "1"})
    with pytest.raises(RuntimeError, match="crashed"), outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "2"})
        raise RuntimeError("crashed")
    assert published_files(uri) == {"report.json": "1"}
    assert not staging.exists()
    if not store.is_s3(uri):
        assert sorted(p.name for p in Path(base_uri).iterdir()) == ["out"]


def test_something_else_at_the_destination_is_never_replaced(base_uri: str) -> None:
    uri = store.join(base_uri, "photos")
    store.write_text(store.join(uri, "cat.jpg"), "meow")
    with pytest.raises(StorageError, match="holds files that are not a test output"):
        outputs.OutputStaging(uri, KIND)
    assert store.read_text(store.join(uri, "cat.jpg")) == "meow"
    assert len(store.list_uris(uri)) == 1


def test_a_local_file_at_the_destination_is_refused_with_the_kinds_error(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    kind = outputs.OutputKind(name="a generate output", markers=("a", "b"), error=ConfigError)
    with pytest.raises(ConfigError, match="is a file; give a folder"):
        outputs.OutputStaging(str(tmp_path / "out"), kind)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "a").write_text("only one marker")
    with pytest.raises(ConfigError, match="not a generate output"):
        outputs.OutputStaging(str(tmp_path / "half"), kind)


def test_on_s3_new_files_go_under_a_fresh_version_and_the_pointer_moves_last(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"{s3_bucket}/out"
    with outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "1", "part": "1"})
    first_root = store.resolve(uri)

    events: list[tuple[str, str]] = []
    real_write, real_upload, real_delete = store.write_bytes, store.upload_file, store.delete_many

    def upload(path: Path, target: str, sha256: str | None = None) -> None:
        assert store.read_text(f"{first_root}/part") == "1"  # old version whole meanwhile
        events.append(("upload", target))
        real_upload(path, target, sha256)

    monkeypatch.setattr(store, "upload_file", upload)
    monkeypatch.setattr(
        store, "write_bytes", lambda u, d: (events.append(("write", u)), real_write(u, d))
    )
    monkeypatch.setattr(
        store, "delete_many", lambda uris: (events.append(("delete", "")), real_delete(uris))
    )
    with outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "2", "part": "2"})

    second_root = store.resolve(uri)
    assert second_root != first_root and outputs.VERSION_PATTERN.fullmatch(
        second_root.rsplit("/", 1)[1]
    )
    assert [kind for kind, _ in events] == ["upload", "upload", "write", "delete"]
    assert all(target.startswith(second_root + "/") for kind, target in events if kind == "upload")
    assert events[2][1] == f"{uri}/{store.MANIFEST_NAME}"
    assert published_files(uri) == {"report.json": "2", "part": "2"}


def test_leftovers_of_crashed_publishes_are_cleaned_by_the_next_one(base_uri: str) -> None:
    uri = store.join(base_uri, "out")
    with outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "1"})
    if store.is_s3(uri):
        orphan = store.join(uri, outputs.new_version(), "report.json")
        store.write_text(orphan, "half a publish")
        bucket, key = store.split_s3(store.join(uri, outputs.new_version(), "big.bin"))
        store.client().create_multipart_upload(Bucket=bucket, Key=key)
    else:
        for leftover in (".out.0123abcd.tmp", ".out.4567cdef.old"):
            (Path(base_uri) / leftover).mkdir()
            (Path(base_uri) / leftover / "report.json").write_text("half a publish")

    with outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "2"})
    assert published_files(uri) == {"report.json": "2"}
    if store.is_s3(uri):
        bucket, key = store.split_s3(uri)
        assert not store.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
    else:
        assert sorted(p.name for p in Path(base_uri).iterdir()) == ["out"]


def test_a_first_publish_that_crashed_leaves_a_prefix_the_next_publish_may_use(
    s3_bucket: str,
) -> None:
    uri = f"{s3_bucket}/out"
    store.write_text(store.join(uri, outputs.new_version(), "report.json"), "half")
    with outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "1"})
    assert published_files(uri) == {"report.json": "1"}


def test_an_output_published_before_versions_is_read_and_replaced(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/legacy"
    store.write_text(f"{uri}/report.json", "old")
    store.write_text(f"{uri}/{store.MANIFEST_NAME}", json.dumps({"files": {"report.json": {}}}))
    assert store.resolve(uri) == uri
    with outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "new"})
    assert published_files(uri) == {"report.json": "new"}


def test_readers_follow_the_pointer_to_a_directory_or_a_file_in_it(
    s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"{s3_bucket}/lora"
    with outputs.staged_output(uri, KIND) as staging:
        _write_output(staging, {"report.json": "{}", "film.safetensors": "weights"})
    root = store.resolve(uri)
    assert store.resolve(f"{uri}/film.safetensors") == f"{root}/film.safetensors"
    assert store.resolve(f"{uri}/absent.safetensors") == f"{uri}/absent.safetensors"

    store.get_dir(uri, tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        store.MANIFEST_NAME,
        "film.safetensors",
        "report.json",
    ]
    assert "version" not in json.loads((tmp_path / "copy" / store.MANIFEST_NAME).read_text())


def test_a_pointer_to_a_version_outside_the_output_is_refused(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/out"
    store.write_text(f"{uri}/{store.MANIFEST_NAME}", json.dumps({"version": "../x", "files": {}}))
    with pytest.raises(StorageError, match="not a valid manifest"):
        store.resolve(uri)


def test_locally_the_old_output_is_swapped_out_in_one_step(tmp_path: Path) -> None:
    """With renameat2's exchange there is no moment without an output at the destination."""
    old, new = tmp_path / "out", tmp_path / ".out.x.tmp"
    old.mkdir()
    (old / "v").write_text("old")
    new.mkdir()
    (new / "v").write_text("new")
    assert outputs._exchange(new, old)
    assert (old / "v").read_text() == "new" and (new / "v").read_text() == "old"


def test_a_second_run_into_an_output_being_written_stops_at_once(
    base_uri: str, tmp_path: Path
) -> None:
    """Every stage output is held while it is written: `lorapipe ingest` into a dataset that
    another run is writing exits 2 at once, in one line naming that run."""
    from test_writer_lock import Holder

    from lorapipe.writer_lock import hold

    dataset = store.join(base_uri, "dataset")
    images = tmp_path / "images"
    images.mkdir()
    holder = Holder(dataset)
    try:
        assert holder.first_line == "held"
        command = [sys.executable, "-m", "lorapipe.cli", "ingest", str(images), "--out", dataset]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        holder.finish()
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert "is being written by" in line and f"pid {holder.pid}" in line, line
    assert "Traceback" not in refused.stderr

    with hold(dataset):  # a stage's own hold: its publish shares it and keeps the lease
        with outputs.staged_output(dataset, KIND) as staging:
            _write_output(staging, {"report.json": "1"})
        assert store.exists(store.join(dataset, LEASE_NAME)) == store.is_s3(dataset)
    assert published_files(dataset) == {"report.json": "1"}
