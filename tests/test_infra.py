"""Cluster packaging: ray_cluster.yaml, infra/ (Dockerfile, KubeRay, MLflow, runtime_env) and the
real-model config, checked without a cluster, Docker, Kubernetes or network.

What is pinned down here:
- every YAML parses; Kubernetes documents carry apiVersion/kind/metadata in one namespace;
  the launcher config validates against the installed Ray's own cluster-config schema;
- Ray heads take no tasks (CPU 0 / num-cpus "0"); GPU groups ask for GPUs (nvidia.com/gpu limits),
  CPU groups don't; every Ray pod mounts the shared ReadWriteMany claim at /mnt/shared;
- token authentication on every Ray process, dashboards on 127.0.0.1 (or token-guarded where the
  KubeRay operator must reach them); MLflow on 0.0.0.0 only behind a ClusterIP Service;
- ONE image tag everywhere, whose parts match pyproject.toml's version and constraints.txt's ray
  pin, and a Dockerfile built FROM the matching rayproject/ray tag, installing with constraints;
- nothing that looks like a credential in any of these files (the scanner is tested too);
- the runtime_env upload leaves out .venv, caches, runs and MLflow stores;
- configs/clip-b32-to-l14.yaml loads and fits the cluster it is meant for.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
LAUNCHER = ROOT / "ray_cluster.yaml"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
RUNTIME_ENV = INFRA / "runtime_env.yaml"
K8S_DIRS = (INFRA / "kuberay", INFRA / "mlflow")
REAL_CONFIG = ROOT / "configs" / "clip-b32-to-l14.yaml"
DOCS = ROOT / "docs" / "cluster.md"
SHARED = "/mnt/shared"
# <registry>/<name>:<xbt-ray version>-ray<ray version>-<python>-<cuda>
IMAGE_TAG = re.compile(r"^(?P<repo>[a-z0-9][a-z0-9./_-]*/xbt-ray):(?P<version>\d+\.\d+\.\d+)"
                       r"-ray(?P<ray>\d+\.\d+\.\d+)-(?P<python>py3\d+)-(?P<cuda>cu\d+)$")
# files the docs may name before they exist (later issues)
PLANNED_FILES = {"jobs/evaluate.py", "jobs/sweep.py"}


# ----------------------------------------------------------------------------- loading helpers

def infra_yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def all_yaml_files() -> list[Path]:
    return infra_yaml_files() + [LAUNCHER]


def k8s_files() -> list[Path]:
    return [p for p in infra_yaml_files() if any(d in p.parents for d in K8S_DIRS)]


@functools.cache
def load_docs(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in k8s_files() for d in load_docs(p)]


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_docs() if d.get("kind") == kind]


def launcher() -> dict:
    (doc,) = load_docs(LAUNCHER)
    return doc


def runtime_env() -> dict:
    (doc,) = load_docs(RUNTIME_ENV)
    return doc


def pyproject_version() -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        (version,) = re.findall(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                                flags=re.M)
        return version
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayClusterSpec) of the RayCluster and of every RayJob's embedded cluster."""
    specs = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in of_kind("RayCluster")]
    specs += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"])
              for d in of_kind("RayJob")]
    return specs


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group."""
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def walk(node, path=""):
    """Yield (path, key, value) for every mapping entry of a parsed YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from walk(item, f"{path}[{i}]")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def mlflow_service_url() -> str:
    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = [s for s in of_kind("Service")
                  if s["spec"].get("selector") and s["spec"]["selector"].items() <= labels.items()]
    port = service["spec"]["ports"][0]["port"]
    return (f"http://{service['metadata']['name']}.{service['metadata']['namespace']}"
            f".svc.cluster.local:{port}")


# ----------------------------------------------------------------------------- parsing, schema

def test_yaml_inventory():
    # every YAML under infra/ is either a Kubernetes manifest (checked below) or the runtime_env
    assert set(infra_yaml_files()) == set(k8s_files()) | {RUNTIME_ENV}
    assert len(k8s_files()) >= 6 and LAUNCHER.is_file() and DOCKERFILE.is_file()


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses_into_mappings(path):
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_k8s_documents_have_required_fields(path):
    for doc in load_docs(path):
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc
        assert isinstance(doc.get("kind"), str) and doc["kind"], doc
        metadata = doc.get("metadata")
        assert isinstance(metadata, dict) and metadata.get("name"), doc
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", metadata["name"]), metadata["name"]
        if doc["kind"] != "Namespace":
            assert metadata.get("namespace") == "xbt", (path, metadata)


