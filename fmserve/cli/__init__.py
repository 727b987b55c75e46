"""The `fmserve` command (`commands`) and the local cluster supervisor behind `fmserve up`
(`cluster`)."""

from fmserve.cli.commands import main

__all__ = ["main"]
