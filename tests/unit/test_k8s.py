"""deploy/k8s/ renders and holds together without a cluster to apply it to.

No Kubernetes runs here. So each overlay is rendered by `kubectl kustomize` (what `kubectl
apply -k` applies), validated offline against the Kubernetes API schemas (kubernetes-validate,
strict: unknown fields fail) and the KEDA objects against the schema subset in tests/schemas/;
then checked against the code, as tests/unit/test_compose.py does for compose: every command
runs a service, every variable is one its service reads and parses, ports, probes, scaling
metrics and queue names are the code's, and every pod is hardened, budgeted and fenced."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from prometheus_client import REGISTRY

from fmserve.cli.cluster import SERVICES
from fmserve.core.metrics import RpcMetrics
from fmserve.core.repository import load_config
from fmserve.core.settings import variables
from fmserve.queue import topology
from fmserve.queue.topology import Topology
from fmserve.v1 import gateway_pb2
from services.inference import metrics as inference_metrics
from tests.deployment import COMPOSE_DIR, ROOT, metric_names, settings_class, settings_of
from tests.kubernetes import (
    K8S_DIR,
    OVERLAYS,
    Manifests,
    container,
    environment,
    ingress_sources,
    pod_labels,
    render,
    service_of,
)

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
# The oldest release the manifests need (the preStop `sleep` action is on by default from
# 1.30) and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
NAMESPACE = "fmserve"
STAGES = topology.STAGES
WORKERS = {f"{stage}-worker": stage for stage in STAGES}
# Labels the Prometheus the scalers read adds to every series (deploy/k8s/README.md).
PROMETHEUS_LABELS = {"namespace", "app_kubernetes_io_component"}
# What may reach a pod from outside the namespace besides the gateway's clients: Prometheus
# scraping its metrics port, and KEDA's operator reading queue depths from RabbitMQ (AMQP).
MONITORING = "namespace:monitoring"
KEDA = ("namespace:keda", 5672)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_RENDERED: dict[str, Manifests] = {}


def rendered(overlay: str) -> Manifests:
    """An overlay rendered once per test run (kubectl takes a second or two)."""
    if overlay not in _RENDERED:
        _RENDERED[overlay] = Manifests(render(overlay))
    return _RENDERED[overlay]


@pytest.fixture(scope="module")
def manifests(overlay: str) -> Manifests:
    return rendered(overlay)


@pytest.fixture(scope="module")
def cpu() -> Manifests:
    return rendered("cpu")


def keda_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / f"keda-{kind.lower()}.json").read_text())
    return schema


def settings_for(
    manifests: Manifests, deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Any:
    env = environment(deployment, manifests.secret_values("fmserve-stores"))
    return settings_of(service_of(deployment), env, monkeypatch)


# Schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(version: str) -> None:
    """Every overlay's objects, each distinct one once (most are the base's in all three)."""
    distinct: dict[str, dict[str, Any]] = {}
    for overlay in OVERLAYS:
        for obj in rendered(overlay).objects:
            distinct.setdefault(json.dumps(obj, sort_keys=True), obj)
    for obj in distinct.values():
        if not obj["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_kubernetes_validation_refuses_what_an_api_server_would(cpu: Manifests) -> None:
    """The check above can fail: a misspelt field, a named port where gRPC probes need a
    number."""
    named = copy.deepcopy(cpu.one("Deployment", "gateway"))
    container(named)["readinessProbe"]["grpc"]["port"] = "grpc"
    misspelt = copy.deepcopy(cpu.one("Deployment", "gateway"))
    container(misspelt)["readinesProbe"] = container(misspelt).pop("readinessProbe")
    for deployment in (named, misspelt):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_keda_objects_validate_against_the_keda_schemas(manifests: Manifests) -> None:
    keda = [o for o in manifests.objects if o["apiVersion"].startswith("keda.sh/")]
    assert {o["kind"] for o in keda} == {"ScaledObject", "TriggerAuthentication"}
    for obj in keda:
        jsonschema.validate(obj, keda_schema(obj["kind"]))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "triggers", 1, "metadata", "treshold"), "32"),  # misspelt: KEDA ignores it
        (("spec", "triggers", 1, "metadata", "threshold"), 32),  # metadata values are strings
        (("spec", "minReplicaCount"), -1),
        (("spec", "scaleTargetRef", "name"), ""),
    ],
)
def test_the_keda_schema_refuses_what_keda_would_not_do(
    cpu: Manifests, path: tuple[Any, ...], value: Any
) -> None:
    scaled = copy.deepcopy(cpu.one("ScaledObject", "gateway"))
    *parents, last = path
    target = scaled
    for key in parents:
        target = target[key]
    target[last] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, keda_schema("ScaledObject"))


# Workloads: commands, variables, ports, probes, hardening ----------------------------------


def test_every_service_runs_as_a_deployment_and_every_stage_has_a_worker(
    manifests: Manifests,
) -> None:
    deployments = manifests.of("Deployment")
    assert set(deployments) == {*SERVICES, *WORKERS}
    for name, deployment in deployments.items():
        assert service_of(deployment) == WORKERS.get(name, name)
        assert "replicas" not in deployment["spec"], f"{name}: KEDA owns the replica count"


@pytest.mark.parametrize("name", [*SERVICES, *WORKERS])
def test_every_variable_is_read_by_its_service(
    manifests: Manifests, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = manifests.one("Deployment", name)
    service = service_of(deployment)
    env = environment(deployment, manifests.secret_values("fmserve-stores"))
    known = {variable for variable, _, _ in variables(settings_class(service))}
    assert set(env) <= known, f"{name}: {service} does not read {set(env) - known}"
    settings = settings_of(service, env, monkeypatch)  # values parse as the service parses them
    prefix = f"FMSERVE_{service.upper()}_"
    for variable, value in env.items():
        if variable.startswith(prefix):
            field = variable.removeprefix(prefix).lower()
            assert str(getattr(settings, field)).lower() == value.lower(), variable


def test_sync_deployments_leave_jobs_to_the_workers(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    for worker, stage in WORKERS.items():
        sync = settings_for(manifests, manifests.one("Deployment", stage), monkeypatch)
        consumer = settings_for(manifests, manifests.one("Deployment", worker), monkeypatch)
        assert sync.worker_enabled is False, stage
        assert consumer.worker_enabled is True, worker
        cache = settings_for(manifests, manifests.one("Deployment", "cache"), monkeypatch)
        assert consumer.cache_address == f"dns:///cache:{cache.port}", worker
    gateway = settings_for(manifests, manifests.one("Deployment", "gateway"), monkeypatch)
    assert gateway.jobs_enabled is True
    assert gateway.auth is True, "API keys are on in Kubernetes, as in compose"


@pytest.mark.parametrize("name", [*SERVICES, *WORKERS])
def test_ports_probes_and_scrape_annotations_are_the_services(
    manifests: Manifests, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = manifests.one("Deployment", name)
    settings = settings_for(manifests, deployment, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    # Probes, scrapes and callers reach the pod on its own address, never on its loopback.
    assert settings.host == "0.0.0.0", f"{name} binds {settings.host}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Kubernetes' own gRPC probe asks grpc.health.v1 for the whole server ("" service),
        # which every fmserve service answers (fmserve/rpc/service.py).
        check = container(deployment)[probe]
        assert check["grpc"] == {"port": settings.port}, f"{name} {probe}"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(settings.metrics_port),
        "prometheus.io/path": "/metrics",
    }


def test_the_gateway_reaches_every_stage_through_its_headless_service(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = settings_for(manifests, manifests.one("Deployment", "gateway"), monkeypatch)
    services = manifests.of("Service")
    for stage in (*STAGES, "cache"):
        settings = settings_for(manifests, manifests.one("Deployment", stage), monkeypatch)
        assert getattr(gateway, f"{stage}_address") == f"dns:///{stage}:{settings.port}"
        service = services[stage]["spec"]
        assert service["clusterIP"] == "None", f"{stage}: DNS must answer with every pod"
        assert service["selector"] == {"app.kubernetes.io/component": stage}
        assert [p["port"] for p in service["ports"]] == [settings.port]
    assert services["gateway"]["spec"]["ports"][0]["port"] == gateway.port


def test_every_container_is_hardened_and_sized(manifests: Manifests) -> None:
    for name, workload in manifests.workloads().items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for each in pod["containers"]:
            security = each["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(each["resources"][bound]), f"{name} {bound}"
            assert "readinessProbe" in each and "livenessProbe" in each, name
    labels = manifests.one("Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_workload_has_a_disruption_budget(manifests: Manifests) -> None:
    budgets = list(manifests.of("PodDisruptionBudget").values())
    for name, workload in manifests.workloads().items():
        covering = [b for b in budgets if b["spec"]["selector"] == workload["spec"]["selector"]]
        assert len(covering) == 1, f"{name}: {len(covering)} budgets"
        (budget,) = covering
        if name in manifests.of("Deployment") and name not in WORKERS:
            scaled = manifests.one("ScaledObject", name)["spec"]
            # a voluntary disruption leaves at least one pod, and can still take one
            assert budget["spec"]["minAvailable"] >= 1, name
            assert scaled["minReplicaCount"] > budget["spec"]["minAvailable"], name


@pytest.mark.parametrize("name", [*SERVICES, *WORKERS])
def test_termination_grace_covers_the_services_own_grace(
    manifests: Manifests, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL must not cut the stop short: the preStop wait, then the gRPC server's drain, the
    job consumer's and the models' close each take up to the service's grace period, in turn
    (fmserve/rpc/service.py: Service.stop), and a margin for closing connections."""
    deployment = manifests.one("Deployment", name)
    grace = settings_for(manifests, deployment, monkeypatch).grace_period_s
    pre_stop = container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
    allowed = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert allowed >= pre_stop + 3 * grace + 5, name
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, f"{name}: a rollout must not start by taking a pod"