def test_k8s_objects_present_and_one_namespace():
    kinds = {d["kind"] for _, d in k8s_docs()}
    assert {"Namespace", "PersistentVolumeClaim", "RayCluster", "RayJob", "Deployment",
            "Service", "NetworkPolicy"} <= kinds
    (namespace,) = of_kind("Namespace")
    assert {d["metadata"].get("namespace") for _, d in k8s_docs()
            if d["kind"] != "Namespace"} == {namespace["metadata"]["name"]}
    for doc in of_kind("RayCluster") + of_kind("RayJob"):
        assert doc["apiVersion"] == "ray.io/v1"


def test_launcher_validates_against_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher(), schema)


# ----------------------------------------------------------------------------- heads, GPU groups

SPEC_IDS = lambda v: v if isinstance(v, str) else ""  # noqa: E731  (label, not the spec dict)

def test_launcher_node_types():
    cfg = launcher()
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    assert types[head]["resources"] == {"CPU": 0}, "the head must take no tasks"
    workers = {name: t for name, t in types.items() if name != head}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    cpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) == 0}
    assert gpu and cpu, "need a GPU worker type (encoders, training) and a CPU one (decoding)"
    for name, t in workers.items():
        assert t["resources"].get("CPU", 0) >= 1, name
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]


@pytest.mark.parametrize("label,spec", ray_cluster_specs(), ids=SPEC_IDS)
def test_ray_head_takes_no_tasks(label, spec):
    params = spec["headGroupSpec"]["rayStartParams"]
    assert params.get("num-cpus") == "0", f"{label}: head needs num-cpus \"0\" (a string)"
    assert spec.get("rayVersion") == constraint_pins()["ray"], label


@pytest.mark.parametrize("label,spec", ray_cluster_specs(), ids=SPEC_IDS)
def test_gpu_and_cpu_worker_groups(label, spec):
    gpu_groups, cpu_groups = [], []
    for group in spec["workerGroupSpecs"]:
        assert group.get("minReplicas", 0) <= group["maxReplicas"], group["groupName"]
        gpus = []
        for c in group["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            requested = res.get("requests", {}).get("nvidia.com/gpu")
            limit = res.get("limits", {}).get("nvidia.com/gpu")
            # extended resources: a request without the same limit is rejected by Kubernetes
            assert requested is None or requested == limit, (label, group["groupName"])
            if limit is not None:
                gpus.append(int(limit))
        (gpu_groups if gpus and min(gpus) >= 1 else cpu_groups).append(group["groupName"])
        if "gpu" in group["groupName"]:
            assert gpus and min(gpus) >= 1, f"{label}: group {group['groupName']} has no GPU limit"
    assert gpu_groups and cpu_groups, (label, gpu_groups, cpu_groups)
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in head)


# ----------------------------------------------------------------------------- auth, dashboards

def test_launcher_token_auth_and_loopback_dashboard():
    cfg = launcher()
    options = [opt for item in cfg["docker"]["run_options"] for opt in shlex.split(item)]
    env = dict(o.split("=", 1) for o in options if "=" in o and o.isascii() and o[0].isupper())
    assert env.get("RAY_AUTH_MODE") == "token"
    assert "RAY_AUTH_TOKEN" not in env, "the token itself must never be in the config"
    # the token file comes from the operator's machine, not from this file
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "/home/ray/.ray/auth_token")
    assert token_path in cfg["file_mounts"]
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "0.0.0.0" not in head_cmds + " ".join(cfg["worker_start_ray_commands"])


def _container_has_token_env(container: dict) -> bool:
    env = env_of(container)
    token = env.get("RAY_AUTH_TOKEN", {})
    return (env.get("RAY_AUTH_MODE", {}).get("value") == "token"
            and "value" not in token
            and bool(token.get("valueFrom", {}).get("secretKeyRef", {}).get("name")))


@pytest.mark.parametrize("label,spec", ray_cluster_specs(), ids=SPEC_IDS)
def test_k8s_ray_token_auth(label, spec):
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":  # KubeRay injects the token into every Ray container
        assert auth.get("secretName"), label
        return
    for group, pod in pod_templates(spec):
        for container in pod["containers"]:
            assert _container_has_token_env(container), f"{label}/{group}/{container['name']}"
    if spec.get("enableInTreeAutoscaling"):
        assert _container_has_token_env(spec.get("autoscalerOptions", {})), f"{label}: autoscaler"


