"""What each public RPC needs of the caller's key, derived from its request: the scopes (every
one), the model and how many items (for admission), and what was asked (for the audit log).

Deny by default: a method without a rule here is refused to every key, so a new RPC cannot be
added unprotected (tests/unit/test_gateway_auth.py checks every Gateway method has a rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fmserve.core.tasks import TASK_FROM_WIRE, TaskName
from fmserve.errors import PermissionDenied
from services.gateway import scopes

TaskOf = Callable[[str], str]
"""A model's own task ('' for a model the gateway does not know)."""


@dataclass(frozen=True)
class Access:
    scopes: tuple[str, ...]
    model: str = ""
    items: int = 0
    asked: dict[str, Any] = field(default_factory=dict)


class AccessTable:
    def __init__(self, task_of: TaskOf) -> None:
        self.task_of = task_of
        self.rules: dict[str, Callable[[Any], Access]] = {
            "Infer": self._infer,
            "Generate": self._generate,
            "ListModels": lambda _: Access((scopes.INFER,)),
            "SubmitJob": self._submit,
            "GetJob": _job(scopes.JOBS_READ),
            "GetJobResults": _job(scopes.JOBS_READ),
            "WatchJob": _job(scopes.JOBS_READ),
            "CancelJob": _job(scopes.JOBS_SUBMIT),
            "ListJobs": lambda _: Access((scopes.JOBS_READ,)),
            "CreateApiKey": _admin,
            "ListApiKeys": _admin,
            "RevokeApiKey": _admin,
        }

    def access(self, method: str, request: Any) -> Access:
        rule = self.rules.get(method)
        if rule is None:
            raise PermissionDenied(f"{method} has no access rule, so it is refused to every key")
        return rule(request)

    def _infer_scope(self, request: Any) -> str:
        task = TASK_FROM_WIRE.get(request.task)
        return scopes.infer_scope(
            request.model, task.value if task else self.task_of(request.model)
        )

    def _infer(self, request: Any) -> Access:
        needed = self._infer_scope(request)
        asked = {"model": request.model, "items": len(request.texts)}
        return Access((needed,), request.model, len(request.texts), asked)

    def _generate(self, request: Any) -> Access:
        """One item per generation: the tokens it will produce are not known when it is
        admitted, so daily quotas count generations, not tokens (yet)."""
        needed = scopes.infer_scope(request.model, TaskName.TEXT_GENERATION.value)
        return Access((needed,), request.model, 1, {"model": request.model, "items": 1})

    def _submit(self, request: Any) -> Access:
        """Checked on the stream's first message, its header."""
        header = request.header if request is not None else None
        if header is None or request.WhichOneof("part") != "header":
            return Access((scopes.JOBS_SUBMIT, scopes.infer_scope("", "")))
        needed = (scopes.JOBS_SUBMIT, self._infer_scope(header))
        asked = {"model": header.model, "items": header.expected_items}
        return Access(needed, header.model, header.expected_items, asked)


def _job(needed: str) -> Callable[[Any], Access]:
    return lambda request: Access((needed,), asked={"job_id": request.job_id})


def _admin(request: Any) -> Access:
    asked = {"name": getattr(request, "name", "")}
    if scopes_asked := list(getattr(request, "scopes", [])):
        asked["scopes"] = scopes_asked
    return Access((scopes.ADMIN,), asked=asked)
