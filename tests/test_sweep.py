"""Sweeps: parsing a list or a grid of overrides, planning named runs with checked configs,
refusing runs whose validation losses would not compare, and ``lorapipe sweep`` training each
run into its own folder and writing sweep.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_train import write_folder

from lorapipe import checkpoint_layout as layout
from lorapipe import cli
from lorapipe.errors import ConfigError
from lorapipe.sweep import (
    COMPARABILITY_KEYS,
    child_environment,
    cpu_threads,
    gpu_slots,
    parse_sweep,
    plan_sweep,
)
from lorapipe.train_config import TrainConfig, load_config

# --------------------------------------------------------------------------- parsing


def test_a_list_is_one_run_per_entry_and_empty_is_one_run_of_the_base() -> None:
    assert parse_sweep("[{lora_rank: 8}, {lora_rank: 32, lora_alpha: 16}, null]") == [
        {"lora_rank": 8},
        {"lora_rank": 32, "lora_alpha": 16},
        {},
    ]
    for empty in (None, "", "[]", "{}", "# nothing\n"):
        assert parse_sweep(empty) == [{}]


def test_a_grid_expands_to_its_product_first_key_slowest() -> None:
    grid = "{lora_rank: [8, 16], learning_rate: [1e-4, 5.0e-5], seed: 3}"
    # values as YAML reads them (1e-4 is a string to PyYAML); plan_sweep checks and converts them
    assert parse_sweep(grid) == [
        {"lora_rank": 8, "learning_rate": "1e-4", "seed": 3},
        {"lora_rank": 8, "learning_rate": 5e-5, "seed": 3},
        {"lora_rank": 16, "learning_rate": "1e-4", "seed": 3},
        {"lora_rank": 16, "learning_rate": 5e-5, "seed": 3},
    ]
    # a key that takes a list: a flat list is one value, a list of lists its values
    assert parse_sweep("{target_modules: [to_q, to_v]}") == [{"target_modules": ["to_q", "to_v"]}]
    assert parse_sweep("{target_modules: [[to_q], [to_q, to_v]]}") == [
        {"target_modules": ["to_q"]},
        {"target_modules": ["to_q", "to_v"]},
    ]


def test_a_sweep_file_is_read(tmp_path: Path) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("- lora_rank: 8\n- lora_rank: 32\n  lora_alpha: 16\n")
    assert parse_sweep(str(sweep_file)) == [{"lora_rank": 8}, {"lora_rank": 32, "lora_alpha": 16}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{lora_rnk: [8, 16]}", "sweep: unknown key 'lora_rnk'; did you mean 'lora_rank'?"),
        (
            "[{lora_rank: 8}, {learning_rat: 1e-4}]",
            "sweep item 2: unknown key 'learning_rat'; did you mean 'learning_rate'?",
        ),
        ("[{lora_rank: 8}, 16]", "sweep item 2: expected a mapping of overrides (lora_rank: 8)"),
        ("{lora_rank: []}", "sweep: lora_rank lists no values; give at least one"),
        ("sweep.yml", "sweep: 'sweep.yml' is neither a file nor a YAML list or grid"),
        ("[{lora_rank: 8}", "sweep line 1: not valid YAML"),
    ],
)
def test_a_bad_sweep_is_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_sweep(text)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


# --------------------------------------------------------------------------- planning


@pytest.fixture
def base(tmp_path: Path) -> TrainConfig:
    return load_config(
        overrides={
            "train_data_dir": str(tmp_path / "data"),
            "base_model": str(tmp_path / "model"),
            "output_dir": str(tmp_path / "sweep"),
        }
    )


def test_runs_are_named_by_their_overrides_and_write_into_folders_of_their_own(
    base: TrainConfig, tmp_path: Path
) -> None:
    base = TrainConfig(
        **{**base.to_dict(), "checkpoint_mirror": "s3://bucket/mirror", "run_id": "nightly 1"}
    )
    overrides = parse_sweep(
        "[{}, {lora_rank: 8}, {lora_rank: 32, lora_alpha: '16', learning_rate: '5e-5'},"
        " {target_modules: [to_q, to_v], train_text_encoder: yes}]"
    )
    runs = plan_sweep(base, overrides)
    assert [run.name for run in runs] == [
        "run-01",
        "run-02-lora_rank-8",
        "run-03-lora_rank-32-lora_alpha-16-learning_rate-5e-5",
        "run-04-target_modules-to_q-to_v-train_text_encoder-true",
    ]
    third = runs[2]
    assert third.overrides == {"lora_rank": 32, "lora_alpha": 16.0, "learning_rate": 5e-5}
    assert (third.config.lora_rank, third.config.lora_alpha, runs[0].config.lora_rank) == (
        32,
        16.0,
        16,
    )
    assert third.config.output_dir == str(tmp_path / "sweep" / third.name)
    # the run id's folder on the mirror, then the run's
    assert third.config.checkpoint_mirror == f"s3://bucket/mirror/nightly-1/{third.name}"
    assert third.config.run_id == "" and third.config.log_dir == ""


def test_a_bad_value_names_its_run(base: TrainConfig) -> None:
    with pytest.raises(
        ConfigError, match=r"^sweep run run-02-lora_rank-0: key 'lora_rank' must be at least 1"
    ):
        plan_sweep(base, [{"lora_rank": 8}, {"lora_rank": 0}])


def test_where_a_run_writes_is_the_sweeps_to_set(base: TrainConfig) -> None:
    with pytest.raises(ConfigError, match=r"^sweep run run-02-output_dir-x: output_dir is set "):
        plan_sweep(base, [{}, {"output_dir": "x"}])


@pytest.mark.parametrize(
    ("key", "values"),
    [
        ("resolution", (512, 768)),
        ("validation_split", (0.1, 0.2)),
        ("train_data_dir", ("/data/a", "/data/b")),
        ("base_model", ("/models/a", "/models/b")),
        ("validation_timesteps", ([500], [100, 900])),
        ("enable_bucket", (True, False)),
    ],
)
def test_runs_whose_validation_losses_do_not_compare_are_refused(
    key: str, values: tuple[object, object], base: TrainConfig
) -> None:
    assert key in COMPARABILITY_KEYS
    overrides = [{"lora_rank": 8, key: values[0]}, {"lora_rank": 16, key: values[1]}]
    with pytest.raises(ConfigError) as error:
        plan_sweep(base, overrides)
    message = str(error.value)
    assert message.startswith(f"sweep: runs run-01-lora_rank-8-{key}-")
    assert f") and run-02-lora_rank-16-{key}-" in message
    assert f"({key} {values[0]!r})" in message and f"({key} {values[1]!r})" in message
    assert "their losses do not compare" in message and "\n" not in message


def test_the_seed_and_a_key_every_run_shares_may_be_swept(base: TrainConfig) -> None:
    runs = plan_sweep(base, parse_sweep("{seed: [1, 2], resolution: 512, crop: [center, random]}"))
    assert [(run.config.seed, run.config.crop) for run in runs] == [
        (1, "center"),
        (1, "random"),
        (2, "center"),
        (2, "random"),
    ]


def test_parallel_runs_get_gpus_of_their_own_when_there_are_enough(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_slots(2, 2) == ["0,1", "2,3"]
    assert gpu_slots(3, 2) == [None, None, None]  # too few: they share
    assert gpu_slots(1, 1) == [None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert gpu_slots(4, 1) == ["4", "5", "6", "7"]


def test_parallel_runs_share_the_cpu_threads_instead_of_each_taking_every_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two runs at a time on 8 cores get 4 threads each (torch reads OMP_NUM_THREADS); one run
    keeps torch's default, and a thread count the user set wins."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads(1, 1) is None
    assert (cpu_threads(2, 1), cpu_threads(2, 2), cpu_threads(16, 1)) == (4, 2, 1)
    environment = child_environment("0", cpu_threads(2, 1))
    assert (environment["CUDA_VISIBLE_DEVICES"], environment["OMP_NUM_THREADS"]) == ("0", "4")
    assert "OMP_NUM_THREADS" not in child_environment(None, None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert child_environment(None, 4)["OMP_NUM_THREADS"] == "3"


# --------------------------------------------------------------------------- lorapipe sweep


BASE_YAML = """\
train_data_dir: {data}
base_model: {model}
cache_dir: {cache}
batch_size: 2
learning_rate: 3e-3
validation_split: 2
save_steps: 2
max_train_steps: 4
sample_prompts: []
"""
SWEEP_YAML = """\
- lora_rank: 4
- {lora_rank: 8, early_stopping_patience: 1, learning_rate: 1e-12, save_steps: 1}
- target_modules: [no_such_layer]
"""


def test_lorapipe_sweep_trains_each_run_into_its_folder_and_records_them(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_folder(tmp_path / "data", 8)
    (tmp_path / "base.yaml").write_text(
        BASE_YAML.format(data=data, model=tiny_model_dir, cache=tmp_path / "cache")
    )
    (tmp_path / "sweep.yaml").write_text(SWEEP_YAML)
    output = tmp_path / "runs" / "sweep"
    args = ["--config", str(tmp_path / "base.yaml"), "--sweep", str(tmp_path / "sweep.yaml")]
    code = cli.main(["sweep", *args, "--output-dir", str(output), "--parallel", "2"])
    printed = capsys.readouterr().out.splitlines()

    assert code == 1  # the third run failed
    sweep = json.loads((output / "sweep.json").read_text())
    names = [
        "run-01-lora_rank-4",
        "run-02-lora_rank-8-early_stopping_patience-1-learning_rate-1e-12-save_steps-1",
        "run-03-target_modules-no_such_layer",
    ]
    assert [run["name"] for run in sweep["runs"]] == names
    first, second, third = sweep["runs"]
    assert first["overrides"] == {"lora_rank": 4} and first["status"] == "finished"
    assert first["output"] == str(output / names[0]) and first["stopped_early"] is None
    assert sorted(layout.complete_checkpoints(first["output"])) == [2, 4]
    report = json.loads((output / names[0] / "training_report.json").read_text())
    assert report["lora"]["rank"] == 4 and report["config"]["output_dir"] == first["output"]

    assert second["status"] == "finished" and second["stopped_early"]["step"] == 2
    assert sorted(layout.complete_checkpoints(second["output"])) == [1, 2]

    assert third["status"] == "failed" and "'no_such_layer' matches no layer" in third["error"]
    assert Path(third["log"]) == output / "logs" / f"{names[2]}.log"
    assert sweep["base_config"]["output_dir"] == str(output)

    assert sorted(printed[:3]) == [
        f"{names[0]}: finished: {output / names[0]}",
        f"{names[1]}: finished, stopped early at step 2: {output / names[1]}",
        f"{names[2]}: failed: {third['error']} (log: {third['log']})",
    ]
    assert printed[3] == f"2 of 3 runs finished; {output / 'sweep.json'}"

    assert cli.main(["sweep", *args, "--output-dir", str(output)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lorapipe sweep: error: {output} already holds a sweep ({output / 'sweep.json'}); "
        "continue it with --resume latest, or give a new output_dir"
    )
