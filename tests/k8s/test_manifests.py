"""The KubeRay manifests in k8s/: each ray.io/v1 resource validates against its CRD's OpenAPI v3 schema
as strictly as the API server would (unknown fields are errors), and the manifests agree with each other
and with the project: one shared PVC mounted at one path everywhere, GPU groups that ask for GPUs, a
job spec that clusterft's own loader accepts, a RayService that serves deployments/serve_config.yaml,
and API keys that come from a Secret (never written in a manifest).

The CRDs come from ../shared/kuberay-crds/ (beside the repository), as published by KubeRay.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from clusterft.config import parse_job_dict

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
SERVE_CONFIG = REPO / "deployments" / "serve_config.yaml"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
CORE_KINDS = {"PersistentVolumeClaim", "ConfigMap", "Pod", "Secret", "Service"}
APPS_KINDS = {"StatefulSet"}
SHARED_CLAIM = "clusterft-shared"
SHARED_PATH = "/shared"
RAY_VERSION = "2.60.0"
GPU = "nvidia.com/gpu"
# The CRDs are ~1 MB each; the C loader reads all three in about a second.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# ---------------------------------------------------------------- OpenAPI v3 → JSON Schema

# Keywords whose value is one schema, a list of schemas, or a map of names to schemas.
_SUBSCHEMA = ("items", "not")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


def openapi_to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes structural schema as a JSON Schema that rejects what the API server rejects.

    - `x-kubernetes-int-or-string: true` admits an integer or a string (`cpu: 4` and `cpu: 500m`);
      a `pattern` beside it (quantities) then applies to the string form only, as in Kubernetes.
    - `nullable: true` also admits null.
    - An object with `properties` and no `x-kubernetes-preserve-unknown-fields` admits no other
      field: the API server prunes unknown fields (or rejects them under strict field validation),
      so a misspelt field would silently do nothing; here it is an error.
    - Other `x-kubernetes-*` keys (list types, map types, CEL `x-kubernetes-validations`),
      `description` and `default` carry no constraint that jsonschema can check, and are dropped.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "default", "nullable"):
            continue
        if key == "properties":
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = openapi_to_jsonschema(value)
        elif key in _SUBSCHEMA_LISTS:
            out[key] = [openapi_to_jsonschema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


# The CRD's schema leaves the top-level `metadata` open (the API server checks ObjectMeta itself);
# this is the part of ObjectMeta a manifest may set.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_1123.pattern},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    """The validator of `kind`'s ray.io/v1 schema (read and converted once per session)."""
    path = CRD_DIR / CRD_FILES[kind]
    assert path.is_file(), (
        f"{path} is missing: the KubeRay CRDs live in ../shared/kuberay-crds/ beside the repository"
    )
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind, f"{path} defines {crd['spec']['names']['kind']}, not {kind}"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft4Validator(schema, format_checker=FORMATS)


def schema_errors(resource: dict[str, Any]) -> list[str]:
    """Every schema violation of a ray.io/v1 resource as `path: message`, e.g.
    `spec.workerGroupSpecs[1].template.spec.containers[0]: Additional properties ... ('resource' ...)`."""
    validator = crd_validator(resource["kind"])
    return sorted(
        f"{_dotted(error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(resource)
    )


def _dotted(path: Any) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


# ---------------------------------------------------------------- the manifests


@cache
def _documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) for every non-empty YAML document under k8s/."""
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=Loader):
            if doc is not None:
                docs.append((path.name, doc))
    return tuple(docs)


def documents() -> list[tuple[str, dict[str, Any]]]:
    """A deep copy, so that a test that mutates a manifest cannot affect another."""
    return copy.deepcopy(list(_documents()))


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [
        doc
        for _, doc in documents()
        if doc.get("kind") == kind and name in (None, doc.get("metadata", {}).get("name"))
    ]
    return doc


def ray_cluster_specs() -> dict[str, dict[str, Any]]:
    """The RayCluster spec inside each ray.io resource (a RayJob's and a RayService's own cluster)."""
    field = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    specs = {}
    for kind, name in field.items():
        spec = the(kind)["spec"]
        specs[kind] = spec if name is None else spec[name]
    return specs


def groups(cluster_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Head and worker groups by name ('head', then each groupName)."""
    return {"head": cluster_spec["headGroupSpec"]} | {
        group["groupName"]: group for group in cluster_spec["workerGroupSpecs"]
    }


def pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod spec the manifests make, named `Kind/group`."""
    specs = {
        f"{kind}/{name}": group["template"]["spec"]
        for kind, cluster in ray_cluster_specs().items()
        for name, group in groups(cluster).items()
    }
    for _, doc in documents():
        if doc.get("kind") == "Pod":
            specs[f"Pod/{doc['metadata']['name']}"] = doc["spec"]
    return specs


def ray_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return pod_spec["containers"][0]  # KubeRay's convention: the first container runs Ray


def ray_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in documents() if str(d.get("apiVersion", "")).startswith("ray.io/")]


# ---------------------------------------------------------------- the converter itself


def test_converter_mimics_the_api_server() -> None:
    schema = openapi_to_jsonschema(
        {
            "type": "object",
            "properties": {
                "cpu": {
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "pattern": r"^[0-9]+m?$",
                    "x-kubernetes-int-or-string": True,
                },
                "port": {"x-kubernetes-int-or-string": True},
                "when": {"type": "string", "nullable": True},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "replicas": {"type": "integer", "format": "int32"},
            },
        }
    )
    validator = jsonschema.Draft4Validator(schema, format_checker=FORMATS)
    valid = {"cpu": 4, "port": "http", "when": None, "free": {"any": {"thing": 1}}, "labels": {"a": "b"}}
    assert list(validator.iter_errors(valid)) == []
    assert list(validator.iter_errors({"cpu": "500m", "port": 8080})) == []
    for bad in (
        {"cpu": "4 cores"},
        {"cpu": 1.5},
        {"port": [1]},
        {"labels": {"a": 1}},
        {"typo": 1},
        {"replicas": 2**31},
    ):
        assert list(validator.iter_errors(bad)), f"{bad} should be rejected"


# ---------------------------------------------------------------- shape and schema


def test_k8s_holds_the_cluster_the_job_the_service_and_their_storage() -> None:
    kinds = sorted(doc.get("kind", "?") for _, doc in documents())
    store = ["Secret", "Service", "StatefulSet"]  # the job store (postgres.yaml)
    assert kinds == sorted(
        ["PersistentVolumeClaim", "Pod", "RayCluster", "ConfigMap", "RayJob", "RayService", "Secret", *store]
    ), kinds


@pytest.mark.parametrize("index", range(len(_documents())))
def test_every_document_is_a_named_kubernetes_object(index: int) -> None:
    file, doc = documents()[index]
    where = f"{file}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    assert isinstance(doc, dict), f"{file}: a document must be a mapping"
    kind = doc.get("kind")
    if kind in CORE_KINDS:
        assert doc.get("apiVersion") == "v1", where
    elif kind in APPS_KINDS:
        assert doc.get("apiVersion") == "apps/v1", where
    else:
        assert kind in CRD_FILES and doc.get("apiVersion") == "ray.io/v1", f"{where}: unexpected kind"
    name = doc.get("metadata", {}).get("name", "")
    assert DNS_1123.match(name) and len(name) <= 63, f"{where}: metadata.name must be a DNS-1123 label"
    for key in ("labels", "annotations"):
        assert all(isinstance(v, str) for v in doc["metadata"].get(key, {}).values()), where
    body = {"ConfigMap": "data", "Secret": "stringData"}.get(kind, "spec")
    assert isinstance(doc.get(body), dict), f"{where}: no body"


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_ray_resources_validate_against_their_crd(kind: str) -> None:
    assert schema_errors(the(kind)) == []


def _set(resource: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set `a.b[0].c` in resource (creating nothing but the last key); returns resource."""
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node = resource
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return resource


HEAD_CONTAINER = "headGroupSpec.template.spec.containers[0]"


