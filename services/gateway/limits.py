"""Per-key limits at the gateway: the `Admission` that the auth interceptor enters around every
authorized call. The limits themselves live in Redis behind the cache service (shared by every
gateway replica); this module decides which ones a call claims, keeps its concurrency slot for
as long as it runs, gives the slot back on every path, and turns a refusal into an error.

- Rate: a token bucket per key, `rpm` tokens at most (a burst of a full minute), refilled at
  rpm / 60 per second; and, with `FMSERVE_GATEWAY_KEY_MODEL_RPM`, one per key and model. A
  busy key's calls spend tokens this replica leased ahead (leases.py): one check per lease.
- Concurrency: a slot per running call, `max_concurrency` at once, leased for
  `limits_slot_lease_s` and renewed while the call runs, so a crashed gateway's slots free
  themselves.
- Quota: `daily_items` items per UTC day, counted when a call is admitted: texts, and for a
  generation its completion tokens: it reserves max_new_tokens (or the model's default) when
  admitted, and gives back what it did not generate when it ends, on every path (finish,
  error, cancel, deadline). Completion only: the prompt's tokens are not known until
  preprocess has run, and what a key spends is bounded by what it asks for.

A key with no limit at all is admitted without any call to the cache service: an outage of the
cache service or Redis neither slows nor blocks it. A key with limits fails closed: when its
limits cannot be checked the call is refused UNAVAILABLE, because an outage must not open the
gates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from fmserve.errors import FmserveError, RateLimited, Unavailable
from fmserve.v1 import limits_pb2
from services.gateway.leases import LEASE_S, Leases, lease_size
from services.gateway.limits_client import LimitsClient
from services.gateway.metrics import LIMIT_REFUSALS
from services.gateway.principal import ADMITTED, Meter, Principal

log = logging.getLogger("fmserve.gateway.limits")

KEY_BUCKET = "key"
MODEL_BUCKET = "model:"
# Longest model name kept in a bucket's Redis key: the name comes from the client.
MAX_MODEL_CHARS = 128


class KeyLimits:
    """The gateway's `Admission`: per-key rate, concurrency and daily item limits."""

    def __init__(self, client: LimitsClient, slot_lease_s: float, key_model_rpm: int) -> None:
        self.client = client
        self.lease_ms = max(1, int(slot_lease_s * 1000))
        self.key_model_rpm = key_model_rpm
        self.leases = Leases()
        self._held: dict[str, str] = {}  # call id → key id, renewed until released
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.client.start()
        self._tasks = [
            asyncio.create_task(self._renew_forever()),
            asyncio.create_task(self._end_leases_forever()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for refund in self.leases.ended(everything=True):
            self.client.give_back(refund)
        await self.client.stop()

    def admit(
        self, principal: Principal, model: str, items: int, metered: Meter | None = None
    ) -> AbstractAsyncContextManager[None]:
        buckets = self._buckets(principal, model)
        if not (buckets or principal.max_concurrency or principal.daily_items):
            return ADMITTED  # no limits: no call to the cache service
        if _tokens_only(principal, items) and self.leases.spend(principal.key_id, buckets):
            return ADMITTED  # a token of each bucket held: no call either, nor a Claim built
        claim = self.claim(principal, model, items)
        assert claim is not None
        return self._admitted(principal, claim, metered)

    @contextlib.asynccontextmanager
    async def _admitted(
        self, principal: Principal, claim: limits_pb2.Claim, metered: Meter | None
    ) -> AsyncIterator[None]:
        verdict = await self._enter(principal, claim, metered is not None)
        try:
            yield
        finally:
            if claim.max_concurrency:
                self._release(claim.key_id, claim.call_id)
            if metered is not None and (unused := claim.items - metered.spent) > 0:
                self.client.refund(claim.key_id, verdict.day, unused)

    def claim(self, principal: Principal, model: str, items: int) -> limits_pb2.Claim | None:
        """What a call by this key claims from its limits; None when the key has none."""
        names = self._buckets(principal, model)
        if not (names or principal.max_concurrency or principal.daily_items):
            return None
        tokens_only = _tokens_only(principal, items)
        buckets = []
        for name in names:
            per_minute = principal.rpm if name == KEY_BUCKET else self.key_model_rpm
            take = lease_size(per_minute) if tokens_only else 1
            # burst: a full minute's worth, as documented
            buckets.append(
                limits_pb2.Bucket(name=name, per_minute=per_minute, burst=per_minute, take=take)
            )
        return limits_pb2.Claim(
            key_id=principal.key_id,
            buckets=buckets,
            max_concurrency=principal.max_concurrency,
            call_id=uuid.uuid4().hex if principal.max_concurrency else "",
            lease_ms=self.lease_ms,
            daily_items=principal.daily_items,
            items=items if principal.daily_items else 0,
        )

    def _buckets(self, principal: Principal, model: str) -> tuple[str, ...]:
        """The names of the token buckets a call of `model` by this key takes from."""
        key = (KEY_BUCKET,) if principal.rpm > 0 else ()
        if self.key_model_rpm > 0 and model:
            return (*key, MODEL_BUCKET + model[:MAX_MODEL_CHARS])
        return key

    async def _enter(
        self, principal: Principal, claim: limits_pb2.Claim, metered: bool
    ) -> limits_pb2.Verdict:
        asking = self.leases.ask(claim)
        try:
            reply = await self.client.admit(claim)
        except BaseException as exc:
            self.leases.asked(asking)
            # The slot may have been taken before the answer was lost (or the caller left).
            if claim.max_concurrency:
                self._release(claim.key_id, claim.call_id)
            if isinstance(exc, Unavailable):
                LIMIT_REFUSALS.labels(principal.name, "unavailable").inc()
            raise
        self.leases.asked(asking)
        if not reply.admitted:
            reason, error = refusal(principal, claim, reply, metered)
            LIMIT_REFUSALS.labels(principal.name, reason).inc()
            raise error
        if claim.max_concurrency:
            self._held[claim.call_id] = claim.key_id
        self.leases.keep(claim, reply)
        return reply

    def _release(self, key_id: str, call_id: str) -> None:
        """Give the slot back without holding up the call's answer (its lease is the backstop)."""
        self._held.pop(call_id, None)
        self.client.release(key_id, call_id)

    async def _end_leases_forever(self) -> None:
        """Give back what ended leases did not spend."""
        while True:
            await asyncio.sleep(LEASE_S / 2)
            for refund in self.leases.ended():
                self.client.give_back(refund)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            slots = [(key_id, call_id) for call_id, key_id in self._held.items()]
            if not slots:
                continue
            try:
                await self.client.renew(slots, self.lease_ms)
            except FmserveError as exc:
                log.warning(
                    "could not renew %d concurrency slots (a slot lapses unrenewed): %s",
                    len(slots),
                    exc,
                )


_REASONS = {
    limits_pb2.LIMIT_REASON_RATE: "rate",
    limits_pb2.LIMIT_REASON_CONCURRENCY: "concurrency",
    limits_pb2.LIMIT_REASON_QUOTA: "quota",
}


def _tokens_only(principal: Principal, items: int) -> bool:
    """Whether a call claims nothing but tokens: no slot, no quota items (only such a call
    may be admitted from a lease)."""
    return not (principal.max_concurrency or (items and principal.daily_items))


def refusal(
    principal: Principal, claim: limits_pb2.Claim, reply: limits_pb2.Verdict, metered: bool
) -> tuple[str, RateLimited]:
    """The metric's reason and the error a refused call gets: which limit, and when to retry."""
    reason = _REASONS.get(reply.reason, "rate")
    after = reply.retry_after_ms
    key = f"API key {principal.name!r}"
    if reason == "concurrency":
        message = f"{key} already has {principal.max_concurrency} calls running, its limit"
    elif reason == "quota":
        message = _quota_message(key, principal.daily_items, reply.items_used, claim.items, metered)
    elif reply.bucket.startswith(MODEL_BUCKET):
        reason = "model_rate"
        model = reply.bucket.removeprefix(MODEL_BUCKET)
        rpm = claim.buckets[-1].per_minute  # the model's bucket comes last
        message = f"{key} is over the limit of {rpm} requests per minute to model {model!r}"
    else:
        message = f"{key} is over its limit of {principal.rpm} requests per minute"
    return reason, RateLimited(f"{message}; retry in {after} ms", after)


def _quota_message(key: str, daily: int, used: int, items: int, metered: bool) -> str:
    brings = (
        f"this generation reserves {items} tokens (max_new_tokens)"
        if metered
        else f"this call brings {items}"
    )
    if items > daily:
        advice = "ask for fewer tokens" if metered else "split it"
        return (
            f"{key} may use {daily} items a day (a generation's tokens count as items), and "
            f"{brings}: {advice}; the quota resets at 00:00 UTC"
        )
    return f"{key} has used {used} of its {daily} items today (UTC) and {brings}"
