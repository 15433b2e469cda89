"""Multi-node training as a Kubeflow Trainer v2 ``TrainJob``, submitted and followed from Python.

One pod can hold only so many GPUs; past that, the pipeline's train step hands the same torch
image to Kubeflow Trainer (``trainer.kubeflow.org/v1alpha1``, the ``torch-distributed``
ClusterTrainingRuntime). The runtime sets ``PET_NNODES``/``PET_NODE_RANK``/``PET_MASTER_ADDR``...
on every node; ``torchrun`` turns them into ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``, under which
``lorapipe train`` joins the process group instead of starting its own processes. The nodes
share nothing but the network: the config, data, base model, outputs and the checkpoint mirror
are all on S3, where the pipeline's select step reads the result.

Retries: the job's name comes from the pipeline run id (:func:`trainjob_name`), so a retried
train task finds the TrainJob of its earlier attempt and waits for it rather than starting a
second one; a failed one is deleted and created again, and resumes from the mirrored
checkpoints (``--resume latest``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorapipe import store
from lorapipe.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, CustomObjectsApi

    from lorapipe.train_config import TrainConfig

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
GPU_RESOURCE = "nvidia.com/gpu"
SPEC_HASH_ANNOTATION = "lorapipe/spec-hash"
CONFIG_ANNOTATION = "lorapipe/config-uri"

# JobSet (under every TrainJob) refuses a job whose longest pod name,
# "<name>-node-0-<node index>-<5 random>", is not a DNS-1035 label (<= 63 characters). With
# room for 999 nodes that leaves 46; trainjob_name stays well under it.
_POD_NAME_SUFFIX = len("-node-0-") + len("-abcde")
NAME_MAX_LENGTH = 40
_NAME_PREFIX = "lorapipe-"
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_TRANSIENT_STATUSES = {429, 500, 502, 503, 504}
_MAX_TRANSIENT_ERRORS = 6


@dataclass(frozen=True)
class TrainJobSpec:
    """What to run: ``lorapipe train --config <config_uri>`` on ``num_nodes`` x ``gpus_per_node``.

    The S3 credentials (Secret ``secret_name``) and endpoint/region (ConfigMap
    ``config_map_name``) are the ones every pipeline step reads, as in ``k8s/``.
    ``shm_size`` sizes ``/dev/shm`` for NCCL between the GPUs of a node (Trainer >= 2.2
    ``runtimePatches``; older releases drop the field); empty leaves the runtime's.
    """

    name: str
    namespace: str
    image: str
    config_uri: str
    num_nodes: int
    gpus_per_node: int
    cpu: str = "8"
    memory: str = "64Gi"
    secret_name: str = "lorapipe-s3"
    config_map_name: str = "lorapipe-s3"
    runtime: str = "torch-distributed"
    env: Mapping[str, str] = field(default_factory=dict)
    shm_size: str = "8Gi"
    labels: Mapping[str, str] = field(default_factory=dict)


def train_on_nodes(config: TrainConfig) -> None:
    """``lorapipe train`` with ``num_nodes`` > 1: the nodes share only S3, so the dataset and
    the resolved config go to ``checkpoint_mirror``, a TrainJob trains into
    ``<checkpoint_mirror>/training``, and its output comes back to ``output_dir``."""
    import dataclasses

    import yaml

    if not store.is_s3(config.checkpoint_mirror):
        raise ConfigError(
            f"num_nodes {config.num_nodes} needs checkpoint_mirror on S3 (got "
            f"'{config.checkpoint_mirror}'): the nodes share data and checkpoints only through it"
        )
    if not config.trainer_image:
        raise ConfigError("num_nodes > 1 needs trainer_image, the torch image the nodes run")
    work = config.checkpoint_mirror
    dataset_uri = config.train_data_dir
    if not store.is_s3(dataset_uri):
        dataset_uri = store.join(work, "dataset")
        if not store.is_complete(dataset_uri):
            store.put_dir(config.train_data_dir, dataset_uri)
    output_uri = (
        config.output_dir if store.is_s3(config.output_dir) else store.join(work, "training")
    )
    node_config = dataclasses.replace(
        config,
        train_data_dir=dataset_uri,
        metadata_path="",
        output_dir=output_uri,
        log_dir="",
        checkpoint_mirror="",
        resume="latest",
        num_nodes=1,  # torchrun starts the processes on every node
        num_processes=1,
    )
    config_uri = store.join(work, "train_config.yaml")
    store.write_text(config_uri, yaml.safe_dump(node_config.to_dict(), sort_keys=False))
    run_trainjob(
        TrainJobSpec(
            name=trainjob_name(work.rstrip("/").rsplit("/", 1)[-1]),
            namespace=pod_namespace(),
            image=config.trainer_image,
            config_uri=config_uri,
            num_nodes=config.num_nodes,
            gpus_per_node=config.num_processes,
        )
    )
    if output_uri != config.output_dir:
        store.get_dir(output_uri, config.output_dir)


def pod_namespace() -> str:
    """The namespace this pod runs in (where the TrainJob goes), else ``$POD_NAMESPACE`` or
    ``kubeflow``."""
    from pathlib import Path

    service_account = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if service_account.is_file():
        return service_account.read_text().strip()
    return os.environ.get("POD_NAMESPACE", "kubeflow")


def trainjob_name(run_id: str) -> str:
    """A TrainJob name that is the same for every attempt of one pipeline run and differs
    between runs: ``lorapipe-<run id>``, lower-cased and cut to fit, with a hash of the whole
    run id appended whenever the id had to be changed (so ``Run_A`` and ``run-a`` differ)."""
    if not run_id or not run_id.strip():
        raise ConfigError(
            "trainjob_name: the pipeline run id is empty; pass the KFP run id "
            "(dsl.PIPELINE_JOB_ID_PLACEHOLDER) so that retries find their TrainJob"
        )
    body = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    name = _NAME_PREFIX + body
    if body == run_id and len(name) <= NAME_MAX_LENGTH:
        return name
    digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:8]
    keep = NAME_MAX_LENGTH - len(_NAME_PREFIX) - len(digest) - 1
    body = body[:keep].strip("-")
    return f"{_NAME_PREFIX}{body}-{digest}" if body else f"{_NAME_PREFIX}{digest}"


def trainjob_manifest(spec: TrainJobSpec) -> dict[str, Any]:
    """The TrainJob object for ``spec``; checks what the cluster would only reject later."""
    _check_spec(spec)
    processes = max(spec.gpus_per_node, 1)
    resources: dict[str, str] = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus_per_node > 0:
        resources[GPU_RESOURCE] = str(spec.gpus_per_node)
    trainer: dict[str, Any] = {
        "image": spec.image,
        # torchrun reads PET_* from the runtime and starts numProcPerNode processes
        "command": ["torchrun", "--no-python", "lorapipe", "train"],
        "args": ["--config", spec.config_uri, "--resume", "latest"],
        "env": _env(spec),
        "numNodes": spec.num_nodes,
        "numProcPerNode": processes,
        # requests == limits: Guaranteed QoS, so a node under memory pressure evicts others first
        "resourcesPerNode": {"requests": dict(resources), "limits": dict(resources)},
    }
    job_spec: dict[str, Any] = {
        "runtimeRef": {"name": spec.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
        "trainer": trainer,
    }
    if spec.shm_size:
        job_spec["runtimePatches"] = [_shm_patch(spec.shm_size)]
    labels = {
        "app.kubernetes.io/part-of": "lorapipe",
        "app.kubernetes.io/component": "train",
        "app.kubernetes.io/managed-by": "lorapipe",
        **spec.labels,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": labels,
            "annotations": {
                CONFIG_ANNOTATION: spec.config_uri,
                SPEC_HASH_ANNOTATION: _spec_hash(job_spec),
            },
        },
        "spec": job_spec,
    }


def run_trainjob(
    spec: TrainJobSpec,
    *,
    api_client: ApiClient | None = None,
    poll_seconds: float = 10.0,
    timeout_seconds: float | None = None,
) -> dict[str, Any]:
    """Create the TrainJob (or take over the one an earlier attempt made), log its status as
    it changes, and return the final object once it is ``Complete``.

    Raises :class:`TrainingError` when it fails, when the cluster refuses it, or after
    ``timeout_seconds``; a timed-out job is deleted so that it stops holding GPUs (its
    checkpoints stay on S3 and a rerun resumes from them).
    """
    manifest = trainjob_manifest(spec)
    api = _custom_objects_api(api_client)
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    job = _create_or_reuse(api, spec, manifest, deadline, poll_seconds)
    return _wait(api, spec, job, deadline, poll_seconds, timeout_seconds)


# --------------------------------------------------------------------------- manifest


def _check_spec(spec: TrainJobSpec) -> None:
    where = f"TrainJob '{spec.name}'"
    if not _DNS1035.match(spec.name) or len(spec.name) > 63:
        raise ConfigError(
            f"{where}: the name must be lower-case letters, digits and '-', start with a letter "
            "and have at most 63 characters; derive it with lorapipe.trainjob.trainjob_name(run_id)"
        )
    longest = len(spec.name) + _POD_NAME_SUFFIX + len(str(max(spec.num_nodes - 1, 0)))
    if longest > 63:
        raise ConfigError(
            f"{where}: the name is too long for its pods' names ({longest} > 63 characters); "
            f"use at most {63 - longest + len(spec.name)} characters"
        )
    if not _DNS1123.match(spec.namespace) or len(spec.namespace) > 63:
        raise ConfigError(f"{where}: '{spec.namespace}' is not a valid Kubernetes namespace")
    if not spec.image:
        raise ConfigError(f"{where}: no image; use the lorapipe torch image (images/)")
    if not spec.config_uri.startswith("s3://"):
        raise ConfigError(
            f"{where}: config_uri must be an s3:// URI that every node can read, "
            f"got '{spec.config_uri}'; upload the training YAML first"
        )
    if not spec.runtime:
        raise ConfigError(f"{where}: no runtime; use 'torch-distributed'")
    if spec.num_nodes < 1:
        raise ConfigError(f"{where}: num_nodes must be at least 1, got {spec.num_nodes}")
    if spec.gpus_per_node < 0:
        raise ConfigError(f"{where}: gpus_per_node must be 0 or more, got {spec.gpus_per_node}")
    reserved = sorted(name for name in spec.env if name.startswith("PET_"))
    if reserved:
        raise ConfigError(
            f"{where}: env {', '.join(reserved)} is set by the Trainer's torch runtime; remove it"
        )


def _env(spec: TrainJobSpec) -> list[dict[str, Any]]:
    """S3 settings by reference (the TrainJob API has ``env`` but no ``envFrom``), so no
    secret value is ever in the object."""

    def ref(name: str, kind: str, source: str, optional: bool = False) -> dict[str, Any]:
        selector: dict[str, Any] = {"name": source, "key": name}
        if optional:
            selector["optional"] = True
        return {"name": name, "valueFrom": {kind: selector}}

    env = [
        ref("AWS_ACCESS_KEY_ID", "secretKeyRef", spec.secret_name),
        ref("AWS_SECRET_ACCESS_KEY", "secretKeyRef", spec.secret_name),
        ref("LORAPIPE_S3_ENDPOINT", "configMapKeyRef", spec.config_map_name),
        ref("AWS_DEFAULT_REGION", "configMapKeyRef", spec.config_map_name, optional=True),
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # the log shows progress as it happens
    ]
    fixed = {item["name"] for item in env}
    env += [{"name": k, "value": str(v)} for k, v in spec.env.items() if k not in fixed]
    return env


def _shm_patch(size: str) -> dict[str, Any]:
    """A memory-backed ``/dev/shm`` for the node container: NCCL passes data between the
    GPUs of a node through it, and the container default (64 MiB) is too small."""
    pod = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}],
        "containers": [
            {"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
        ],
    }
    job = {"template": {"spec": {"template": {"spec": pod}}}}
    return {
        "manager": "lorapipe",
        "trainingRuntimeSpec": {
            "template": {"spec": {"replicatedJobs": [{"name": "node", **job}]}}
        },
    }


def _spec_hash(job_spec: Mapping[str, Any]) -> str:
    text = json.dumps(job_spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- cluster


def _custom_objects_api(api_client: ApiClient | None) -> CustomObjectsApi:
    from kubernetes import client

    return client.CustomObjectsApi(api_client or _default_api_client())


def _default_api_client() -> ApiClient:
    """The pod's service account inside a cluster (a KFP step), else ``~/.kube/config``."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            config.load_kube_config(client_configuration=configuration)
        except (config.ConfigException, OSError) as error:
            raise TrainingError(
                "cannot reach Kubernetes to start the TrainJob: not running in a cluster and no "
                f"usable kubeconfig ({_one_line(str(error))}); set KUBECONFIG or run in a pod"
            ) from None
    return client.ApiClient(configuration)