@pytest.mark.parametrize(
    ("kind", "path", "value", "expected"),
    [
        # a misspelt field (minReplica) would be pruned by the API server and do nothing
        ("RayCluster", "spec.workerGroupSpecs[1].minReplica", 0, "'minReplica' was unexpected"),
        ("RayCluster", "spec.workerGroupSpecs[1].maxReplicas", "4", "'4' is not of type 'integer'"),
        ("RayCluster", f"spec.{HEAD_CONTAINER}.resources.limits.memory", "16 GB", "does not match"),
        ("RayJob", "spec.shutdownAfterJobFinishes", "yes", "'yes' is not of type 'boolean'"),
        ("RayJob", "spec.rayClusterSpec.headGroupSpec.rayStartParam", {}, "'rayStartParam' was unexpected"),
        ("RayService", "spec.serveConfigV2", {"applications": []}, "is not of type 'string'"),
        ("RayService", f"spec.rayClusterConfig.{HEAD_CONTAINER}.imagePulPolicy", "Always", "unexpected"),
        ("RayService", "metadata.name", "Clusterft_Serve", "does not match"),
    ],
)
def test_the_validator_rejects_unknown_fields_and_wrong_types(
    kind: str, path: str, value: Any, expected: str
) -> None:
    errors = schema_errors(_set(the(kind), path, value))
    # An unknown field is reported at the object holding it; a bad value at the field itself.
    where = path.rsplit(".", 1)[0] if "unexpected" in expected else path
    assert any(e.startswith(f"{where}: ") and expected in e for e in errors), errors


# ---------------------------------------------------------------- storage, GPUs, scaling


def test_the_shared_volume_is_read_write_many() -> None:
    pvc = the("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == SHARED_CLAIM
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every Ray pod mounts it at once"
    assert pvc["spec"]["resources"]["requests"]["storage"]


@pytest.mark.parametrize("pod", sorted(pod_specs()))
def test_every_pod_mounts_the_shared_volume_at_the_same_path(pod: str) -> None:
    spec = pod_specs()[pod]
    volumes = [v["name"] for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")]
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
    }
    assert claims == {SHARED_CLAIM}, f"{pod}: claims {claims}"
    mounts = {m["name"]: m["mountPath"] for m in ray_container(spec).get("volumeMounts", [])}
    assert [mounts.get(name) for name in volumes] == [SHARED_PATH], f"{pod}: mounts {mounts}"


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_gpu_groups_request_gpus_and_others_do_not(kind: str) -> None:
    by_name = groups(ray_cluster_specs()[kind])
    assert "gpu" in by_name, f"{kind}: no GPU worker group"
    for name, group in by_name.items():
        pod = group["template"]["spec"]
        container = ray_container(pod)
        limits = container["resources"]["limits"]
        if name == "gpu":
            assert int(limits.get(GPU, 0)) >= 1, f"{kind}/{name}: no {GPU} limit"
            assert container["resources"]["requests"].get(GPU) == limits[GPU], "extended resources: equal"
            assert container["image"].endswith("-gpu"), f"{kind}/{name}: a CUDA image runs GPU pods"
            assert any(t["key"] == GPU for t in pod.get("tolerations", [])), f"{kind}/{name}: toleration"
        else:
            assert GPU not in limits, f"{kind}/{name} asks for GPUs"


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_ray_pods_have_resources_images_auth_and_one_ray_version(kind: str) -> None:
    cluster = ray_cluster_specs()[kind]
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["authOptions"] == {"mode": "token"}, "KubeRay sets RAY_AUTH_MODE and the token"
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"ray[serve,train]>={RAY_VERSION}"' in pyproject, "the image's Ray is the one we test with"
    for name, group in groups(cluster).items():
        container = ray_container(group["template"]["spec"])
        assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py311(-gpu)?", container["image"])
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], f"{kind}/{name}: Ray sizes itself on limits"
        assert {"cpu", "memory"} <= set(resources["limits"]), f"{kind}/{name}"
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert "RAY_AUTH_MODE" not in env, f"{kind}/{name}: authOptions owns RAY_AUTH_MODE"
        for var in ("CLUSTERFT_REGISTRY", "CLUSTERFT_HOME"):  # registry; job store and run logs
            assert env.get(var, "").startswith(SHARED_PATH + "/"), f"{kind}/{name}: {var}"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_training_workers_scale_from_zero(kind: str) -> None:
    cluster = ray_cluster_specs()[kind]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "work goes to workers"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["replicas"] == 0, group["groupName"]
        assert group["maxReplicas"] >= 1, group["groupName"]


# ---------------------------------------------------------------- the fine-tuning job


