"""The kustomize base in k8s/, checked offline: rendered here (no kubectl), every object
validated against the Kubernetes schemas with kubernetes-validate (strict), the example TrainJob
checked field by field, and the names the pipeline uses (Secret/ConfigMap lorapipe-s3) present
with the keys it reads."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERNETES_VERSION = latest_version()  # the newest schemas kubernetes-validate ships
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
    "CustomResourceDefinition", "PriorityClass",
}  # fmt: skip
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
# the kustomization fields render() understands; anything else fails the test, not silently
KNOWN_FIELDS = {
    "apiVersion", "kind", "namespace", "labels", "resources", "generatorOptions",
    "secretGenerator", "configMapGenerator",
}  # fmt: skip

# what pipelines/lora_training.py reads, if it cannot be imported
EXPECTED_S3 = {
    "S3_SECRET": "lorapipe-s3",
    "S3_SECRET_KEYS": {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
    "S3_CONFIG_MAP": "lorapipe-s3",
    "S3_CONFIG_KEYS": {"LORAPIPE_S3_ENDPOINT": "", "AWS_DEFAULT_REGION": ""},
}


# --------------------------------------------------------------------------- rendering


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key.strip(), f"{path.name} line {number}: expected KEY=value"
        values[key.strip()] = value
    return values


def generated(kind: str, spec: dict[str, Any], base: Path) -> dict[str, Any]:
    assert set(spec) <= {"name", "envs", "literals", "files", "type"}, spec
    data: dict[str, str] = {}
    for env_file in spec.get("envs", []):
        data.update(read_env_file(base / env_file))
    for literal in spec.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for entry in spec.get("files", []):
        key, _, file = entry.rpartition("=")
        data[key or Path(file).name] = (base / file).read_text()
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {"name": spec["name"]},
    }
    if kind == "Secret":
        obj["type"] = spec.get("type", "Opaque")
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        obj["data"] = data
    return obj


def render(directory: Path = K8S) -> list[dict[str, Any]]:
    """What `kubectl kustomize` prints for this (generator, namespace and labels) subset."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_FIELDS
    assert not unknown, f"render() in this test does not know {sorted(unknown)}: teach it"
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    options = kustomization.get("generatorOptions", {})
    # the pipeline refers to lorapipe-s3 by name: a hash suffix would break that
    assert options.get("disableNameSuffixHash") is True
    for spec in kustomization.get("secretGenerator", []):
        objects.append(generated("Secret", spec, directory))
    for spec in kustomization.get("configMapGenerator", []):
        objects.append(generated("ConfigMap", spec, directory))
    namespace = kustomization.get("namespace")
    for obj in objects:
        metadata = obj.setdefault("metadata", {})
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = namespace
        for entry in kustomization.get("labels", []):
            assert not entry.get("includeSelectors"), "selectors would change under a label"
            metadata.setdefault("labels", {}).update(entry["pairs"])
    return objects


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render()


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            specs.append(
                (f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"])
            )
        elif obj["kind"] == "CronJob":
            job = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            specs.append((f"CronJob/{obj['metadata']['name']}", job))
        elif obj["kind"] == "Pod":
            specs.append((f"Pod/{obj['metadata']['name']}", obj["spec"]))
    return specs


def s3_contract() -> dict[str, Any]:
    try:
        from pipelines import lora_training
    except Exception:  # not importable (yet, or mid-edit): the names as designed
        return EXPECTED_S3
    return {name: getattr(lora_training, name) for name in EXPECTED_S3}


def validate(obj: dict[str, Any]) -> None:
    name = f"{obj['kind']}/{obj['metadata'].get('name')}"
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        pytest.fail(f"{name}: {path}: {error.message} (Kubernetes {KUBERNETES_VERSION})")


# --------------------------------------------------------------------------- the base


def test_every_object_validates_strictly(objects: list[dict[str, Any]]) -> None:
    assert objects
    for obj in objects:
        validate(obj)


def test_validation_catches_mistakes() -> None:
    """The validator is strict: an unknown field or a wrong type fails."""
    pvc = yaml.safe_load((K8S / "model-cache-pvc.yaml").read_text())
    broken = copy.deepcopy(pvc)
    broken["spec"]["accesMode"] = ["ReadWriteOnce"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(pvc)
    broken["spec"]["resources"]["requests"] = "100Gi"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_expected_objects_are_there(
    objects: list[dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    namespace = kustomization["namespace"]
    assert find(objects, "Namespace", namespace)
    assert all(
        o["metadata"].get("namespace") == namespace
        for o in objects
        if o["kind"] not in CLUSTER_SCOPED
    )
    find(objects, "Deployment", "minio")
    find(objects, "PersistentVolumeClaim", "minio-data")
    find(objects, "PersistentVolumeClaim", "lorapipe-model-cache")
    find(objects, "Secret", "minio-credentials")
    job = find(objects, "Job", "minio-buckets")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"].split("/")[-1].startswith("mc:")
    env = {e["name"]: e for e in container["env"]}
    assert env["BUCKETS"]["value"].split() == ["lorapipe-data", "lorapipe-artifacts"]
    service = find(objects, "Service", "minio")
    assert sorted(p["port"] for p in service["spec"]["ports"]) == [9000, 9001]
    # the examples are not applied with the base
    assert not any(str(r).startswith("examples") for r in kustomization["resources"])


def test_the_s3_secret_and_configmap_match_the_pipeline(
    objects: list[dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    contract = s3_contract()
    secret = find(objects, "Secret", contract["S3_SECRET"])
    assert set(secret["data"]) == set(contract["S3_SECRET_KEYS"])
    assert all(base64.b64decode(v) for v in secret["data"].values()), "an empty credential"
    config = find(objects, "ConfigMap", contract["S3_CONFIG_MAP"])
    assert set(config["data"]) == set(contract["S3_CONFIG_KEYS"])
    # the endpoint is the MinIO Service of the namespace these land in
    namespace = kustomization["namespace"]
    assert config["data"]["LORAPIPE_S3_ENDPOINT"] == f"http://minio.{namespace}.svc:9000"
    assert config["data"]["AWS_DEFAULT_REGION"]
    minio = find(objects, "Secret", "minio-credentials")
    assert set(minio["data"]) == {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    assert minio["data"]["MINIO_ROOT_USER"] != secret["data"]["AWS_ACCESS_KEY_ID"], (
        "the components' MinIO user must differ from the root user"
    )
    password = base64.b64decode(minio["data"]["MINIO_ROOT_PASSWORD"]).decode()
    assert len(password) >= 8, "MinIO refuses a root password under 8 characters"
    # the example values say loudly that they are examples
    for env_file in ("minio.env", "s3.env"):
        assert "CHANGE" in (K8S / env_file).read_text()


def test_containers_are_locked_down(objects: list[dict[str, Any]]) -> None:
    specs = pod_specs(objects)
    assert specs
    for owner, spec in specs:
        pod_context = spec.get("securityContext", {})
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", owner
        assert spec.get("automountServiceAccountToken") is False, owner
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{owner} container {container['name']}"
            context = {**pod_context, **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert context.get("runAsUser", 1) != 0, f"{where}: runs as root"
            assert context.get("allowPrivilegeEscalation") is False, f"{where}: escalation"
            assert context.get("readOnlyRootFilesystem") is True, f"{where}: writable root"
            assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: caps"
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("limits", {})), f"{where}: limits"
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
            image = container["image"]
            assert ":" in image.split("/")[-1] and not image.endswith(":latest"), image


def test_references_resolve(objects: list[dict[str, Any]]) -> None:
    """Every Secret, ConfigMap, key and claim a pod names is in the rendered set."""
    data = {
        (o["kind"], o["metadata"]["name"]): set(o.get("data", {}))
        for o in objects
        if o["kind"] in ("Secret", "ConfigMap")
    }
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for owner, spec in pod_specs(objects):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, owner
        for container in spec.get("initContainers", []) + spec["containers"]:
            for source in container.get("envFrom", []):
                for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                    if field in source:
                        assert (kind, source[field]["name"]) in data, f"{owner}: {source}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if field in ref:
                        keys = data.get((kind, ref[field]["name"]))
                        assert keys is not None and ref[field]["key"] in keys, f"{owner}: {env}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{owner}: {mount}"
            ports = {p.get("name") for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or isinstance(port, int) or port in ports, f"{owner}: {port}"


def test_the_minio_service_reaches_the_deployment(objects: list[dict[str, Any]]) -> None:
    deployment = find(objects, "Deployment", "minio")
    service = find(objects, "Service", "minio")
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    for port in service["spec"]["ports"]:
        assert ports[port["targetPort"]] == port["port"]
    # one writer on a ReadWriteOnce volume
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["spec"]["replicas"] == 1


def test_the_pipeline_runner_may_manage_trainjobs(objects: list[dict[str, Any]]) -> None:
    roles = [o for o in objects if o["kind"] == "Role"]
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert roles and bindings

    def allowed(role: dict[str, Any], group: str, resource: str) -> set[str]:
        verbs: set[str] = set()
        for rule in role["rules"]:
            if group in rule["apiGroups"] and resource in rule["resources"]:
                verbs |= set(rule["verbs"])
        return verbs

    for binding in bindings:
        role = find(objects, "Role", binding["roleRef"]["name"])
        assert binding["roleRef"]["kind"] == "Role"
        assert any(
            s["kind"] == "ServiceAccount" and s["name"] == "pipeline-runner"
            for s in binding["subjects"]
        )
        trainjobs = allowed(role, "trainer.kubeflow.org", "trainjobs")
        assert {"create", "get", "list", "watch", "delete"} <= trainjobs
        assert {"get", "list"} <= allowed(role, "", "pods/log")
        assert {"get", "list"} <= allowed(role, "", "pods")
        assert "*" not in trainjobs


# --------------------------------------------------------------------------- the TrainJob


@pytest.fixture(scope="module")
def example() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / "examples" / "trainjob.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_trainjob_required_fields(example: dict[str, dict[str, Any]]) -> None:
    job = example["TrainJob"]
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["metadata"]["name"]
    assert set(job["spec"]) <= {
        "runtimeRef", "initializer", "trainer", "runtimePatches", "suspend",
        "activeDeadlineSeconds", "managedBy",
    }  # fmt: skip
    ref = job["spec"]["runtimeRef"]
    assert ref["name"] == "torch-distributed"
    assert ref.get("kind", "ClusterTrainingRuntime") == "ClusterTrainingRuntime"
    assert ref.get("apiGroup", "trainer.kubeflow.org") == "trainer.kubeflow.org"
    trainer = job["spec"]["trainer"]
    assert set(trainer) <= {
        "image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode",
    }  # fmt: skip
    assert trainer["image"].rpartition(":")[0] == "ghcr.io/lorapipe/lorapipe-torch"
    assert isinstance(trainer["numNodes"], int) and trainer["numNodes"] >= 1
    assert trainer["numNodes"] == 2
    gpus = trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    assert gpus == 4 and trainer["numProcPerNode"] == gpus
    command = trainer["command"]
    start = command.index("lorapipe")
    assert command[start:] == ["lorapipe", "train", "--config", "/config/train.yaml"]
    # torchrun turns the runtime's PET_* variables into RANK/WORLD_SIZE/MASTER_ADDR
    assert command[:start] in ([], ["torchrun", "--no-python"])
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR"}
    assert not reserved & {e["name"] for e in trainer["env"]}


def trainer_pod(job: dict[str, Any]) -> dict[str, Any]:
    """The trainer node's pod as the runtime will run it, to validate with the core schemas."""
    trainer = job["spec"]["trainer"]
    container: dict[str, Any] = {
        "name": "node",
        "image": trainer["image"],
        "command": trainer["command"],
        "env": trainer["env"],
        "resources": trainer["resourcesPerNode"],
    }
    spec: dict[str, Any] = {"containers": [container]}
    for patch in job["spec"].get("runtimePatches", []):
        assert patch["manager"]
        for replicated in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            assert replicated["name"] == "node"
            pod_patch = replicated["template"]["spec"]["template"]["spec"]
            for key, value in pod_patch.items():
                if key != "containers":
                    spec[key] = value
            for patched in pod_patch.get("containers", []):
                assert patched["name"] == "node"
                container.update({k: v for k, v in patched.items() if k != "name"})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node"}, "spec": spec}


def test_trainjob_pod_validates_and_reads_the_s3_settings(
    example: dict[str, dict[str, Any]], objects: list[dict[str, Any]]
) -> None:
    validate(example["ConfigMap"])
    pod = trainer_pod(example["TrainJob"])
    validate(pod)
    spec = pod["spec"]
    (container,) = spec["containers"]
    context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    assert context["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    contract = s3_contract()
    wanted = {
        (contract["S3_SECRET"], key, "secretKeyRef") for key in contract["S3_SECRET_KEYS"]
    } | {(contract["S3_CONFIG_MAP"], key, "configMapKeyRef") for key in contract["S3_CONFIG_KEYS"]}
    got = set()
    for env in container["env"]:
        for field, ref in env.get("valueFrom", {}).items():
            got.add((ref["name"], ref["key"], field))
            kind = "Secret" if field == "secretKeyRef" else "ConfigMap"
            assert ref["key"] in find(objects, kind, ref["name"])["data"]
    assert wanted <= got
    # /config/train.yaml comes from the example's ConfigMap
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_volume = volumes[mounts["/config"]]
    assert config_volume["configMap"]["name"] == example["ConfigMap"]["metadata"]["name"]
    assert "train.yaml" in example["ConfigMap"]["data"]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_trainjob_training_config_is_accepted(
    example: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    from lorapipe.train_config import load_config

    path = tmp_path / "train.yaml"
    path.write_text(example["ConfigMap"]["data"]["train.yaml"])
    config = load_config(str(path))
    for uri in (config.train_data_dir, config.base_model, config.output_dir):
        assert uri.startswith(("s3://lorapipe-data/", "s3://lorapipe-artifacts/")), uri
