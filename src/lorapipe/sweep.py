"""Sweeps: train one LoRA per training config, so the config is chosen and not only the checkpoint.

A sweep is YAML (a file or a pipeline parameter's text), either

- a list of overrides of the base training config, one run each::

      - {lora_rank: 8}
      - {lora_rank: 32, lora_alpha: 16}

- or a grid, a mapping of keys to lists of values, expanded to its product (the first key
  varies slowest, values in the order written; a single value counts as a one-value list; a
  list-valued key such as ``target_modules`` takes a list of lists)::

      {lora_rank: [8, 16], learning_rate: [1e-4, 5e-5]}

Empty means one run of the base config. Every run validates on the same held-out images,
timesteps and noise, so its validation losses compare with every other run's; a sweep whose runs
differ in a key that changes what validation measures (``COMPARABILITY_KEYS``) is refused when
it is planned.

``lorapipe sweep --config base.yaml --sweep sweep.yaml --output-dir runs/sweep [--parallel N]``
trains each run with ``lorapipe train`` in a process of its own, N at a time (each group of
GPUs to one run when there are enough), into ``<output_dir>/<run name>/``, its log into
``<output_dir>/logs/<run name>.log``, then writes ``<output_dir>/sweep.json`` (``SWEEP_NAME``)::

    {"runs": [{"name", "overrides", "output", "status": "finished" | "failed",
               "stopped_early", "log", "error"}, ...],
     "base_config": {...}}

``output`` is each run's training output (a checkpoint layout with ``training_report.json``,
what ``lorapipe select`` reads), also found as ``<sweep folder>/<name>``. A failed run is
recorded and the others go on. A folder that holds a sweep is trained into again only with
``--resume latest``: each run resumes its own checkpoints (a finished one trains no more).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorapipe import config as config_options
from lorapipe import store, writer_lock
from lorapipe.checkpoint_layout import TRAINING_REPORT_NAME
from lorapipe.errors import ConfigError, TrainingError
from lorapipe.train_config import TrainConfig, load_config

log = logging.getLogger(__name__)

SWEEP_NAME = "sweep.json"
RUN_LOGS_DIR = "logs"  # <output_dir>/logs/<run name>.log
MAX_NAME_LENGTH = 80

# Keys whose value decides what a validation loss measures: which images are held out (the data,
# its captions, the split), how they are cropped and sized (resolution and buckets), the model
# and its objective (base model, prediction type, noise schedule) and the timesteps. Runs that
# differ in one of them would rank on losses that do not compare. Not here, because validation
# does not depend on them: ``seed`` (the held-out images are chosen by a hash of their ids and
# their noise is seeded by the id alone, ``training.data``), ``crop`` and ``cache_latents``
# (validation always encodes the centre crop), ``mixed_precision`` (the same images, noise and
# timesteps; only rounding differs) and every key of training alone (rank, learning rate,
# target modules, augmentations, timestep range, loss weighting, steps, ...).
COMPARABILITY_KEYS = (
    "train_data_dir",
    "metadata_path",
    "validation_split",
    "validation_timesteps",
    "base_model",
    "base_model_config",
    "v_parameterization",
    "zero_terminal_snr",
    "resolution",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
)
# Where a run writes: the sweep gives each run its own, under the base config's.
PER_RUN_KEYS = ("output_dir", "log_dir", "checkpoint_mirror")


@dataclass(frozen=True)
class SweepRun:
    """One training of a sweep: its name (a path segment), the overrides that make it (values
    as the config holds them) and its resolved config."""

    name: str
    overrides: dict[str, Any]
    config: TrainConfig


# --------------------------------------------------------------------------- parsing


def parse_sweep(text_or_path: str | None) -> list[dict[str, Any]]:
    """The overrides of each run of a sweep: a YAML file (local or s3://) or YAML text, a list
    of override mappings or a grid (see the module docstring); empty or None: ``[{}]``.

    Raises ConfigError, one line naming the unknown key and the nearest valid one.
    """
    value, label = _read_sweep(text_or_path or "")
    if value is None or value == [] or value == {}:
        return [{}]
    if isinstance(value, Mapping):
        runs = _expand_grid(value, label)
    elif isinstance(value, list):
        runs = [
            _as_overrides(item, f"{label} item {number}") for number, item in enumerate(value, 1)
        ]
    else:
        raise ConfigError(
            f"{label}: expected a list of overrides ([{{lora_rank: 8}}, {{lora_rank: 32}}]) or a "
            f"grid ({{lora_rank: [8, 16]}}), got {value!r}"
        )
    known = {item.name: item for item in config_options.options(TrainConfig)}
    for number, overrides in enumerate(runs, 1):
        for key in overrides:
            if key not in known:
                origin = label if isinstance(value, Mapping) else f"{label} item {number}"
                raise config_options.unknown_key(key, known, origin, TrainConfig)
    return runs


def _read_sweep(text_or_path: str) -> tuple[Any, str]:
    """(the parsed YAML, its label in errors): a file when the text names one, else the text."""
    is_file = "\n" not in text_or_path and (
        store.is_s3(text_or_path) or Path(text_or_path).expanduser().is_file()
    )
    text = store.read_text(text_or_path) if is_file else text_or_path
    label = text_or_path if is_file else "sweep"
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{label}{where}: not valid YAML; fix the syntax there") from None
    if isinstance(value, str) and not is_file:
        raise ConfigError(
            f"sweep: '{text_or_path}' is neither a file nor a YAML list or grid of overrides"
        )
    return value, label


def _as_overrides(item: Any, origin: str) -> dict[str, Any]:
    if item is None:
        return {}
    if not isinstance(item, Mapping):
        raise ConfigError(f"{origin}: expected a mapping of overrides (lora_rank: 8), got {item!r}")
    return {str(key): value for key, value in item.items()}


def _expand_grid(grid: Mapping[str, Any], label: str) -> list[dict[str, Any]]:
    """The product of the grid's values, the first key varying slowest."""
    keys = [str(key) for key in grid]
    values = [_grid_values(key, grid[key], label) for key in grid]
    return [dict(zip(keys, chosen, strict=True)) for chosen in itertools.product(*values)]


def _grid_values(key: str, value: Any, label: str) -> list[Any]:
    """A grid entry's values: a list is its values, except for a key that takes a list, whose
    values are a list of lists; anything else is one value."""
    if value == []:
        raise ConfigError(f"{label}: {key} lists no values; give at least one")
    if not isinstance(value, list):
        return [value]
    if _takes_list(key) and not all(isinstance(item, list) for item in value):
        return [value]
    return value


def _takes_list(key: str) -> bool:
    """Whether config key ``key`` holds a list (``list[str]``, ``list[str] | None``)."""
    hint = typing.get_type_hints(TrainConfig).get(key)
    return any(typing.get_origin(kind) in (list, tuple) for kind in (hint, *typing.get_args(hint)))


# --------------------------------------------------------------------------- planning


def plan_sweep(
    base_config: TrainConfig, overrides: Sequence[Mapping[str, Any]], label: str = "sweep"
) -> list[SweepRun]:
    """The runs of a sweep over ``base_config``, each checked like any training config
    (``lorapipe.config.from_mapping``, what ``load_config`` uses, errors naming the run), each
    writing into ``<output_dir>/<run name>`` (its checkpoint mirror and log_dir, if set, into
    ``<that>/<run name>`` likewise), and their validation losses comparable.

    Raises ConfigError, one line, for a bad value, a per-run key, or runs that do not compare.
    """
    from lorapipe.stages.train import with_run_folder

    base = with_run_folder(base_config)  # a run id's folder first: <mirror>/<run id>/<run name>
    width = max(2, len(str(len(overrides))))
    runs = []
    for index, override in enumerate(overrides or [{}], 1):
        name = run_name(index, override, width)
        owned = next((key for key in PER_RUN_KEYS if key in override), None)
        if owned:
            raise ConfigError(
                f"{label} run {name}: {owned} is set for each run by the sweep (under the base "
                f"config's {owned}); set it in the base config, not in the sweep"
            )
        raw = {**base.to_dict(), **override, **_run_paths(base, name)}
        origins = {key: f"{label} run {name}: key '{key}'" for key in override}
        run_config = config_options.from_mapping(TrainConfig, raw, origins)
        values = {key: getattr(run_config, key) for key in override}
        runs.append(SweepRun(name, values, run_config))
    check_comparable(runs, label)
    return runs


def _run_paths(base: TrainConfig, name: str) -> dict[str, str]:
    """Where run ``name`` writes: its own folder under each of the base config's places."""
    return {
        key: store.join(getattr(base, key), name) if getattr(base, key) else ""
        for key in PER_RUN_KEYS
    }


def run_name(index: int, overrides: Mapping[str, Any], width: int = 2) -> str:
    """``run-01-lora_rank-8``: the run's number and overrides, safe as a path segment."""
    parts = [f"run-{index:0{width}d}"]
    parts += [f"{key}-{_value_text(value)}" for key, value in overrides.items()]
    name = store.safe_name("-".join(parts))
    return name[:MAX_NAME_LENGTH].rstrip("-.")


def _value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(map(_value_text, value))
    return str(value)


def check_comparable(runs: Sequence[SweepRun], label: str = "sweep") -> None:
    """Refuse runs whose validation losses would not compare: the first two that differ in a
    ``COMPARABILITY_KEYS`` key, in one line."""
    for key in COMPARABILITY_KEYS:
        first = getattr(runs[0].config, key)
        other = next((run for run in runs[1:] if getattr(run.config, key) != first), None)
        if other is not None:
            raise ConfigError(
                f"{label}: runs {runs[0].name} ({key} {first!r}) and {other.name} ({key} "
                f"{getattr(other.config, key)!r}) would not validate on the same images, noise "
                f"and timesteps, so their losses do not compare; keep {key} in the base config "
                "and sweep it in sweeps of its own"
            )


# --------------------------------------------------------------------------- running


def run_sweep(
    runs: Sequence[SweepRun], output_dir: str, *, parallel: int = 1
) -> list[dict[str, Any]]:
    """Train every run with ``lorapipe train``, ``parallel`` at a time, and return the
    ``sweep.json`` records in the runs' order, printing one line per run as it ends."""
    slots: queue.Queue[str | None] = queue.Queue()
    processes = max(run.config.num_processes for run in runs)
    devices_of_slots = gpu_slots(min(parallel, len(runs)), processes)
    for devices in devices_of_slots:
        slots.put(devices)
    threads = cpu_threads(len(devices_of_slots), processes)
    with tempfile.TemporaryDirectory(prefix="lorapipe-sweep-") as tmp:
        logs = Path(tmp) if store.is_s3(output_dir) else Path(output_dir) / RUN_LOGS_DIR
        logs.mkdir(parents=True, exist_ok=True)

        def train_one(run: SweepRun) -> dict[str, Any]:
            devices = slots.get()
            try:
                log_path = logs / f"{run.name}.log"
                record = train_run(run, Path(tmp), log_path, child_environment(devices, threads))
            finally:
                slots.put(devices)
            if store.is_s3(output_dir):
                log_uri = store.join(output_dir, RUN_LOGS_DIR, f"{run.name}.log")
                store.upload_file(logs / f"{run.name}.log", log_uri)
                record["log"] = log_uri
            print(_run_line(record), flush=True)
            return record

        with concurrent.futures.ThreadPoolExecutor(max_workers=slots.qsize()) as pool:
            return list(pool.map(train_one, runs))


def cpu_threads(runs_at_a_time: int, processes: int) -> int | None:
    """The CPU threads each training process gets when several runs share the CPU cores: an
    equal share (at least 1), so that parallel runs do not each start a thread per core and
    oversubscribe them; None for one run at a time (torch's own default)."""
    if runs_at_a_time <= 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // (runs_at_a_time * processes))


def child_environment(devices: str | None, threads: int | None) -> dict[str, str]:
    """The environment of one run's ``lorapipe train``: its GPUs (CUDA_VISIBLE_DEVICES) when it
    has its own, and its share of the CPU threads (OMP_NUM_THREADS, which torch reads) unless
    the caller set that already."""
    environment = dict(os.environ)
    if devices is not None:
        environment["CUDA_VISIBLE_DEVICES"] = devices
    if threads is not None:
        environment.setdefault("OMP_NUM_THREADS", str(threads))
    return environment


def train_run(
    run: SweepRun, work_dir: Path, log_path: Path, environment: Mapping[str, str]
) -> dict[str, Any]:
    """Train one run in a ``lorapipe train`` process with ``environment`` and its output in
    ``log_path``; its ``sweep.json`` record."""
    config_path = work_dir / f"{run.name}.yaml"
    config_path.write_text(yaml.safe_dump(run.config.to_dict(), sort_keys=False))
    log.info("%s: training into %s (log: %s)", run.name, run.config.output_dir, log_path)
    command = [sys.executable, "-m", "lorapipe.cli", "train", "--config", str(config_path)]
    with log_path.open("w") as output:
        code = subprocess.call(
            command, stdout=output, stderr=subprocess.STDOUT, env=dict(environment)
        )
    report_uri = store.join(run.config.output_dir, TRAINING_REPORT_NAME)
    finished = code == 0 and store.exists(report_uri)
    report = json.loads(store.read_text(report_uri)) if finished else {}
    return {
        "name": run.name,
        "overrides": run.overrides,
        "output": run.config.output_dir,
        "status": "finished" if finished else "failed",
        "stopped_early": report.get("stopped_early"),
        "log": str(log_path),
        "error": None if finished else _error_line(log_path, code),
    }


def _error_line(log_path: Path, code: int) -> str:
    """The failed run's one-line error (what ``lorapipe train`` printed last), else its exit
    status."""
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("lorapipe train: error: ")]
    if errors:
        return errors[-1].removeprefix("lorapipe train: error: ")
    return f"lorapipe train exited with status {code}; see the log"


