"""Rollouts through the five services (issue 12): a model with four versions is added to the
running cluster's repository (1 and 2 differ in weights, 3 has corrupt weights, 4 crashes on
texts over 128 tokens), and its traffic policy is set, promoted and rolled back through the
gateway's admin RPCs while requests flow."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fmserve.cli import commands
from fmserve.cli.cluster import Cluster
from fmserve.client import Client, Guard, TrafficPolicy
from fmserve.errors import Conflict, FmserveError
from tests.e2e.conftest import metric
from tests.models import build_classifier

pytestmark = pytest.mark.timeout(300)

MODEL = "rollout-classifier"
SHORT = "the service was quick and friendly"
LONG = "word " * 200  # 202 tokens: versions 1 and 2 take 512, version 4 only 128


@pytest.fixture(scope="module")
def client(gateway_address: str, model_repository: Path) -> Iterator[Client]:
    folder = model_repository / MODEL
    build_classifier(folder / "1", seed=11, positions=512)
    build_classifier(folder / "2", seed=12, positions=512)
    shutil.copytree(folder / "1", folder / "3")
    (folder / "3" / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 64)
    build_classifier(folder / "4", seed=14, positions=128)
    (folder / "model.toml").write_text(
        'task = "text-classification"\nmax_length = 256\n[batching]\nmax_batch_size = 8\n'
    )
    with Client(gateway_address, timeout=60) as client:
        # every service rereads the repository on its own poll: wait until all have seen it
        wait_until(lambda: answers(client), timeout_s=30)
        yield client
    shutil.rmtree(folder)


def answers(client: Client) -> bool:
    try:
        client.infer(SHORT, MODEL, version="1")
    except FmserveError:
        return False
    return True


def wait_until(done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def rounded(labels: list) -> list[tuple[str, float]]:
    """A classification, to 3 decimals: texts batched with others may differ in the last bits."""
    return [(s.label, round(s.score, 3)) for s in labels]


def policy(**fields: object) -> TrafficPolicy:
    return TrafficPolicy(MODEL, **{"stable": "1", **fields})  # type: ignore[arg-type]


def version_of(client: Client, text: str = SHORT, **options: object) -> str:
    return client.infer(text, MODEL, **options).version  # type: ignore[arg-type]


def test_a_canary_of_10_percent_gets_10_percent_of_requests(client: Client) -> None:
    set_to = client.set_traffic_policy(policy(canary="2", canary_percent=10))
    assert (set_to.state, set_to.state_version) == ("serving", "2")
    versions = Counter(version_of(client) for _ in range(2000))
    assert set(versions) == {"1", "2"}
    assert abs(versions["2"] / 2000 - 0.10) <= 0.025, versions
    rows = {row.version: row for row in client.model_versions(MODEL)}
    assert (rows["1"].traffic_percent, rows["2"].traffic_percent) == (90.0, 10.0)
    assert rows["1"].requests >= versions["1"] and rows["2"].state == "READY"


def test_a_pinned_request_ignores_the_policy(client: Client) -> None:
    client.set_traffic_policy(policy(canary="2", canary_percent=100))
    assert {version_of(client) for _ in range(20)} == {"2"}
    assert {version_of(client, version="1") for _ in range(20)} == {"1"}


def test_sticky_keys_always_reach_the_same_version(client: Client) -> None:
    client.set_traffic_policy(policy(canary="2", canary_percent=50, sticky=True))
    seen: dict[str, set[str]] = {}
    for round_ in range(3):
        for user in range(60):
            version = version_of(client, f"{SHORT} {round_}", routing_key=f"user-{user}")
            seen.setdefault(f"user-{user}", set()).add(version)
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert {v for versions in seen.values() for v in versions} == {"1", "2"}


class Hammer:
    """Requests one after another on a few threads, each noted (start time, version, error)."""

    def __init__(self, client: Client, threads: int = 3) -> None:
        self.client = client
        self.answers: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Hammer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            started, n = time.monotonic(), n + 1
            try:
                answer = self.client.infer(f"{SHORT} {index} {n}", MODEL)
                self.answers.append((started, answer.version, ""))
            except FmserveError as exc:
                self.answers.append((started, "", exc.message))

    def versions_since(self, since: float) -> set[str]:
        return {version for started, version, _ in self.answers if started >= since}

    @property
    def errors(self) -> list[str]:
        return [error for _, _, error in self.answers if error]


def test_promote_and_rollback_take_effect_within_a_second_with_no_failed_request(
    client: Client,
) -> None:
    client.set_traffic_policy(policy(canary="2", canary_percent=30))
    with Hammer(client) as hammer:
        time.sleep(1.5)
        promoted_at = time.monotonic()
        promoted = client.promote(MODEL)
        time.sleep(2.5)
        rolled_back_at = time.monotonic()
        rolled_back = client.rollback(MODEL)
        time.sleep(2.5)
    assert (promoted.stable, promoted.previous, promoted.canary) == ("2", "1", "")
    assert (rolled_back.stable, rolled_back.state) == ("1", "rolled_back")
    assert hammer.errors == []
    between = {v for started, v, _ in hammer.answers if promoted_at + 1 <= started < rolled_back_at}
    assert between == {"2"}
    assert hammer.versions_since(rolled_back_at + 1.0) == {"1"}
    assert len(hammer.answers) > 30


def test_a_version_with_corrupt_weights_never_gets_traffic(client: Client) -> None:
    client.set_traffic_policy(policy())
    with pytest.raises(Conflict, match=r"version 3 .* FAILED"):
        client.set_traffic_policy(policy(canary="3", canary_percent=50))
    kept = client.traffic_policy(MODEL)
    assert (kept.state, kept.state_version, kept.canary) == ("failed", "3", "")
    assert kept.reason
    assert {version_of(client) for _ in range(100)} == {"1"}
    row = {row.version: row for row in client.model_versions(MODEL)}["3"]
    assert row.traffic_percent == 0 and row.requests == 0


def test_a_canary_answering_errors_is_rolled_back_on_its_own(
    client: Client, cluster: Cluster
) -> None:
    guard = Guard(max_error_ratio=0.2, window_s=30, min_requests=10)
    client.set_traffic_policy(policy(canary="4", canary_percent=50, guard=guard))
    before = metric(
        cluster, "gateway", "fmserve_gateway_rollbacks_total", model=MODEL, reason="error_ratio"
    )
    canary_errors = 0
    deadline = time.monotonic() + 30
    while client.traffic_policy(MODEL).canary:
        assert time.monotonic() < deadline, "the guard did not roll the canary back"
        try:
            version_of(client, LONG)
        except FmserveError:
            canary_errors += 1
    rolled = client.traffic_policy(MODEL)
    assert (rolled.state, rolled.state_version) == ("rolled_back", "4")
    assert "error ratio" in rolled.reason
    assert canary_errors >= 10
    after = metric(
        cluster, "gateway", "fmserve_gateway_rollbacks_total", model=MODEL, reason="error_ratio"
    )
    assert after == before + 1
    assert {version_of(client, LONG) for _ in range(30)} == {"1"}


def test_shadow_answers_are_counted_and_never_returned(client: Client, cluster: Cluster) -> None:
    client.set_traffic_policy(policy(shadow="2"))
    copies = dict(model=MODEL, version="2", outcome="ok")
    before = metric(cluster, "gateway", "fmserve_gateway_shadow_requests_total", **copies)
    texts = [f"shadowed text {i}" for i in range(40)]
    answers = [rounded(client.classify(t, MODEL, cache="bypass")[0]) for t in texts]
    pinned = [rounded(client.classify(t, MODEL, version="1", cache="bypass")[0]) for t in texts]
    assert answers == pinned  # the stable version's answers, never the shadow's
    other = [rounded(client.classify(t, MODEL, version="2", cache="bypass")[0]) for t in texts]
    assert answers != other
    wait_until(
        lambda: (
            metric(cluster, "gateway", "fmserve_gateway_shadow_requests_total", **copies)
            >= before + 40
        ),
        timeout_s=10,
    )


def test_a_job_submitted_during_a_rollout_is_answered_by_one_version(client: Client) -> None:
    client.set_traffic_policy(policy(canary="2", canary_percent=50))
    texts = [f"job text {i}" for i in range(24)]
    reference = {
        v: [rounded(client.classify(t, MODEL, version=v, cache="bypass")[0]) for t in texts]
        for v in "12"
    }
    jobs = [client.submit(texts, MODEL) for _ in range(12)]
    versions = set()
    for job in jobs:
        status = job.wait(timeout=120)
        assert status.state == "succeeded" and status.version in reference
        results = [rounded(item.result) for item in job.results()]
        assert results == reference[status.version]
        versions.add(status.version)
    assert versions == {"1", "2"}  # 12 jobs all drawing one version: a chance in 2048


def test_the_cli_rolls_out_shows_versions_promotes_and_rolls_back(
    client: Client, gateway_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def fmserve(*argv: str) -> str:
        assert commands.main(["--address", gateway_address, *argv]) == 0
        return capsys.readouterr().out

    client.set_traffic_policy(policy())
    out = fmserve("rollout", MODEL, "--version", "2", "--canary", "20", "--sticky")
    assert "canary 2 at 20% (sticky by routing key)" in out and "SERVING" in out
    lines = fmserve("models", "--versions").splitlines()
    mine = {line.split()[1]: line for line in lines if line.startswith(MODEL)}
    assert set(mine) == {"1", "2", "3", "4"}
    assert "READY" in mine["1"] and "80%" in mine["1"] and "20%" in mine["2"]
    assert "FAILED" in mine["3"]
    assert fmserve("rollout", MODEL, "--promote").startswith(f"{MODEL}: stable 2")
    assert fmserve("rollback", MODEL).startswith(f"{MODEL}: stable 1")
    assert (
        commands.main(
            ["--address", gateway_address, "rollout", MODEL, "--version", "3", "--canary", "5"]
        )
        == 1
    )
    assert "FAILED" in capsys.readouterr().err


def test_generate_streams_are_counted_for_the_version_that_answered(
    client: Client, cluster: Cluster
) -> None:
    counted = dict(model="tiny-llama", version="1", outcome="ok")
    before = metric(cluster, "gateway", "fmserve_gateway_version_requests_total", **counted)
    generation = client.generate(
        "count me", model="tiny-llama", max_new_tokens=4, routing_key="user-1", cache="bypass"
    )
    assert generation.version == "1"
    assert (
        metric(cluster, "gateway", "fmserve_gateway_version_requests_total", **counted)
        == before + 1
    )