def _configmap_volume(pod_spec: dict[str, Any], configmap: str) -> str:
    """Where the ray container mounts `configmap`."""
    (volume,) = [v["name"] for v in pod_spec["volumes"] if v.get("configMap", {}).get("name") == configmap]
    (path,) = [m["mountPath"] for m in ray_container(pod_spec)["volumeMounts"] if m["name"] == volume]
    return path


def test_the_rayjob_runs_the_configmaps_spec_through_the_controller() -> None:
    job, configmap = the("RayJob")["spec"], the("ConfigMap")
    mount = _configmap_volume(
        job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"], "clusterft-finetune-job"
    )
    words = shlex.split(job["entrypoint"])
    command = words[words.index("clusterft") :]
    assert command[:3] == ["clusterft", "jobs", "submit"] and "--wait" in command, job["entrypoint"]
    spec_path = Path(command[3])
    assert spec_path.parent == Path(mount) and spec_path.name in configmap["data"], (
        f"the entrypoint reads {spec_path}; the ConfigMap is at {mount} with {list(configmap['data'])}"
    )
    assert job["submissionMode"] == "K8sJobMode"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert "clusterSelector" not in job, "the job's own cluster mounts the ConfigMap on its head"


def test_the_rayjobs_runtime_env_installs_clusterft_from_the_shared_volume() -> None:
    runtime_env = yaml.safe_load(the("RayJob")["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) == {"pip", "env_vars"}
    assert [p.split("==")[0] for p in runtime_env["pip"]["packages"]] == ["clusterft"]
    assert f"--find-links={SHARED_PATH}/wheels" in runtime_env["pip"]["pip_install_options"]
    env = runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in env.values()), "runtime_env env_vars are strings"
    assert env["CLUSTERFT_REGISTRY"] == f"{SHARED_PATH}/registry"
    assert env["CLUSTERFT_HOME"] == f"{SHARED_PATH}/controller"
    assert "RAY_AUTH_MODE" not in env


def test_the_configmaps_job_spec_is_valid_and_lives_on_the_shared_volume() -> None:
    text = the("ConfigMap")["data"]["job.yaml"]
    spec = parse_job_dict(yaml.safe_load(text), "k8s/rayjob-finetune.yaml#ConfigMap/job.yaml")
    for field, path in {
        "model_name_or_path": spec.model.model_name_or_path,
        "dataset_dir": spec.data.dataset_dir,
        "output_dir": spec.train.output_dir,
        "checkpoint.storage_path": spec.checkpoint.storage_path,
    }.items():
        assert str(path).startswith(SHARED_PATH + "/"), f"{field}: {path} is not on the shared volume"
    gpu = groups(ray_cluster_specs()["RayJob"])["gpu"]
    gpu_limits = ray_container(gpu["template"]["spec"])["resources"]["limits"]
    assert spec.cluster.use_gpu and spec.cluster.gpus_per_worker <= int(gpu_limits[GPU])
    assert spec.cluster.num_workers <= gpu["maxReplicas"], "the GPU group can grow to the job's size"
    assert spec.cluster.cpus_per_worker <= int(gpu_limits["cpu"])
    assert spec.promote.alias == "production", "the RayService follows production"


# ---------------------------------------------------------------- serving


def serve_config() -> dict[str, Any]:
    config = yaml.safe_load(the("RayService")["spec"]["serveConfigV2"])
    assert isinstance(config, dict), "serveConfigV2 must be a YAML mapping in a string"
    return config


def test_the_rayservice_serves_deployments_serve_config() -> None:
    expected = yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))
    assert serve_config() == expected, (
        f"k8s/rayservice.yaml spec.serveConfigV2 differs from {SERVE_CONFIG}: "
        "paste deployments/serve_config.yaml into serveConfigV2 (a YAML block string)"
    )
    # Inside Kubernetes the proxies must listen on every interface (Serve's default for config files).
    assert "host" not in expected.get("http_options", {})


def test_the_serve_config_listens_where_the_serve_service_looks() -> None:
    config = serve_config()
    names = [app["name"] for app in config["applications"]]
    assert names and len(set(names)) == len(names), names
    assert all(app.get("import_path") for app in config["applications"])
    port = config.get("http_options", {}).get("port", 8000)
    for name, group in groups(ray_cluster_specs()["RayService"]).items():
        ports = {p["name"]: p["containerPort"] for p in ray_container(group["template"]["spec"])["ports"]}
        assert ports.get("serve") == port, f"RayService/{name}: Serve listens on {port}"


