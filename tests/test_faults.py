"""Fault injection (issue 8): kills, a full disk, memory bounds, deterministic re-runs.

Run with ``make test-faults`` (``pytest -m faults``); excluded from the default run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_proxy import CuttingProxy
from lora_fixtures import publish_folder
from PIL import Image
from safetensors.torch import load_file
from test_train import flags, write_folder

from lorapipe import checkpoint_layout as layout
from lorapipe import outputs, store, writer_lock
from lorapipe.dataset import DatasetWriter, ImageRecord, read_info, read_records
from lorapipe.errors import LorapipeError
from lorapipe.stages import augment, ingest, select
from lorapipe.stages.train import run
from lorapipe.train_config import TrainConfig
from lorapipe.training.progress import LOSS_LOG_NAME

pytestmark = pytest.mark.faults

KILLS = 3
RESUME_ATOL = 1e-5
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data") / "shapes", 8)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def config(tiny_model_dir: Path, cache_dir: Path, images: Path) -> TrainConfig:
    return TrainConfig(
        base_model=str(tiny_model_dir),
        cache_dir=str(cache_dir),
        train_data_dir=str(images),
        batch_size=2,
        learning_rate=3e-3,
        validation_split=2,
        save_steps=4,
        max_train_steps=4,
    )


def train_process(config: TrainConfig, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lorapipe.cli", "train", *flags(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def assert_only_complete_checkpoints_listed_complete(output: str) -> dict[int, str]:
    """Every checkpoint ``select`` calls complete has its marker and all of its files."""
    complete, _ = layout.find_checkpoints(output)
    for step, uri in complete.items():
        assert store.exists(store.join(uri, layout.COMPLETE_MARKER)), (step, uri)
        for name in (LORA_FILE, "record.json", "lora_config.json", "training_state/state.json"):
            assert store.exists(store.join(uri, name)), f"{uri} is listed complete without {name}"
    return complete


# --------------------------------------------------------------------------- kills


def complete_steps(output: Path) -> list[int]:
    """Steps of the complete local checkpoints, read safely while a run is writing them (a
    recursive listing such as ``find_checkpoints`` may race with files being renamed)."""
    return [
        int(marker.parent.name.split("-")[1]) for marker in output.glob("checkpoint-*/_COMPLETE")
    ]


def test_training_killed_again_and_again_resumes_from_s3_to_the_uninterrupted_lora(
    config: TrainConfig, tmp_path: Path, s3_bucket: str
) -> None:
    mirror = f"{s3_bucket}/mirror"
    config = dataclasses.replace(config, max_train_steps=24, checkpoint_mirror=mirror)
    output = tmp_path / "resumed"
    resumed = dataclasses.replace(config, output_dir=str(output), resume="latest")
    rng = random.Random(8)
    kills, attempts, progress = 0, 0, []
    # a killed run's lease on the mirror lives on until its TTL: the next attempt knows it is dead
    after_a_kill = {"env": os.environ | {writer_lock.FORCE_ENV: "1"}}
    while kills < KILLS:
        attempts += 1
        assert attempts <= 2 * KILLS, f"only {kills} kills landed in {attempts - 1} attempts"
        start = max(layout.find_checkpoints(mirror)[0], default=0)
        process = train_process(resumed, **after_a_kill)
        deadline = time.monotonic() + 300
        # wait for progress (a checkpoint past the resume point), then kill at a random moment:
        # mid-step, mid-save or mid-upload to the mirror
        while process.poll() is None and max(complete_steps(output), default=0) <= start:
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        _, stderr = process.communicate()
        assert process.returncode in (0, -signal.SIGKILL), stderr[-3000:]
        assert_only_complete_checkpoints_listed_complete(str(output))
        progress.append(sorted(assert_only_complete_checkpoints_listed_complete(mirror)))
        if process.returncode == 0:
            break  # finished before the kill landed: nothing left to interrupt
        shutil.rmtree(output)  # the local disk is lost: the next attempt resumes from S3
    print(f"\nkills survived: {kills} in {attempts} attempts; mirrored steps: {progress}")
    assert kills >= 2 and progress[-1], "the kills must land after checkpoints were mirrored"

    final = train_process(resumed, **after_a_kill)
    _, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr[-3000:]
    straight = tmp_path / "straight"
    run(
        str(config.train_data_dir), str(straight), dataclasses.replace(config, checkpoint_mirror="")
    )

    complete = assert_only_complete_checkpoints_listed_complete(str(output))
    assert max(complete) == 24
    a = load_file(output / "checkpoint-24" / LORA_FILE)
    b = load_file(straight / "checkpoint-24" / LORA_FILE)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=RESUME_ATOL, rtol=0, msg=key)
    assert 24 in assert_only_complete_checkpoints_listed_complete(mirror)
    report = select.run(str(output), str(tmp_path / "selected"))
    assert report["files"]["kohya"]


# --------------------------------------------------------------------------- disk full


def _limit_file_size(limit: int):  # noqa: ANN202
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG, not a kill

    return preexec


def assert_one_line_disk_full_error(process: subprocess.CompletedProcess, command: str) -> None:
    assert process.returncode != 0
    assert "Traceback" not in process.stderr, process.stderr[-3000:]
    errors = [line for line in process.stderr.splitlines() if f"lorapipe {command}: error" in line]
    assert len(errors) == 1, process.stderr[-3000:]
    assert "disk" in errors[0].lower() and "free" in errors[0].lower(), errors[0]


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def noise_folder(folder: Path, count: int, size: int = 520, blocks: int = 13) -> Path:
    """``count`` distinct images of random colour blocks: no exact or near duplicates."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (blocks, blocks, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
        image.save(folder / f"img_{index:05d}.png", compress_level=1)
    return folder