@pytest.mark.parametrize("label,spec", ray_cluster_specs(), ids=SPEC_IDS)
def test_k8s_dashboard_binding(label, spec):
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host")
    if label.startswith("RayCluster/"):
        assert host == "127.0.0.1", label
    elif host != "127.0.0.1":
        # a RayJob's operator polls the Jobs API through the head Service: allowed only with
        # token auth the operator itself knows about
        assert (spec.get("authOptions") or {}).get("mode") == "token", label


# ----------------------------------------------------------------------------- shared storage

def test_every_ray_pod_mounts_the_shared_rwx_claim():
    claims = {d["metadata"]["name"]: d for d in of_kind("PersistentVolumeClaim")}
    for label, spec in ray_cluster_specs():
        for group, pod in pod_templates(spec):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                assert SHARED in mounts, f"{label}/{group}: no {SHARED}"
                claim = volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"]
                assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], claim


def test_launcher_mounts_shared_storage():
    cfg = launcher()
    assert f"--volume {SHARED}:{SHARED}" in cfg["docker"]["run_options"]
    init = " ".join(cfg["initialization_commands"])
    assert re.search(rf"mount -t nfs4 .* {SHARED}\b", init), init


# ----------------------------------------------------------------------------- one image tag

def image_references() -> list[tuple[str, str]]:
    refs = []
    for path in all_yaml_files():
        for doc in load_docs(path):
            for where, key, value in walk(doc):
                if key in ("image", "head_image", "worker_image"):
                    refs.append((f"{path.relative_to(ROOT)}:{where}.{key}", value))
    return refs


def test_one_image_tag_matching_versions():
    refs = image_references()
    assert len(refs) >= 9, refs  # launcher; 3 RayCluster + 4 RayJob containers; MLflow
    images = {image for _, image in refs}
    assert len(images) == 1, f"more than one image tag: {sorted(images)}"
    (image,) = images
    match = IMAGE_TAG.match(image)
    assert match, f"{image} does not follow <repo>/xbt-ray:<version>-ray<ray>-<py>-<cuda>"
    assert match["version"] == pyproject_version()
    assert match["ray"] == constraint_pins()["ray"]

    froms = [args for word, args in dockerfile_instructions() if word == "FROM"]
    assert froms == [f"rayproject/ray:{match['ray']}-{match['python']}-{match['cuda']}"], froms
    labels = " ".join(args for word, args in dockerfile_instructions() if word == "LABEL")
    assert f'org.opencontainers.image.version="{pyproject_version()}"' in labels
    # the docs build and run this very tag, and no other tag of the image
    doc_tags = set(re.findall(rf"{re.escape(match['repo'])}:[\w.-]+", DOCS.read_text()))
    assert doc_tags == {image}, doc_tags
    assert f"-t {image}" in " ".join(DOCKERFILE.read_text().split())


