"""The Parquet dataset every stage reads and writes: one row per image.

A dataset is a directory, local or ``s3://``, of Parquet shards plus ``_dataset.json``::

    part-00000.parquet      row groups of ``row_group_rows`` rows, ``rows_per_shard`` rows a shard
    part-00001.parquet
    _dataset.json           {"schema_version": 1, "rows": 70, "shards": [{"path": ..., "rows": ...}]}

A dataset is published whole (:mod:`lorapipe.outputs`): on S3 its files live under a version
prefix that ``_MANIFEST.json`` points at, and readers follow the pointer. Stages may put their
own files (``report.json``, ``metadata.csv``) next to the shards; readers only open the shards
that ``_dataset.json`` lists, and only inside the dataset's folder.

The schema version is stored twice: in ``_dataset.json`` and in every shard's Parquet
metadata (key ``lorapipe.schema_version``), so a shard copied out of its dataset still says
what it is. A reader refuses a newer version than it knows instead of misreading it.

Memory stays bounded on both sides: the writer holds at most one row group of records, the
reader one batch of rows (and, for S3, one downloaded shard on disk).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lorapipe import __version__, outputs, store
from lorapipe.errors import DatasetError, ObjectNotFoundError

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = "lorapipe.schema_version"
INFO_NAME = "_dataset.json"
SHARD_NAME = "part-{index:05d}.parquet"
# only an older dataset (or nothing) is replaced
OUTPUT_KIND = outputs.OutputKind(
    name="a lorapipe dataset",
    markers=(INFO_NAME,),
    error=DatasetError,
    refusal=(
        "'{uri}' exists and is not a lorapipe dataset; write the dataset to a new or "
        "empty folder (lorapipe only replaces an older dataset)"
    ),
)

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("tags", pa.list_(pa.string()), nullable=False),
        pa.field("tag_scores", pa.list_(pa.float32()), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("flipped", pa.bool_(), nullable=False),
        pa.field("parent_id", pa.string(), nullable=True),
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION)},
)

# Parquet column paths whose values repeat across rows; dictionary encoding of the unique ones
# (image bytes, ids, hashes, file names) would only fill a dictionary that is then abandoned.
_DICTIONARY_COLUMNS = ["format", "tags.list.element"]
# zstd everywhere but the image bytes: PNG, JPEG and WebP are compressed already, and zstd over
# them costs more time than the encoding itself saves bytes
_COMPRESSION = {
    f"{item.name}.list.element" if pa.types.is_list(item.type) else item.name: (
        "none" if item.name == "image" else "zstd"
    )
    for item in SCHEMA
}


@dataclass
class ImageRecord:
    """One image of a dataset: the encoded bytes and what the stages learned about them."""

    id: str  # stable id, e.g. first 16 hex of the pixels' sha256 (+ "-flip")
    image: bytes  # encoded 8-bit RGB, no metadata (from ingest: a photo's own bytes or WebP)
    format: str  # "png" | "jpeg" | "webp"
    width: int
    height: int
    sha256: str  # of the decoded RGB pixels
    caption: str = ""
    tags: list[str] = field(default_factory=list)  # normalized tags, ordered by score
    tag_scores: list[float] = field(default_factory=list)  # parallel to tags; empty if untagged
    source: str = ""  # original file name relative to the input
    flipped: bool = False
    parent_id: str | None = None  # id of the image this one was derived from


# What a record holds for a required column that a projected read (``columns=``) skipped.
_NOT_READ = {"image": b"", "format": "", "width": 0, "height": 0, "sha256": ""}


@dataclass
class DatasetInfo:
    """The contents of ``_dataset.json``."""

    schema_version: int
    rows: int
    shards: dict[str, int]  # shard file name -> rows, in reading order
    root: str = ""  # where the shards are read from (the current version's prefix on S3)

    def to_json(self) -> str:
        shards = [{"path": name, "rows": rows} for name, rows in self.shards.items()]
        document = {
            "schema_version": self.schema_version,
            "rows": self.rows,
            "shards": shards,
            "written_by": f"lorapipe {__version__}",
        }
        return json.dumps(document, indent=2) + "\n"


# --------------------------------------------------------------------------- writing


class DatasetWriter:
    """Writes records as a dataset at ``uri`` (local or s3://); use it as a context manager.

    Records are buffered up to ``row_group_rows`` and flushed as one row group; a new shard
    starts every ``rows_per_shard`` rows. Shards go to a private staging directory, and
    nothing appears at ``uri`` until ``close()`` succeeds. A dataset already at ``uri`` is
    replaced only then; an exception inside the ``with`` block publishes nothing.
    """

    def __init__(self, uri: str, *, rows_per_shard: int = 512, row_group_rows: int = 32) -> None:
        if rows_per_shard < 1 or row_group_rows < 1:
            raise ValueError(
                f"rows_per_shard ({rows_per_shard}) and row_group_rows ({row_group_rows}) "
                "must be at least 1"
            )
        self.uri = uri
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = row_group_rows
        self._output = outputs.OutputStaging(uri, OUTPUT_KIND)
        self._staging_dir = self._output.path
        self._buffer: list[ImageRecord] = []
        self._shard: pq.ParquetWriter | None = None
        self._shard_name = ""
        self._shard_rows = 0
        self._shards: dict[str, int] = {}
        self._rows = 0
        self._closed = False

    def write(self, record: ImageRecord) -> None:
        """Add one record; a full row group is flushed to the current shard."""
        if self._closed:
            raise ValueError(f"DatasetWriter for '{self.uri}' is closed; open a new one")
        if record.tag_scores and len(record.tag_scores) != len(record.tags):
            raise ValueError(
                f"record {record.id!r}: {len(record.tag_scores)} tag_scores for "
                f"{len(record.tags)} tags; give one score per tag or none"
            )
        self._buffer.append(record)
        rows_pending = self._shard_rows + len(self._buffer)
        if len(self._buffer) >= self.row_group_rows or rows_pending >= self.rows_per_shard:
            self._flush_row_group()

    def extra_file(self, name: str) -> Path:
        """Where to write a file that is published with the dataset, in the same step (a
        stage's ``report.json``, ``metadata.csv``, ``flagged/<id>.jpg``): never written into
        the output after it. ``name`` is a relative path; its folders are created."""
        parts = PurePosixPath(name).parts
        if (
            not parts
            or name.startswith("/")
            or any(part in ("", ".", "..") for part in parts)
            or parts[0] in (INFO_NAME, store.MANIFEST_NAME)
            or parts[0].startswith("part-")
        ):
            raise ValueError(f"{name!r} is not a name for a file beside the shards")
        path = self._staging_dir.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_extra(self, name: str, content: str | bytes) -> None:
        """Write ``content`` (text as UTF-8) to ``extra_file(name)``."""
        data = content.encode("utf-8") if isinstance(content, str) else content
        self.extra_file(name).write_bytes(data)

    def close(self) -> int:
        """Finish the last shard, publish the dataset at ``uri`` and return its row count."""
        if self._closed:
            return self._rows
        self._closed = True
        try:
            self._flush_row_group()
            if not self._shards and self._shard is None:
                self._open_shard()  # an empty dataset still has one shard carrying the schema
            self._finish_shard()
            info = DatasetInfo(SCHEMA_VERSION, self._rows, dict(self._shards))
            (self._staging_dir / INFO_NAME).write_text(info.to_json(), encoding="utf-8")
            self._output.publish()
        finally:
            self._discard_staging()
        return self._rows

    def abort(self) -> None:
        """Drop everything written so far; nothing is published."""
        self._closed = True
        self._discard_staging()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        if self._shard is None:
            self._open_shard()
        table = pa.Table.from_pylist([asdict(record) for record in self._buffer], schema=SCHEMA)
        self._shard.write_table(table, row_group_size=len(self._buffer))
        self._shard_rows += len(self._buffer)
        self._rows += len(self._buffer)
        self._buffer.clear()
        if self._shard_rows >= self.rows_per_shard:
            self._finish_shard()

    def _open_shard(self) -> None:
        self._shard_name = SHARD_NAME.format(index=len(self._shards))
        self._shard = pq.ParquetWriter(
            self._staging_dir / self._shard_name,
            SCHEMA,
            compression=_COMPRESSION,
            use_dictionary=_DICTIONARY_COLUMNS,
        )

    def _finish_shard(self) -> None:
        if self._shard is None:
            return
        self._shard.close()
        self._shards[self._shard_name] = self._shard_rows
        self._shard = None
        self._shard_rows = 0

    def _discard_staging(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        self._buffer.clear()
        self._output.discard()


# --------------------------------------------------------------------------- reading


def read_info(uri: str) -> DatasetInfo:
    """The dataset's ``_dataset.json``, checked: a DatasetError if missing, broken or newer,
    or if it lists a shard outside the dataset's folder."""
    root = store.resolve(uri)
    info_uri = store.join(root, INFO_NAME)
    try:
        text = store.read_text(info_uri)
    except ObjectNotFoundError:
        raise DatasetError(
            f"'{uri}' is not a lorapipe dataset (no {INFO_NAME}); run `lorapipe ingest` to "
            "make one, or check the path"
        ) from None
    try:
        document = json.loads(text)
        version = document["schema_version"]
        _check_version(version, info_uri)
        shards = {entry["path"]: int(entry["rows"]) for entry in document["shards"]}
        info = DatasetInfo(version, int(document["rows"]), shards, root)
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetError(
            f"{info_uri}: not a valid dataset description ({error!r}); write the dataset "
            "again with lorapipe"
        ) from None
    for name in info.shards:
        _check_shard_path(name, info_uri)
    return info


def _check_shard_path(name: str, info_uri: str) -> None:
    """A shard path is a file inside the dataset's folder: relative, no ``..``, no scheme, so
    an edited or hostile ``_dataset.json`` cannot make a stage read someone else's files."""
    parts = name.split("/")
    if ":" in name or "\\" in name or any(part in ("", ".", "..") for part in parts):
        raise DatasetError(
            f"{info_uri}: shard path {name!r} leaves the dataset's folder; a dataset lists "
            "only its own shards (e.g. part-00000.parquet), write it again with lorapipe"
        )


def is_dataset(uri: str) -> bool:
    """Whether ``uri`` holds a lorapipe dataset (rather than, say, a folder of images)."""
    return store.exists(store.join(store.resolve(uri), INFO_NAME))


def count_rows(uri: str) -> int:
    """Rows in the dataset, from ``_dataset.json`` (no shard is read)."""
    return read_info(uri).rows


def read_records(
    uri: str, *, columns: Sequence[str] | None = None, batch_rows: int = 32
) -> Iterator[ImageRecord]:
    """Stream the records of a dataset, ``batch_rows`` rows in memory at a time.

    ``columns`` reads only those columns (and ``id``), e.g. ``["tags"]`` to skip the image
    bytes; a required field that was not read is empty (``b""``, ``""``, ``0``) and an
    optional one keeps its default. The dataset is checked before the first record.
    """
    info = read_info(uri)
    wanted = [f.name for f in SCHEMA] if columns is None else _projection(columns)
    return _stream(uri, info, wanted, batch_rows)


def decode_image(record: ImageRecord) -> Image.Image:
    """The record's image, decoded, as an RGB PIL image."""
    if not record.image:
        raise DatasetError(
            f"record {record.id!r} has no image bytes; read it without a columns= list "
            "that leaves out 'image'"
        )
    try:
        with Image.open(io.BytesIO(record.image)) as image:
            return image.convert("RGB")
    except OSError as error:
        raise DatasetError(
            f"record {record.id!r} (source {record.source!r}): the image cannot be decoded "
            f"({error}); run `lorapipe ingest` again on the original"
        ) from None


def _projection(columns: Sequence[str]) -> list[str]:
    known = SCHEMA.names
    unknown = [name for name in columns if name not in known]
    if unknown:
        raise ValueError(f"unknown dataset column(s) {unknown}; the columns are {known}")
    return [name for name in known if name == "id" or name in columns]


def _stream(
    uri: str, info: DatasetInfo, columns: list[str], batch_rows: int
) -> Iterator[ImageRecord]:
    """The records of every shard; a shard that is truncated, corrupted or not Parquet (pyarrow
    says so on opening, or on the page it cannot decode) is a DatasetError naming it."""
    for name, expected_rows in info.shards.items():
        shard_uri = store.join(info.root, name)
        with store.local_file(shard_uri) as path:
            try:
                with pq.ParquetFile(path) as shard:
                    _check_shard(shard, shard_uri, expected_rows)
                    for batch in shard.iter_batches(batch_size=batch_rows, columns=columns):
                        for row in batch.to_pylist():
                            yield _record(row)
            except (pa.ArrowException, OSError) as error:
                if isinstance(error, OSError) and error.errno is not None:
                    raise  # the system failed to read the file, not the file's content
                printable = "".join(c if c.isprintable() else " " for c in str(error))
                raise DatasetError(
                    f"{shard_uri}: not a readable Parquet shard ({' '.join(printable.split())}); "
                    "it is truncated, corrupted or not Parquet: write the dataset again with "
                    "the lorapipe stage that made it"
                ) from None


def _record(row: dict) -> ImageRecord:
    values = {name: value for name, value in _NOT_READ.items() if name not in row}
    values.update(row)
    return ImageRecord(**values)


def _check_shard(shard: pq.ParquetFile, shard_uri: str, expected_rows: int) -> None:
    """The shard has every column with its type and a schema version this lorapipe reads."""
    schema = shard.schema_arrow
    version = (schema.metadata or {}).get(SCHEMA_VERSION_KEY.encode())
    if version is None:
        raise DatasetError(
            f"{shard_uri}: no '{SCHEMA_VERSION_KEY}' in the Parquet metadata, so it was not "
            "written by lorapipe; make the dataset with `lorapipe ingest`"
        )
    _check_version(version.decode(), shard_uri)
    for expected in SCHEMA:
        if expected.name not in schema.names:
            raise DatasetError(
                f"{shard_uri}: column '{expected.name}' is missing; the shard does not have "
                "the lorapipe dataset schema, write it again with lorapipe"
            )
        actual = schema.field(expected.name).type
        if actual != expected.type:
            raise DatasetError(
                f"{shard_uri}: column '{expected.name}' is {actual}, expected {expected.type}; "
                "the shard does not have the lorapipe dataset schema, write it again with lorapipe"
            )
    if shard.metadata.num_rows != expected_rows:
        raise DatasetError(
            f"{shard_uri}: has {shard.metadata.num_rows} rows but {INFO_NAME} says "
            f"{expected_rows}; the dataset was changed after it was written, write it again"
        )


def _check_version(version: object, where: str) -> None:
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DatasetError(
            f"{where}: schema version {version!r} is not one lorapipe writes "
            f"(1..{SCHEMA_VERSION}); write the dataset again with lorapipe"
        )
    if version > SCHEMA_VERSION:
        raise DatasetError(
            f"{where}: written by a newer lorapipe (schema {version} > {SCHEMA_VERSION}); "
            "upgrade lorapipe"
        )
