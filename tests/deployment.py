"""What the deployment tests read: the compose files with their `${VAR:-default}` values, the
Prometheus and Grafana configuration, the metric names a dashboard's PromQL uses, the README's
metrics table, a Prometheus text scrape, and a service's settings as it would read them from
an environment."""

from __future__ import annotations

import importlib
import json
import os
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
GPU_FILE = COMPOSE_DIR / "compose.gpu.yaml"
PROMETHEUS_FILE = COMPOSE_DIR / "prometheus" / "prometheus.yml"
DASHBOARD_DIR = COMPOSE_DIR / "grafana" / "dashboards"
README = ROOT / "README.md"

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """A value as compose sees it when no `.env` sets anything: `${VAR:-default}` → default."""
    if not isinstance(value, str):
        return value
    env = env or {}
    return _VARIABLE.sub(lambda m: env.get(m[1]) or m[2] or "", value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment (mapping or list form), interpolated, as strings."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {key: str(interpolate(value)) for key, value in raw.items()}


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARD_DIR.glob("*.json")}


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets, annotations and variables."""
    found: list[str] = []
    for panel in all_panels(dashboard.get("panels", [])):
        found += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    found += [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        found.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return [e for e in found if e]


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels, and those inside collapsed rows."""
    return [p for panel in panels for p in (panel, *all_panels(panel.get("panels", [])))]


# What is not a metric name in PromQL: strings, label matchers, ranges, grouping clauses,
# function calls, keywords and numbers.
_STRIP = (
    re.compile(r'"(?:[^"\\]|\\.)*"'),
    re.compile(r"\{[^}]*\}"),
    re.compile(r"\[[^\]]*\]"),
    re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"),
)
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
_NAME = re.compile(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()")


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression (or `label_values(metric, label)`) selects."""
    label_values = re.fullmatch(r"\s*label_values\(\s*([\w:]+)\s*,.*\)\s*", expression)
    if label_values:
        return {label_values[1]}
    for pattern in _STRIP:
        expression = pattern.sub(" ", expression)
    return {name for name in _NAME.findall(expression) if name.lower() not in _KEYWORDS}


def readme_metrics() -> list[str]:
    """The metric names in the README's "Metrics" table (first column, in backticks)."""
    return re.findall(r"^\| `(fmserve_\w+)`", _metrics_section(), re.M)


def readme_gauges() -> set[str]:
    """The metrics of that table whose type column says gauge."""
    return set(re.findall(r"^\| `(fmserve_\w+)`[^|]*\| gauge \|", _metrics_section(), re.M))


def _metrics_section() -> str:
    return README.read_text().split("\n### Metrics", 1)[1].split("\n#", 1)[0]


def scrape(port: int, **labels: str) -> dict[str, float]:
    """One /metrics page: each sample name (`_total`, `_count`, … included) with the sum of its
    values over the label sets that match `labels` (a value starting with "!" excludes it); a
    declared family without samples yet appears with 0."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for suffix in _DECLARED.get(family.type, ("",)):
            totals.setdefault(family.name + suffix, 0.0)
        for sample in family.samples:
            if all(_matches(sample.labels.get(k), v) for k, v in labels.items()):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


# The sample names a family declares before its first observation.
_DECLARED = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}


def _matches(value: str | None, wanted: str) -> bool:
    return value != wanted[1:] if wanted.startswith("!") else value == wanted


def settings_class(service: str) -> type[BaseSettings]:
    module = importlib.import_module(f"services.{service}.settings")
    cls: type[BaseSettings] = getattr(module, f"{service.capitalize()}Settings")
    return cls


def settings_of(service: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's settings as it would read them from this environment (and nothing else)."""
    with monkeypatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("FMSERVE_")]:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        return settings_class(service)()
