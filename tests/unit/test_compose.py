"""deploy/compose/ stays runnable without a Docker engine to try it on.

No engine runs here, and the docker CLI has no compose plugin, so `docker compose config` is not
available; nor is the Compose specification's JSON schema shipped by any installed package (and
`jsonschema` is not a project dependency). So the file is checked structurally against the parts
of the specification it uses (known keys, enums, references that resolve), and semantically
against the code: every command runs a module that exists, every variable is one its service
reads and parses, every port agrees with health checks, addresses and Prometheus."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from typing import Any

import pytest

from fmserve.cli.cluster import SERVICES
from fmserve.core.settings import variables
from tests.conftest import require_binary
from tests.deployment import (
    COMPOSE_DIR,
    COMPOSE_FILE,
    GPU_FILE,
    PROMETHEUS_FILE,
    ROOT,
    dashboards,
    environment,
    expressions,
    interpolate,
    load_yaml,
    metric_names,
    settings_class,
    settings_of,
)

STAGES = ("preprocess", "inference", "postprocess", "cache")
PUBLISHED = {"gateway", "grafana", "prometheus", "rabbitmq"}
ONE_SHOT = {"certs"}  # runs once before the services start, then exits: no health to check

# The Compose specification's keys for what this project's files use (compose-spec.json).
TOP_LEVEL_KEYS = {"version", "name", "include", "services", "networks", "volumes", "secrets"}
TOP_LEVEL_KEYS |= {"configs", "models"}
_SERVICE_KEYS = """
    annotations attach build blkio_config cap_add cap_drop cgroup cgroup_parent command configs
    container_name cpu_count cpu_percent cpu_shares cpu_quota cpu_period cpu_rt_period
    cpu_rt_runtime cpus cpuset credential_spec depends_on deploy develop device_cgroup_rules
    devices dns dns_opt dns_search domainname entrypoint env_file environment expose extends
    external_links extra_hosts gpus group_add healthcheck hostname image init ipc isolation labels
    links logging mac_address mem_limit mem_reservation mem_swappiness memswap_limit network_mode
    networks oom_kill_disable oom_score_adj pid pids_limit platform ports privileged profiles
    pull_policy read_only restart runtime scale secrets security_opt shm_size stdin_open
    stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits user userns_mode uts
    volumes volumes_from working_dir"""
SERVICE_KEYS = set(_SERVICE_KEYS.split())
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval"}
HEALTHCHECK_KEYS |= {"disable"}
DEVICE_KEYS = {"capabilities", "count", "device_ids", "driver", "options"}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# Structure (the Compose specification) ------------------------------------------------------


def test_top_level_and_service_keys_are_the_specifications(compose: dict[str, Any]) -> None:
    for data in (compose, load_yaml(GPU_FILE)):
        assert set(data) - TOP_LEVEL_KEYS <= {k for k in data if k.startswith("x-")}
        for name, service in data["services"].items():
            unknown = {k for k in set(service) - SERVICE_KEYS if not k.startswith("x-")}
            assert not unknown, f"{name}: keys outside the Compose specification: {unknown}"


def test_healthchecks_restart_and_durations_are_well_formed(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        assert RESTART.match(service["restart"]), name
        if name in ONE_SHOT:
            assert service["restart"] == "no" and "healthcheck" not in service, name
            continue
        check = service["healthcheck"]
        assert set(check) <= HEALTHCHECK_KEYS, name
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        durations = [check[k] for k in ("interval", "timeout", "start_period") if k in check]
        for value in [*durations, service.get("stop_grace_period", "1s")]:
            assert DURATION.match(value), f"{name}: {value!r} is not a compose duration"


def test_references_resolve(compose: dict[str, Any]) -> None:
    services, networks, volumes = compose["services"], compose["networks"], compose["volumes"]
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert spec["condition"] in DEPENDS_CONDITIONS
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
        assert set(service.get("networks", [])) <= set(networks), name
        for mount in service.get("volumes", []):
            source = interpolate(mount).split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"


def test_gpu_variant_reserves_a_gpu_for_inference_only() -> None:
    gpu = load_yaml(GPU_FILE)["services"]
    assert set(gpu) == {"inference"}
    (device,) = gpu["inference"]["deploy"]["resources"]["reservations"]["devices"]
    assert set(device) <= DEVICE_KEYS and device["capabilities"] == ["gpu"]
    assert "cu" in interpolate(gpu["inference"]["build"]["args"]["TORCH_INDEX_URL"])


# Topology: scaling, networks, persistence ----------------------------------------------------


def test_stage_services_can_scale(services: dict[str, dict[str, Any]]) -> None:
    for name in STAGES:
        assert "container_name" not in services[name], name
        assert "ports" not in services[name], f"{name} publishes a host port: cannot scale"


def test_only_the_front_doors_are_published(compose: dict[str, Any]) -> None:
    published = {name for name, s in compose["services"].items() if s.get("ports")}
    assert published == PUBLISHED
    assert [p.rsplit(":", 1)[1] for p in compose["services"]["rabbitmq"]["ports"]] == ["15672"]
    assert compose["networks"]["backend"]["internal"] is True
    for name in (*STAGES, "redis"):
        assert compose["services"][name]["networks"] == ["backend"], name


def test_stores_keep_their_data_and_redis_never_evicts_jobs(
    services: dict[str, dict[str, Any]],
) -> None:
    mounts = {
        name: [m.split(":")[:2] for m in s.get("volumes", [])] for name, s in services.items()
    }
    assert ["redis-data", "/data"] in mounts["redis"]
    assert ["rabbitmq-data", "/var/lib/rabbitmq"] in mounts["rabbitmq"]
    assert ["prometheus-data", "/prometheus"] in mounts["prometheus"]
    assert ["grafana-data", "/var/lib/grafana"] in mounts["grafana"]
    command = [interpolate(part) for part in services["redis"]["command"]]
    policy = command[command.index("--maxmemory-policy") + 1]
    # Cache entries live hours, job records their deadline plus retention (days): evicting the
    # keys nearest their expiry first takes cache entries long before any job record.
    assert policy == "volatile-ttl", "evict the shortest-lived keys (cache entries) first"
    assert command[command.index("--appendonly") + 1] == "yes"


def test_gateway_starts_after_every_stage_is_healthy(services: dict[str, dict[str, Any]]) -> None:
    depends = services["gateway"]["depends_on"]
    assert {name for name, d in depends.items() if d["condition"] == "service_healthy"} >= set(
        STAGES
    )
    assert services["cache"]["depends_on"]["redis"]["condition"] == "service_healthy"


# The code: commands, variables, ports --------------------------------------------------------


def test_commands_run_the_services_of_the_same_name(services: dict[str, dict[str, Any]]) -> None:
    for name in SERVICES:
        assert services[name]["command"] == ["python", "-m", f"services.{name}"]
        assert importlib.util.find_spec(f"services.{name}.__main__"), name
        assert services[name]["healthcheck"]["test"][:4] == [
            "CMD",
            "python",
            "-m",
            "fmserve.rpc.healthcheck",
        ]
    assert importlib.util.find_spec("fmserve.rpc.healthcheck")


@pytest.mark.parametrize("name", SERVICES)
def test_every_variable_is_read_by_its_service(
    services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(services[name])
    known = {variable for variable, _, _ in variables(settings_class(name))}
    assert set(env) <= known, f"{name} does not read {set(env) - known}"
    settings = settings_of(name, env, monkeypatch)  # values parse as the service parses them
    for variable, value in env.items():
        if variable in known and variable.startswith(f"FMSERVE_{name.upper()}_"):
            field = variable.removeprefix(f"FMSERVE_{name.upper()}_").lower()
            assert str(getattr(settings, field)) == value, variable


@pytest.mark.parametrize("name", SERVICES)
def test_ports_agree_with_healthcheck_addresses_and_prometheus(
    services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(name, environment(services[name]), monkeypatch)
    assert services[name]["healthcheck"]["test"][4] == f"127.0.0.1:{settings.port}"
    assert settings.metrics_port > 0, "Prometheus needs a fixed metrics port"
    (job,) = [j for j in load_yaml(PROMETHEUS_FILE)["scrape_configs"] if j["job_name"] == name]
    (discovery,) = job["dns_sd_configs"]
    assert discovery == {**discovery, "names": [name], "type": "A", "port": settings.metrics_port}
    gateway = settings_of("gateway", environment(services["gateway"]), monkeypatch)
    if name == "gateway":
        assert services[name]["ports"] == [f"${{FMSERVE_GATEWAY_HOST_PORT:-50051}}:{settings.port}"]
    else:
        assert getattr(gateway, f"{name}_address") == f"{name}:{settings.port}"
    if name == "cache":
        for stage in ("preprocess", "inference", "postprocess"):
            worker = settings_of(stage, environment(services[stage]), monkeypatch)
            assert worker.cache_address == f"cache:{settings.port}", stage


def test_rabbitmq_exports_queue_metrics_to_prometheus(services: dict[str, dict[str, Any]]) -> None:
    plugins = (COMPOSE_DIR / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in plugins and "rabbitmq_management" in plugins
    (job,) = [
        j for j in load_yaml(PROMETHEUS_FILE)["scrape_configs"] if j["job_name"] == "rabbitmq"
    ]
    assert job["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    broker = {key: interpolate(value) for key, value in services["rabbitmq"]["environment"].items()}
    user, password = broker["RABBITMQ_DEFAULT_USER"], broker["RABBITMQ_DEFAULT_PASS"]
    assert user != "guest", "RabbitMQ lets guest log in from localhost only"
    for name in ("gateway", "preprocess", "inference", "postprocess"):
        url = environment(services[name])["FMSERVE_AMQP_URL"]
        assert url == f"amqp://{user}:{password}@rabbitmq:5672/", name


def test_promtool_accepts_the_prometheus_config() -> None:
    """Prometheus' own check of the file. It does not resolve the compose service names the DNS
    discovery asks for (Prometheus does that when it runs), so it passes outside compose."""
    promtool = require_binary("promtool", "prometheus")
    check = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_FILE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_image_installs_the_project_as_the_readme_does() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "make install" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert dockerfile.index("$TORCH_INDEX_URL") < dockerfile.index("RUN make install")


# TLS: certificates, mTLS, private stages ------------------------------------------------------


def tls_files(name: str) -> dict[str, str]:
    return {
        "FMSERVE_TLS_CERT": f"/certs/{name}.crt",
        "FMSERVE_TLS_KEY": f"/certs/{name}.key",
        "FMSERVE_TLS_CA": "/certs/ca.crt",
    }


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_runs_tls_with_its_own_certificate(
    services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = services[name]
    env = environment(service)
    assert {k: env.get(k) for k in tls_files(name)} == tls_files(name)
    assert "certs:/certs:ro" in service["volumes"]
    assert service["depends_on"]["certs"] == {"condition": "service_completed_successfully"}
    settings = settings_of(name, env, monkeypatch)
    assert settings.tls_enabled
    # The health check presents the service's own certificate: a stage refuses any other call.
    test = service["healthcheck"]["test"]
    flags = dict(zip(test[5::2], test[6::2], strict=True))
    assert flags == {
        "--tls-cert": f"/certs/{name}.crt",
        "--tls-key": f"/certs/{name}.key",
        "--tls-ca": "/certs/ca.crt",
    }


@pytest.mark.parametrize("name", SERVICES)
def test_stages_serve_the_internal_network_only(
    services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside compose a stage binds loopback; here every service binds all interfaces, and
    only the gateway's are reachable from the host (no stage publishes a port)."""
    settings = settings_of(name, environment(services[name]), monkeypatch)
    assert settings.host == "0.0.0.0"
    assert bool(services[name].get("ports")) == (name == "gateway")


