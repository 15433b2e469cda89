"""The Parquet dataset: what a writer publishes, what a reader gets back, and what it refuses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lorapipe import store
from lorapipe.dataset import (
    INFO_NAME,
    SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    DatasetWriter,
    ImageRecord,
    count_rows,
    decode_image,
    read_info,
    read_records,
)
from lorapipe.errors import DatasetError
from lorapipe.store import MANIFEST_NAME


def png_bytes(value: int, mode: str = "RGB", size: tuple[int, int] = (8, 6)) -> bytes:
    color = value % 256 if mode == "L" else (value % 256, 7, 200)
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_record(index: int, **overrides) -> ImageRecord:
    record = ImageRecord(
        id=f"{index:016x}",
        image=png_bytes(index),
        format="png",
        width=8,
        height=6,
        sha256=f"{index:064x}",
        source=f"raw/img_{index}.jpg",
    )
    for name, value in overrides.items():
        setattr(record, name, value)
    return record


def write_dataset(uri: str, records: list[ImageRecord], **writer_options) -> int:
    with DatasetWriter(uri, **writer_options) as writer:
        for record in records:
            writer.write(record)
    return writer.close()


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    tagged = make_record(
        1,
        caption="1girl, left hand",
        tags=["1girl", "left hand"],
        tag_scores=[0.875, 0.5],
        flipped=True,
        parent_id="0000000000000000",
    )
    untagged = make_record(2)  # empty caption and lists, parent_id None
    uri = str(tmp_path / "ds")

    assert write_dataset(uri, [tagged, untagged]) == 2

    assert list(read_records(uri)) == [tagged, untagged]
    assert count_rows(uri) == 2
    info = json.loads((tmp_path / "ds" / INFO_NAME).read_text())
    assert info["schema_version"] == SCHEMA_VERSION
    assert info["rows"] == 2
    shard = pq.ParquetFile(tmp_path / "ds" / "part-00000.parquet")
    assert shard.schema_arrow.metadata[SCHEMA_VERSION_KEY.encode()] == str(SCHEMA_VERSION).encode()
    assert shard.schema_arrow.equals(SCHEMA)


def test_a_new_shard_every_rows_per_shard_rows(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    records = [make_record(i) for i in range(70)]

    write_dataset(uri, records, rows_per_shard=32, row_group_rows=8)

    assert read_info(uri).shards == {
        "part-00000.parquet": 32,
        "part-00001.parquet": 32,
        "part-00002.parquet": 6,
    }
    assert sorted(p.name for p in (tmp_path / "ds").glob("*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert pq.ParquetFile(tmp_path / "ds" / "part-00000.parquet").num_row_groups == 4
    assert [r.id for r in read_records(uri)] == [r.id for r in records]


def test_row_groups_end_at_shard_boundaries(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_record(i) for i in range(25)], rows_per_shard=10, row_group_rows=4)

    groups = [
        [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)]
        for shard in (pq.ParquetFile(p) for p in sorted((tmp_path / "ds").glob("*.parquet")))
    ]
    assert groups == [[4, 4, 2], [4, 4, 2], [4, 1]]


def test_reading_streams_batches_across_row_groups_and_shards(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    records = [make_record(i) for i in range(40)]
    write_dataset(uri, records, rows_per_shard=16, row_group_rows=4)

    stream = read_records(uri, batch_rows=3)
    first_shard = [next(stream) for _ in range(16)]
    # Later shards are opened only when the reader gets to them.
    (tmp_path / "ds" / "part-00002.parquet").unlink()
    second_shard = [next(stream) for _ in range(16)]

    assert first_shard + second_shard == records[:32]
    with pytest.raises(Exception, match="part-00002"):
        next(stream)


def test_columns_skip_the_image_bytes(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_record(1, tags=["sky"], tag_scores=[0.5], flipped=True)])

    (record,) = read_records(uri, columns=["tags", "flipped"])

    assert (record.id, record.tags, record.flipped) == (f"{1:016x}", ["sky"], True)
    assert (record.image, record.width, record.caption, record.tag_scores) == (b"", 0, "", [])
    with pytest.raises(DatasetError, match="no image bytes"):
        decode_image(record)


def test_unknown_column_is_a_programming_error(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_record(1)])

    with pytest.raises(ValueError, match="'colour'"):
        read_records(uri, columns=["colour"])


def test_decode_image_returns_rgb(tmp_path: Path) -> None:
    gray = make_record(3, image=png_bytes(3, mode="L", size=(5, 4)), width=5, height=4)

    image = decode_image(gray)

    assert (image.mode, image.size) == ("RGB", (5, 4))
    with pytest.raises(DatasetError, match="cannot be decoded"):
        decode_image(make_record(4, image=b"not an image"))


def test_zero_rows_make_a_valid_empty_dataset(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")

    assert write_dataset(uri, []) == 0

    assert count_rows(uri) == 0
    assert list(read_records(uri)) == []
    assert pq.ParquetFile(tmp_path / "ds" / "part-00000.parquet").schema_arrow.equals(SCHEMA)


def test_a_folder_without_dataset_json_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()

    with pytest.raises(DatasetError, match=r"not a lorapipe dataset \(no _dataset.json\)"):
        read_records(str(tmp_path / "images"))
    with pytest.raises(DatasetError, match="lorapipe ingest"):
        count_rows(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t.set_column(3, "width", pa.array(["8"], pa.string())),
            r"part-00000.parquet: column 'width' is string, expected int32",
        ),
        (lambda t: t.drop_columns(["tags"]), r"part-00000.parquet: column 'tags' is missing"),
        (lambda t: t.replace_schema_metadata(None), "not written by lorapipe"),
    ],
    ids=["wrong-type", "missing-column", "no-version"],
)
def test_a_shard_with_the_wrong_schema_is_refused(tmp_path: Path, change, message: str) -> None:
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_record(1)])
    shard = tmp_path / "ds" / "part-00000.parquet"
    pq.write_table(change(pq.read_table(shard)), shard)

    with pytest.raises(DatasetError, match=message):
        list(read_records(uri))


def test_a_newer_schema_version_asks_for_an_upgrade(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_record(1)])
    info_path = tmp_path / "ds" / INFO_NAME
    info = json.loads(info_path.read_text())
    newer = SCHEMA_VERSION + 2

    info_path.write_text(json.dumps({**info, "schema_version": newer}))
    upgrade = rf"newer lorapipe \(schema {newer} > {SCHEMA_VERSION}\); upgrade lorapipe"
    with pytest.raises(DatasetError, match=upgrade):
        count_rows(uri)

    info_path.write_text(json.dumps(info))
    shard = tmp_path / "ds" / "part-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.replace_schema_metadata({SCHEMA_VERSION_KEY: str(newer)}), shard)
    with pytest.raises(DatasetError, match="part-00000.parquet: written by a newer lorapipe"):
        list(read_records(uri))


@pytest.mark.parametrize(
    "path", ["../other/part-00000.parquet", "/etc/passwd", "s3://elsewhere/p.parquet", "a//b", ""]
)
def test_a_shard_path_that_leaves_the_dataset_is_refused(tmp_path: Path, path: str) -> None:
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_record(1)])
    info_path = tmp_path / "ds" / INFO_NAME
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "shards": [{"path": path, "rows": 1}]}))
    with pytest.raises(DatasetError, match=r"shard path .* leaves the dataset's folder"):
        count_rows(uri)


def test_an_exception_inside_with_publishes_nothing(tmp_path: Path) -> None:
    older = [make_record(i) for i in range(3)]
    kept, fresh = str(tmp_path / "kept"), str(tmp_path / "fresh")
    write_dataset(kept, older)

    for uri in (kept, fresh):
        with (
            pytest.raises(RuntimeError, match="tagger crashed"),
            DatasetWriter(uri, row_group_rows=2) as writer,
        ):
            for i in range(10, 15):
                writer.write(make_record(i))
            raise RuntimeError("tagger crashed")

    assert list(read_records(kept)) == older
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_close_replaces_an_older_dataset(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_record(i) for i in range(9)], rows_per_shard=4)

    write_dataset(uri, [make_record(42)], rows_per_shard=4)

    assert [r.id for r in read_records(uri)] == [f"{42:016x}"]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        MANIFEST_NAME,
        INFO_NAME,
        "part-00000.parquet",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_a_folder_that_is_not_a_dataset_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"...")

    with pytest.raises(DatasetError, match="exists and is not a lorapipe dataset"):
        DatasetWriter(str(tmp_path / "photos"))
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]


def test_tag_scores_must_be_parallel_to_tags(tmp_path: Path) -> None:
    with DatasetWriter(str(tmp_path / "ds")) as writer, pytest.raises(ValueError, match="2 tags"):
        writer.write(make_record(1, tags=["a", "b"], tag_scores=[0.5]))


def test_s3_round_trip(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/datasets/clean"
    records = [make_record(i, tags=["sky"], tag_scores=[0.25]) for i in range(20)]

    assert write_dataset(uri, records, rows_per_shard=8, row_group_rows=4) == 20

    assert count_rows(uri) == 20
    assert list(read_records(uri, batch_rows=5)) == records
    assert store.is_complete(uri)

    write_dataset(uri, records[:3], rows_per_shard=8)
    assert list(read_records(uri)) == records[:3]
    version = store.resolve(uri)  # on S3 the files are under the version the pointer names
    assert [u for u in store.list_uris(uri) if u.endswith(".parquet")] == [
        f"{version}/part-00000.parquet"
    ]
