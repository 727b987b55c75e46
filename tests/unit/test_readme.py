"""The README stays true: its configuration tables are `fmserve config`'s output, and its first
lines give the two commands that set up and run the cluster and the tests."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from fmserve.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def test_configuration_tables_match_the_settings_classes() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["config"]) == 0
    section = re.search(r"fmserve config`; [^\n]*-->\n(.*)\n<!-- end", README.read_text(), re.S)
    assert section, "README lost its generated configuration section"
    assert section.group(1).strip() == out.getvalue().strip(), "run `fmserve config` into README"


def test_the_two_commands_come_first() -> None:
    head = README.read_text().split("## ")[0]
    assert "make up" in head and "make test" in head
