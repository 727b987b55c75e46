"""Services never import each other: each imports `fmserve.*`, its own package and libraries.
The shared core never imports or names a service; the client and the health check load no
server code.

Read with `ast`, so nothing is imported to check it; a local import inside a function counts too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p.parent for p in (ROOT / "services").glob("*/__init__.py"))
PROJECT_PACKAGES = {"fmserve", "services", "tests"}


def imported_modules(source: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import; relative ones stay in the package."""
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def forbidden_imports(service: Path, root: Path = ROOT) -> list[str]:
    own = f"services.{service.name}"
    found = []
    for source in sorted(service.rglob("*.py")):
        for line, module in imported_modules(source):
            top = module.split(".")[0]
            if top in PROJECT_PACKAGES and top != "fmserve" and not _within(module, own):
                found.append(f"{source.relative_to(root)}:{line} imports {module}")
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_there_are_services_to_check() -> None:
    assert SERVICES, "no services/*/__init__.py found"


@pytest.mark.parametrize("service", SERVICES, ids=[s.name for s in SERVICES])
def test_a_service_imports_only_fmserve_and_itself(service: Path) -> None:
    assert forbidden_imports(service) == []


def test_the_check_catches_a_service_importing_another(tmp_path: Path) -> None:
    service = tmp_path / "services" / "alpha"
    service.mkdir(parents=True)
    (service / "__init__.py").write_text("")
    (service / "ok.py").write_text(
        "import fmserve.errors\nfrom services.alpha import ok\nfrom . import sibling\nimport os\n"
    )
    (service / "bad.py").write_text(
        "from services.beta.server import X\n"
        "def f():\n    import services.betamax\n"
        "from services import gamma\nimport tests.models\n"
    )
    found = forbidden_imports(service, root=tmp_path)
    assert sorted(found) == [
        "services/alpha/bad.py:1 imports services.beta.server",
        "services/alpha/bad.py:3 imports services.betamax",
        "services/alpha/bad.py:4 imports services",
        "services/alpha/bad.py:5 imports tests.models",
    ]


# --- the shared core names no service -------------------------------------------------------


def service_references(package: Path, root: Path = ROOT) -> list[str]:
    """Imports of `services` and strings naming a service module (for `importlib` or
    `python -m`): the shared core learns of services only through their entry points."""
    found = []
    for source in sorted(package.rglob("*.py")):
        where = source.relative_to(root)
        for line, module in imported_modules(source):
            if module.split(".")[0] == "services":
                found.append(f"{where}:{line} imports {module}")
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if named := _service_named(node):
                found.append(f"{where}:{node.lineno} names {named}")
    return found


def _service_named(node: ast.AST) -> str:
    """A string constant (an f-string's literal parts included) that begins `services.`."""
    if isinstance(node, ast.Constant) and str(node.value).startswith("services."):
        return str(node.value)
    return ""


def test_the_shared_core_never_names_a_service() -> None:
    assert service_references(ROOT / "fmserve") == []


def test_the_core_check_catches_dynamic_imports(tmp_path: Path) -> None:
    core = tmp_path / "fmserve"
    core.mkdir()
    (core / "bad.py").write_text(
        "import importlib\n"
        "def settings(name):\n"
        "    return importlib.import_module(f'services.{name}.settings')\n"
        "RUN = ['python', '-m', 'services.gateway']\n"
        "from services.cache import settings\n"
    )
    assert sorted(service_references(core, root=tmp_path)) == [
        "fmserve/bad.py:3 names services.",
        "fmserve/bad.py:4 names services.gateway",
        "fmserve/bad.py:5 imports services.cache",
    ]


def test_every_service_registers_its_settings() -> None:
    from fmserve.cli.cluster import SERVICES
    from fmserve.core.settings import ServiceSettings, service_module, settings_class

    for name in SERVICES:
        cls = settings_class(name)
        assert issubclass(cls, ServiceSettings)
        assert cls.model_config["env_prefix"] == f"FMSERVE_{name.upper()}_"
        assert service_module(name) == f"services.{name}"


# --- the client stays light -----------------------------------------------------------------

# What a client-only install does not have: the server side's packages and modules.
SERVER_SIDE = (
    "prometheus_client",
    "opentelemetry",
    "grpc_reflection.v1alpha",
    "grpc_health.v1.health",
    "aio_pika",
    "redis",
    "torch",
    "transformers",
    "tokenizers",
    "tritonclient",
    "pydantic_settings",
    "rich",
    "services",
    "fmserve.rpc.service",
    "fmserve.rpc.interceptors",
    "fmserve.core.settings",
    "fmserve.queue",
)


@pytest.mark.parametrize(
    "module", ["fmserve", "fmserve.client", "fmserve.errors", "fmserve.rpc.healthcheck"]
)
def test_the_client_and_health_check_load_no_server_code(module: str) -> None:
    code = f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = json.loads(result.stdout)
    heavy = [m for m in loaded if any(m == s or m.startswith(s + ".") for s in SERVER_SIDE)]
    assert heavy == [], f"importing {module} loads server-side modules"
