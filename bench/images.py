"""Benchmark: ViT image classification in-process against the full cluster.

    python -m bench.images --size small --seconds 20      (also in `make bench`)

A ViT built from a config with random weights (`--size`: tiny 32x32, small = ViT-S/16 224x224,
base = ViT-B/16 224x224) and PIL-drawn JPEGs, all different (cache bypassed, and no two alike
in flight). It measures
1. in-process, with 2 torch threads: decode, the processor steps and the forward pass in
   batches of 32, as the services do it: images/s;
2. the cluster (five processes, `fmserve up`'s code path) under closed-loop load of
   one-image requests at concurrency 32: images/s, p50, p99;
and prints the ratio, since the machine is shared and absolute numbers drift."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import ViTConfig, ViTForImageClassification

from bench.embedding import SYNC_ONLY, Load
from fmserve.cli.cluster import SERVICES, Cluster, free_port
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.preprocess.image_processor import ImageProcessor
from services.preprocess.images import ImageLimits, decode_image

MODEL = "vit-bench"
SIZES = {
    "tiny": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "layers": 2, "heads": 2},
    "small": {"image_size": 224, "patch_size": 16, "hidden_size": 384, "layers": 12, "heads": 6},
    "base": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "layers": 12, "heads": 12},
}
LABELS = 1000
IMAGES = 256
BATCH = 32


def build_model(root: Path, size: str) -> Path:
    """A ViT of `size` with random weights and ViTImageProcessor's config, as model `MODEL`."""
    s = SIZES[size]
    config = ViTConfig(
        image_size=s["image_size"],
        patch_size=s["patch_size"],
        hidden_size=s["hidden_size"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=4 * s["hidden_size"],
        id2label={i: f"class-{i}" for i in range(LABELS)},
        label2id={f"class-{i}": i for i in range(LABELS)},
    )
    folder = root / MODEL / "1"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    ViTForImageClassification(config).eval().save_pretrained(folder)
    processor = {
        "do_resize": True,
        "size": {"height": s["image_size"], "width": s["image_size"]},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    (root / MODEL / "model.toml").write_text('task = "image-classification"\n')
    return folder


def photos(count: int) -> list[bytes]:
    """JPEGs of 320x240 (a thumbnail's size), each different."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        image = Image.new("RGB", (320, 240), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            box = sorted(rng.integers(0, 320, 2)) + sorted(rng.integers(0, 240, 2))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse((box[0], box[2], box[1], box[3]), fill=color)
        draw.text((10, 10), f"image {i}", fill=(255, 255, 255))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def in_process(folder: Path, images: list[bytes], seconds: float, threads: int) -> float:
    """Images/s of decode, processor steps and forward pass, in batches of `BATCH`."""
    torch.set_num_threads(threads)
    model = ViTForImageClassification.from_pretrained(folder).eval()
    processor = ImageProcessor.load(folder)
    limits = ImageLimits(1 << 24, 1 << 26)

    def classify(batch: list[bytes]) -> None:
        pixels = [processor(decode_image(data, "image/jpeg", limits, "x")) for data in batch]
        with torch.inference_mode():
            model(pixel_values=torch.from_numpy(np.stack(pixels))).logits.softmax(-1)

    classify(images[:BATCH])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        offset = done % len(images)
        classify((images * 2)[offset : offset + BATCH])
        done += BATCH
    return done / (time.perf_counter() - start)


async def closed_loop(address: str, images: list[bytes], concurrency: int, seconds: float) -> Load:
    """`concurrency` clients each sending one one-image request after another."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        # top-5, as ImageNet classifiers are read: all 1000 labels would be the answer's cost
        policy = common_pb2.CACHE_POLICY_BYPASS
        options = gateway_pb2.InferOptions(cache_policy=policy, top_k=5)
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop_at:
                media = common_pb2.Media(mime_type="image/jpeg", data=images[i % len(images)])
                request = gateway_pb2.InferRequest(model=MODEL, media=[media], options=options)
                start = time.perf_counter()
                await stub.Infer(request, timeout=60)
                latencies.append((time.perf_counter() - start) * 1e3)
                i += concurrency  # no two workers send the same image at once

        warm = common_pb2.Media(mime_type="image/jpeg", data=images[0])
        await stub.Infer(gateway_pb2.InferRequest(model=MODEL, media=[warm]), timeout=120)
        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return Load(len(latencies), time.perf_counter() - start, latencies)


def start_cluster(root: Path) -> Cluster:
    ports = {name: free_port() for name in SERVICES}
    env = {
        **SYNC_ONLY,
        "FMSERVE_MODEL_REPOSITORY": str(root),
        "FMSERVE_INFERENCE_PRELOAD": MODEL,
        "FMSERVE_LOG_LEVEL": "WARNING",
        "FMSERVE_CACHE_KEY_PREFIX": f"fmserve-bench-{uuid.uuid4().hex[:8]}:",
    }
    log_dir = Path(tempfile.mkdtemp(prefix="fmserve-bench-"))
    cluster = Cluster(env=env, ports=ports, log_dir=log_dir, say=lambda _: None)
    cluster.start()
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fmserve-bench-images-"))
    folder = build_model(root, args.size)
    images = photos(IMAGES)
    baseline = in_process(folder, images, args.seconds, args.threads)
    cluster = start_cluster(root)
    try:
        address = cluster.address("gateway")
        load = asyncio.run(closed_loop(address, images, args.concurrency, args.seconds))
    finally:
        cluster.stop()
    print(f"\nViT {args.size}: in-process (batches of {BATCH}, {args.threads} threads) ", end="")
    print(f"{baseline:.1f} images/s")
    print(
        f"cluster c={args.concurrency}: {load.rate:.1f} images/s   p50 {load.pct(0.5):.1f} ms   "
        f"p99 {load.pct(0.99):.1f} ms"
    )
    print(f"cluster/in-process at c={args.concurrency}: {load.rate / baseline:.2f}   [>= 0.7]")


if __name__ == "__main__":
    main()
