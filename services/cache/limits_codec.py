"""Rate limit messages ↔ the limit store's dataclasses (services/cache/limits.py)."""

from __future__ import annotations

from fmserve.v1 import limits_pb2
from services.cache.limits import Admission, Bucket, Reason, Verdict

_REASON_TO_WIRE = {
    Reason.ADMITTED: limits_pb2.LIMIT_REASON_UNSPECIFIED,
    Reason.RATE: limits_pb2.LIMIT_REASON_RATE,
    Reason.CONCURRENCY: limits_pb2.LIMIT_REASON_CONCURRENCY,
    Reason.QUOTA: limits_pb2.LIMIT_REASON_QUOTA,
}


def admission_to_domain(request: limits_pb2.Claim) -> Admission:
    return Admission(
        key_id=request.key_id,
        buckets=[bucket_to_domain(b) for b in request.buckets],
        max_concurrency=request.max_concurrency,
        call_id=request.call_id,
        lease_ms=request.lease_ms,
        daily_items=request.daily_items,
        items=request.items,
    )


def verdict_to_wire(verdict: Verdict) -> limits_pb2.Verdict:
    return limits_pb2.Verdict(
        admitted=verdict.admitted,
        reason=_REASON_TO_WIRE[verdict.reason],
        bucket=verdict.bucket,
        retry_after_ms=verdict.retry_after_ms,
        items_used=verdict.items_used,
        day=verdict.day,
        taken=verdict.taken,
    )


def bucket_to_domain(bucket: limits_pb2.Bucket) -> Bucket:
    return Bucket(bucket.name, bucket.per_minute, bucket.burst, max(1, bucket.take))
