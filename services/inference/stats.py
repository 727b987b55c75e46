"""Statistics of one loaded model version, in the shape of Triton's ModelStatistics: request,
queue and compute counts with summed durations, since the version was loaded.

What each count counts (perf_analyzer reads them, and refuses compute counts that differ):
    success, fail                   requests (one ModelInfer call each)
    queue                           sequences (batch items), each its wait for a batch
    compute_input/_infer/_output    forward passes, each phase once per pass: the three counts
                                    and execution_count stay equal
    inference_count                 sequences inferred
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class BatchStats:
    """The forward passes of one batch size: one count per pass in each phase."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    inference_count: int = 0
    """Sequences inferred (Triton counts batch items)."""
    execution_count: int = 0
    """Forward passes run."""
    last_inference_ms: int = 0
    """Wall-clock time of the last successful request, in ms since the epoch."""
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    """Forward passes and their phases, by batch size."""

    def record_request(self, ok: bool, ns: int) -> None:
        (self.success if ok else self.fail).add(ns)
        if ok:
            self.last_inference_ms = time.time_ns() // 1_000_000

    def record_queued(self, delays_s: list[float]) -> None:
        for delay in delays_s:
            self.queue.add(int(delay * 1e9))

    def record_batch(self, size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One forward pass of `size` sequences and the nanoseconds of its three phases."""
        self.inference_count += size
        self.execution_count += 1
        for phases in (self, self.batches.setdefault(size, BatchStats())):
            phases.compute_input.add(input_ns)
            phases.compute_infer.add(infer_ns)
            phases.compute_output.add(output_ns)
