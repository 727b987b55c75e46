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
from fmserve.v1 import common_pb2
from services.gateway import scopes

TaskOf = Callable[[str], str]
"""A model's own task ('' for a model the gateway does not know)."""
TokensOf = Callable[[str], tuple[int, int]]
"""A generation model's (default, cap) of max_new_tokens ((0, 0) for a model the gateway does
not know, or one that does not generate)."""


@dataclass(slots=True)
class Access:
    """Read, never changed (not frozen: a frozen dataclass is slower to build, on every call)."""

    scopes: tuple[str, ...]
    model: str = ""
    items: int = 0
    asked: dict[str, Any] = field(default_factory=dict)
    metered: bool = False
    """`items` is a reserve, settled to what the call spends (a generation's tokens)."""
    counted: bool = True
    """False for a job that does not say how many items it sends: a key with a daily quota
    may not submit one (its items could not be charged when it is admitted)."""


class AccessTable:
    def __init__(self, task_of: TaskOf, tokens_of: TokensOf) -> None:
        self.task_of = task_of
        self.tokens_of = tokens_of
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
            "SetTrafficPolicy": _admin_of_model,
            "GetTrafficPolicy": _admin_of_model,
            "Promote": _admin_of_model,
            "Rollback": _admin_of_model,
            "ListModelVersions": _admin_of_model,
        }

    def access(self, method: str, request: Any) -> Access:
        rule = self.rules.get(method)
        if rule is None:
            raise PermissionDenied(f"{method} has no access rule, so it is refused to every key")
        return rule(request)

    def _task(self, model: str, wire_task: common_pb2.Task) -> str:
        """The task a request asks for: its own, or else its model's."""
        task = TASK_FROM_WIRE.get(wire_task)
        return task.value if task else self.task_of(model)

    def _infer(self, request: Any) -> Access:
        model = request.model  # each read of a message's field builds it anew: once
        needed = scopes.infer_scope(model, self._task(model, request.task))
        items = len(request.texts) + len(request.media)  # an image counts as a text does
        return Access((needed,), model, items, {"model": model, "items": items})

    def generation_tokens(self, model: str, max_new_tokens: int, items: int = 1) -> int:
        """The tokens `items` generations reserve of their key's daily quota when admitted:
        max_new_tokens each (0: the model's default), at most the model's cap (a request over
        it is refused by the generation itself, which gives the reserve back)."""
        default, cap = self.tokens_of(model)
        return items * min(max_new_tokens or default, cap)

    def _generate(self, request: Any) -> Access:
        """A generation reserves its max_new_tokens: the completion tokens it will produce are
        not known when it is admitted, and it gives back what it does not produce."""
        needed = scopes.infer_scope(request.model, TaskName.TEXT_GENERATION.value)
        tokens = self.generation_tokens(request.model, request.parameters.max_new_tokens)
        asked = {"model": request.model, "tokens": tokens}
        return Access((needed,), request.model, tokens, asked, metered=True)

    def _submit(self, request: Any) -> Access:
        """Checked on the stream's first message, its header."""
        header = request.header if request is not None else None
        if header is None or request.WhichOneof("part") != "header":
            return Access((scopes.JOBS_SUBMIT, scopes.infer_scope("", "")))
        task = self._task(header.model, header.task)
        needed = (scopes.JOBS_SUBMIT, scopes.infer_scope(header.model, task))
        items = header.expected_items
        if task == TaskName.TEXT_GENERATION.value:
            # each prompt reserves its max_new_tokens; a job is charged once, never settled
            items = self.generation_tokens(header.model, header.parameters.max_new_tokens, items)
        asked = {"model": header.model, "items": header.expected_items}
        return Access(needed, header.model, items, asked, counted=header.expected_items > 0)


def _job(needed: str) -> Callable[[Any], Access]:
    return lambda request: Access((needed,), asked={"job_id": request.job_id})


def _admin_of_model(request: Any) -> Access:
    """Traffic policies and model versions: admin, audited with the model (and the policy)."""
    model = request.policy.model if hasattr(request, "policy") else request.model
    return Access((scopes.ADMIN,), asked={"model": model})


def _admin(request: Any) -> Access:
    asked = {"name": getattr(request, "name", "")}
    if scopes_asked := list(getattr(request, "scopes", [])):
        asked["scopes"] = scopes_asked
    return Access((scopes.ADMIN,), asked=asked)