def _create_or_reuse(
    api: CustomObjectsApi,
    spec: TrainJobSpec,
    manifest: dict[str, Any],
    deadline: float | None,
    poll_seconds: float,
) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    where = _where(spec)
    for _attempt in range(5):
        try:
            created = api.create_namespaced_custom_object(
                GROUP, VERSION, spec.namespace, PLURAL, manifest
            )
        except ApiException as error:
            if error.status != 409:
                raise _api_error(error, "create", spec) from None
        except HTTPError as error:
            raise TrainingError(
                f"cannot reach the Kubernetes API at {api.api_client.configuration.host} to "
                f"create {where} ({_one_line(str(error))}); check the cluster and rerun"
            ) from None
        else:
            log.info(
                "%s: created: %d node(s) x %d GPU(s), image %s, config %s",
                where,
                spec.num_nodes,
                spec.gpus_per_node,
                spec.image,
                spec.config_uri,
            )
            return created
        try:
            existing = _get(api, spec)
        except _TransientError as error:
            raise TrainingError(
                f"{where} exists but cannot be read ({error}); rerun to follow it"
            ) from None
        if existing is None:  # deleted between our create and get: try again
            continue
        metadata = existing.get("metadata") or {}
        if metadata.get("deletionTimestamp"):
            log.info("%s: an earlier one is being deleted; waiting", where)
            _wait_gone(api, spec, deadline, poll_seconds)
            continue
        theirs = (metadata.get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
        if theirs != manifest["metadata"]["annotations"][SPEC_HASH_ANNOTATION]:
            raise TrainingError(
                f"{where} already exists and was not made for this training (different spec); "
                f"delete it (kubectl delete trainjob -n {spec.namespace} {spec.name}) "
                "or use another run id"
            )
        condition = _final_condition(existing)
        if condition is not None and condition["type"] == "Failed":
            log.warning(
                "%s: the earlier attempt failed (%s); deleting it and starting again, from the "
                "last checkpoint on S3",
                where,
                _condition_text(condition),
            )
            _delete(api, spec)
            _wait_gone(api, spec, deadline, poll_seconds)
            continue
        log.info("%s: exists from an earlier attempt of this run; following it", where)
        return existing
    raise TrainingError(
        f"{where}: could not create it, the name keeps being taken; "
        f"check kubectl get trainjob -n {spec.namespace} {spec.name} and rerun"
    )


def _wait(
    api: CustomObjectsApi,
    spec: TrainJobSpec,
    job: dict[str, Any],
    deadline: float | None,
    poll_seconds: float,
    timeout_seconds: float | None,
) -> dict[str, Any]:
    where = _where(spec)
    seen: dict[str, str] = {}
    errors = 0
    while True:
        _log_changes(where, job, seen)
        condition = _final_condition(job)
        if condition is not None and condition["type"] == "Complete":
            log.info("%s: complete", where)
            return job
        if condition is not None:
            raise TrainingError(
                f"{where} failed: {_condition_text(condition)}; see its pods' logs "
                f"(kubectl logs -n {spec.namespace} -l jobset.sigs.k8s.io/jobset-name={spec.name})"
                ", fix the cause and rerun: training resumes from the last checkpoint on S3"
            )
        if deadline is not None and time.monotonic() >= deadline:
            _delete(api, spec, quiet=True)
            raise TrainingError(
                f"{where} did not finish within {timeout_seconds:g} s "
                f"(last seen: {seen.get('summary', 'no status')}); "
                "deleted it, its checkpoints stay on S3 and a rerun resumes from them; "
                "allow more time if training needs it"
            )
        pause = poll_seconds if deadline is None else min(poll_seconds, deadline - time.monotonic())
        time.sleep(max(pause, 0.0))
        try:
            latest = _get(api, spec)
        except _TransientError as error:
            errors += 1
            if errors >= _MAX_TRANSIENT_ERRORS:
                raise TrainingError(
                    f"{where}: the Kubernetes API failed {errors} times in a row ({error}); "
                    "the TrainJob may still be running: check it and rerun to follow it again"
                ) from None
            log.warning("%s: reading its status failed (%s); trying again", where, error)
            continue
        errors = 0
        if latest is None:
            raise TrainingError(
                f"{where} was deleted while training (by someone else, or its runtime); "
                "rerun the pipeline: training resumes from the last checkpoint on S3"
            )
        job = latest


class _TransientError(Exception):
    """A status read that may work on the next try (API server busy, connection dropped)."""


def _get(api: CustomObjectsApi, spec: TrainJobSpec) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, spec.namespace, PLURAL, spec.name)
    except ApiException as error:
        if error.status == 404:
            return None
        if error.status in _TRANSIENT_STATUSES:
            raise _TransientError(f"HTTP {error.status} {error.reason}") from None
        raise _api_error(error, "read", spec) from None
    except HTTPError as error:
        raise _TransientError(_one_line(str(error))) from None