# Scaling -----------------------------------------------------------------------------------


def _exported_metrics() -> set[str]:
    """Every metric name the services register, the autoscaling gauges included."""
    for service in SERVICES:
        RpcMetrics(service)
    assert inference_metrics.QUEUED_SEQUENCES is not None
    return {family.name for family in REGISTRY.collect()}


def test_scalers_read_metrics_the_services_export(manifests: Manifests) -> None:
    exported = _exported_metrics()
    gateway_methods = set(gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods_by_name)
    for name, scaled in manifests.of("ScaledObject").items():
        for trigger in scaled["spec"]["triggers"]:
            if trigger["type"] != "prometheus":
                continue
            query = trigger["metadata"]["query"]
            assert metric_names(query) <= exported, f"{name}: {query}"
            matchers = dict(re.findall(r'(\w+)\s*!?=~?\s*"([^"]*)"', query))
            assert matchers["namespace"] == NAMESPACE, name
            target = scaled["spec"]["scaleTargetRef"]["name"]
            component = pod_labels(manifests.one("Deployment", target))
            assert (
                matchers["app_kubernetes_io_component"] == component["app.kubernetes.io/component"]
            ), f"{name} must read its own pods only"
            assert set(matchers) - PROMETHEUS_LABELS <= {"method"}, query
            if "method" in matchers:
                assert matchers["method"] in gateway_methods, query


