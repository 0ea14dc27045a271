"""cluster/: the runtime env, the AWS launcher config and the KubeRay RayJobs, checked with the
validators Ray and KubeRay themselves apply (no cluster is started)."""
from __future__ import annotations

import copy
import importlib.metadata as md
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.cluster.bare_ray import pins

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_EXTRAS = {"default", "train", "tune", "data"}
KUBERAY_MANIFESTS = ["kuberay-rayjob.yaml", "kuberay-rayjob-existing-cluster.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _pinned(packages: list[str]) -> dict[str, str]:
    """{canonical name: version} of ``name==version`` entries; fails on anything else."""
    out = {}
    for spec in packages:
        req = Requirement(spec)
        (s,) = req.specifier  # exactly one specifier
        assert s.operator == "==", f"{spec}: pin an exact version"
        out[canonicalize_name(req.name)] = s.version
    return out


def _runtime_env_pins() -> dict[str, str]:
    return _pinned(_load("runtime_env.yaml")["pip"]["packages"])


def _requires(dist: str, extras: set[str] = frozenset()) -> set[str]:
    """Names a distribution installs with the given extras (one level, markers evaluated)."""
    names = set()
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            names.add(canonicalize_name(req.name))
    return names


# --- cluster/runtime_env.yaml ---------------------------------------------------------------

def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**_load("runtime_env.yaml"))
    assert env.pip_config()["packages"], "no pip packages"
    assert "working_dir" not in env, "the working dir comes from --working-dir (the repository)"


def test_runtime_env_installs_no_local_path():
    # Ray runs pip from an empty directory of its own: "-e ." or "." cannot name the project.
    for spec in _load("runtime_env.yaml")["pip"]["packages"]:
        assert not spec.startswith(("-e", ".", "/")), spec


def test_runtime_env_covers_every_dependency_a_ray_torch_node_lacks():
    """Every dependency in pyproject.toml is either pinned in the runtime env or installed on a
    node by ray[default,train,tune,data], torch or torchvision."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    node = ({"ray", "torch", "torchvision"} | _requires("ray", RAY_EXTRAS) | _requires("torch")
            | _requires("torchvision"))
    pinned = _runtime_env_pins()
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in node or name in pinned, f"{name} is neither on a ray+torch node nor in runtime_env.yaml's pip"
        if name in pinned:
            assert req.specifier.contains(pinned[name]), f"{name}=={pinned[name]} breaks pyproject's {req.specifier}"
    # Nothing that the node already has: pinning those would replace the node's build.
    assert not set(pinned) & {"ray", "torch", "torchvision"}


def test_runtime_env_pins_agree_with_constraints():
    constraints = {canonicalize_name(k): v for k, v in pins().items()}
    for name, version in _runtime_env_pins().items():
        if name in constraints:
            assert version == constraints[name], f"{name}: runtime_env {version} vs constraints.txt {constraints[name]}"
    assert _runtime_env_pins()["facenet-pytorch"] == constraints["facenet-pytorch"]


# --- cluster/aws-gpu.yaml ---------------------------------------------------------------------

def _ray_up_validate(config: dict) -> dict:
    """What `ray up` does to a config before launching anything: fill Ray's provider defaults,
    then validate against ray-schema.json and the node-type rules (autoscaler/_private/commands.py
    _bootstrap_config; the AWS resource autodetection between the two needs AWS and is skipped,
    which is why the file gives `resources` itself)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_config_passes_ray_launcher_validation():
    prepared = _ray_up_validate(_load("aws-gpu.yaml"))
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert gpu["max_workers"] > gpu["min_workers"], "the GPU group must be able to scale"
    assert prepared["available_node_types"][prepared["head_node_type"]]["resources"] == {"CPU": 0}


