"""The Kubeflow pipeline: its compiled YAML, its wiring, and submitting it to a KFP server.

No KFP server runs here, so submit and schedule talk to a small HTTP server on 127.0.0.1
that answers the KFP v2 REST paths the kfp client calls and records every request.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import images
from pipelines import __main__ as pipelines_cli
from pipelines import lora_training

# run-report's executor starts with "run"
STAGE_COMPONENTS = {
    "fingerprint", "plan", "ingest", "tag", "augment", "train", "select", "generate", "run",
}  # fmt: skip


def load_compiled(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, Kubernetes platform spec) of a compiled pipeline YAML."""
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    return pipeline_spec, platform_spec["platforms"]["kubernetes"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lora_training.compile_pipeline(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")


def test_the_committed_yaml_is_what_the_code_compiles_to(compiled: Path) -> None:
    committed = lora_training.PIPELINE_YAML.read_text()
    assert committed == compiled.read_text(), "pipelines/lora_training.yaml is stale: make compile"


def test_the_dag_runs_the_six_stages_in_order_then_the_run_report(compiled: Path) -> None:
    spec, _ = load_compiled(compiled)
    executors = {name.removeprefix("exec-") for name in spec["deploymentSpec"]["executors"]}
    assert {name.split("-")[0] for name in executors} == STAGE_COMPONENTS

    assert set(spec["root"]["dag"]["tasks"]) == {"fingerprint", "plan-sweep", "condition-1"}
    tasks = tasks_by_display_name(spec)
    for augment in tasks["flip-augment"]:
        assert augment["componentRef"]["name"].startswith("comp-augment")
    for train in tasks["train LoRA"] + tasks["train LoRA (TrainJob)"]:
        assert _producer(train, "dataset") == ("parent", "pipelinechannel--augment-augmented")
    for select in tasks["select checkpoint"]:  # every run of the sweep's ParallelFor
        producer, output = _producer(select, "trainings")
        assert producer.startswith("for-loop") and output.endswith("-training")
    for generate in tasks["generate review grid"]:
        producer, output = _producer(generate, "lora")
        assert producer.startswith("select") and output == "lora"
    # the last step reads every stage's output and writes the run's page as its HTML artifact
    for page in tasks["run report"]:
        assert _producer(page, "images")[0].startswith("generate")
        assert _producer(page, "lora")[0].startswith("select")
        assert _producer(page, "trainings")[0].startswith("for-loop")
        assert _producer(page, "ingested") == ("parent", "pipelinechannel--ingested")
        assert _producer(page, "inputs") == ("parent", "pipelinechannel--inputs")
    report_outputs = spec["components"]["comp-run-report"]["outputDefinitions"]["artifacts"]
    assert report_outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"


def test_kfp_loads_the_committed_yaml_back_as_the_pipeline_with_its_parameters() -> None:
    from kfp import components

    loaded = components.load_component_from_file(str(lora_training.PIPELINE_YAML))
    assert loaded.name == lora_training.PIPELINE_NAME
    assert set(loaded.component_spec.inputs) == set(
        lora_training.lora_training.component_spec.inputs
    )
    assert set(loaded.pipeline_spec.root.dag.tasks) == {"fingerprint", "plan-sweep", "condition-1"}
    executors = loaded.pipeline_spec.deployment_spec["executors"]
    assert {name.removeprefix("exec-").split("-")[0] for name in executors} == STAGE_COMPONENTS


def test_every_pipeline_parameter_has_the_description_the_kfp_ui_shows(compiled: Path) -> None:
    spec, _ = load_compiled(compiled)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == set(lora_training.lora_training.component_spec.inputs)
    for name, parameter in parameters.items():
        assert len(parameter.get("description", "")) > 20, name
    # a stage's key is described by the stage's own help text, the one `--help` prints
    assert parameters["min_size"]["description"].startswith("Drop images whose shorter side")
    assert "(lorapipe select --epsilon)" in parameters["epsilon"]["description"]


def test_parameters_carry_the_stage_key_names_and_the_old_names_still_work() -> None:
    names = set(lora_training.lora_training.component_spec.inputs)
    assert {"min_size", "threshold", "merge", "epsilon", "job_yaml"} <= names
    renamed = pipelines_cli.parse_params(["min_image_size=768", "selection_epsilon=0.05"], None)
    assert renamed == {"min_size": 768, "epsilon": 0.05}


def test_tagging_runs_only_when_a_tagger_is_given(compiled: Path) -> None:
    spec, _ = load_compiled(compiled)
    components = spec["components"]
    branches = components["comp-condition-branches-2"]["dag"]["tasks"]
    with_tagger, without_tagger = (branches[name] for name in sorted(branches))
    assert "pipelinechannel--tagger_uri" in with_tagger["triggerPolicy"]["condition"]
    assert "!=" in with_tagger["triggerPolicy"]["condition"]
    assert without_tagger["triggerPolicy"]["condition"] == (
        f"!({with_tagger['triggerPolicy']['condition']})"
    )

    tagged = components["comp-condition-3"]["dag"]["tasks"]
    assert _producer(tagged["tag"], "dataset") == ("parent", "pipelinechannel--ingest-dataset")
    assert _producer(tagged["augment-train-review"], "dataset") == ("tag", "tagged")
    untagged = components["comp-condition-4"]["dag"]["tasks"]
    assert _producer(untagged["augment-train-review-2"], "dataset") == (
        "parent",
        "pipelinechannel--ingest-dataset",
    )


def test_train_gets_gpus_shm_retries_and_a_run_scoped_checkpoint_mirror(compiled: Path) -> None:
    spec, kubernetes = load_compiled(compiled)
    tasks = tasks_by_display_name(spec)
    for train in tasks["train LoRA"]:
        assert train["retryPolicy"]["maxRetryCount"] == 3
        run_id = train["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"]
        assert run_id == "{{$.pipeline_job_uuid}}"
        executor = _executor(spec, train)
        resources = spec["deploymentSpec"]["executors"][executor]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert "num_gpus" in resources["accelerator"]["resourceCount"]
        (shm,) = kubernetes["deploymentSpec"]["executors"][executor]["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"


def test_with_several_nodes_the_train_step_only_coordinates_and_holds_no_gpu(
    compiled: Path,
) -> None:
    spec, _ = load_compiled(compiled)
    tasks = tasks_by_display_name(spec)
    branches = [
        task
        for component in spec["components"].values()
        for task in component.get("dag", {}).get("tasks", {}).values()
        if "num_nodes" in task.get("triggerPolicy", {}).get("condition", "")
    ]
    conditions = {task["taskInfo"]["name"]: task["triggerPolicy"]["condition"] for task in branches}
    assert conditions["one pod"].endswith("== 1")
    assert conditions["multi-node TrainJob"] == f"!({conditions['one pod']})"
    for train in tasks["train LoRA (TrainJob)"]:
        container = spec["deploymentSpec"]["executors"][_executor(spec, train)]["container"]
        assert "accelerator" not in container.get("resources", {})
        assert train["inputs"]["parameters"]["trainer_image"]["runtimeValue"]["constant"] == (
            images.TORCH_IMAGE
        )


def test_a_run_trains_only_when_the_uncached_fingerprint_step_says_the_inputs_changed(
    compiled: Path,
) -> None:
    """KFP caches a task on its inputs' values: ingest and tag take the fingerprint step's
    digests of what lies under their URIs, so their cache hits exactly when the files are the
    same; the fingerprint step itself runs every time, and everything after it only when it
    says to train."""
    spec, _ = load_compiled(compiled)
    root = spec["root"]["dag"]["tasks"]
    assert root["fingerprint"]["cachingOptions"] == {}
    assert root["condition-1"]["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--fingerprint-Output'] == true"
    )
    (ingest,) = [
        task for task in _all_tasks(spec).values() if task["taskInfo"]["name"] == "ingest / clean"
    ]
    assert ingest["inputs"]["parameters"]["inputs_fingerprint"] == {
        "componentInputParameter": "pipelinechannel--fingerprint-data"
    }
    (tag,) = tasks_by_display_name(spec)["auto-tag (DeepDanbooru)"]
    assert tag["inputs"]["parameters"]["tagger_fingerprint"] == {
        "componentInputParameter": "pipelinechannel--fingerprint-tagger"
    }
    for select in tasks_by_display_name(spec)["select checkpoint"]:
        assert select["inputs"]["parameters"]["fingerprint"] == {
            "componentInputParameter": "pipelinechannel--run_fingerprint"
        }  # the sub-pipeline's input, which each branch gives the step's run digest
    for name, task in _all_tasks(spec).items():
        if name.startswith("augment-train-review"):
            assert task["inputs"]["parameters"]["run_fingerprint"] == {
                "componentInputParameter": "pipelinechannel--fingerprint-run"
            }
    for train in tasks_by_display_name(spec)["train LoRA"]:
        assert train["inputs"]["parameters"]["publish_uri"] == {
            "componentInputParameter": "pipelinechannel--publish_uri"
        }
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["force_retrain"]["defaultValue"] is False
    assert defaults["promote"]["defaultValue"] == "better"
    assert defaults["promotion_epsilon"]["defaultValue"] == -1.0  # below 0: epsilon's


def test_a_sweep_runs_one_train_task_per_planned_config_in_a_parallel_for(compiled: Path) -> None:
    spec, _ = load_compiled(compiled)
    root = spec["root"]["dag"]["tasks"]
    assert root["plan-sweep"]["inputs"]["parameters"]["sweep"] == {
        "componentInputParameter": "sweep"
    }
    loops = [
        task
        for component in spec["components"].values()
        for name, task in component.get("dag", {}).get("tasks", {}).items()
        if name.startswith("for-loop")
    ]
    assert len(loops) == 4  # one pod and TrainJob, in each tagger branch
    for loop in loops:
        assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--runs"}
        assert loop["iteratorPolicy"]["parallelismLimit"] == lora_training.MAX_PARALLEL_TRAINS
        (train,) = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"].values()
        assert train["componentRef"]["name"].startswith("comp-train")
        parameters = train["inputs"]["parameters"]
        assert parameters["training_config"]["componentInputParameter"].endswith("loop-item")
        assert parameters["training_config"]["parameterExpressionSelector"] == (
            'parseJson(string_value)["training_config"]'
        )


def _all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tasks = {**spec["root"]["dag"]["tasks"]}
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_data_stages_are_cached_and_the_rest_are_not(compiled: Path) -> None:
    spec, _ = load_compiled(compiled)
    for name, task in _all_tasks(spec).items():
        cached = name.split("-")[0] in ("ingest", "tag", "augment")
        if name.split("-")[0] in STAGE_COMPONENTS:
            assert task["cachingOptions"] == ({"enableCache": True} if cached else {}), name


def test_every_stage_reads_s3_credentials_from_the_secret_never_from_parameters(
    compiled: Path,
) -> None:
    spec, kubernetes = load_compiled(compiled)
    executors = kubernetes["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for name, executor in executors.items():
        (secret,) = executor["secretAsEnv"]
        assert secret["secretName"] == lora_training.S3_SECRET, name
        assert {item["envVar"] for item in secret["keyToEnv"]} == set(
            lora_training.S3_SECRET_KEYS.values()
        )
    text = compiled.read_text()
    assert not re.search(r"(?i)secret_?access_?key\s*[:=]\s*['\"]?\w{8,}", text)
    assert "AWS_SECRET_ACCESS_KEY" not in spec["root"]["inputDefinitions"]["parameters"]


def test_components_run_in_the_stage_images(compiled: Path) -> None:
    spec, _ = load_compiled(compiled)
    executors = spec["deploymentSpec"]["executors"]
    expected = {
        "fingerprint": images.BASE_IMAGE,
        "plan": images.BASE_IMAGE,  # plan-sweep
        "ingest": images.BASE_IMAGE,
        "tag": images.TAGGER_IMAGE,
        "augment": images.BASE_IMAGE,
        "train": images.TORCH_IMAGE,
        "select": images.BASE_IMAGE,
        "generate": images.TORCH_IMAGE,
        "run": images.BASE_IMAGE,  # run-report
    }
    for name, executor in executors.items():
        stage = name.removeprefix("exec-").split("-")[0]
        assert executor["container"]["image"] == expected[stage], name


def test_params_parse_json_values_and_refuse_unknown_names(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text("data_uri: s3://bucket/raw\nseeds: [1, 2, 3]\n")
    arguments = pipelines_cli.parse_params(["num_gpus=4", "trigger_word=sks"], str(params_file))
    assert arguments == {
        "data_uri": "s3://bucket/raw",
        "seeds": [1, 2, 3],
        "num_gpus": 4,
        "trigger_word": "sks",
    }
    with pytest.raises(Exception, match="pipeline parameter 'num_gpu' is unknown.*num_gpus"):
        pipelines_cli.parse_params(["num_gpu=4"], None)


def test_a_text_parameter_written_as_yaml_structure_reaches_the_pipeline_as_its_text(
    tmp_path: Path,
) -> None:
    """`sweep: [{lora_rank: 4}]` in a params file, or JSON on the command line, is the
    sweep's YAML text, which the plan step parses."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        "sweep: [{lora_rank: 4}, {lora_rank: 8}]\ntraining_config: {epochs: 2}\n"
    )
    arguments = pipelines_cli.parse_params(['job_yaml={"sampler": "euler"}'], str(params_file))
    assert arguments["sweep"] == "[{lora_rank: 4}, {lora_rank: 8}]"
    assert arguments["training_config"] == "{epochs: 2}"
    assert yaml.safe_load(arguments["job_yaml"]) == {"sampler": "euler"}


# --------------------------------------------------------------------------- a fake KFP server


class FakeKfpServer(ThreadingHTTPServer):
    """Answers the KFP v2beta1 calls of kfp.Client and records them as (method, path, body)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _KfpHandler)
        self.requests: list[tuple[str, str, bytes]] = []
        self.pipelines: dict[str, str] = {}  # display name -> id

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def bodies(self, method: str, path_prefix: str) -> list[bytes]:
        return [b for m, p, b in self.requests if m == method and p.startswith(path_prefix)]


class _KfpHandler(BaseHTTPRequestHandler):
    server: FakeKfpServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append((self.command, self.path, body))
        path, _, query = self.path.partition("?")
        answer: dict[str, Any] = {}
        if path == "/apis/v2beta1/healthz":
            answer = {"multi_user": False}
        elif path == "/apis/v2beta1/pipelines" and self.command == "GET":
            names = re.findall(r"stringValue%22%3A\+%22([^%]+)%22", query)
            found = [
                {"pipeline_id": self.server.pipelines[name], "display_name": name}
                for name in names
                if name in self.server.pipelines
            ]
            answer = {"pipelines": found, "total_size": len(found)}
        elif path == "/apis/v2beta1/pipelines/upload":
            name = re.search(r"name=([^&]+)", query).group(1)
            self.server.pipelines[name] = pipeline_id = f"pipeline-{len(self.server.pipelines)}"
            answer = {"pipeline_id": pipeline_id, "display_name": name}
        elif re.fullmatch(r"/apis/v2beta1/pipelines/[^/]+/versions", path):
            answer = {"pipeline_versions": [{"pipeline_version_id": "version-first"}]}
        elif path == "/apis/v2beta1/pipelines/upload_version":
            version_id = f"version-{len(self.server.requests)}"
            answer = {"pipeline_id": "pipeline-0", "pipeline_version_id": version_id}
        elif path == "/apis/v2beta1/experiments" and self.command == "POST":
            answer = {
                "experiment_id": "experiment-1",
                "display_name": json.loads(body)["display_name"],
            }
        elif path == "/apis/v2beta1/runs":
            answer = {"run_id": "run-1"}
        elif path == "/apis/v2beta1/recurringruns":
            answer = {"recurring_run_id": "recurring-1"}
        encoded = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def kfp_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeKfpServer]:
    server = FakeKfpServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("KFP_HOST", server.url)
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp reads ~/.config/kfp/context.json
    monkeypatch.setattr(lora_training, "PIPELINE_YAML", tmp_path / "lora_training.yaml")
    yield server
    server.shutdown()
    server.server_close()


def _uploaded_spec(body: bytes) -> dict[str, Any]:
    document = body.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
    return next(yaml.safe_load_all(document))


def test_submit_uploads_the_compiled_pipeline_and_starts_a_run_with_the_parameters(
    kfp_server: FakeKfpServer, compiled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["submit", "--param", "data_uri=s3://data/raw", "--param", "num_gpus=4"]
    assert pipelines_cli.main(argv) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == f"run: {kfp_server.url}/#/runs/details/run-1"

    (upload,) = kfp_server.bodies("POST", "/apis/v2beta1/pipelines/upload?")
    assert _uploaded_spec(upload) == load_compiled(compiled)[0]
    (run,) = map(json.loads, kfp_server.bodies("POST", "/apis/v2beta1/runs"))
    assert run["runtime_config"]["parameters"] == {"data_uri": "s3://data/raw", "num_gpus": 4}
    assert run["pipeline_version_reference"] == {
        "pipeline_id": "pipeline-0",
        "pipeline_version_id": "version-first",
    }
    assert run["experiment_id"] == "experiment-1"


def test_a_second_submit_uploads_a_new_version_of_the_same_pipeline(
    kfp_server: FakeKfpServer,
) -> None:
    assert pipelines_cli.main(["submit", "--param", "data_uri=s3://data/raw"]) == 0
    assert pipelines_cli.main(["submit", "--param", "data_uri=s3://data/raw"]) == 0
    assert len(kfp_server.bodies("POST", "/apis/v2beta1/pipelines/upload?")) == 1
    assert len(kfp_server.bodies("POST", "/apis/v2beta1/pipelines/upload_version")) == 1
    runs = [json.loads(body) for body in kfp_server.bodies("POST", "/apis/v2beta1/runs")]
    versions = [run["pipeline_version_reference"]["pipeline_version_id"] for run in runs]
    assert versions[0] == "version-first" and versions[1].startswith("version-")
    assert versions[0] != versions[1]


def test_schedule_creates_a_weekly_recurring_run_without_catch_up_one_at_a_time(
    kfp_server: FakeKfpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["schedule", "--cron", "0 0 3 * * 1", "--param", "data_uri=s3://data/raw"]
    assert pipelines_cli.main(argv) == 0
    assert "recurring-1" in capsys.readouterr().out
    (recurring,) = map(json.loads, kfp_server.bodies("POST", "/apis/v2beta1/recurringruns"))
    assert recurring["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert recurring["max_concurrency"] == "1" or recurring["max_concurrency"] == 1
    assert recurring["no_catchup"] is True
    assert recurring["runtime_config"]["parameters"] == {"data_uri": "s3://data/raw"}


def test_a_five_field_cron_is_refused_before_anything_is_sent(
    kfp_server: FakeKfpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pipelines_cli.main(["schedule", "--cron", "0 3 * * 1"]) != 0
    assert "wants six, seconds first" in capsys.readouterr().err
    assert kfp_server.requests == []


def test_submit_without_kfp_host_says_how_to_set_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KFP_HOST", raising=False)
    assert pipelines_cli.main(["submit"]) != 0
    assert "export KFP_HOST=" in capsys.readouterr().err


def _producer(task: dict[str, Any], artifact: str) -> tuple[str, str]:
    source = task["inputs"]["artifacts"][artifact]
    if "taskOutputArtifact" in source:
        output = source["taskOutputArtifact"]
        return output["producerTask"], output["outputArtifactKey"]
    return ("parent", source["componentInputArtifact"])


def tasks_by_display_name(spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every task of every (sub-)DAG, grouped by the name the KFP UI shows."""
    tasks: dict[str, list[dict[str, Any]]] = {}
    dags = [spec["root"]] + list(spec["components"].values())
    for dag in dags:
        for task in dag.get("dag", {}).get("tasks", {}).values():
            tasks.setdefault(task["taskInfo"]["name"], []).append(task)
    return tasks


def _executor(spec: dict[str, Any], task: dict[str, Any]) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


def test_an_unreachable_kfp_server_is_one_line_naming_the_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("KFP_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("KFP_TOKEN", "token-that-must-not-leak")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(lora_training, "PIPELINE_YAML", tmp_path / "lora_training.yaml")
    assert pipelines_cli.main(["submit"]) != 0
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(
        f"python -m pipelines submit: error: cannot reach KFP at http://127.0.0.1:{port}"
    )
    assert "token-that-must-not-leak" not in capsys.readouterr().err


def test_a_refusing_kfp_server_gives_the_status_and_a_credentials_hint(
    kfp_server: FakeKfpServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(handler: _KfpHandler) -> None:
        handler.send_response(401, "Unauthorized")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    monkeypatch.setattr(_KfpHandler, "do_POST", refuse)  # uploading the pipeline is refused
    assert pipelines_cli.main(["submit"]) != 0
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"python -m pipelines submit: error: KFP at {kfp_server.url} answered HTTP 401 "
        "Unauthorized (check KFP_TOKEN or your kfp credentials)"
    )
