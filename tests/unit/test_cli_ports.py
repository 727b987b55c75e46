"""Where `fmserve up` puts each service's /metrics endpoint (fmserve/cli/commands.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmserve.cli.cluster import PORT_ORDER, Cluster
from fmserve.cli.commands import _print_cluster, metrics_ports

pytestmark = pytest.mark.timeout(10)


def ports_from(base: int) -> dict[str, int]:
    return {name: base + i for i, name in enumerate(PORT_ORDER)}


def test_metrics_follow_the_grpc_ports() -> None:
    assert metrics_ports(ports_from(50051)) == {
        "gateway": 9151,
        "preprocess": 9152,
        "inference": 9153,
        "postprocess": 9154,
        "cache": 9155,
    }
    assert metrics_ports(ports_from(60051))["cache"] == 19155


def test_a_configured_metrics_port_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FMSERVE_GATEWAY_METRICS_PORT", "19999")
    monkeypatch.setenv("FMSERVE_CACHE_METRICS_PORT", "-1")
    chosen = metrics_ports(ports_from(60051))
    assert chosen["gateway"] == 19999
    assert chosen["cache"] == -1  # off
    assert chosen["preprocess"] == 19152


def test_a_base_port_too_low_for_the_offset_takes_free_ports(tmp_path: Path) -> None:
    chosen = metrics_ports(ports_from(20000))
    assert set(chosen.values()) == {0}
    cluster = Cluster(ports=ports_from(20000), metrics_ports=chosen, log_dir=tmp_path)
    assert all(r.metrics_port > 1024 for r in cluster.all())


def test_the_cluster_gives_its_first_replica_the_chosen_port(tmp_path: Path) -> None:
    cluster = Cluster(
        ports=ports_from(60051),
        replicas={"inference": 2},
        metrics_ports={"inference": 19153},
        log_dir=tmp_path,
    )
    first, second = cluster.replicas_of["inference"]
    assert first.metrics_port == 19153
    assert second.metrics_port not in (0, 19153)


@pytest.mark.parametrize(
    ("auth", "says"),
    [(True, "auth on: API keys required"), (False, "auth off (FMSERVE_AUTH=on requires")],
)
def test_the_ready_line_says_whether_auth_is_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], auth: bool, says: str
) -> None:
    cluster = Cluster(ports={n: 50000 + i for i, n in enumerate(PORT_ORDER)}, log_dir=tmp_path)
    _print_cluster(cluster, "", auth)
    ready = capsys.readouterr().out.splitlines()[-1]
    assert ready.startswith("fmserve is ready: gateway at 127.0.0.1:") and says in ready


def test_the_gateway_keeps_two_batches_in_flight_per_inference_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FMSERVE_GATEWAY_MAX_BATCHES_IN_FLIGHT", raising=False)
    one = Cluster(log_dir=tmp_path)
    gateway = one.replicas_of["gateway"][0]
    assert "FMSERVE_GATEWAY_MAX_BATCHES_IN_FLIGHT" not in one.child_env(gateway)  # default: 2
    three = Cluster(log_dir=tmp_path, replicas={"inference": 3})
    env = three.child_env(three.replicas_of["gateway"][0])
    assert env["FMSERVE_GATEWAY_MAX_BATCHES_IN_FLIGHT"] == "6"
    chosen = Cluster(
        log_dir=tmp_path,
        replicas={"inference": 3},
        env={"FMSERVE_GATEWAY_MAX_BATCHES_IN_FLIGHT": "1"},
    )
    assert chosen.child_env(gateway)["FMSERVE_GATEWAY_MAX_BATCHES_IN_FLIGHT"] == "1"


def test_the_gateway_keeps_two_streams_per_replica_of_its_most_scaled_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FMSERVE_GATEWAY_STAGE_STREAMS", raising=False)
    two = Cluster(log_dir=tmp_path, replicas={"inference": 2})
    gateway = two.replicas_of["gateway"][0]
    assert "FMSERVE_GATEWAY_STAGE_STREAMS" not in two.child_env(gateway)  # default: 4
    scaled = Cluster(log_dir=tmp_path, replicas={"inference": 2, "preprocess": 3})
    env = scaled.child_env(scaled.replicas_of["gateway"][0])
    assert env["FMSERVE_GATEWAY_STAGE_STREAMS"] == "6"