def test_dockerfile_installs_with_constraints_as_non_root():
    steps = dockerfile_instructions()
    runs = [args for word, args in steps if word == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs, "no pip install"
    for cmd in installs:
        words = shlex.split(cmd.split("&&")[0])
        assert "-c" in words and words[words.index("-c") + 1] == "constraints.txt", cmd
    assert any("." in shlex.split(c.split("&&")[0])[2:] for c in installs), "package not installed"
    users = [args for word, args in steps if word == "USER"]
    assert users and all(u.split(":")[0] not in ("root", "0") for u in users), users
    pins = constraint_pins()
    text = DOCKERFILE.read_text()
    for pkg in ("ray", "torch", "torchvision"):  # the build-time assertions use the pins
        assert f"'{pins[pkg]}'" in text, pkg
    for word, args in steps:
        if word in ("ARG", "ENV"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split("=")[0]]:
                assert not SECRET_NAME.search(name), f"{word} {name}: build-time secret"


def test_dockerignore_lets_exactly_the_copied_sources_in():
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "the build context starts from nothing"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    sources = []
    for word, args in dockerfile_instructions():
        if word == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources += parts[:-1]
    assert sources and set(sources) <= allowed, set(sources) - allowed
    assert not any(a.startswith((".venv", ".cache", ".ray", "runs", "mlruns")) for a in allowed)


# ----------------------------------------------------------------------------- MLflow

def test_mlflow_server_behind_cluster_ip_only():
    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["command"] + container.get("args", [])
    assert args[:2] == ["mlflow", "server"]
    assert "--host=0.0.0.0" in args
    assert not any(a.startswith("--backend-store-uri") for a in args), "URI belongs in a Secret"
    (dest,) = [a.split("=", 1)[1] for a in args if a.startswith("--artifacts-destination=")]
    assert dest.startswith("s3://")
    env = env_of(container)
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"], name

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [s for s in of_kind("Service")
                if s["spec"].get("selector", {}).items() <= labels.items()]
    assert services
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "must stay in-cluster"
        targets = {p["name"] for p in container["ports"]} | \
            {p["containerPort"] for p in container["ports"]}
        assert all(p["targetPort"] in targets for p in service["spec"]["ports"])
    # nothing in infra/ publishes anything outside the cluster
    assert not of_kind("Ingress")
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in of_kind("Service"))
    # the host clients use must pass MLflow's Host-header check
    host = mlflow_service_url().removeprefix("http://")
    (allowed,) = [a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")]
    assert host in allowed.split(",")
    policies = [p for p in of_kind("NetworkPolicy")
                if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
    assert policies and all("Ingress" in p["spec"]["policyTypes"] for p in policies)


# ----------------------------------------------------------------------------- runtime_env

def _excluded(excludes: list[str], rel: str) -> bool:
    from ray._private.thirdparty.pathspec import PathSpec

    return PathSpec.from_lines("gitwildmatch", excludes).match_file(rel)


def test_runtime_env_excludes_venv_caches_runs():
    env = runtime_env()
    assert env["working_dir"] == "."
    excludes = env["excludes"]
    for rel in (".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/__init__.py",
                ".cache/xbt/embeddings/m/d/text/part-00000.parquet", ".cache/huggingface/x",
                "runs/demo/report.json", "mlruns/0/meta.yaml", "mlflow.db", "mlartifacts/1/a.txt",
                ".git/HEAD", "xbt_ray/__pycache__/config.cpython-311.pyc"):
        assert _excluded(excludes, rel), rel
    for rel in ("xbt_ray/config.py", "jobs/embed.py", "configs/clip-b32-to-l14.yaml",
                "tune/README.md", "infra/gpu_smoke.py"):
        assert not _excluded(excludes, rel), rel


def test_runtime_env_upload_is_small():
    """Walk this checkout exactly as Ray zips a working dir (excludes only, .gitignore ignored:
    the excludes must hold on their own). Ray's private packaging helpers; ray is pinned."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    sizes = []
    _dir_travel(ROOT, [_get_excludes(ROOT, runtime_env()["excludes"])],
                lambda p: sizes.append(p.stat().st_size) if p.is_file() else None,
                include_gitignore=False)
    assert sizes and sum(sizes) < 50 * 2**20, f"{sum(sizes) / 2**20:.0f} MiB would be uploaded"


def test_runtime_env_vars_and_tracking_uri():
    env_vars = runtime_env()["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), "Ray wants string env values"
    assert env_vars["RAY_TRAIN_V2_ENABLED"] == "1"
    assert env_vars["MLFLOW_TRACKING_URI"] == mlflow_service_url()
    assert env_vars["HF_HOME"].startswith(SHARED + "/")
    for job in of_kind("RayJob"):
        job_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert job_env["env_vars"] == env_vars, "RayJob and runtime_env.yaml drifted apart"
        workdir = [a for w, a in dockerfile_instructions() if w == "WORKDIR"][-1]
        assert job_env["working_dir"] == workdir


# ----------------------------------------------------------------------------- the real config

def test_real_config_loads():
    from xbt_ray.config import load_config

    config = load_config(REAL_CONFIG)
    assert (config.old.name, config.old.pretrained) == ("ViT-B-32-quickgelu", "openai")
    assert (config.new.name, config.new.pretrained) == ("ViT-L-14-quickgelu", "openai")
    assert config.trainer.use_gpu and config.trainer.precision == "bf16"
    for path in (config.output_dir, config.cache_dir, config.data.text, config.data.image_text,
                 config.data.eval):
        assert path.startswith(SHARED + "/"), path
    assert config.tracking.tracking_uri == mlflow_service_url()
    # global batches split evenly across the Train workers
    assert config.stage1.batch_size % config.trainer.num_workers == 0
    assert config.stage2.batch_size % config.trainer.num_workers == 0


def test_real_config_fits_the_clusters():
    from xbt_ray.config import load_config

    config = load_config(REAL_CONFIG)
    cfg = launcher()
    gpu_types = [t for n, t in cfg["available_node_types"].items()
                 if t["resources"].get("GPU", 0) >= 1]
    gpus = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types)
    cpus_per_gpu = min(t["resources"]["CPU"] / t["resources"]["GPU"] for t in gpu_types)
    assert config.trainer.num_workers <= gpus
    # GPU groups autoscale from zero: the encoders must ask for their GPU, not detect one
    assert config.embed.num_gpus >= 1
    assert config.embed.num_actors * config.embed.num_gpus <= gpus
    assert max(config.trainer.cpus_per_worker, config.embed.actor_num_cpus) < cpus_per_gpu
    for label, spec in ray_cluster_specs():
        (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert config.trainer.num_workers <= gpu["maxReplicas"], label
        assert config.embed.num_actors <= gpu["maxReplicas"], label


def test_real_config_models_match_their_openai_weights():
    """OpenAI weights were trained with QuickGELU: a GELU config would load them with a
    warning only, and shift every embedding."""
    open_clip = pytest.importorskip("open_clip")
    from xbt_ray.config import load_config

    config = load_config(REAL_CONFIG)
    for model in (config.old, config.new):
        tag = open_clip.get_pretrained_cfg(model.name, model.pretrained)
        assert tag, f"{model.pretrained} is not an open_clip tag of {model.name}"
        assert open_clip.get_model_config(model.name).get("quick_gelu", False) == \
            tag.get("quick_gelu", False), model.name


def test_rayjob_runs_the_real_config():
    from xbt_ray.config import load_config

    for job in of_kind("RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        words = shlex.split(spec["entrypoint"])
        assert words[:2] == ["python", "jobs/pipeline.py"] and (ROOT / words[1]).is_file()
        config_path = words[words.index("--config") + 1]
        assert "--run-name" in words
        load_config(ROOT / config_path)  # loads, validated


# ----------------------------------------------------------------------------- docs

def test_docs_reference_existing_files():
    text = DOCS.read_text()
    for needle in ("ray up ray_cluster.yaml", "kubectl apply",
                   "--runtime-env infra/runtime_env.yaml",
                   "jobs/embed.py --config configs/clip-b32-to-l14.yaml"):
        assert needle in text, needle
    named = set(re.findall(r"\b((?:infra|configs|jobs|tune|docs|xbt_ray)/[\w./-]*\w)", text))
    missing = {p for p in named if not (ROOT / p).exists()} - PLANNED_FILES
    assert not missing, missing
    assert not re.search(r"\{\{\s*\w+\s*\}\}", text), "a {{placeholder}} is left"
    # section 6's table is the estimate script's output, between its markers
    from benchmarks.cluster_estimate import BEGIN, END

    table = text[text.index(BEGIN):text.index(END)]
    assert "GPU-hours" in table and "**total, without the sweep**" in table
    assert "XBT / backfill" in table and "1,000,000,000" in table


# ----------------------------------------------------------------------------- secrets

SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key|access[_-]?key(?:[_-]?id)?"
                         r"|private[_-]?key|credentials?)$")
PLACEHOLDER = re.compile(r"^(\$\{[^}]*\}|\$\([^)]*\)|\$[A-Za-z_]\w*|<[^>]*>|\{\{[^}]*\}\}"
                         r"|\.\.\.|\*+|x+|(?i:true|false|null|~)|)$")
# high-confidence patterns, searched everywhere (comments and prose too)
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Slack token": re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),
}


def is_reference(value: str) -> bool:
    """A placeholder, a variable / command substitution, or a path to a file holding the secret."""
    return bool(PLACEHOLDER.match(value)) or value.startswith(("$", "<", "{{", "/", "~/", "./"))


URI_CREDENTIALS = re.compile(r"\b[a-z][a-z0-9+.\-]*://[^\s:/@'\"]+:(?P<pw>[^\s@/'\"]+)@")
# `name: value` / `name=value` where the name ends in a secret-ish word; code lines only
ASSIGNMENT = re.compile(r"(?i)(?P<name>[A-Za-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key"
                        r"|access[_-]?key(?:[_-]?id)?))[\"']?\s*[:=]\s*[\"']?"
                        r"(?P<value>[^\s\"',}#]*)")


def secret_findings(text: str, kind: str) -> list[str]:
    """What in `text` looks like a credential. kind: yaml | text | markdown."""
    found = [f"{name}: {m.group(0)[:12]}..." for name, rx in SECRET_PATTERNS.items()
             for m in rx.finditer(text)]
    found += [f"credentials in URI: {m.group(0)}" for m in URI_CREDENTIALS.finditer(text)
              if not is_reference(m["pw"])]
    if kind == "markdown":  # prose mentions tokens freely: look at the code blocks only
        code = "\n".join(re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S))
    else:
        code = "\n".join(re.sub(r"(^|\s)#.*$", "", ln) for ln in text.splitlines())
    for m in ASSIGNMENT.finditer(code):
        if not is_reference(m["value"]):
            found.append(f"literal value for {m['name']}: {m.group(0)}")
    if kind == "yaml":
        for doc in yaml.safe_load_all(text):
            for where, key, value in walk(doc):
                if isinstance(key, str) and SECRET_NAME.search(key) and isinstance(value, str) \
                        and not is_reference(value):
                    found.append(f"literal value for {where}.{key}")
                if key == "env" and isinstance(value, list):
                    for e in value:
                        if isinstance(e, dict) and SECRET_NAME.search(str(e.get("name", ""))) \
                                and e.get("value") not in (None, ""):
                            found.append(f"literal env value for {where}.env.{e['name']}")
                if key == "runtimeEnvYAML" and isinstance(value, str):
                    found += secret_findings(value, "yaml")
    return found


def scanned_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.suffix not in (".pyc",)]
    return sorted(files) + [LAUNCHER, REAL_CONFIG, DOCS]


def _kind(path: Path) -> str:
    if path.suffix in (".yaml", ".yml"):
        return "yaml"
    return "markdown" if path.suffix == ".md" else "text"


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_secret_values(path):
    assert secret_findings(path.read_text(), _kind(path)) == []


@pytest.mark.parametrize("text,kind", [
    ("aws_key: AKIA" + "ABCDEFGHIJKLMNOP\n", "yaml"),
    ("password: hunter2\n", "yaml"),
    ("db:\n  password: 'correct horse'\n", "yaml"),
    ("env:\n  - name: RAY_AUTH_TOKEN\n    value: abc123\n", "yaml"),
    ("env:\n  - name: AWS_SECRET_ACCESS_KEY\n    value: wJalrXUtnFEMI\n", "yaml"),
    ("args: [--backend-store-uri=postgresql://mlflow:s3cr3t@db:5432/mlflow]\n", "yaml"),
    ("runtimeEnvYAML: |\n  env_vars:\n    HF_TOKEN: hf_abcdef\n", "yaml"),
    ("ENV AWS_SECRET_ACCESS_KEY=abcd\n", "text"),
    ("-----BEGIN RSA PRIVATE KEY-----\n", "text"),
    ("```\nexport RAY_AUTH_TOKEN=0123456789abcdef\n```\n", "markdown"),
    ("```\nkubectl create secret generic x --from-literal=api_key=sk-live\n```\n", "markdown"),
])
def test_secret_scanner_flags(text, kind):
    assert secret_findings(text, kind), text


@pytest.mark.parametrize("text,kind", [
    ("env:\n  - name: RAY_AUTH_TOKEN\n    valueFrom:\n"
     "      secretKeyRef: {name: a, key: auth_token}\n", "yaml"),
    ("authOptions: {mode: token, secretName: xbt-ray-auth}\n", "yaml"),
    ("run_options: [--env RAY_AUTH_TOKEN_PATH=/home/ray/.ray/auth_token]\n", "yaml"),
    ("```\nexport RAY_AUTH_TOKEN=$(kubectl get secret x -o jsonpath='{.data.auth_token}')\n```\n",
     "markdown"),
    ("```\n--from-literal=uri=\"postgresql+psycopg2://mlflow:<password>@db:5432/mlflow\"\n```\n",
     "markdown"),
    ("The token is copied by file_mounts; password: see your vault.\n", "markdown"),
    ("file_mounts:\n  /home/ray/.ray/auth_token: ~/.ray/auth_token\n", "yaml"),
    ("spec:\n  automountServiceAccountToken: false\n", "yaml"),
])
def test_secret_scanner_passes_references(text, kind):
    assert secret_findings(text, kind) == [], text