def test_the_certs_service_copies_keys_for_the_services_user_only(
    compose: dict[str, Any],
) -> None:
    certs = compose["services"]["certs"]
    assert "./certs:/host-certs:ro" in certs["volumes"] and "certs:/certs" in certs["volumes"]
    assert certs["network_mode"] == "none"
    script = certs["command"][-1]
    uid = re.search(r"useradd .*--uid (\d+) fmserve", (ROOT / "Dockerfile").read_text())
    assert uid, "the Dockerfile's service user"
    assert f"install -o {uid[1]} -m 0600 /host-certs/*.key /certs/" in script
    assert f"install -o {uid[1]} -m 0644 /host-certs/*.crt /certs/" in script
    assert "fmserve certs --out deploy/compose/certs" in script  # what to do when none exist
    assert "certs" in compose["volumes"]


def test_git_never_holds_the_compose_certificates() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/compose/certs/gateway.key"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0
    kept = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/compose/certs/.gitignore"], cwd=ROOT, check=False
    )
    assert kept.returncode == 1  # the folder itself exists in a checkout, for the bind mount


# Grafana ------------------------------------------------------------------------------------


def test_grafana_provisions_the_dashboards_from_prometheus(
    services: dict[str, dict[str, Any]],
) -> None:
    provisioning = COMPOSE_DIR / "grafana" / "provisioning"
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    (provider,) = load_yaml(provisioning / "dashboards" / "fmserve.yaml")["providers"]
    assert (
        f"./grafana/dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]
    )
    assert source["url"] == "http://prometheus:9090"
    for name, dashboard in dashboards().items():
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), name
        for panel in panels:
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert all(t["expr"] for t in panel["targets"]), panel["title"]


def test_dashboard_queries_name_only_fmserve_rabbitmq_or_prometheus_metrics() -> None:
    for dashboard in dashboards().values():
        for expression in expressions(dashboard):
            names = metric_names(expression)
            assert names, f"no metric in {expression!r}"
            assert all(re.match(r"^(fmserve_|rabbitmq_queue_|up$)", n) for n in names), expression
