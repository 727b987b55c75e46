"""Every service has the same shape (house style, habit 2): `__main__.py` registers the servicer
that `server.py`'s `servicer()` builds, wire ↔ domain conversions live in `codec` (a module, or a
package where one would be too long), and Prometheus metrics in `metrics.py` only.

Read with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(10)

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p.parent for p in (ROOT / "services").glob("*/__init__.py"))
IDS = [s.name for s in SERVICES]


def _tree(source: Path) -> ast.Module:
    return ast.parse(source.read_text(), filename=str(source))


def _imports(source: Path) -> set[str]:
    found = set()
    for node in ast.walk(_tree(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("service", SERVICES, ids=IDS)
def test_a_service_has_the_shared_modules(service: Path) -> None:
    for module in ("__main__.py", "server.py", "settings.py"):
        assert (service / module).is_file(), f"{service.name} has no {module}"
    assert (service / "codec.py").is_file() != (service / "codec" / "__init__.py").is_file()


@pytest.mark.parametrize("service", SERVICES, ids=IDS)
def test_server_builds_the_servicer_and_main_registers_it(service: Path) -> None:
    functions = {
        node.name: node
        for node in _tree(service / "server.py").body
        if isinstance(node, ast.FunctionDef)
    }
    assert "servicer" in functions, f"{service.name}/server.py has no servicer()"
    assert ast.unparse(functions["servicer"].returns or ast.Constant(None)) == "Servicer"
    calls = [
        node
        for node in ast.walk(_tree(service / "__main__.py"))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "servicer"
    ]
    assert calls, f"{service.name}/__main__.py does not call servicer()"


@pytest.mark.parametrize("service", SERVICES, ids=IDS)
def test_metrics_are_defined_in_metrics_py_only(service: Path) -> None:
    defining = [
        str(source.relative_to(ROOT))
        for source in sorted(service.rglob("*.py"))
        if source.name != "metrics.py" and "prometheus_client" in _imports(source)
    ]
    assert defining == []
