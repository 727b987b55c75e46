"""The `fmserve` command: run a local cluster, call models, list them.

    fmserve up                                  the cluster as local processes
    fmserve models                              what the cluster serves
    fmserve embed --model minilm-embed "text"   vectors
    fmserve classify --model minilm-sentiment "I love it"
    fmserve entities --model my-ner "Ada lives in London"

Add --json to any call for machine-readable output."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fmserve.client import Client
from fmserve.cluster import PORT_ORDER, SERVICES, Cluster, ClusterError, check_ports, check_redis
from fmserve.errors import FmserveError
from fmserve.settings import DEFAULT_REPOSITORY, ClientSettings, RepositorySettings, variables

_CLUSTER_WIDE = {"FMSERVE_LOG_LEVEL", "FMSERVE_LOG_FORMAT", "FMSERVE_MODEL_REPOSITORY"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except FmserveError as exc:
        print(f"error ({exc.code.name}): {exc.message}", file=sys.stderr)
        return 1
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    settings = ClientSettings()
    parser = argparse.ArgumentParser(prog="fmserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=settings.address, help="gateway address")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole cluster as local processes")
    up.add_argument("--replicas", default="", help="e.g. inference=2,preprocess=2")
    up.add_argument("--log-dir", type=Path, default=Path(".fmserve/logs"))
    up.add_argument(
        "--base-port", type=int, default=50051, help="gateway port; the stages take the next four"
    )
    up.set_defaults(run=_up, settings=settings)

    models = commands.add_parser("models", help="list the models served")
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=_models)

    config = commands.add_parser("config", help="every environment variable, with its default")
    config.set_defaults(run=_config)

    for name, helptext in (
        ("embed", "one vector per text"),
        ("classify", "labels with scores per text"),
        ("entities", "labelled spans per text"),
    ):
        call = commands.add_parser(name, help=helptext)
        call.add_argument("texts", nargs="+", metavar="TEXT")
        call.add_argument("--model", required=name != "embed", default="minilm-embed")
        call.add_argument("--version", default="")
        call.add_argument(
            "--truncate", action="store_true", help="cut texts over the model's limit"
        )
        call.add_argument("--cache", choices=["use", "bypass", "refresh"], default="use")
        call.add_argument("--top-k", type=int, default=0)
        call.add_argument("--json", action="store_true")
        call.set_defaults(run=_call, task=name)
    return parser


def _call(args: argparse.Namespace) -> None:
    task = {
        "embed": "embedding",
        "classify": "text-classification",
        "entities": "token-classification",
    }
    with Client(args.address) as client:
        answer = client.infer(
            args.texts,
            args.model,
            task=task[args.task],
            version=args.version,
            truncate=args.truncate,
            top_k=args.top_k,
            cache=args.cache,
        )
    if args.json:
        payload = {**asdict(answer), "results": [_jsonable(r) for r in answer.results]}
        print(json.dumps(payload))
        return
    print(
        f"{answer.model} v{answer.version} ({answer.task}){' [cached]' if answer.cache_hit else ''}"
    )
    for text, result in zip(args.texts, answer.results, strict=True):
        print(f"\n{text!r}")
        print(_readable(result))


def _jsonable(result: Any) -> Any:
    if isinstance(result, np.ndarray):
        return result.tolist()
    return [asdict(item) for item in result]


def _readable(result: Any) -> str:
    if isinstance(result, np.ndarray):
        head = ", ".join(f"{v:+.4f}" for v in result[:6])
        return f"  [{head}, …]  ({result.shape[0]} dimensions, norm {np.linalg.norm(result):.3f})"
    if not result:
        return "  (nothing found)"
    if hasattr(result[0], "start"):
        return "\n".join(
            f"  {e.label:<8} {e.score:.3f}  [{e.start}:{e.end}] {e.text!r}" for e in result
        )
    return "\n".join(f"  {s.label:<16} {s.score:.4f}" for s in result)


def _models(args: argparse.Namespace) -> None:
    with Client(args.address) as client:
        models = client.models()
    if args.json:
        print(json.dumps([asdict(m) for m in models]))
        return
    for m in models:
        detail = f"{m.dimensions} dimensions" if m.task == "embedding" else ", ".join(m.labels)
        print(f"{m.name:<24} {m.task:<22} versions {','.join(m.versions):<8} {detail}")


def _config(args: argparse.Namespace) -> None:
    """Every variable as Markdown tables (the README's Configuration section is this output)."""
    _table("`fmserve` CLI and `fmserve up`", variables(ClientSettings))
    common = [
        (env if env in _CLUSTER_WIDE else env.replace("FMSERVE_", "FMSERVE_<SERVICE>_", 1), d, doc)
        for env, d, doc in variables(RepositorySettings)
    ]
    _table(
        "Every service (`<SERVICE>` is GATEWAY, PREPROCESS, INFERENCE, POSTPROCESS or CACHE)",
        common,
    )
    for name in SERVICES:
        module = importlib.import_module(f"services.{name}.settings")
        _table(name, variables(getattr(module, f"{name.capitalize()}Settings"), RepositorySettings))


def _table(title: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n**{title}**\n\n| variable | default | meaning |\n|---|---|---|")
    for env, default, doc in rows:
        default = default.replace(str(DEFAULT_REPOSITORY), "models/ (in the checkout)")
        print(f"| `{env}` | `{default}` | {doc} |")


def _up(args: argparse.Namespace) -> int:
    settings: ClientSettings = args.settings
    check_redis(settings.redis_url)
    env = {"FMSERVE_INFERENCE_PRELOAD": settings.inference_preload}
    ports = {name: args.base_port + i for i, name in enumerate(PORT_ORDER)}
    cluster = Cluster(env=env, ports=ports, replicas=_replicas(args.replicas), log_dir=args.log_dir)
    check_ports(cluster)
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stopping.append(signum))
    print("starting fmserve: cache, preprocess, inference, postprocess, gateway …", flush=True)
    try:
        cluster.start()
        _print_cluster(cluster)
        while not stopping:
            cluster.supervise_once()
            time.sleep(0.5)
    finally:
        print("stopping fmserve …", flush=True)
        cluster.stop()
        print("stopped", flush=True)
    return 0


def _replicas(spec: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for part in filter(None, spec.split(",")):
        name, _, count = part.partition("=")
        if name not in SERVICES or not count.isdigit():
            raise ClusterError(f"--replicas: {part!r} is not SERVICE=N (e.g. inference=2)")
        counts[name] = int(count)
    return counts


def _print_cluster(cluster: Cluster) -> None:
    for r in cluster.all():
        pid = r.process.pid if r.process else "-"
        where = f"grpc {r.address:<16} metrics :{r.metrics_port:<6}"
        print(f"  {r.service:<12} {where} pid {pid:<8} {r.log_path}")
    gateway = cluster.replicas_of["gateway"][0]
    print(f"fmserve is ready: gateway at {gateway.address} (Ctrl-C stops everything)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
