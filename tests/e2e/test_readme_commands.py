"""The README's raw gRPC commands, run as printed (grpcurl, a generic reflection client) against
the running cluster, with only the gateway's address changed."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def raw_grpc_commands() -> list[str]:
    """The commands of the README's "Raw gRPC" section, continuation lines joined."""
    section = README.read_text().split("### Raw gRPC", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's Raw gRPC section lost its commands"
    return [c.strip() for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def run(command: str, gateway_address: str) -> str:
    args = shlex.split(command.replace("localhost:50051", gateway_address))
    assert args[0] == ".venv/bin/grpcurl"
    args[0] = str(Path(sys.executable).parent / "grpcurl")  # the venv running these tests
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, f"{command}\n{result.stderr}"
    return result.stdout


def test_the_readme_shows_a_listing_and_a_call() -> None:
    commands = raw_grpc_commands()
    assert [c.split()[-1] for c in commands] == ["list", "fmserve.v1.Gateway/Infer"]


def test_grpcurl_lists_the_public_api(gateway_address: str) -> None:
    listing = run(raw_grpc_commands()[0], gateway_address).split()
    assert "fmserve.v1.Gateway" in listing
    assert "grpc.health.v1.Health" in listing


def test_grpcurl_calls_infer(gateway_address: str) -> None:
    reply = json.loads(run(raw_grpc_commands()[1], gateway_address))
    labels = reply["results"][0]["classification"]["labels"]
    assert labels[0]["label"] == "positive"
    assert reply["model"] == "minilm-sentiment"
