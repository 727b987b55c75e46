"""The client's audio items: what a path, WAV/FLAC bytes and numpy waveforms become on the wire,
and how the CLI tells audio files from images and texts (images: test_images_units.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile

from fmserve.client import media


def encoded(samples: np.ndarray, rate: int, container: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=container)
    return buffer.getvalue()


def test_wav_and_flac_bytes_are_sniffed_whatever_their_name(tmp_path: Path) -> None:
    clip = np.zeros(1600, dtype=np.float32)
    wav, flac = encoded(clip, 16_000, "WAV"), encoded(clip, 16_000, "FLAC")
    misnamed = tmp_path / "clip.bin"
    misnamed.write_bytes(flac)

    assert media.to_wire(wav).mime_type == "audio/wav"
    assert media.to_wire(misnamed).mime_type == "audio/flac"
    assert media.to_wire(flac).data == flac


def test_a_waveform_travels_as_float32_pcm_with_its_rate_and_channels() -> None:
    stereo = np.arange(12, dtype=np.int16).reshape(6, 2)

    item = media.to_wire(stereo, sample_rate=8_000)

    assert (item.mime_type, item.sample_rate, item.channels) == ("audio/pcm", 8_000, 2)
    assert item.sample_format == "f32le"
    np.testing.assert_array_equal(np.frombuffer(item.data, "<f4"), stereo.ravel())
    assert [m.channels for m in media.items_to_wire([stereo[:, 0]] * 3, 8_000)] == [1, 1, 1]
    assert len(media.items_to_wire(stereo, 8_000)) == 1  # one clip's channels, not two clips


@pytest.mark.parametrize(
    ("waveform", "rate", "problem"),
    [
        (np.zeros(10), 0, "pass sample_rate="),
        (np.zeros((2, 2, 2)), 16_000, "shape [2, 2, 2]"),
        (np.zeros(0), 16_000, "not empty"),
    ],
)
def test_a_waveform_without_its_rate_or_shape_is_refused(
    waveform: np.ndarray, rate: int, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[")):
        media.to_wire(waveform, sample_rate=rate)


def test_the_cli_tells_audio_and_image_files_from_texts(tmp_path: Path) -> None:
    clip, photo = tmp_path / "a.WAV", tmp_path / "b.png"
    clip.write_bytes(b"x")
    photo.write_bytes(b"x")

    assert media.kind_of_path(str(clip)) == "audio"
    assert media.kind_of_path(str(photo)) == "image"
    assert media.kind_of_path("hello.wav") == ""  # no such file: a text
    assert media.kind_of_path("a sentence") == ""
