"""`fmserve models --versions`: every version of the models with its state and memory (from
the inference service), its share of traffic (from the policy) and its recent requests and
errors (this gateway's own counts, outcomes.py)."""

from __future__ import annotations

from fmserve.core.repository import version_order
from fmserve.v1 import policy_pb2
from services.gateway.inference_admin import InferenceAdmin, VersionState
from services.gateway.outcomes import RECENT_S, Outcomes
from services.gateway.policies import PolicyBook
from services.gateway.routes import Router


class ModelVersions:
    def __init__(
        self, router: Router, inference: InferenceAdmin, book: PolicyBook, outcomes: Outcomes
    ) -> None:
        self.router = router
        self.inference = inference
        self.book = book
        self.outcomes = outcomes

    async def list(self, model: str = "") -> list[policy_pb2.ModelVersion]:
        """Every version of `model` ('' every model), oldest first."""
        configs = [self.router.repository.get(model)] if model else self.router.models()
        index, memory = await self.inference.index(), await self.inference.memory()
        rows = []
        for config in configs:
            default = config.default_version
            for version in sorted(config.versions, key=version_order):
                state = index.get((config.name, version), VersionState("UNKNOWN"))
                row = self._row(config.name, version, default, state)
                row.memory_bytes = memory.get((config.name, version), 0)
                rows.append(row)
        return rows

    def _row(
        self, model: str, version: str, default: str, state: VersionState
    ) -> policy_pb2.ModelVersion:
        split = self.book.split(model)
        shares = split.shares() if split else {default: 100.0}
        requests, errors = self.outcomes.recent(model, version)
        return policy_pb2.ModelVersion(
            model=model,
            version=version,
            state=state.state,
            reason=state.reason,
            traffic_percent=shares.get(version, 0.0),
            shadow=bool(split and split.shadow == version),
            requests=requests,
            errors=errors,
            window_s=RECENT_S,
        )