def _run_line(record: Mapping[str, Any]) -> str:
    if record["status"] == "failed":
        return f"{record['name']}: failed: {record['error']} (log: {record['log']})"
    stopped = record["stopped_early"]
    detail = f", stopped early at step {stopped['step']}" if stopped else ""
    return f"{record['name']}: finished{detail}: {record['output']}"


def gpu_slots(parallel: int, processes: int) -> list[str | None]:
    """The GPUs of each of ``parallel`` runs at a time (CUDA_VISIBLE_DEVICES values of
    ``processes`` GPUs each) when there are enough visible; else None for each: the runs share
    what there is (one run at a time needs no choice)."""
    if parallel <= 1:
        return [None]
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = (visible.split(",") if visible else [str(i) for i in range(count)])[:count]
    if len(devices) < parallel * processes:
        if devices:
            log.warning(
                "%d runs at a time of %d processes each want %d GPUs, %d are visible: the runs "
                "share them", parallel, processes, parallel * processes, len(devices),
            )  # fmt: skip
        return [None] * parallel
    return [",".join(devices[i * processes : (i + 1) * processes]) for i in range(parallel)]


def write_sweep(output_dir: str, records: Sequence[Mapping[str, Any]], base: TrainConfig) -> str:
    """Write ``<output_dir>/sweep.json``; its URI."""
    uri = store.join(output_dir, SWEEP_NAME)
    document = {"runs": list(records), "base_config": base.to_dict()}
    store.write_text(uri, json.dumps(document, indent=2) + "\n")
    return uri