def test_a_full_disk_while_writing_a_dataset_is_one_line_and_keeps_the_old_dataset(
    tmp_path: Path,
) -> None:
    dataset = tmp_path / "dataset"
    with DatasetWriter(str(dataset)) as writer:
        writer.write(
            ImageRecord(id="0" * 16, image=b"png", format="png", width=1, height=1, sha256="0" * 64)
        )
    before = tree_digest(dataset)
    folder = noise_folder(tmp_path / "noise", 40)  # ~250 kB of PNG, well over the limit

    process = subprocess.run(
        [sys.executable, "-m", "lorapipe.cli", "ingest", str(folder), "--out", str(dataset)]
        + ["--min-size", "1", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(64 * 1024),
    )
    assert_one_line_disk_full_error(process, "ingest")
    assert tree_digest(dataset) == before
    assert read_info(str(dataset)).rows == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dataset.")]  # no staging


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(
    config: TrainConfig, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    run(str(config.train_data_dir), str(output), config)  # checkpoint-4, and a filled cache
    before = tree_digest(output / "checkpoint-4")

    # checkpoint files are 100-400 kB; the loss log and event files stay far below the limit
    resumed = dataclasses.replace(
        config, output_dir=str(output), resume="latest", max_train_steps=8
    )
    process = subprocess.run(
        [sys.executable, "-m", "lorapipe.cli", "train", *flags(resumed)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(64 * 1024),
    )
    assert_one_line_disk_full_error(process, "train")
    complete, incomplete = layout.find_checkpoints(str(output))
    assert sorted(complete) == [4] and not incomplete
    assert tree_digest(output / "checkpoint-4") == before
    assert not list(output.glob(".staging-*"))


# --------------------------------------------------------------------------- memory

MEMORY_IMAGES = 5000
# Measured (2 cores, 2 threads): 5,000 PNGs of 520x520 (32 MB on disk, 1.35 GB decoded) peak
# 30 to 35 MB above what the process holds once ingest's modules are imported (which is 75 to 115 MB:
# ru_maxrss counts the shared libraries' resident file pages, more of them when a fresh install
# left them all in the page cache, as on CI); the bound is about 3x that growth.
INGEST_PEAK_RSS_GROWTH_BOUND_KB = 100_000
INGEST_IMPORTS = "import lorapipe.cli, lorapipe.stages.ingest, pyarrow.parquet, boto3"


def peak_rss_kb(command: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``command`` under a fresh Python parent, so that only its process tree counts:
    ru_maxrss of RUSAGE_CHILDREN is the largest peak of any process in the tree (kB)."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:]).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", wrapper, *command], capture_output=True, text=True, timeout=600
    )
    return process, int(process.stderr.strip().splitlines()[-1])


def test_ingest_of_thousands_of_images_stays_under_a_stated_peak_rss(tmp_path: Path) -> None:
    folder = noise_folder(tmp_path / "many", MEMORY_IMAGES)
    size = sum(path.stat().st_size for path in folder.iterdir())
    process, peak = peak_rss_kb(
        [sys.executable, "-m", "lorapipe.cli", "ingest", str(folder)]
        + ["--out", str(tmp_path / "dataset"), "--min-size", "1", "--workers", "2"]
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert read_info(str(tmp_path / "dataset")).rows == MEMORY_IMAGES
    print(f"\ningest of {MEMORY_IMAGES} images ({size / 1e6:.0f} MB): peak RSS {peak / 1e3:.0f} MB")
    _, imported = peak_rss_kb([sys.executable, "-c", INGEST_IMPORTS])
    print(f"({(peak - imported) / 1e3:.0f} MB above its imports, {imported / 1e3:.0f} MB)")
    assert peak - imported < INGEST_PEAK_RSS_GROWTH_BOUND_KB


def noise_dataset(uri: Path, count: int, size: int = 512) -> Path:
    """A lorapipe dataset of ``count`` distinct captioned noise-block PNGs."""
    with DatasetWriter(str(uri)) as writer:
        for index, path in enumerate(
            sorted(noise_folder(uri.parent / f"{uri.name}-png", count, size).iterdir())
        ):
            pixels = np.asarray(Image.open(path).convert("RGB"))
            digest = hashlib.sha256(pixels.tobytes()).hexdigest()
            writer.write(
                ImageRecord(
                    id=digest[:16], image=path.read_bytes(), format="png", width=size,
                    height=size, sha256=digest, caption=f"blocks {index}",
                )
            )  # fmt: skip
    return uri


def test_training_reads_the_dataset_streaming_not_all_at_once(
    tmp_path: Path, config: TrainConfig
) -> None:
    """Ten times the images (283 MB more decoded pixels) costs training far less memory: images
    are streamed to a file cache and decoded one batch at a time."""
    peaks = {}
    for count in (40, 400):
        dataset = noise_dataset(tmp_path / f"data-{count}", count)
        changes = dict(train_data_dir=str(dataset), output_dir=str(tmp_path / f"out-{count}"))
        changes.update(resolution=64, max_train_steps=1, save_steps=0, validation_split=0)
        changes.update(cache_dir=str(tmp_path / f"cache-{count}"))
        process, peaks[count] = peak_rss_kb(
            [sys.executable, "-m", "lorapipe.cli", "train", *flags(config, **changes)]
        )
        assert process.returncode == 0, process.stderr[-3000:]
    extra_decoded_kb = (400 - 40) * 512 * 512 * 3 / 1024
    growth = peaks[400] - peaks[40]
    print(
        f"\ntraining peak RSS: 40 images {peaks[40] / 1e3:.0f} MB, 400 images {peaks[400] / 1e3:.0f} MB"
    )
    assert growth < extra_decoded_kb / 4


# --------------------------------------------------------------------------- interrupted publishes

CUT_POINTS = 12  # interruption points tried per output kind on S3
LOCAL_KILLS = 5  # SIGKILLs of a local ingest over an existing dataset, at random moments


@pytest.fixture
def cut_line(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CuttingProxy]:
    """Every S3 request of this test goes through a proxy that can cut the line; a cut
    request is tried twice, not eight times, so each interrupted publish fails in seconds. The
    run after a cut is a new run while the cut one's lease is still fresh (its release was
    cut too), so it takes over, as `--force` after a dead run does."""
    proxy = CuttingProxy(s3_server)
    monkeypatch.setenv("LORAPIPE_S3_ENDPOINT", proxy.url)
    monkeypatch.setenv("LORAPIPE_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv(writer_lock.FORCE_ENV, "1")
    monkeypatch.setattr(store, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)  # S3's smallest part
    yield proxy
    proxy.close()


def noise_records(generation: int, count: int, size: int) -> list[ImageRecord]:
    """``count`` records of incompressible pixels, different for every ``generation``."""
    rng = np.random.default_rng(generation)
    records = []
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
        digest = hashlib.sha256(pixels.tobytes()).hexdigest()
        records.append(
            ImageRecord(
                id=digest[:16], image=buffer.getvalue(), format="png", width=size, height=size,
                sha256=digest, caption=f"generation {generation} image {index}",
            )
        )  # fmt: skip
    return records


def publish_dataset(uri: str, generation: int) -> None:
    """A dataset of three shards, the last above the multipart threshold."""
    with DatasetWriter(uri, rows_per_shard=2) as writer:
        for record in dataset_records(generation):
            writer.write(record)


def dataset_records(generation: int) -> list[ImageRecord]:
    large = dataclasses.replace(LARGE_RECORD, caption=f"generation {generation} large image")
    return [*noise_records(generation, 4, 64), large]


LARGE_RECORD = noise_records(1000, 1, 1400)[0]  # 5.9 MB of PNG


def dataset_version(uri: str) -> tuple[str, ...]:
    """The captions of the one whole dataset readable at ``uri``: every file its manifest
    lists is there with that sha256, and every shard has the rows ``_dataset.json`` says."""
    with store.local_dir(uri) as local:
        return tuple(record.caption for record in read_records(str(local), columns=["caption"]))


def expected_dataset(generation: int) -> tuple[str, ...]:
    return tuple(record.caption for record in dataset_records(generation))


GENERATE_KIND = outputs.OutputKind("a generate output", ("report.json", "index.parquet"))


def publish_generate_output(uri: str, generation: int) -> None:
    """Like generate's output: images, an index and the report."""
    with outputs.staged_output(uri, GENERATE_KIND) as staging:
        (staging / "images").mkdir()
        for index, record in enumerate(noise_records(generation, 12, 48)):
            (staging / "images" / f"{index:05d}.png").write_bytes(record.image)
        (staging / "index.parquet").write_text(f"generation {generation}")
        (staging / "report.json").write_text(json.dumps({"generation": generation}))


def generate_version(uri: str) -> tuple[str, ...]:
    """The report's generation and every image's sha256, of the one whole output at ``uri``."""
    with store.local_dir(uri) as local:
        report = json.loads((local / "report.json").read_text())
        images = sorted((local / "images").iterdir())
        return (report["generation"], *(hashlib.sha256(p.read_bytes()).hexdigest() for p in images))


def expected_generate_output(generation: int) -> tuple[str, ...]:
    images = [hashlib.sha256(r.image).hexdigest() for r in noise_records(generation, 12, 48)]
    return (generation, *images)


def cut_points(request_starts: list[int], total: int) -> list[int]:
    """The middle of CUT_POINTS of a publish's requests: spread over all of them, and every
    one of the last five (the pointer's PUT and the clean-up after it)."""
    ends = [*request_starts[1:], total]
    middles = [(start + end) // 2 for start, end in zip(request_starts, ends, strict=True)]
    spread = np.linspace(0, len(middles) - 1, CUT_POINTS - 5).round().astype(int)
    chosen = sorted({*spread.tolist(), *range(max(0, len(middles) - 5), len(middles))})
    return [middles[index] for index in chosen]


@pytest.mark.parametrize(
    ("publish", "read", "expected"),
    [
        (publish_dataset, dataset_version, expected_dataset),
        (publish_generate_output, generate_version, expected_generate_output),
    ],
    ids=["dataset", "generate-output"],
)
def test_a_publish_cut_at_any_point_leaves_the_old_version_or_the_new_one_whole(
    cut_line: CuttingProxy,
    s3_bucket: str,
    publish,
    read,
    expected,  # noqa: ANN001
) -> None:
    """The endpoint dies in the middle of one request of a publish over an existing S3
    output, for requests spread over the whole publish (uploads, the pointer, the clean-up);
    after it comes back exactly one whole version is readable, and the next publish leaves
    exactly its own files (no old version, orphan or multipart upload)."""
    uri = f"{s3_bucket}/output"
    publish(uri, 0)
    cut_line.restore()
    publish(uri, 1)
    points = cut_points(cut_line.request_starts, cut_line.sent)
    current = expected(1)
    outcomes = {"old": 0, "new": 0}
    for generation, point in enumerate(points, start=2):
        cut_line.cut_after(point)
        with pytest.raises(LorapipeError):
            publish(uri, generation)
        assert cut_line.was_cut
        cut_line.restore()
        seen = read(uri)
        assert seen in (current, expected(generation)), f"cut at byte {point}: a mixed output"
        outcomes["old" if seen == current else "new"] += 1
        current = seen

    publish(uri, 99)
    assert read(uri) == expected(99)
    manifest = store.read_manifest(uri)
    root = store.resolve(uri)
    assert set(store.list_uris(uri)) == {store.join(uri, store.MANIFEST_NAME)} | {
        store.join(root, name) for name in manifest["files"]
    }
    bucket, key = store.split_s3(uri)
    uploads = store.client().list_multipart_uploads(Bucket=bucket, Prefix=key + "/")
    assert not uploads.get("Uploads")
    assert outcomes["old"] and outcomes["new"]  # cuts before and after the pointer moved
    requests = len(cut_line.request_starts)
    print(f"\n{len(points)} cuts of a {requests}-request publish: {outcomes}, never mixed")


def ingest_command(folder: Path, dataset: Path) -> list[str]:
    cli = [sys.executable, "-m", "lorapipe.cli", "ingest"]
    return [*cli, str(folder), "--out", str(dataset), "--min_size", "1"]


def test_a_local_publish_killed_at_any_moment_leaves_one_whole_dataset(
    images: Path, tmp_path: Path
) -> None:
    """``lorapipe ingest`` over an existing local dataset, SIGKILLed at random moments of its
    run, alternating between two inputs: the dataset is always one of the two, whole (every
    file as its manifest lists it), and no staging folder outlives the next publish."""
    fewer = tmp_path / "changed"
    shutil.copytree(images, fewer)
    first = next(p for p in sorted(fewer.iterdir()) if p.suffix == ".png")
    Image.open(first).transpose(Image.Transpose.ROTATE_90).save(first)
    dataset = tmp_path / "dataset"
    versions, started = {}, time.monotonic()
    for folder in (fewer, images):
        subprocess.run(ingest_command(folder, dataset), check=True, capture_output=True)
        versions[folder] = tuple(r.sha256 for r in read_records(str(dataset)))
    duration = (time.monotonic() - started) / 2
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0}
    current = versions[images]
    for kill in range(LOCAL_KILLS):
        folder = fewer if kill % 2 == 0 else images
        process = subprocess.Popen(
            ingest_command(folder, dataset),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.5, 1.5) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
        seen = tuple(r.sha256 for r in read_records(str(dataset)))
        assert seen in (current, versions[folder])
        assert json.loads((dataset / store.MANIFEST_NAME).read_text()) == store.manifest_for(
            dataset
        )
        outcomes["old" if seen == current else "new"] += 1
        current = seen
    subprocess.run(ingest_command(images, dataset), check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".dataset")) == []
    print(f"\n{LOCAL_KILLS} kills of a local ingest: {outcomes}, always one whole dataset")


# --------------------------------------------------------------------------- determinism


def shard_bytes(dataset: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(dataset.glob("part-*.parquet"))}


def test_ingest_and_augment_twice_write_byte_identical_shards(images: Path, tmp_path: Path) -> None:
    for attempt in ("a", "b"):
        ingest.run(
            str(images), str(tmp_path / f"ingested-{attempt}"), ingest.IngestConfig(min_size=1)
        )
        augment.run(str(tmp_path / f"ingested-{attempt}"), str(tmp_path / f"augmented-{attempt}"))
    for stage in ("ingested", "augmented"):
        first, second = shard_bytes(tmp_path / f"{stage}-a"), shard_bytes(tmp_path / f"{stage}-b")
        assert first and first == second, stage


def test_two_runs_publishing_to_one_bucket_do_not_clobber_each_other(
    tmp_path: Path, s3_bucket: str
) -> None:
    published = f"{s3_bucket}/loras"
    files = {}
    for run_id in ("run-1", "run-2"):
        lora_dir = tmp_path / run_id
        lora_dir.mkdir()
        (lora_dir / "lora.safetensors").write_bytes(run_id.encode() * 100)
        (lora_dir / "report.json").write_text(json.dumps({"run": run_id}))
        files[run_id] = tree_digest(lora_dir)
        publish_folder(lora_dir, published, run_id)
    for run_id, digest in files.items():
        prefix = store.join(published, run_id)
        assert store.is_complete(prefix)
        with store.local_dir(prefix) as local:
            assert {k: v for k, v in tree_digest(local).items() if k in digest} == digest
    latest = json.loads(store.read_text(store.join(published, "latest.json")))
    assert (latest["run_id"], latest["uri"]) == ("run-2", store.join(published, "run-2"))
    assert [record["run_id"] for record in latest["history"]] == ["run-1", "run-2"]


# --------------------------------------------------------------------------- two writers


# the S3 lease is the same lock as the local flock behind one interface (test_writer_lock.py
# races both); the S3 race, two training processes more, runs with `make test-slow`
@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_two_trainings_racing_for_one_output_leave_only_the_winners_run(
    config: TrainConfig, tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    output = (
        str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    )
    started = time.monotonic()
    racers = {
        seed: train_process(dataclasses.replace(config, output_dir=output, seed=seed))
        for seed in (1, 2)
    }

    def finish(process: subprocess.Popen) -> tuple[float, str]:
        _, stderr = process.communicate(timeout=300)
        return time.monotonic() - started, stderr

    with ThreadPoolExecutor(len(racers)) as pool:
        ended = dict(zip(racers, pool.map(finish, racers.values()), strict=True))
    codes = {seed: process.returncode for seed, process in racers.items()}
    assert sorted(codes.values()) == [0, 2], {seed: ended[seed][1][-2000:] for seed in racers}
    winner = next(seed for seed, code in codes.items() if code == 0)
    loser = next(seed for seed in racers if seed != winner)
    (winner_seconds, _), (loser_seconds, loser_log) = ended[winner], ended[loser]
    print(
        f"\n{where}: the loser stopped after {loser_seconds:.1f} s, the winner after {winner_seconds:.1f} s"
    )

    errors = [line for line in loser_log.splitlines() if "lorapipe train: error" in line]
    assert len(errors) == 1 and "Traceback" not in loser_log, loser_log[-3000:]
    assert "`lorapipe train --" in errors[0] and f"pid {racers[winner].pid} on host" in errors[0]
    assert "since" in errors[0] and "wait for it to finish" in errors[0]
    assert loser_seconds < winner_seconds / 2  # at once: before loading any model

    complete, incomplete = layout.find_checkpoints(output)
    assert sorted(complete) == [4] and not incomplete
    rows = store.read_text(store.join(output, LOSS_LOG_NAME)).splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "2", "3", "4"]
    report = json.loads(store.read_text(store.join(output, layout.TRAINING_REPORT_NAME)))
    assert report["config"]["seed"] == winner
    if where == "s3":
        assert not store.exists(store.join(output, writer_lock.LEASE_NAME))
    else:
        assert not writer_lock.lock_path(output).exists()
