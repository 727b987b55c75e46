"""The gateway's routing (services/gateway/routes.py) and result cache keys (cache_keys.py).

Routing reads only configs, so the repository here is written in tmp_path: a model.toml and a
config.json with id2label per model, no weights.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from fmserve.core.repository import ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.errors import InvalidInput, ModelNotFound, TooLarge, Unavailable, WrongTask
from services.gateway.cache_keys import cache_key
from services.gateway.routes import Route, Router

pytestmark = pytest.mark.timeout(10)

EMBEDDING, CLASSIFICATION, TOKENS = (
    TaskName.EMBEDDING,
    TaskName.TEXT_CLASSIFICATION,
    TaskName.TOKEN_CLASSIFICATION,
)


def write_model(root: Path, name: str, task: str, versions: list[str], labels: list[str]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(f'task = "{task}"\n')
    config = {"hidden_size": 8, "id2label": {str(i): label for i, label in enumerate(labels)}}
    for version in versions:
        (folder / version).mkdir()
        (folder / version / "config.json").write_text(json.dumps(config))


@pytest.fixture
def router(tmp_path: Path) -> Router:
    write_model(tmp_path, "sentiment", "text-classification", ["1", "2"], ["neg", "pos"])
    write_model(tmp_path, "embedder", "embedding", ["1"], [])
    write_model(tmp_path, "ner", "token-classification", ["3"], ["O", "B-PER", "I-PER"])
    return Router(ModelRepository(tmp_path), max_items=3, max_text_chars=10)


# --- Router.route ----------------------------------------------------------------------------


def test_route_uses_the_models_task_and_default_version(router: Router) -> None:
    route = router.route("sentiment", "", None, truncate=True, top_k=1)
    assert route == Route("sentiment", "2", CLASSIFICATION, truncate=True, top_k=1)


def test_route_to_an_explicit_version_and_task(router: Router) -> None:
    route = router.route("sentiment", "1", CLASSIFICATION, truncate=False, top_k=0)
    assert (route.version, route.task) == ("1", CLASSIFICATION)


def test_top_k_only_matters_for_text_classification(router: Router) -> None:
    assert router.route("embedder", "", None, False, 5).top_k == 0
    assert router.route("ner", "", TOKENS, False, 5).top_k == 0
    assert router.route("sentiment", "", None, False, 5).top_k == 5


def test_missing_model_is_invalid_input(router: Router) -> None:
    with pytest.raises(InvalidInput, match="model is required") as caught:
        router.route("", "", None, False, 0)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_model_is_not_found_and_names_the_served_models(router: Router) -> None:
    with pytest.raises(ModelNotFound) as caught:
        router.route("gpt-17", "", None, False, 0)
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    message = str(caught.value)
    assert "gpt-17" in message
    assert all(name in message for name in ("embedder", "ner", "sentiment"))


def test_wrong_task_names_what_the_model_does(router: Router) -> None:
    with pytest.raises(WrongTask) as caught:
        router.route("embedder", "", CLASSIFICATION, False, 0)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "embedding" in str(caught.value)
    assert "text-classification" in str(caught.value)


def test_unknown_version_is_not_found_and_lists_the_versions(router: Router) -> None:
    with pytest.raises(ModelNotFound, match="available: 1, 2") as caught:
        router.route("sentiment", "9", None, False, 0)
    assert caught.value.code is grpc.StatusCode.NOT_FOUND


def test_negative_top_k_is_invalid_input(router: Router) -> None:
    with pytest.raises(InvalidInput, match="top_k"):
        router.route("sentiment", "", None, False, -1)


def test_models_lists_every_config(router: Router) -> None:
    assert [m.name for m in router.models()] == ["embedder", "ner", "sentiment"]


# --- Router.check_texts ----------------------------------------------------------------------


def test_texts_within_the_limits_pass(router: Router) -> None:
    router.check_texts(["a", "b", "x" * 10])


def test_empty_list_is_invalid_input(router: Router) -> None:
    with pytest.raises(InvalidInput, match="texts is empty"):
        router.check_texts([])


@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_blank_text_is_named_by_its_index(router: Router, blank: str) -> None:
    with pytest.raises(InvalidInput, match=r"texts\[1\] is empty"):
        router.check_texts(["fine", blank])


def test_too_many_texts_is_too_large(router: Router) -> None:
    with pytest.raises(TooLarge, match=r"4 texts.*limit is 3") as caught:
        router.check_texts(["a", "b", "c", "d"])
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_too_many_characters_names_the_text_and_the_limit(router: Router) -> None:
    with pytest.raises(InvalidInput, match=r"texts\[2\] has 11 characters; the limit is 10"):
        router.check_texts(["a", "b", "x" * 11])


# --- cache keys ------------------------------------------------------------------------------

ROUTE = Route("sentiment", "2", CLASSIFICATION, truncate=False, top_k=0)


def test_cache_key_is_stable_for_equal_inputs() -> None:
    twin = Route("sentiment", "2", CLASSIFICATION, truncate=False, top_k=0)
    assert cache_key(ROUTE, "hello") == cache_key(twin, "hello")


@pytest.mark.parametrize(
    "changed",
    [
        replace(ROUTE, model="other"),
        replace(ROUTE, version="1"),
        replace(ROUTE, task=TOKENS),
        replace(ROUTE, truncate=True),
        replace(ROUTE, top_k=1),
    ],
    ids=["model", "version", "task", "truncate", "top_k"],
)
def test_cache_key_changes_with_everything_that_changes_an_answer(changed: Route) -> None:
    assert cache_key(changed, "hello") != cache_key(ROUTE, "hello")


def test_cache_key_changes_with_the_text() -> None:
    assert cache_key(ROUTE, "hello") != cache_key(ROUTE, "hello ")


def test_cache_key_names_model_and_version_but_not_the_text() -> None:
    key = cache_key(ROUTE, "a private sentence")
    assert "sentiment" in key
    assert ":2:" in key
    assert "private" not in key


def test_a_broken_model_toml_is_unavailable_and_left_out_of_the_list(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.toml").write_text('task = "translation"\n')
    router = Router(ModelRepository(tmp_path), max_items=8, max_text_chars=100)
    with pytest.raises(Unavailable, match="model 'broken' cannot be served") as caught:
        router.route("broken", "", None, False, 0)
    assert str(tmp_path) not in caught.value.message
    assert router.models() == []


# --- lanes -----------------------------------------------------------------------------------


def test_a_lane_keeps_what_changes_the_work_and_drops_per_text_options() -> None:
    """One batcher per lane: routes that differ only in top_k share it, truncation does not
    (it changes tokenization)."""
    assert replace(ROUTE, top_k=7).lane == ROUTE.lane == replace(ROUTE, top_k=0)
    assert replace(ROUTE, truncate=True).lane != ROUTE.lane
