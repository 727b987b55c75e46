"""The model repository watched by a running cluster: a model folder and then a version folder
copied in are listed by the gateway (ListModels) and the inference service (RepositoryIndex)
within a few seconds, without touching model.toml, and answer requests."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton

from fmserve import Client
from fmserve.cli.cluster import Cluster
from fmserve.errors import NotFound

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MODEL = "watched-classifier"
SEEN_WITHIN_S = 6.0
"""The services reread the repository every 2 s (FMSERVE_REPOSITORY_POLL_S)."""


@pytest.fixture
def watched_model(model_repository: Path) -> Iterator[Path]:
    """A folder for a model added while the cluster runs; removed afterwards, as the session's
    other tests share the repository."""
    folder = model_repository / MODEL
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def copy_in(source: Path, target: Path) -> None:
    """Copied beside it, then renamed into place: the folder appears whole, as the README says
    to add one."""
    staging = target.parent / f".{target.name}.partial"
    shutil.copytree(source, staging)
    staging.rename(target)


def within(seconds: float, check: Callable[[], bool]) -> None:
    """Wait for `check` to become true; fails after `seconds`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"not seen within {seconds} s"
        time.sleep(0.1)


def test_a_version_folder_copied_in_is_listed_and_served_without_touching_model_toml(
    cluster: Cluster, gateway_address: str, model_repository: Path, watched_model: Path
) -> None:
    source = model_repository / "tiny-classifier"
    watched_model.mkdir()
    copy_in(source / "1", watched_model / "1")
    (watched_model / "model.toml").write_text((source / "model.toml").read_text())
    stamp = (watched_model / "model.toml").stat().st_mtime_ns
    inference = triton.InferenceServerClient(cluster.address("inference"))

    def indexed() -> set[str]:
        index = inference.get_model_repository_index(as_json=True).get("models", [])
        return {m.get("version", "") for m in index if m["name"] == MODEL}

    with Client(gateway_address) as client:

        def listed() -> list[str]:
            return next((m.versions for m in client.models() if m.name == MODEL), [])

        def answered_by() -> str:
            """The version that answers; "" while a service has not seen the model yet (each
            rereads the repository on its own clock)."""
            try:
                return client.infer(["a text"], model=MODEL, cache="bypass").version
            except NotFound:
                return ""

        within(SEEN_WITHIN_S, lambda: listed() == ["1"] and answered_by() == "1")

        copy_in(source / "2", watched_model / "2")
        within(SEEN_WITHIN_S, lambda: set(listed()) == indexed() == {"1", "2"})
        assert (watched_model / "model.toml").stat().st_mtime_ns == stamp
        # the new default version loads on request, and answers once it is READY
        within(30, lambda: answered_by() == "2")
    inference.close()
