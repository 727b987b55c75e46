"""A real Prometheus for tests: Debian's `prometheus` binary scraping given targets every second,
with its own data folder and port, and its HTTP query API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from fmserve.cli.cluster import free_port

SCRAPE_INTERVAL_S = 1


class Prometheus:
    """`targets` maps a job name to its host:port targets; `paths` a job to its metrics path."""

    def __init__(
        self,
        binary: str,
        folder: Path,
        targets: dict[str, list[str]],
        paths: dict[str, str] | None = None,
    ) -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.targets = targets
        self.paths = paths or {}
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        config = self.folder / "prometheus.yml"
        config.write_text(yaml.safe_dump(self._config()))
        log = (self.folder / "prometheus.log").open("ab")
        self._process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self._wait_ready(timeout_s)

    def _config(self) -> dict[str, Any]:
        interval = f"{SCRAPE_INTERVAL_S}s"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": self.paths.get(job, "/metrics"),
                    "static_configs": [{"targets": targets}],
                }
                for job, targets in self.targets.items()
            ],
        }

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited; see {self.folder / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(self._url("/-/ready"), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready in {timeout_s} s")

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) an expression evaluates to now."""
        url = self._url("/api/v1/query?" + urllib.parse.urlencode({"query": expression}))
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expression!r}: {exc.read().decode()}") from None
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expression: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """The expression's result once it is not empty."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expression)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(SCRAPE_INTERVAL_S / 4)

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