def _delete(api: CustomObjectsApi, spec: TrainJobSpec, *, quiet: bool = False) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, spec.namespace, PLURAL, spec.name, propagation_policy="Foreground"
        )
    except ApiException as error:
        if error.status == 404:
            return
        if not quiet:
            raise _api_error(error, "delete", spec) from None
        log.warning("%s: could not delete it: %s", _where(spec), _api_message(error))


def _wait_gone(
    api: CustomObjectsApi, spec: TrainJobSpec, deadline: float | None, poll_seconds: float
) -> None:
    """Foreground deletion keeps the object until its pods are gone; a new one with the same
    name can only be created after that."""
    while True:
        try:
            if _get(api, spec) is None:
                return
        except _TransientError:
            pass
        if deadline is not None and time.monotonic() >= deadline:
            raise TrainingError(
                f"{_where(spec)} is still being deleted at the timeout; "
                f"check kubectl get trainjob -n {spec.namespace} {spec.name} and rerun"
            )
        time.sleep(poll_seconds)


# --------------------------------------------------------------------------- status


def _final_condition(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``Failed`` or ``Complete`` condition once it is True (Failed wins), else None."""
    conditions = {c.get("type"): c for c in _conditions(job)}
    for kind in ("Failed", "Complete"):
        condition = conditions.get(kind)
        if condition is not None and condition.get("status") == "True":
            return condition
    return None


def _conditions(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list((job.get("status") or {}).get("conditions") or [])


def _condition_text(condition: Mapping[str, Any]) -> str:
    reason = condition.get("reason") or condition.get("type", "")
    message = _one_line(str(condition.get("message") or "no message"))
    return f"{reason}: {message}"


def _log_changes(where: str, job: Mapping[str, Any], seen: dict[str, str]) -> None:
    """One log line per change of a condition, of the child jobs' counts or of progress."""
    status = job.get("status") or {}
    lines: dict[str, str] = {}
    for condition in _conditions(job):
        kind = condition.get("type", "?")
        lines[f"condition {kind}"] = (
            f"{kind}={condition.get('status')} ({_condition_text(condition)})"
        )
    for child in status.get("jobsStatus") or []:
        counts = ", ".join(
            f"{key} {child.get(key, 0)}" for key in ("active", "ready", "succeeded", "failed")
        )
        lines[f"jobs {child.get('name')}"] = f"{child.get('name')} jobs: {counts}"
    trainer = status.get("trainerStatus") or {}
    if trainer.get("progressPercentage") is not None:
        remaining = trainer.get("estimatedRemainingSeconds")
        lines["progress"] = f"progress {trainer['progressPercentage']}%" + (
            f", about {remaining} s left" if remaining is not None else ""
        )
    if not lines:
        lines["state"] = "waiting for the controller"
    for key, line in lines.items():
        if seen.get(key) != line:
            log.info("%s: %s", where, line)
            seen[key] = line
    seen["summary"] = "; ".join(lines.values())


def _where(spec: TrainJobSpec) -> str:
    return f"TrainJob {spec.namespace}/{spec.name}"


def _api_message(error: Any) -> str:
    """The ``message`` of the Kubernetes Status in the body, else the HTTP reason."""
    try:
        message = json.loads(error.body or "{}").get("message")
    except (ValueError, AttributeError, TypeError):
        message = None
    return _one_line(str(message or f"HTTP {error.status} {error.reason}"))


def _api_error(error: Any, action: str, spec: TrainJobSpec) -> TrainingError:
    where = _where(spec)
    message = _api_message(error)
    if error.status in (401, 403):
        return TrainingError(
            f"not allowed to {action} {where} ({message}); bind the pipeline's service account "
            "to the Role in k8s/rbac.yaml"
        )
    if error.status == 404 and action == "create":
        return TrainingError(
            f"cannot create {where}: {message}; install Kubeflow Trainer v2 "
            f"({API_VERSION}) and check that namespace {spec.namespace} exists"
        )
    if error.status in (400, 422):
        return TrainingError(f"the cluster rejected {where}: {message}; fix the spec and rerun")
    return TrainingError(
        f"Kubernetes API error while trying to {action} {where}: {message}; rerun when the "
        "cluster is healthy"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())
