"""TrainJob submission against a fake Kubernetes API server on 127.0.0.1.

The fake speaks the paths the ``kubernetes`` client calls for a namespaced custom object,
validates what a real API server and the Trainer's CRD would, records every request, and moves
a job's status on with each GET, so the tests exercise the real client end to end.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from lorapipe.errors import ConfigError, TrainingError
from lorapipe.trainjob import (
    GPU_RESOURCE,
    NAME_MAX_LENGTH,
    SPEC_HASH_ANNOTATION,
    TrainJobSpec,
    run_trainjob,
    trainjob_manifest,
    trainjob_name,
)

PATH = re.compile(
    r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/?]+))?"
)
RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

Status = Callable[[int], dict[str, Any] | None]


def running(_: int) -> dict[str, Any]:
    return {"jobsStatus": [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0}]}


def succeeds(gets: int) -> dict[str, Any] | None:
    """No status, then running with progress, then Complete."""
    if gets <= 1:
        return None
    if gets == 2:
        return {**running(gets), "trainerStatus": {"progressPercentage": 40}}
    return {
        "conditions": [
            {"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "done"}
        ],
        "jobsStatus": [{"name": "node", "active": 0, "ready": 0, "succeeded": 1, "failed": 0}],
    }


def fails(gets: int) -> dict[str, Any] | None:
    if gets <= 2:
        return succeeds(gets)
    return {
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "FailedJobs",
                "message": "jobset failed: node-0 BackoffLimitExceeded\nexit code 1",
            }
        ]
    }


def failed_status(_: int) -> dict[str, Any]:
    return fails(99) or {}


class FakeCluster:
    """The state behind the fake API server: objects, requests, and how status moves on."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.gets: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []
        self.status: Status = succeeds
        self.create_status: int | None = None  # answer every POST with this code
        self.race_on_create = False  # a concurrent attempt creates the object first
        self.unavailable_gets = 0  # answer this many GETs with 503 (API server restarting)
        self.lock = threading.Lock()

    def seed(self, body: dict[str, Any], status: Status) -> None:
        """An object left by an earlier attempt, with its own status progression."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        self.jobs[key] = copy.deepcopy(body)
        self.jobs[key]["_status"] = status

    @staticmethod
    def invalid(body: dict[str, Any]) -> str | None:
        """What the API server and the TrainJob CRD schema would refuse."""
        if body.get("apiVersion") != "trainer.kubeflow.org/v1alpha1":
            return "apiVersion must be trainer.kubeflow.org/v1alpha1"
        if body.get("kind") != "TrainJob":
            return "kind must be TrainJob"
        name = (body.get("metadata") or {}).get("name") or ""
        if not RFC1035.match(name) or len(name) > 63:
            return "metadata.name must match RFC 1035 DNS label format"
        spec = body.get("spec") or {}
        if not (spec.get("runtimeRef") or {}).get("name"):
            return "spec.runtimeRef.name: Required value"
        trainer = spec.get("trainer") or {}
        if not trainer.get("image"):
            return "spec.trainer.image: Required value"
        if not isinstance(trainer.get("numNodes"), int) or trainer["numNodes"] < 1:
            return "spec.trainer.numNodes: should be greater than or equal to 1"
        for item in trainer.get("env") or []:
            if "valueFrom" in item and "value" in item:
                return f"spec.trainer.env[{item['name']}]: value and valueFrom are exclusive"
        return None


def make_handler(cluster: FakeCluster) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def failure(self, code: int, reason: str, message: str) -> None:
            self.reply(
                code,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": message,
                    "reason": reason,
                    "code": code,
                },
            )

        def route(self) -> tuple[str, str | None] | None:
            match = PATH.match(self.path)
            if match is None:
                self.failure(404, "NotFound", f"the server could not find {self.path}")
                return None
            return match.group(1), match.group(2)

        def body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            cluster.requests.append(("POST", self.path))
            route = self.route()
            if route is None:
                return
            namespace, name = route
            body = self.body()
            if name is not None:
                self.failure(405, "MethodNotAllowed", "POST to a named object")
                return
            if cluster.create_status is not None:
                self.failure(cluster.create_status, "Forbidden", "trainjobs is forbidden: nope")
                return
            problem = FakeCluster.invalid(body)
            if problem is not None:
                self.failure(
                    422, "Invalid", f'TrainJob.trainer.kubeflow.org "x" is invalid: {problem}'
                )
                return
            key = (namespace, body["metadata"]["name"])
            with cluster.lock:
                if cluster.race_on_create:
                    cluster.race_on_create = False
                    cluster.seed(body, cluster.status)
                if key in cluster.jobs:
                    self.failure(409, "AlreadyExists", f'trainjobs "{key[1]}" already exists')
                    return
                cluster.created.append(copy.deepcopy(body))
                stored = copy.deepcopy(body)
                stored["metadata"]["uid"] = f"uid-{len(cluster.created)}"
                stored["_status"] = cluster.status
                cluster.jobs[key] = stored
                cluster.gets[key] = 0
            self.reply(201, public(stored))

        def do_GET(self) -> None:  # noqa: N802
            cluster.requests.append(("GET", self.path))
            if cluster.unavailable_gets > 0:
                cluster.unavailable_gets -= 1
                self.failure(503, "ServiceUnavailable", "the server is restarting")
                return
            route = self.route()
            if route is None:
                return
            key = (route[0], route[1] or "")
            with cluster.lock:
                job = cluster.jobs.get(key)
                if job is None:
                    self.failure(404, "NotFound", f'trainjobs "{key[1]}" not found')
                    return
                cluster.gets[key] = cluster.gets.get(key, 0) + 1
                status = job["_status"](cluster.gets[key])
                if status is None:
                    job.pop("status", None)
                else:
                    job["status"] = status
            self.reply(200, public(job))

        def do_DELETE(self) -> None:  # noqa: N802
            cluster.requests.append(("DELETE", self.path))
            route = self.route()
            if route is None:
                return
            self.body()
            key = (route[0], route[1] or "")
            with cluster.lock:
                job = cluster.jobs.pop(key, None)
                cluster.gets.pop(key, None)
            if job is None:
                self.failure(404, "NotFound", f'trainjobs "{key[1]}" not found')
                return
            self.reply(200, public(job))

    return Handler


def public(job: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in job.items() if not key.startswith("_")}


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    state = FakeCluster()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    state.host = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def api_client(cluster: FakeCluster) -> Iterator[client.ApiClient]:
    configuration = client.Configuration(host=cluster.host)  # type: ignore[attr-defined]
    api = client.ApiClient(configuration)
    yield api
    api.close()


def make_spec(**changes: Any) -> TrainJobSpec:
    values: dict[str, Any] = {
        "name": trainjob_name("3f2a9c1e-7b4d-4e21-9a0c-5d6e7f8a9b0c"),
        "namespace": "lorapipe",
        "image": "registry.example/lorapipe-torch:0.1.0",
        "config_uri": "s3://lorapipe-artifacts/runs/r1/train.yaml",
        "num_nodes": 2,
        "gpus_per_node": 4,
    }
    values.update(changes)
    return TrainJobSpec(**values)


def run(spec: TrainJobSpec, api_client: client.ApiClient, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("poll_seconds", 0.01)
    kwargs.setdefault("timeout_seconds", 10)
    return run_trainjob(spec, api_client=api_client, **kwargs)


def methods(cluster: FakeCluster) -> list[str]:
    return [method for method, _ in cluster.requests]


# --------------------------------------------------------------------------- manifest


def test_manifest_is_a_torch_distributed_trainjob_reading_s3_settings_by_reference() -> None:
    manifest = trainjob_manifest(make_spec(env={"NCCL_DEBUG": "WARN"}))
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert manifest["kind"] == "TrainJob"
    assert manifest["metadata"]["namespace"] == "lorapipe"
    assert manifest["spec"]["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = manifest["spec"]["trainer"]
    command = trainer["command"] + trainer["args"]
    assert command[:4] == ["torchrun", "--no-python", "lorapipe", "train"]
    assert command[4:] == [
        "--config",
        "s3://lorapipe-artifacts/runs/r1/train.yaml",
        "--resume",
        "latest",
    ]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    for kind in ("requests", "limits"):
        assert trainer["resourcesPerNode"][kind] == {
            "cpu": "8",
            "memory": "64Gi",
            GPU_RESOURCE: "4",
        }
    env = {item["name"]: item for item in trainer["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "lorapipe-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert env["LORAPIPE_S3_ENDPOINT"]["valueFrom"]["configMapKeyRef"]["name"] == "lorapipe-s3"
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "WARN"}
    assert not any(name.startswith(("PET_", "RANK", "WORLD_SIZE")) for name in env)
    patch = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod = patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert "runtimePatches" not in trainjob_manifest(make_spec(shm_size=""))["spec"]


def test_manifest_without_gpus_runs_one_process_per_node_and_requests_none() -> None:
    trainer = trainjob_manifest(make_spec(gpus_per_node=0))["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 1
    assert GPU_RESOURCE not in trainer["resourcesPerNode"]["limits"]


def test_manifest_hash_follows_the_spec() -> None:
    def digest(spec: TrainJobSpec) -> str:
        return trainjob_manifest(spec)["metadata"]["annotations"][SPEC_HASH_ANNOTATION]

    assert digest(make_spec()) == digest(make_spec())
    assert digest(make_spec()) != digest(make_spec(num_nodes=3))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"num_nodes": 0}, "num_nodes"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"name": "1-starts-with-a-digit"}, "start with a letter"),
        ({"name": "Upper"}, "lower-case"),
        ({"name": "a" * 50}, "too long for its pods"),
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"image": ""}, "image"),
        ({"config_uri": "/local/train.yaml"}, "s3://"),
        ({"runtime": ""}, "runtime"),
        ({"env": {"PET_NNODES": "3"}}, "PET_NNODES"),
    ],
)
def test_manifest_refuses_what_the_cluster_would(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)) as error:
        trainjob_manifest(make_spec(**changes))
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "run_id",
    [
        "3f2a9c1e-7b4d-4e21-9a0c-5d6e7f8a9b0c",
        "run-1",
        "Run_1",
        "42",
        "--weird..ID__with//symbols--",
        "x" * 300,
        "ünïcødé run",
        "---",
    ],
)
def test_trainjob_name_is_a_short_stable_dns_label(run_id: str) -> None:
    name = trainjob_name(run_id)
    assert RFC1035.match(name), name
    assert len(name) <= NAME_MAX_LENGTH <= 63
    assert trainjob_name(run_id) == name
    trainjob_manifest(make_spec(name=name, num_nodes=999))  # fits JobSet's pod names


def test_trainjob_name_keeps_simple_ids_readable_and_different_ids_apart() -> None:
    assert trainjob_name("run-1") == "lorapipe-run-1"
    ids = ["run-1", "Run-1", "run_1", "run 1", "x" * 100, "x" * 101, "x" * 100 + "y"]
    assert len({trainjob_name(run_id) for run_id in ids}) == len(ids)
    uuid = "3f2a9c1e-7b4d-4e21-9a0c-5d6e7f8a9b0c"
    assert trainjob_name(uuid).startswith("lorapipe-3f2a9c1e")


def test_trainjob_name_needs_a_run_id() -> None:
    with pytest.raises(ConfigError, match="run id"):
        trainjob_name(" ")


# --------------------------------------------------------------------------- submission


def test_run_creates_the_trainjob_follows_it_and_returns_the_completed_object(
    cluster: FakeCluster, api_client: client.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    spec = make_spec()
    with caplog.at_level(logging.INFO, logger="lorapipe.trainjob"):
        job = run(spec, api_client)
    assert job["status"]["conditions"][0]["type"] == "Complete"
    [created] = cluster.created
    assert created == trainjob_manifest(spec)  # what went over the wire, field for field
    trainer = created["spec"]["trainer"]
    assert trainer["image"] == "registry.example/lorapipe-torch:0.1.0"
    assert trainer["resourcesPerNode"]["limits"][GPU_RESOURCE] == "4"
    refs = [item["valueFrom"] for item in trainer["env"] if "valueFrom" in item]
    assert {"secretKeyRef"} <= {kind for ref in refs for kind in ref}
    assert {ref["secretKeyRef"]["name"] for ref in refs if "secretKeyRef" in ref} == {"lorapipe-s3"}
    assert {ref["configMapKeyRef"]["name"] for ref in refs if "configMapKeyRef" in ref} == {
        "lorapipe-s3"
    }
    assert methods(cluster)[0] == "POST" and "DELETE" not in methods(cluster)
    assert (
        cluster.requests[0][1]
        == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/lorapipe/trainjobs"
    )
    text = caplog.text
    for expected in (
        "created",
        "waiting for the controller",
        "node jobs: active 1",
        "progress 40%",
        "Complete=True",
    ):
        assert expected in text
    assert text.count("progress 40%") == 1  # changes are logged, not every poll


def test_failed_trainjob_raises_one_line_with_the_condition_message(
    cluster: FakeCluster, api_client: client.ApiClient
) -> None:
    cluster.status = fails
    spec = make_spec()
    with pytest.raises(TrainingError) as error:
        run(spec, api_client)
    message = str(error.value)
    assert "\n" not in message
    assert f"TrainJob lorapipe/{spec.name} failed" in message
    assert "FailedJobs: jobset failed: node-0 BackoffLimitExceeded exit code 1" in message
    assert "kubectl logs" in message and "rerun" in message


def test_a_retry_follows_the_running_job_of_its_earlier_attempt(
    cluster: FakeCluster, api_client: client.ApiClient
) -> None:
    spec = make_spec()
    cluster.seed(trainjob_manifest(spec), succeeds)
    job = run(spec, api_client)
    assert job["status"]["conditions"][0]["type"] == "Complete"
    assert cluster.created == []  # the 409 answer: not created again
    assert "DELETE" not in methods(cluster)
    assert methods(cluster).count("POST") == 1


def test_a_retry_after_a_completed_job_returns_at_once(
    cluster: FakeCluster, api_client: client.ApiClient
) -> None:
    spec = make_spec()
    cluster.seed(trainjob_manifest(spec), lambda _: succeeds(99))
    run(spec, api_client)
    assert methods(cluster) == ["POST", "GET"]


def test_a_retry_replaces_a_failed_job_so_training_resumes(
    cluster: FakeCluster, api_client: client.ApiClient
) -> None:
    spec = make_spec()
    cluster.seed(trainjob_manifest(spec), failed_status)
    job = run(spec, api_client)
    assert job["status"]["conditions"][0]["type"] == "Complete"
    assert len(cluster.created) == 1
    assert methods(cluster)[:4] == ["POST", "GET", "DELETE", "GET"]


def test_a_different_job_under_the_same_name_is_not_taken_over(
    cluster: FakeCluster, api_client: client.ApiClient
) -> None:
    spec = make_spec()
    cluster.seed(trainjob_manifest(make_spec(num_nodes=3)), succeeds)
    with pytest.raises(TrainingError, match="different spec.*kubectl delete trainjob"):
        run(spec, api_client)
    assert "DELETE" not in methods(cluster)


def test_conflict_from_a_concurrent_create_is_followed_not_fatal(
    cluster: FakeCluster, api_client: client.ApiClient
) -> None:
    cluster.race_on_create = True
    job = run(make_spec(), api_client)
    assert job["status"]["conditions"][0]["type"] == "Complete"
    assert cluster.created == [] and len(cluster.jobs) == 1


def test_timeout_deletes_the_job_and_raises(
    cluster: FakeCluster, api_client: client.ApiClient
) -> None:
    cluster.status = running
    spec = make_spec()
    with pytest.raises(TrainingError, match=r"did not finish within 0\.3 s .*node jobs: active 1"):
        run(spec, api_client, timeout_seconds=0.3)
    assert methods(cluster)[-1] == "DELETE"
    assert cluster.jobs == {}


def test_status_reads_survive_a_few_api_server_errors(
    cluster: FakeCluster, api_client: client.ApiClient
) -> None:
    cluster.unavailable_gets = 3
    job = run(make_spec(), api_client)
    assert job["status"]["conditions"][0]["type"] == "Complete"
    cluster.unavailable_gets = 100
    cluster.jobs.clear()
    with pytest.raises(TrainingError, match="failed 6 times in a row .*HTTP 503"):
        run(make_spec(), api_client)


def test_job_deleted_under_us_raises(cluster: FakeCluster, api_client: client.ApiClient) -> None:
    def vanish(gets: int) -> dict[str, Any] | None:
        if gets >= 2:
            cluster.jobs.clear()
        return None

    cluster.status = vanish
    with pytest.raises(TrainingError, match="was deleted while training"):
        run(make_spec(), api_client)


def test_forbidden_points_at_the_rbac(cluster: FakeCluster, api_client: client.ApiClient) -> None:
    cluster.create_status = 403
    with pytest.raises(TrainingError, match=r"not allowed to create .*k8s/rbac.yaml"):
        run(make_spec(), api_client)


def test_the_fake_api_refuses_an_invalid_trainjob_with_a_status(
    api_client: client.ApiClient,
) -> None:
    """The fake checks what matters (so the tests above mean something), and a refusal from
    the cluster reaches the user as one line."""
    api = client.CustomObjectsApi(api_client)
    manifest = trainjob_manifest(make_spec())
    for path in (("spec", "trainer", "image"), ("spec", "runtimeRef", "name"), ("kind",)):
        broken = copy.deepcopy(manifest)
        target = broken
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        with pytest.raises(client.ApiException) as error:
            api.create_namespaced_custom_object(
                "trainer.kubeflow.org", "v1alpha1", "lorapipe", "trainjobs", broken
            )
        assert error.value.status == 422
        assert json.loads(error.value.body)["kind"] == "Status"
    broken = copy.deepcopy(manifest)
    broken["spec"]["trainer"]["numNodes"] = 0
    with pytest.raises(client.ApiException, match="422"):
        api.create_namespaced_custom_object(
            "trainer.kubeflow.org", "v1alpha1", "lorapipe", "trainjobs", broken
        )


def test_a_refusal_by_the_cluster_is_one_line(
    cluster: FakeCluster, api_client: client.ApiClient
) -> None:
    cluster.create_status = 422
    with pytest.raises(
        TrainingError, match=r"the cluster rejected TrainJob lorapipe/.*nope"
    ) as error:
        run(make_spec(), api_client)
    assert "\n" not in str(error.value)


def test_an_unreachable_api_server_is_one_line() -> None:
    configuration = client.Configuration(host="http://127.0.0.1:9")  # the discard port
    configuration.retries = 0
    api = client.ApiClient(configuration)
    with pytest.raises(
        TrainingError, match=r"cannot reach the Kubernetes API at http://127\.0\.0\.1:9"
    ):
        run(make_spec(), api)


def test_without_a_cluster_or_kubeconfig_the_error_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(TrainingError, match="no usable kubeconfig"):
        run_trainjob(make_spec(), poll_seconds=0.01, timeout_seconds=1)
