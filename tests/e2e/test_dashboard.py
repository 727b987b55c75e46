"""The Grafana dashboard against a real Prometheus (Debian's `prometheus` package) scraping every
replica of the e2e cluster and RabbitMQ's exporter. After a little traffic through the public
client (calls, one error of each common kind, a small job), every query of every panel, and the
model variable's, returns at least one series, and a number (not only NaN) in one: an empty
query is a panel showing "No data", which reads as a broken exporter rather than as "nothing
went wrong"."""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from fmserve import Client
from fmserve.cli.cluster import SERVICES, Cluster
from fmserve.client import TrafficPolicy
from fmserve.errors import InvalidInput, ModelNotFound, NotFound, TooLarge, WrongTask
from tests.conftest import require_binary, require_server
from tests.deployment import all_panels, dashboards
from tests.e2e.conftest import MAX_ITEMS
from tests.images import drawn, encoded
from tests.prometheus import SCRAPE_INTERVAL_S, Prometheus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

# RabbitMQ's own exporter (the rabbitmq_prometheus plugin): per-queue series on this path.
RABBITMQ_EXPORTER = ("127.0.0.1", 15692, "/metrics/per-object")
# Grafana's interval variables; the test puts one window over all its traffic in their place.
INTERVALS = ("$__rate_interval", "$__interval", "$__range")


@dataclass(frozen=True)
class Query:
    where: str
    """The dashboard, the panel's title and the target's legend (or the variable's name)."""
    expr: str
    """As the dashboard writes it: Grafana's variables and functions included."""
    variables: tuple[tuple[str, str], ...]
    """The dashboard's template variables, each set to "All"."""

    def promql(self, window: str) -> str:
        """The query as Grafana sends it: intervals → `window`, a variable → its value, and
        `label_values(metric, label)` → the series it reads its values from."""
        label_values = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", self.expr)
        if label_values:
            return f"count by ({label_values[2]}) ({label_values[1]})"
        expr = self.expr
        for interval in INTERVALS:
            expr = expr.replace(interval, window)
        values = dict(self.variables)
        return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m[1]], expr)


def dashboard_queries(name: str, dashboard: dict[str, Any]) -> list[Query]:
    variables = dashboard.get("templating", {}).get("list", [])
    values = tuple((v["name"], v.get("allValue", ".*")) for v in variables)
    found = [
        Query(f"{name} {panel['title']}: {target.get('legendFormat', '')}", target["expr"], values)
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    found += [Query(f"{name} ${v['name']}", v["query"]["query"], values) for v in variables]
    return found


QUERIES = [q for name, d in dashboards().items() for q in dashboard_queries(name, d)]


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = require_binary("prometheus", "prometheus")
    targets: dict[str, list[str]] = {}
    for replica in cluster.all():
        targets.setdefault(replica.service, []).append(f"127.0.0.1:{replica.metrics_port}")
    replicas = len(cluster.all())
    host, port, path = RABBITMQ_EXPORTER
    targets["rabbitmq"] = [f"{host}:{port}"]  # down where the plugin is off (see the test)
    server = Prometheus(binary, tmp_path_factory.mktemp("prometheus"), targets, {"rabbitmq": path})
    server.start()
    try:
        # Every replica scraped before any traffic: counters start from what they were.
        up = f'count(up{{job=~"{"|".join(SERVICES)}"}} == 1) == {replicas}'
        assert server.wait_for(up), "Prometheus cannot scrape every replica"
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def window(prometheus: Prometheus, gateway_address: str) -> str:
    """Two rounds of traffic through the public client, each scraped before the next; returns a
    range over both. The first round brings the series that appear with their first event (a
    model's first call, a code's first error), which rate() cannot see; the second is traffic as
    a running cluster's panels show it."""
    started = time.time()
    with Client(gateway_address) as client:
        for _ in range(2):
            send_traffic(client)
            ended = time.time()
            assert prometheus.wait_for(f"min(timestamp(up)) > {ended + SCRAPE_INTERVAL_S}")
    return f"{math.ceil(time.time() - started) + 4 * SCRAPE_INTERVAL_S}s"


def send_traffic(client: Client) -> None:
    tag = uuid.uuid4().hex[:8]
    texts = [f"a sentence for the dashboard ({tag}, {i})" for i in range(3)]
    for _ in range(3):
        client.embed(texts, model="minilm-embed")  # a miss, then hits
        client.embed(texts, model="minilm-embed", cache="bypass")
        client.classify(texts, model="minilm-sentiment")
        client.classify(texts, model="tiny-classifier")
        client.classify_images([encoded(drawn(seed=1))], model="tiny-vit", cache="bypass")
        # Sampled (temperature > 0, no seed), so never a cache hit: the engine runs each time.
        client.generate(f"a prompt ({tag})", model="tiny-llama", max_new_tokens=4, temperature=1)
    for call, error in (
        (lambda: client.embed(["x"], model="no-such-model"), ModelNotFound),
        (lambda: client.embed([]), InvalidInput),
        (lambda: client.embed(["x"], model="tiny-classifier"), WrongTask),
        (lambda: client.embed(["x"] * (MAX_ITEMS + 1)), TooLarge),
        (lambda: client.job("no-such-job").status(), NotFound),
    ):
        with pytest.raises(error):
            call()
    job = client.submit([f"a job item ({tag}, {i})" for i in range(5)], "minilm-embed")
    assert job.wait(timeout=60).state == "succeeded"
    send_rollout_traffic(client, tag)


def send_rollout_traffic(client: Client, tag: str) -> None:
    """A canary and a shadow of tiny-classifier, then a rollback: the Rollouts row's series.
    Its stable version is the default one, so the model serves as before once rolled back."""
    policy = TrafficPolicy("tiny-classifier", stable="2", canary="1", canary_percent=50)
    client.set_traffic_policy(replace(policy, shadow="1"))
    for i in range(10):
        client.classify(f"a canary text ({tag}, {i})", model="tiny-classifier")
    assert client.rollback("tiny-classifier").state == "rolled_back"


@pytest.mark.parametrize("query", QUERIES, ids=[q.where for q in QUERIES])
def test_every_dashboard_query_returns_a_series(
    prometheus: Prometheus, window: str, query: Query
) -> None:
    if "rabbitmq_" in query.expr:
        host, port, _ = RABBITMQ_EXPORTER
        require_server("RabbitMQ's Prometheus exporter (rabbitmq_prometheus)", host, port)
    promql = query.promql(window)
    result = prometheus.query(promql)
    assert result, f"{query.where} shows no data: {promql}"
    values = [float(series["value"][1]) for series in result]
    assert not all(math.isnan(v) for v in values), f"{query.where} is only NaN: {promql}"


def test_jobs_are_counted_in_every_state_they_enter(prometheus: Prometheus, window: str) -> None:
    entered = {
        series["metric"]["state"]: float(series["value"][1])
        for series in prometheus.query(
            f"sum by (state) (increase(fmserve_cache_jobs_total[{window}]))"
        )
    }
    for state in ("QUEUED", "RUNNING", "SUCCEEDED"):
        assert entered.get(state, 0) >= 0.5, f"{state} not counted: {entered}"