def test_aws_validation_is_not_vacuous():
    """The same validation rejects the GPU node type without `resources` (the old file's error)."""
    import jsonschema as js

    config = _load("aws-gpu.yaml")
    del config["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(js.ValidationError, match="'resources' is a required property"):
        _ray_up_validate(config)


def test_aws_setup_installs_the_pinned_stack():
    config = _load("aws-gpu.yaml")
    words = [w for cmd in config["setup_commands"] for w in shlex.split(cmd)]
    reqs = {canonicalize_name(Requirement(w).name): Requirement(w) for w in words if re.match(r"^[A-Za-z].*==", w)}
    constraints = {canonicalize_name(k): v for k, v in pins().items()}
    assert reqs["ray"].extras >= RAY_EXTRAS, "ray needs [default] for the job server"
    for name in ("ray", "torch", "torchvision", "facenet-pytorch"):
        assert str(reqs[name].specifier) == f"=={constraints[name]}", f"{name}: {reqs[name].specifier}"
    # The nodes carry the runtime env's packages at the same pins (its pip step then installs nothing).
    for name, version in _runtime_env_pins().items():
        assert str(reqs[name].specifier) == f"=={version}", name
    assert not any(w in (".", "-e") or w.startswith("raydefense") for w in words), \
        "the project travels with each job (working_dir), not in the node image"


# --- KubeRay RayJobs ----------------------------------------------------------------------------

def _strict(schema):
    """Unknown fields fail, as with `kubectl apply` (strict field validation): every object schema
    that lists properties and allows nothing else gets additionalProperties: false."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayjob_schema():
    """KubeRay v1.7.0's RayJob v1 openAPIV3Schema (fixtures/, see make_rayjob_schema.py)."""
    schema = json.loads((Path(__file__).parent / "fixtures" / "rayjob_v1_schema.json").read_text())
    return _strict(schema)


def _kuberay_rules(job: dict) -> list[str]:
    """The RayJob checks of KubeRay's controller (ray-operator/controllers/ray/utils/validation.go,
    v1.7.0: ValidateRayJobMetadata, ValidateRayJobSpec, ValidateRayClusterSpec) that apply to these
    manifests; returns the violated ones."""
    errors = []
    name = job["metadata"]["name"]
    if len(name) > 47 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append("name: at most 47 characters, DNS-1035 label")
    spec = job["spec"]
    selector = spec.get("clusterSelector") or {}
    if ("rayClusterSpec" in spec) == bool(selector):
        errors.append("exactly one of rayClusterSpec and clusterSelector")
    if selector and not selector.get("ray.io/cluster"):
        errors.append("clusterSelector needs ray.io/cluster")
    if selector and spec.get("backoffLimit", 0) > 0:
        errors.append("backoffLimit is incompatible with clusterSelector")
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("backoffLimit", 0) < 0 or spec.get("activeDeadlineSeconds", 1) <= 0:
        errors.append("backoffLimit >= 0, activeDeadlineSeconds > 0")
    cluster = spec.get("rayClusterSpec")
    if cluster:
        if (cluster.get("authOptions") or {}).get("mode") == "token" and \
                Version(cluster.get("rayVersion", "0")) < Version("2.52.0"):
            errors.append("authOptions.mode token needs rayVersion >= 2.52.0")
        if not cluster["headGroupSpec"]["template"]["spec"].get("containers"):
            errors.append("head needs a container")
        for g in cluster.get("workerGroupSpecs", []):
            if not g["template"]["spec"].get("containers"):
                errors.append(f"{g['groupName']} needs a container")
            if g.get("minReplicas", 0) > g.get("maxReplicas", 2**31):
                errors.append(f"{g['groupName']}: minReplicas > maxReplicas")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML", ""))
    except yaml.YAMLError:
        errors.append("runtimeEnvYAML is not YAML")
    return errors


@pytest.mark.parametrize("manifest", KUBERAY_MANIFESTS)
def test_rayjob_valid_for_kuberay_v1(manifest, rayjob_schema):
    job = _load(manifest)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    jsonschema.validate(job, rayjob_schema)
    assert _kuberay_rules(job) == []


def test_schema_check_is_not_vacuous(rayjob_schema):
    job = _load("kuberay-rayjob.yaml")
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        jsonschema.validate(typo, rayjob_schema)
    bad_toleration = copy.deepcopy(job)
    bad_toleration["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"] = \
        {"key": "nvidia.com/gpu"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_toleration, rayjob_schema)
    bad_quantity = copy.deepcopy(job)
    bad_quantity["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="'one' does not match"):
        jsonschema.validate(bad_quantity, rayjob_schema)
    both = copy.deepcopy(job)
    both["spec"]["clusterSelector"] = {"ray.io/cluster": "raydefense"}
    assert "exactly one of rayClusterSpec and clusterSelector" in _kuberay_rules(both)


@pytest.mark.parametrize("manifest", KUBERAY_MANIFESTS)
def test_rayjob_runtime_env_installs_the_project_like_runtime_env_yaml(manifest):
    from ray.runtime_env import RuntimeEnv

    job = _load(manifest)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own parsing of the fields
    # The submitter pod has no checkout: the project must come from a remote archive.
    assert re.match(r"^(https|s3|gs)://.+\.zip$", env["working_dir"]), env["working_dir"]
    pinned = _pinned(env["pip"]["packages"])
    assert all(pinned.get(k) == v for k, v in _runtime_env_pins().items()), "pins differ from runtime_env.yaml"
    constraints = {canonicalize_name(k): v for k, v in pins().items()}
    for name in ("torch", "torchvision"):  # the stock rayproject/ray image has no torch
        assert pinned[name] == constraints[name]
    assert env["env_vars"] == _load("runtime_env.yaml")["env_vars"]
    # The entrypoint runs a script and a config of this repository.
    words = shlex.split(job["spec"]["entrypoint"])
    assert (REPO / words[1]).is_file() and (REPO / words[words.index("--config") + 1]).is_file()


def test_rayjob_autoscaling_gpu_group_with_s3_service_account():
    spec = _load("kuberay-rayjob.yaml")["spec"]
    assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == pins()["ray"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["minReplicas"] < gpu["maxReplicas"]
    pod = gpu["template"]["spec"]
    assert head["serviceAccountName"] == pod["serviceAccountName"] == "raydefense-s3"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    (container,) = pod["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    for c in head["containers"] + pod["containers"]:
        assert c["image"].startswith(f"rayproject/ray:{pins()['ray']}-py3"), c["image"]
