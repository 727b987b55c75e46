"""Test speech, synthesised by espeak-ng (Debian's `espeak-ng`), written as a WAV file at its
own rate (22.05 kHz): preprocess resamples it to the model's."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import require_binary


def spoken(text: str, folder: Path) -> Path:
    """A WAV file of `text` spoken by espeak-ng, in `folder`."""
    espeak = require_binary("espeak-ng", "espeak-ng")
    path = folder / "speech.wav"
    subprocess.run([espeak, "-w", str(path), text], check=True, timeout=30)
    return path
