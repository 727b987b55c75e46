"""Job chunks, the unit every queue message carries: reading one, splitting one into single
items, and a failed item's answer."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from fmserve.errors import FmserveError
from fmserve.v1 import jobs_pb2


def failure(index: int, error: FmserveError | str) -> jobs_pb2.JobItemResult:
    """A failed item, answered with the error's message as it stands: whoever raises an item's
    error words it for a job's owner ("the text is empty", not "texts[0] is empty")."""
    message = error if isinstance(error, str) else error.message
    return jobs_pb2.JobItemResult(index=index, error=message)


def decode(body: bytes) -> jobs_pb2.JobChunk:
    try:
        return jobs_pb2.JobChunk.FromString(body)
    except DecodeError as exc:
        # An unreadable message can only be dead-lettered: it names no job to fail.
        raise ValueError("a queue message is not a JobChunk") from exc


def singles(chunk: jobs_pb2.JobChunk) -> list[jobs_pb2.JobChunk]:
    """Each item of a chunk alone, as it entered the first stage (its text, or its media)."""
    return [_single(chunk, position) for position in range(len(chunk.indexes))]


def _single(chunk: jobs_pb2.JobChunk, position: int) -> jobs_pb2.JobChunk:
    one = jobs_pb2.JobChunk(
        route=chunk.route,
        indexes=[chunk.indexes[position]],
        submitted_unix_ms=chunk.submitted_unix_ms,
    )
    if chunk.media:
        one.media.append(chunk.media[position])
    else:
        one.texts.append(chunk.texts[position])
    return one