# ---------------------------------------------------------------- API keys

KEY_VARS = {"CLUSTERFT_API_KEY": "api-key", "CLUSTERFT_ADMIN_API_KEY": "admin-api-key"}


def test_the_api_key_secret_ships_empty() -> None:
    """Applied unchanged it exposes nothing: the app refuses to start without a key."""
    secret = the("Secret", "clusterft-api-keys")
    assert secret["type"] == "Opaque" and "data" not in secret
    assert secret["stringData"] == {key: "" for key in KEY_VARS.values()}


@pytest.mark.parametrize("kind", ["RayCluster", "RayService"])
def test_http_serving_pods_read_the_api_keys_from_the_secret(kind: str) -> None:
    secret = the("Secret", "clusterft-api-keys")
    for name, group in groups(ray_cluster_specs()[kind]).items():
        env = {e["name"]: e for e in ray_container(group["template"]["spec"]).get("env", [])}
        for var, key in KEY_VARS.items():
            assert var in env, f"{kind}/{name}: no {var}"
            assert "value" not in env[var], f"{kind}/{name}: {var} is written in the manifest"
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], key), f"{kind}/{name}: {var}"
            assert key in secret["stringData"]


def test_no_manifest_writes_a_key() -> None:
    for file, doc in documents():
        text = yaml.safe_dump(doc)
        assert "api_key:" not in text and "admin_api_key:" not in text, f"{file}: a key in the manifest"
    args = serve_config()["applications"][0]["args"]
    assert not {"api_key", "admin_api_key", "insecure"} & set(args), "keys come from the environment"


# ---------------------------------------------------------------- the job store


STORE_SECRET = "clusterft-store"


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def from_secret(entry: dict[str, Any] | None) -> tuple[str, str] | None:
    ref = (entry or {}).get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_every_controller_pod_reaches_the_shared_job_store_through_the_secret(kind: str) -> None:
    """Every pod that may run a controller or a driver (any of them: the actor and the Ray jobs go
    where Ray puts them) has the store's URL and password from the Secret, never written inline."""
    for name, group in groups(ray_cluster_specs()[kind]).items():
        env = env_of(ray_container(group["template"]["spec"]))
        where = f"{kind}/{name}"
        assert from_secret(env.get("CLUSTERFT_STORE_URL")) == (STORE_SECRET, "url"), where
        assert from_secret(env.get("PGPASSWORD")) == (STORE_SECRET, "password"), where
    runtime_env = yaml.safe_load(the("RayJob")["spec"]["runtimeEnvYAML"]) if kind == "RayJob" else {}
    assert "CLUSTERFT_STORE_URL" not in runtime_env.get("env_vars", {}), "the job server shows runtime envs"


def test_the_store_secret_names_the_statefulsets_server_without_a_password() -> None:
    from urllib.parse import urlsplit

    secret, service, server = the("Secret", STORE_SECRET), the("Service"), the("StatefulSet")
    url = urlsplit(secret["stringData"]["url"])
    assert url.scheme == "postgresql" and url.password is None, "the password travels in PGPASSWORD"
    assert secret["stringData"]["password"] == "", "shipped empty: the server refuses to start so"
    [port] = service["spec"]["ports"]
    assert (url.hostname, url.port) == (service["metadata"]["name"], port["port"])
    assert server["spec"]["serviceName"] == service["metadata"]["name"]
    pod = server["spec"]["template"]
    assert (
        service["spec"]["selector"] == server["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    )
    [container] = pod["spec"]["containers"]
    assert port["targetPort"] in [p["name"] for p in container["ports"]]
    env = env_of(container)
    assert (url.username, url.path.lstrip("/")) == (
        env["POSTGRES_USER"]["value"],
        env["POSTGRES_DB"]["value"],
    )
    assert from_secret(env["POSTGRES_PASSWORD"]) == (STORE_SECRET, "password")
    [claim] = server["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert [m["name"] for m in container["volumeMounts"]] == [claim["metadata"]["name"]]