def test_each_sync_deployment_scales_on_cpu_and_its_own_signal(manifests: Manifests) -> None:
    signals = {
        "gateway": "fmserve_gateway_requests_in_flight",
        "preprocess": "fmserve_preprocess_requests_in_flight",
        "inference": "fmserve_inference_queued_sequences",
        "postprocess": "fmserve_postprocess_requests_in_flight",
        "cache": "fmserve_cache_requests_in_flight",
    }
    deployments = manifests.of("Deployment")
    for name, metric in signals.items():
        scaled = manifests.one("ScaledObject", name)["spec"]
        assert scaled["scaleTargetRef"]["name"] == name and name in deployments
        cpu_trigger, prometheus = scaled["triggers"]
        assert cpu_trigger["type"] == "cpu" and cpu_trigger["metricType"] == "Utilization"
        assert prometheus["type"] == "prometheus"
        assert metric_names(prometheus["metadata"]["query"]) == {metric}, name
        assert scaled["minReplicaCount"] >= 2, name


def test_workers_scale_from_zero_on_the_queues_their_stage_declares(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = manifests.one("TriggerAuthentication", "rabbitmq")["spec"]["secretTargetRef"]
    for worker, stage in WORKERS.items():
        deployment = manifests.one("Deployment", worker)
        settings = settings_for(manifests, deployment, monkeypatch)
        declared = Topology(settings.amqp_queue_prefix, settings.amqp_delivery_limit)
        scaled = manifests.one("ScaledObject", worker)["spec"]
        assert scaled["scaleTargetRef"]["name"] == worker
        assert scaled["minReplicaCount"] == 0, "idle job capacity costs nothing"
        triggers = scaled["triggers"]
        assert [t["type"] for t in triggers] == ["rabbitmq"] * len(triggers)
        assert [t["metadata"]["queueName"] for t in triggers] == declared.queues(stage)
        assert all(t["metadata"]["mode"] == "QueueLength" for t in triggers)
        assert all(t["authenticationRef"]["name"] == "rabbitmq" for t in triggers)
        # KEDA connects with the URL the worker itself consumes with
        (amqp,) = [e for e in container(deployment)["env"] if e["name"] == "FMSERVE_AMQP_URL"]
        reference = amqp["valueFrom"]["secretKeyRef"]
        assert auth == [{"parameter": "host", **reference}]


def test_the_declared_queues_are_quorum_queues() -> None:
    """What the triggers name is what RabbitMQ holds durably (quorum queues on the volume)."""
    declared: dict[str, dict[str, Any]] = {}

    class Channel:
        async def declare_exchange(self, *args: Any, **kwargs: Any) -> None:
            return None

        async def declare_queue(self, name: str, **kwargs: Any) -> Any:
            declared[name] = kwargs

            class Queue:
                async def bind(self, *args: Any) -> None:
                    return None

            return Queue()

    asyncio.run(topology.declare(Channel(), Topology()))  # type: ignore[arg-type]
    for name in Topology().all_queues():
        assert declared[name]["durable"] is True
        assert declared[name]["arguments"]["x-queue-type"] == "quorum", name


def test_the_readme_capacity_table_is_the_scalers() -> None:
    """deploy/k8s/README.md promises a target and a replica range per Deployment."""
    section = (K8S_DIR / "README.md").read_text().split("## Capacity model", 1)[1]
    rows = re.findall(r"^\| `([\w-]+)` \|[^|]*\| (\d+)[^|]*\| (\d+)-(\d+) \|", section, re.M)
    promised = {name: (int(t), int(lo), int(hi)) for name, t, lo, hi in rows}
    actual = {}
    for name, obj in rendered("cpu").of("ScaledObject").items():
        spec = obj["spec"]
        (target,) = {
            t["metadata"].get("threshold") or t["metadata"].get("value")
            for t in spec["triggers"]
            if t["type"] != "cpu"
        }
        actual[name] = (int(target), spec["minReplicaCount"], spec["maxReplicaCount"])
    assert promised == actual


# Network policies --------------------------------------------------------------------------


def test_only_the_gateway_is_reachable_from_outside_the_namespace(manifests: Manifests) -> None:
    policies = list(manifests.of("NetworkPolicy").values())
    deny = manifests.one("NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    pods = {name: pod_labels(w) for name, w in manifests.workloads().items()}
    for name, workload in manifests.workloads().items():
        sources = ingress_sources(policies, workload, pods)
        outside = {s for s in sources if s[0] == "*" or s[0].startswith("namespace:")}
        ports = {p["name"]: p["containerPort"] for p in container(workload)["ports"]}
        expected = {(MONITORING, ports["metrics"])} if "metrics" in ports else set()
        if name == "gateway":
            expected.add(("*", ports["grpc"]))
        if name == "rabbitmq":
            expected.add(KEDA)
        assert outside == expected, name


def test_each_pod_accepts_only_its_callers(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    policies = list(manifests.of("NetworkPolicy").values())
    pods = {name: pod_labels(w) for name, w in manifests.workloads().items()}
    callers = {name: {"gateway"} for name in STAGES}
    callers["cache"] = {"gateway", *WORKERS}
    callers |= {worker: set() for worker in WORKERS}
    callers["gateway"] = set()
    if "redis" in pods:
        callers["redis"] = {"cache"}
        callers["rabbitmq"] = {"gateway", *WORKERS}
    for name, workload in manifests.workloads().items():
        sources = ingress_sources(policies, workload, pods)
        inside = {(s, p) for s, p in sources if s != "*" and not s.startswith("namespace:")}
        assert {s for s, _ in inside} == callers[name], name
        if name in manifests.of("Deployment"):  # callers reach the gRPC port, nothing else
            port = settings_for(manifests, workload, monkeypatch).port
            assert {p for _, p in inside} <= {port}, name


# Stores, overlays, dashboard ---------------------------------------------------------------


def test_in_cluster_stores_persist_and_share_one_secret(cpu: Manifests) -> None:
    secrets = cpu.secret_values("fmserve-stores")
    rabbitmq, redis = cpu.one("StatefulSet", "rabbitmq"), cpu.one("StatefulSet", "redis")
    for store, path in ((rabbitmq, "/var/lib/rabbitmq"), (redis, "/data")):
        (claim,) = store["spec"]["volumeClaimTemplates"]
        mounts = {m["mountPath"]: m["name"] for m in container(store)["volumeMounts"]}
        assert mounts[path] == claim["metadata"]["name"]
    args = container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    # cache entries (hours) are evicted before job records (days): services/cache/store.py
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-ttl"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    password = secrets["REDIS_PASSWORD"]
    assert secrets["FMSERVE_REDIS_URL"] == f"redis://:{password}@redis:6379/0"
    user, secret = secrets["RABBITMQ_DEFAULT_USER"], secrets["RABBITMQ_DEFAULT_PASS"]
    assert user != "guest", "RabbitMQ lets guest log in from localhost only"
    assert secrets["FMSERVE_AMQP_URL"] == f"amqp://{user}:{secret}@rabbitmq:5672/"
    (mounted,) = [v for v in rabbitmq["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    plugins = cpu.one("ConfigMap", mounted["configMap"]["name"])["data"]["enabled_plugins"]
    assert plugins == (COMPOSE_DIR / "rabbitmq" / "enabled_plugins").read_text()


def test_external_stores_overlay_ships_no_store_and_no_credentials() -> None:
    external = rendered("external-stores")
    assert not external.of("StatefulSet") and not external.of("Secret")
    keys = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for d in external.of("Deployment").values()
        for e in container(d)["env"]
        if "valueFrom" in e
    }
    assert keys == {"FMSERVE_AMQP_URL", "FMSERVE_REDIS_URL"}, "what README tells people to set"


def test_gpu_overlay_gives_inference_and_only_inference_a_gpu() -> None:
    gpu = rendered("gpu")
    for name, deployment in gpu.of("Deployment").items():
        resources = container(deployment)["resources"]
        wants = name in ("inference", "inference-worker")
        assert (resources["limits"].get("nvidia.com/gpu") == 1) is wants, name
        assert container(deployment)["image"].startswith("fmserve-gpu") is wants, name
    for model in ("minilm-embed", "minilm-sentiment"):  # what the overlay's image serves
        assert load_config(ROOT / "models" / model / "model.toml").runtime.device == "auto"


def test_the_dashboard_config_map_is_the_compose_dashboard(cpu: Manifests) -> None:
    dashboard = cpu.one("ConfigMap", "fmserve-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    compose = COMPOSE_DIR / "grafana" / "dashboards" / "fmserve.json"
    assert dashboard["data"]["fmserve.json"] == compose.read_text()
