"""Services never import each other: each imports `fmserve.*`, its own package and libraries.

Read with `ast`, so nothing is imported to check it; a local import inside a function counts too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(10)

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
