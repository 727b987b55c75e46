"""Benchmark: minilm-embed on ONNX Runtime (fp32 and int8) against torch, in-process.

    python -m bench.onnx --rounds 15

It exports the bundled model twice (`fmserve export`: ONNX fp32, ONNX int8) into a temporary
repository, loads each version through the inference service's own runner (padding, backend,
mean pooling, normalisation), with torch fp32 and torch int8 (dynamic quantisation) beside them,
2 threads each, and times
- a batch of 32 sentences, and
- one sentence alone,
interleaved: every round runs each variant in turn, so a load that comes and goes on the shared
machine falls on all of them alike. It prints medians, their ratio to torch fp32 (the baseline
of the same run) and each variant's cosine to torch fp32 on the batch (the export's gate reads
the mean). With `--cluster-seconds S` it then serves the same repository with the five services
and sends single-sentence requests (cache bypassed) at concurrency 1 and 32 to each version,
interleaved, S seconds each."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# Before torch loads (the export imports it): the service's wait policy, so that torch's threads
# sleep between regions as the service's do (spinning slowed models 6-23x on this shared machine),
# as onnxruntime's do with spinning off.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from fmserve.core.repository import ModelRepository
from fmserve.export.quality import SAMPLE
from fmserve.export.version import ExportRequest, export_version

MODEL = "minilm-embed"
BUNDLED = Path(__file__).resolve().parent.parent / "models" / MODEL
# torch's variants as versions of the same model: the bundled source is version 1
TORCH_FP32 = '\n[versions.1.runtime]\nprecision = "fp32"\n'


def repository(root: Path) -> dict[str, str]:
    """The variants' versions: torch fp32 and int8 (two model folders), ONNX fp32 and int8."""
    shutil.copytree(BUNDLED, root / MODEL)
    with (root / MODEL / "model.toml").open("a") as toml:
        toml.write(TORCH_FP32)
    for quantize in ("", "int8"):
        request = ExportRequest(model=MODEL, repository=root, quantize=quantize)
        export_version(request, say=lambda line: print("  " + line))
    torch_int8 = root / "minilm-torch-int8"
    shutil.copytree(BUNDLED, torch_int8)
    with (torch_int8 / "model.toml").open("a") as toml:
        toml.write('\n[versions.1.runtime]\nprecision = "int8"\ndevice = "cpu"\n')
    return {"torch fp32": "1", "onnx fp32": "2", "onnx int8": "3", "torch int8": "int8"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, both backends")
    parser.add_argument(
        "--cluster-seconds", type=float, default=0.0, help="per cluster measurement; 0: none"
    )
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from services.inference import onnx_backend
    from services.inference.loading import configure_threads
    from services.inference.runner import Runner

    configure_threads(args.threads, 1)
    onnx_backend.configure_threads(args.threads, 1, spinning=False)
    with tempfile.TemporaryDirectory(prefix="fmserve-bench-onnx-") as tmp:
        root = Path(tmp)
        print("exporting (ONNX fp32, ONNX int8):")
        versions = repository(root)
        repo = ModelRepository(root)
        runners = {}
        for name, version in versions.items():
            if version == "int8":
                runners[name] = Runner.load(repo.get("minilm-torch-int8"), "1")
            else:
                runners[name] = Runner.load(repo.get(MODEL), version)
        tokenizer = AutoTokenizer.from_pretrained(repo.get(MODEL).files("1"))
        batch = [np.asarray(tokenizer(t)["input_ids"], dtype=np.int64) for t in SAMPLE[:32]]
        single = batch[:1]
        reference = np.stack(runners["torch fp32"].forward(batch).outputs)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for workload, sequences in (("batch of 32", batch), ("one sentence", single)):
                for name, runner in runners.items():
                    started = time.perf_counter()
                    runner.forward(sequences)
                    times.setdefault((workload, name), []).append(time.perf_counter() - started)
        report(runners, times, batch, reference)
        if args.cluster_seconds:
            through_cluster(root, versions, args.cluster_seconds)


def report(
    runners: dict[str, Any],
    times: dict[tuple[str, str], list[float]],
    batch: list[np.ndarray],
    reference: np.ndarray,
) -> None:
    print(f"\n{'variant':<12} {'workload':<13} {'median ms':>10} {'vs torch fp32':>14}")
    for workload in ("batch of 32", "one sentence"):
        base = statistics.median(times[(workload, "torch fp32")])
        for name in runners:
            median = statistics.median(times[(workload, name)])
            print(f"{name:<12} {workload:<13} {median * 1000:>10.1f} {base / median:>13.2f}x")
    print("\ncosine to torch fp32 on the batch (mean / worst):")
    for name, runner in runners.items():
        vectors = np.stack(runner.forward(batch).outputs)
        cosines = (vectors * reference).sum(axis=1)
        print(f"  {name:<12} {cosines.mean():.6f} / {cosines.min():.6f}")


def through_cluster(root: Path, versions: dict[str, str], seconds: float) -> None:
    """Requests per second through the cluster, per version, with the ratio to torch fp32."""
    import asyncio

    from bench.embedding import closed_loop, start_cluster

    served = {name: v for name, v in versions.items() if v.isdigit()}  # minilm-embed's versions
    cluster = start_cluster({"FMSERVE_MODEL_REPOSITORY": str(root)})
    try:
        address = cluster.address("gateway")
        for version in served.values():  # load each version before timing it
            asyncio.run(closed_loop(address, 1, 0.5, repeat=False, version=version))
        loads: dict[tuple[int, str], list[float]] = {}
        for _ in range(2):
            for concurrency in (1, 32):
                for name, version in served.items():
                    load = asyncio.run(
                        closed_loop(address, concurrency, seconds, repeat=False, version=version)
                    )
                    loads.setdefault((concurrency, name), []).append(load.rate)
    finally:
        cluster.stop()
    print(f"\nthrough the cluster, req/s (mean of 2 rounds of {seconds:.0f} s):")
    for concurrency in (1, 32):
        base = statistics.mean(loads[(concurrency, "torch fp32")])
        for name in served:
            rate = statistics.mean(loads[(concurrency, name)])
            print(f"  c={concurrency:<3} {name:<12} {rate:8.1f}   {rate / base:.2f}x")


if __name__ == "__main__":
    main()