# --------------------------------------------------------------------------- command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of the base training config")
    parser.add_argument(
        "--sweep",
        required=True,
        help="YAML file (or text) of the sweep: a list of overrides of the base config, or a "
        "grid of keys to lists of values",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="runs trained at a time, each a `lorapipe train` process (on GPUs of its own when "
        "there are enough, and an equal share of the CPU threads); default 1",
    )
    config_options.add_arguments(parser, TrainConfig)
    parser.epilog = (
        "Every training config key is also a flag, which overrides the base file; output_dir is "
        "the sweep's folder: each run trains into <output_dir>/<run name>."
    )


def main(args: argparse.Namespace) -> int:
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {args.parallel}")
    base = load_config(args.config, config_options.overrides_from_args(args, TrainConfig))
    base = dataclasses.replace(base, output_dir=_absolute(base.output_dir))
    runs = plan_sweep(base, parse_sweep(args.sweep))
    with writer_lock.hold(base.output_dir):  # a second sweep into this folder stops at once
        previous = store.join(base.output_dir, SWEEP_NAME)
        if not base.resume and store.exists(previous):
            raise TrainingError(
                f"{base.output_dir} already holds a sweep ({previous}); continue it with "
                "--resume latest, or give a new output_dir"
            )
        records = run_sweep(runs, base.output_dir, parallel=args.parallel)
        uri = write_sweep(base.output_dir, records, base)
    failed = sum(record["status"] == "failed" for record in records)
    print(f"{len(records) - failed} of {len(records)} runs finished; {uri}")
    return 1 if failed else 0


def _absolute(output_dir: str) -> str:
    """A local output_dir as an absolute path, so sweep.json names the runs from anywhere."""
    if store.is_s3(output_dir):
        return output_dir
    return str(Path(output_dir.removeprefix("file://")).expanduser().absolute())
