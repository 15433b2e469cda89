"""Bad input, end to end through the ``lorapipe`` CLI: every stage refuses malformed input with
one line on stderr (``lorapipe <cmd>: error: ...`` naming the file or key), a non-zero exit, no
traceback, and nothing partial at ``--out`` (absent afterwards, or an older output unchanged).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lorapipe.cli import main
from lorapipe.dataset import INFO_NAME, DatasetWriter, ImageRecord

# --------------------------------------------------------------------------- helpers


def one_error_line(capsys: pytest.CaptureFixture[str], command: str, code: int) -> str:
    """The single stderr line of a failed command (checked: non-zero exit, no traceback)."""
    captured = capsys.readouterr()
    assert code != 0, captured
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"lorapipe {command}: error: "), lines[0]
    return lines[0]


def run_subprocess(*argv: str) -> tuple[int, str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "lorapipe.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return result.returncode, result.stdout, result.stderr


def subprocess_error_line(code: int, err: str, command: str) -> str:
    """The one error line of a real process; log lines (timestamped) may come before it."""
    assert code != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"lorapipe {command}: ")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"lorapipe {command}: error: "), err
    assert err.rstrip("\n").splitlines()[-1] == errors[0], err
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (hidden siblings not included)."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Hidden staging/retired folders a stage left next to its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def png_bytes(color: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(uri: Path, count: int) -> Path:
    with DatasetWriter(str(uri)) as writer:
        for index in range(count):
            data = png_bytes((index * 40 % 256, 90, 160))
            writer.write(
                ImageRecord(
                    id=f"img{index}",
                    image=data,
                    format="png",
                    width=64,
                    height=64,
                    sha256=hashlib.sha256(data).hexdigest(),
                    caption=f"a photo {index}",
                    source=f"img{index}.png",
                )
            )
    return uri


def fake_dataset(folder: Path, table: pa.Table) -> Path:
    """``table`` as the one shard of a dataset, with a valid ``_dataset.json``."""
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")
    info = {"schema_version": 1, "rows": table.num_rows, "shards": []}
    info["shards"].append({"path": "part-00000.parquet", "rows": table.num_rows})
    (folder / INFO_NAME).write_text(json.dumps(info))
    return folder


# --------------------------------------------------------------------------- datasets


def test_a_parquet_with_other_columns_is_refused_naming_the_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = pa.table({"url": ["a.png", "b.png"], "label": [1, 2]})
    table = table.replace_schema_metadata({"lorapipe.schema_version": "1"})
    dataset = fake_dataset(tmp_path / "wrong", table)
    out = tmp_path / "out"
    line = one_error_line(capsys, "augment", main(["augment", str(dataset), "--out", str(out)]))
    assert "part-00000.parquet" in line and "column 'id' is missing" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_parquet_not_written_by_lorapipe_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = pa.table({"id": ["a"], "image": [b"x"]})  # no lorapipe.schema_version metadata
    dataset = fake_dataset(tmp_path / "foreign", table)
    out = tmp_path / "out"
    line = one_error_line(capsys, "augment", main(["augment", str(dataset), "--out", str(out)]))
    assert "part-00000.parquet" in line and "lorapipe.schema_version" in line
    assert not out.exists()


def test_a_column_of_the_wrong_type_is_refused_and_an_older_output_stays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorapipe.dataset import SCHEMA

    row = {"id": "a", "image": b"x", "format": "png", "width": 1, "height": 1, "sha256": "0"}
    row |= {"caption": "", "tags": [], "tag_scores": [], "source": "", "flipped": False}
    good = pa.Table.from_pylist([row | {"parent_id": None}], schema=SCHEMA)
    wrong = good.set_column(
        SCHEMA.get_field_index("width"), "width", pa.array(["wide"], type=pa.string())
    )
    dataset = fake_dataset(tmp_path / "typed", wrong.replace_schema_metadata(SCHEMA.metadata))
    out = write_dataset(tmp_path / "out", 2)  # the previous good output
    before = snapshot(out)
    line = one_error_line(capsys, "augment", main(["augment", str(dataset), "--out", str(out)]))
    assert "column 'width' is string" in line
    assert snapshot(out) == before and leftovers(tmp_path) == []


def _truncate(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _replace_with_text(shard: Path) -> None:
    shard.write_text("id,image\na,b\n")


def _garble_the_pages(shard: Path) -> None:
    """The footer stays (the shard opens, its schema checks out); the pages are noise."""
    data = shard.read_bytes()
    shard.write_bytes(data[:4] + bytes(range(256)) * 8 + data[4 + 2048 :])


SHARD_DAMAGE = [_truncate, _replace_with_text, _garble_the_pages]
SHARD_DAMAGE_IDS = ["truncated", "not-parquet", "garbled-pages"]


@pytest.mark.parametrize("damage", SHARD_DAMAGE, ids=SHARD_DAMAGE_IDS)
def test_a_damaged_shard_is_one_line_naming_it_and_an_older_output_stays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage
) -> None:
    dataset = write_dataset(tmp_path / "ds", 40)
    damage(dataset / "part-00000.parquet")
    out = write_dataset(tmp_path / "out", 2)
    before = snapshot(out)
    line = one_error_line(capsys, "augment", main(["augment", str(dataset), "--out", str(out)]))
    assert str(dataset / "part-00000.parquet") in line and "not a readable Parquet shard" in line
    assert "write the dataset again" in line
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_a_truncated_shard_is_one_line_for_train(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = write_dataset(tmp_path / "ds", 4)
    _truncate(dataset / "part-00000.parquet")
    out = tmp_path / "train-out"
    argv = ["train", "--train-data-dir", str(dataset), "--output-dir", str(out)]
    argv += ["--base-model", str(tiny_model_dir), "--max-train-steps", "1"]
    line = one_error_line(capsys, "train", main(argv))
    assert "part-00000.parquet" in line and "truncated, corrupted or not Parquet" in line
    assert not list(out.glob("checkpoint-*"))


def test_a_dataset_description_that_is_not_json_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = write_dataset(tmp_path / "ds", 1)
    (dataset / INFO_NAME).write_text("{not json")
    out = tmp_path / "out"
    line = one_error_line(capsys, "augment", main(["augment", str(dataset), "--out", str(out)]))
    assert INFO_NAME in line and not out.exists()


def test_a_folder_that_is_not_a_dataset_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "photos").mkdir()
    out = tmp_path / "out"
    code = main(["augment", str(tmp_path / "photos"), "--out", str(out)])
    line = one_error_line(capsys, "augment", code)
    assert "photos" in line and INFO_NAME in line and not out.exists()


def test_an_empty_dataset_is_refused_by_augment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = write_dataset(tmp_path / "empty", 0)
    out = tmp_path / "out"
    line = one_error_line(capsys, "augment", main(["augment", str(dataset), "--out", str(out)]))
    assert "empty" in line and "has no images" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_empty_dataset_is_refused_by_train(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = write_dataset(tmp_path / "empty", 0)
    out = tmp_path / "train-out"
    argv = ["train", "--train-data-dir", str(dataset), "--output-dir", str(out)]
    argv += ["--base-model", str(tiny_model_dir), "--max-train-steps", "1"]
    line = one_error_line(capsys, "train", main(argv))
    assert str(dataset) in line and "empty" in line
    assert not list(out.glob("checkpoint-*")) and not (out / "training_report.json").exists()


def test_ingest_of_only_bad_files_publishes_no_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (raw / "notes.jpg").write_text("this is text, not a JPEG")
    (raw / "tiny.png").write_bytes(png_bytes((1, 2, 3), size=8))  # below --min-size
    out = tmp_path / "ds"
    code = main(["ingest", str(raw), "--out", str(out), "--workers", "1"])
    line = one_error_line(capsys, "ingest", code)
    assert "no images survived" in line and str(raw) in line and "report.md" in line
    # by design only the report (why each file was dropped) is left; no dataset is published
    assert not (out / INFO_NAME).exists() and not list(out.glob("*.parquet"))
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    assert leftovers(tmp_path) == []
    # a second attempt, into the report-only folder, behaves the same
    code = main(["ingest", str(raw), "--out", str(out), "--workers", "1"])
    one_error_line(capsys, "ingest", code)


def test_ingest_of_only_bad_files_keeps_an_older_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "broken.png").write_bytes(b"garbage")
    out = write_dataset(tmp_path / "ds", 3)
    shards = {k: v for k, v in snapshot(out).items() if not k.startswith("report.")}
    code = main(["ingest", str(raw), "--out", str(out), "--workers", "1"])
    one_error_line(capsys, "ingest", code)
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("report.")} == shards
    assert leftovers(tmp_path) == []


def test_ingest_of_an_empty_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "raw").mkdir()
    out = tmp_path / "ds"
    code = main(["ingest", str(tmp_path / "raw"), "--out", str(out), "--workers", "1"])
    one_error_line(capsys, "ingest", code)
    assert not (out / INFO_NAME).exists()


# --------------------------------------------------------------------------- train config


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('lora_rank: "big"\n', "lora_rank"),
        ("learning_rate: [1, 2]\n", "learning_rate"),
        ("target_modules: 7\n", "target_modules"),
        ("lora_rnak: 4\n", "lora_rnak"),
        ("lora_rank: 4\n  bad: indent\n", "line"),
        ("- just\n- a list\n", "key: value"),
    ],
)
def test_a_train_config_with_wrong_types_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(text)
    out = tmp_path / "train-out"
    code = main(["train", "--config", str(config), "--output-dir", str(out)])
    line = one_error_line(capsys, "train", code)
    assert str(config) in line and key in line
    assert not out.exists()


def test_a_train_flag_with_a_wrong_type_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "train-out"
    code = main(["train", "--lora-rank", "big", "--output-dir", str(out)])
    line = one_error_line(capsys, "train", code)
    assert "--lora-rank" in line and "'big'" in line and not out.exists()


def test_a_wrong_train_config_in_a_real_process(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text('lora_rank: "big"\n')
    out = tmp_path / "train-out"
    code, _, err = run_subprocess("train", "--config", str(config), "--output-dir", str(out))
    line = subprocess_error_line(code, err, "train")
    assert "lora_rank" in line and str(config) in line
    assert not out.exists()


# --------------------------------------------------------------------------- LoRA files


class _Payload:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def good_lora(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_fixtures import add_random_lora, save_lora

    from lorapipe.models import load_base_model

    pipeline = load_base_model(str(tiny_model_dir))
    add_random_lora(pipeline)
    return save_lora(pipeline, tmp_path_factory.mktemp("lora"))


def _edited_lora(good_lora: Path, target: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    state_dict = load_file(good_lora)
    edit(state_dict)
    save_file(state_dict, target)
    return target


def _drop_an_up_weight(state: dict) -> None:
    del state[next(k for k in sorted(state) if k.endswith("lora_B.weight"))]


def _add_a_stray_key(state: dict) -> None:
    import torch

    state["unet.conv_in.weight"] = torch.zeros(4, 4)


def _widen_a_down_weight(state: dict) -> None:
    import torch

    key = next(k for k in sorted(state) if k.endswith("lora_A.weight"))
    rank, features = state[key].shape
    state[key] = torch.zeros(rank, features + 3)


def _target_a_missing_layer(state: dict) -> None:
    key = next(k for k in sorted(state) if k.endswith("to_q.lora_A.weight"))
    up = key.replace("lora_A", "lora_B")
    for old in (key, up):
        state[old.replace("to_q", "to_nowhere")] = state.pop(old)


def _only_metadata(state: dict) -> None:
    state.clear()


def _generate(tiny_model_dir: Path, lora: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--base-model",
        str(tiny_model_dir),
        "--lora",
        f"style={lora}",
        "--prompt",
        "a dog <lora:style:0.8>",
        "--steps",
        "1",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_an_up_weight, "has no matching up weight"),
        (_add_a_stray_key, "unet.conv_in.weight"),
        (_widen_a_down_weight, "has shapes"),
        (_target_a_missing_layer, "to_nowhere"),
        (_only_metadata, "holds no tensors"),
    ],
    ids=["missing-key", "extra-key", "wrong-shape", "unknown-layer", "no-tensors"],
)
def test_a_lora_with_missing_extra_or_misshaped_keys_is_refused(
    tiny_model_dir: Path,
    good_lora: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit,
    message: str,
) -> None:
    lora = _edited_lora(good_lora, tmp_path / "style.safetensors", edit)
    out = tmp_path / "out"
    line = one_error_line(capsys, "generate", main(_generate(tiny_model_dir, lora, out)))
    assert message in line, line
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_text_file_named_safetensors_is_refused(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = tmp_path / "style.safetensors"
    lora.write_text("<html>404 Not Found</html>\n")
    out = tmp_path / "out"
    line = one_error_line(capsys, "generate", main(_generate(tiny_model_dir, lora, out)))
    assert f"'{lora}' is not a safetensors file" in line
    assert not out.exists()


def test_a_truncated_safetensors_file_is_refused(
    tiny_model_dir: Path, good_lora: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = tmp_path / "style.safetensors"
    data = good_lora.read_bytes()
    lora.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    line = one_error_line(capsys, "generate", main(_generate(tiny_model_dir, lora, out)))
    assert str(lora) in line
    assert not out.exists()


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("lorapipe tried to unpickle a file")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_offered_as_weights_is_refused_and_never_unpickled(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_unpickling: None,
    zip_format: bool,
) -> None:
    import torch

    marker = tmp_path / "unpickled"
    lora = tmp_path / "style.safetensors"
    payload = {"unet.down.lora_A.weight": torch.zeros(2, 2), "x": _Payload(marker)}
    with lora.open("wb") as file:
        torch.save(payload, file, _use_new_zipfile_serialization=zip_format)
    out = tmp_path / "out"
    line = one_error_line(capsys, "generate", main(_generate(tiny_model_dir, lora, out)))
    assert f"'{lora}' is a pickled PyTorch checkpoint" in line and "never unpickles" in line
    assert not marker.exists() and not out.exists()


def test_a_plain_pickle_named_safetensors_is_refused(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_unpickling: None
) -> None:
    marker = tmp_path / "unpickled"
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(pickle.dumps({"weights": _Payload(marker)}, protocol=4))
    out = tmp_path / "out"
    line = one_error_line(capsys, "generate", main(_generate(tiny_model_dir, lora, out)))
    assert "pickled" in line and str(lora) in line
    assert not marker.exists() and not out.exists()


def test_a_pickle_as_a_checkpoint_lora_is_refused_by_select(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_unpickling: None
) -> None:
    from lora_fixtures import record

    marker = tmp_path / "unpickled"
    checkpoint = tmp_path / "train-out" / "checkpoint-100"
    checkpoint.mkdir(parents=True)
    (checkpoint / "pytorch_lora_weights.safetensors").write_bytes(
        pickle.dumps(_Payload(marker), protocol=2)
    )
    (checkpoint / "lora_config.json").write_text(json.dumps({"rank": 4, "alpha": 8}))
    (checkpoint / "record.json").write_text(
        json.dumps(record(100, val_loss=0.1, train_loss_ema=0.2))
    )
    (checkpoint / "_COMPLETE").write_text("")
    out = tmp_path / "selected"
    code = main(["select", str(tmp_path / "train-out"), "--out", str(out)])
    line = one_error_line(capsys, "select", code)
    assert "pickled" in line
    assert not marker.exists() and not out.exists()


# --------------------------------------------------------------------------- generate jobs


@pytest.mark.parametrize(
    ("prompt", "column", "bracket"),
    [("a (dog", 3, "("), ("red [cat, blue", 5, "["), ("a (dog]", 3, "")],
)
def test_a_prompt_with_unbalanced_brackets_points_at_the_column(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    prompt: str,
    column: int,
    bracket: str,
) -> None:
    out = tmp_path / "out"
    argv = ["generate", "--base-model", str(tiny_model_dir), "--prompt", prompt]
    code = main([*argv, "--out", str(out)])
    line = one_error_line(capsys, "generate", code)
    assert f"prompt 1, column {column}" in line or "column" in line, line
    if bracket:
        assert f"'{bracket}' is never closed" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_unbalanced_close_bracket_points_at_its_column(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["generate", "--base-model", str(tiny_model_dir), "--prompt", "ok", "--prompt", "a dog)"]
    line = one_error_line(capsys, "generate", main([*argv, "--out", str(out)]))
    assert "prompt 2, column 6" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ("prompts: [a dog]\nseeds: []\n", "seeds is empty"),
        ("prompts: []\n", "prompts is empty"),
        ("prompts: [a dog]\nseeds: [one]\n", "seeds"),
        ("prompts: [a dog]\nsteps: many\n", "steps"),
        ("prompts: [a dog]\nseed: [1]\n", "did you mean 'seeds'"),
        ("prompts: [a dog\n", "line"),
        ("- a dog\n", "mapping"),
    ],
)
def test_a_generate_job_that_cannot_run_is_one_line_naming_the_file(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], job: str, message
) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(job)
    out = tmp_path / "out"
    argv = ["generate", "--base-model", str(tiny_model_dir), "--job", str(job_file)]
    line = one_error_line(capsys, "generate", main([*argv, "--out", str(out)]))
    assert str(job_file) in line and message in line, line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--height", "100000"], "height 100000"), (["--size", "512x100000"], "sizes '512x100000'")],
)
def test_an_absurd_image_size_is_refused_at_once_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    out = tmp_path / "out"
    model = tmp_path / "not-looked-at"  # refused before the base model is even opened
    argv = ["generate", "--base-model", str(model), "--prompt", "a dog", *flags]
    line = one_error_line(capsys, "generate", main([*argv, "--out", str(out)]))
    assert f"command line: {named} is larger than max_image_side (4096 px per side)" in line
    assert "raise max_image_side (--max-image-side)" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_zero_seeds_keeps_an_older_generate_output(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("report.json", "index.parquet"):  # what generate's output is recognised by
        (out / name).write_text("previous run")
    before = snapshot(out)
    job_file = tmp_path / "job.yaml"
    job_file.write_text("prompts: [a dog]\nseeds: []\n")
    argv = ["generate", "--base-model", str(tiny_model_dir), "--job", str(job_file)]
    one_error_line(capsys, "generate", main([*argv, "--out", str(out)]))
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_zero_seeds_in_a_real_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text("prompts: ['a (dog']\nseeds: []\n")
    out = tmp_path / "out"
    code, _, err = run_subprocess(
        "generate", "--base-model", str(tiny_model_dir), "--job", str(job_file), "--out", str(out)
    )
    line = subprocess_error_line(code, err, "generate")
    assert "seeds is empty" in line and str(job_file) in line
    assert not out.exists()


# --------------------------------------------------------------------------- S3 outputs


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("s3://no-such-bucket-here/x", "bucket 'no-such-bucket-here' does not exist"),
        ("s3://../x", "'..' is not a bucket name"),
        ("s3:///x", "names no bucket"),
        ("s3://bucket/a/../x", "'..' segment"),
    ],
    ids=["missing-bucket", "dot-dot-bucket", "no-bucket", "dot-dot-key"],
)
def test_ingest_to_a_bad_s3_output_is_one_line(
    s3_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str, message: str
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "photo.png").write_bytes(png_bytes((200, 30, 30), size=600))
    line = one_error_line(capsys, "ingest", main(["ingest", str(raw), "--out", out]))
    assert message in line and out in line


def test_select_to_a_missing_bucket_is_one_line(
    s3_server: str, tmp_path: Path, good_lora: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lora_fixtures import record

    checkpoint = tmp_path / "train-out" / "checkpoint-100"
    checkpoint.mkdir(parents=True)
    (checkpoint / "pytorch_lora_weights.safetensors").write_bytes(good_lora.read_bytes())
    (checkpoint / "lora_config.json").write_text(json.dumps({"rank": 4, "alpha": 8}))
    (checkpoint / "record.json").write_text(
        json.dumps(record(100, val_loss=0.1, train_loss_ema=0.2))
    )
    (checkpoint / "_COMPLETE").write_text("")
    out = "s3://no-such-bucket-here/lora"
    line = one_error_line(
        capsys, "select", main(["select", str(tmp_path / "train-out"), "--out", out])
    )
    assert "bucket 'no-such-bucket-here' does not exist" in line and "create it" in line


# --------------------------------------------------------------------------- select


def test_select_without_a_complete_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    training = tmp_path / "train-out"
    for step in (100, 200):  # saved half-way: no _COMPLETE marker
        checkpoint = training / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "pytorch_lora_weights.safetensors").write_bytes(b"partial")
    (training / "loss_log.csv").write_text("step,epoch,loss,lr\n1,1,0.5,0.0001\n")
    out = tmp_path / "selected"
    line = one_error_line(capsys, "select", main(["select", str(training), "--out", str(out)]))
    assert str(training) in line and "no complete checkpoint" in line
    assert not out.exists()


def test_select_without_a_complete_checkpoint_in_a_real_process(tmp_path: Path) -> None:
    training = tmp_path / "train-out"
    (training / "checkpoint-100").mkdir(parents=True)
    (training / "checkpoint-100" / "record.json").write_text("{}")
    out = tmp_path / "selected"
    code, _, err = run_subprocess("select", str(training), "--out", str(out))
    line = subprocess_error_line(code, err, "select")
    assert "no complete checkpoint" in line and not out.exists()


def test_select_on_a_missing_or_empty_training_output_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "selected"
    code = main(["select", str(tmp_path / "nowhere"), "--out", str(out)])
    assert "nowhere" in one_error_line(capsys, "select", code)
    (tmp_path / "empty").mkdir()
    code = main(["select", str(tmp_path / "empty"), "--out", str(out)])
    assert "no complete checkpoint" in one_error_line(capsys, "select", code)
    assert not out.exists()


def test_select_with_a_broken_record_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "train-out" / "checkpoint-100"
    checkpoint.mkdir(parents=True)
    (checkpoint / "record.json").write_text("{broken")
    (checkpoint / "_COMPLETE").write_text("")
    out = tmp_path / "selected"
    code = main(["select", str(tmp_path / "train-out"), "--out", str(out)])
    line = one_error_line(capsys, "select", code)
    assert "record.json" in line and not out.exists()


def test_a_base_model_with_pickled_weights_is_refused_and_never_unpickled(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_unpickling: None
) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state_dict: dict = load_file(weights)
    weights.unlink()
    marker = tmp_path / "unpickled"
    state_dict["payload"] = _Payload(marker)
    torch.save(state_dict, model / "unet" / "diffusion_pytorch_model.bin")
    out = tmp_path / "out"
    argv = ["generate", "--base-model", str(model), "--prompt", "a dog", "--steps", "1"]
    line = one_error_line(capsys, "generate", main([*argv, "--out", str(out)]))
    assert str(model) in line and "safetensors" in line
    assert not marker.exists() and not out.exists()
