"""The `fmserve` command: run a local cluster, call models, list them.

    fmserve up                                  the cluster as local processes
    fmserve certs --out DIR                     certificates for TLS and mTLS
    fmserve models                              what the cluster serves
    fmserve embed --model minilm-embed "text"   vectors
    fmserve classify --model minilm-sentiment "I love it"
    fmserve classify --model vit-demo photo.jpg  labels per image (image files: media)
    fmserve entities --model my-ner "Ada lives in London"
    fmserve generate --model smollm2 "Once upon a time"   text, printed as it arrives
    fmserve submit --model minilm-embed --input items.jsonl --output results.jsonl --wait
    fmserve submit --model smollm2 --task generate --max-new-tokens 32 --input prompts.jsonl
    fmserve submit --model silero-vad --input clips.jsonl     lines of {"file": "a.wav"}
    fmserve results JOB_ID                        a finished job's results, one JSON line each
    fmserve job ID / fmserve jobs / fmserve cancel ID
    fmserve keys create|list|revoke|generate    API keys (FMSERVE_API_KEY: the key sent)
    fmserve rollout MODEL --version 2 --canary 10 / --promote; fmserve rollback MODEL
    fmserve models --versions                   every version: state, memory, traffic, errors

Add --json to any call for machine-readable output."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fmserve.cli import certs, export, generate, keys, rollout, stores
from fmserve.cli.cluster import (
    METRICS_PORT_OFFSET,
    PORT_ORDER,
    SERVICES,
    Cluster,
    ClusterError,
    check_ports,
)
from fmserve.cli.connect import InputError, gateway_client
from fmserve.client import (
    Answer,
    Client,
    Generation,
    JobItem,
    JobStatus,
    Transcription,
    VoiceActivity,
    media,
    wire,
)
from fmserve.core.settings import (
    DEFAULT_REPOSITORY,
    AuthSettings,
    ClientSettings,
    RepositorySettings,
    settings_class,
    variables,
)
from fmserve.errors import FmserveError
from fmserve.rpc import tls

_CLUSTER_WIDE = {
    "FMSERVE_LOG_LEVEL",
    "FMSERVE_LOG_FORMAT",
    "FMSERVE_MODEL_REPOSITORY",
    "FMSERVE_CONVERTED_CACHE",
    "FMSERVE_REPOSITORY_POLL_S",
}
_CLUSTER_WIDE |= {"FMSERVE_TLS_CERT", "FMSERVE_TLS_KEY", "FMSERVE_TLS_CA"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except FmserveError as exc:
        print(f"error ({exc.code.name}): {exc.message}", file=sys.stderr)
        return 1
    except (ClusterError, InputError, certs.CertsError, tls.TlsFilesError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    settings = ClientSettings()
    parser = argparse.ArgumentParser(prog="fmserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=settings.address, help="gateway address")
    # The API key comes from FMSERVE_API_KEY only: a command-line flag would show it to `ps`.
    parser.set_defaults(settings=settings)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole cluster as local processes")
    up.add_argument("--replicas", default="", help="e.g. inference=2,preprocess=2")
    up.add_argument("--log-dir", type=Path, default=Path(".fmserve/logs"))
    up.add_argument(
        "--base-port", type=int, default=50051, help="gateway port; the stages take the next four"
    )
    up.set_defaults(run=_up)

    certificates = commands.add_parser("certs", help="a CA and a certificate per service")
    certificates.add_argument("--out", type=Path, default=Path(".fmserve/certs"))
    certificates.add_argument(
        "--hosts", default="", help="more names or addresses the certificates hold, comma-separated"
    )
    certificates.add_argument("--days", type=int, default=825, help="validity of each certificate")
    certificates.add_argument("--force", action="store_true", help="replace certificates there")
    certificates.set_defaults(run=_certs)

    models = commands.add_parser("models", help="list the models served")
    models.add_argument("--json", action="store_true")
    models.add_argument(
        "--versions", action="store_true", help="every version: state, memory, traffic (admin)"
    )
    models.set_defaults(run=_models)

    config = commands.add_parser("config", help="every environment variable, with its default")
    config.set_defaults(run=_config)

    _job_commands(commands)
    keys.add_commands(commands)
    rollout.add_commands(commands)
    generate.add_command(commands)
    export.add_command(commands)

    for name, helptext, inputs in (
        ("embed", "one vector per text or image", "texts, or image files (.jpg .png .webp)"),
        (
            "classify",
            "labels with scores per text, image or audio clip",
            "texts, or image files (.jpg .png .webp), or audio files (.wav .flac)",
        ),
        ("entities", "labelled spans per text", "texts"),
        ("transcribe", "the words spoken in each audio file, timed", "audio files (.wav .flac)"),
        ("vad", "where someone speaks in each audio file", "audio files (.wav .flac)"),
    ):
        call = commands.add_parser(name, help=helptext)
        call.add_argument("texts", nargs="+", metavar="INPUT", help=inputs)
        call.add_argument(
            "--model", required=name not in DEFAULT_MODELS, default=DEFAULT_MODELS.get(name)
        )
        call.add_argument("--version", default="")
        call.add_argument("--routing-key", default="", help="sticky policies route by it")
        call.add_argument(
            "--truncate", action="store_true", help="cut texts over the model's limit"
        )
        call.add_argument("--cache", choices=["use", "bypass", "refresh"], default="use")
        call.add_argument("--top-k", type=int, default=0)
        call.add_argument("--json", action="store_true")
        if name == "classify":
            call.add_argument(
                "--labels", default="", help="zero-shot labels for an image-embedding model: a,b,c"
            )
        call.set_defaults(run=_call, task=name)
    return parser


def _job_commands(commands: Any) -> None:
    submit = commands.add_parser("submit", help="submit a batch job from a JSONL file")
    submit.add_argument("--model", required=True)
    submit.add_argument(
        "--input",
        type=Path,
        required=True,
        help='JSONL, a line per item: {"text": ...}, or {"file": path} (an image or audio file '
        "for a media model; relative to the JSONL's folder)",
    )
    submit.add_argument("--output", type=Path, help="write the results here as JSONL (waits)")
    submit.add_argument("--wait", action="store_true", help="wait for the job, with progress")
    submit.add_argument("--task", default=None, choices=[*wire.TASKS, *wire.TASK_ALIASES])
    submit.add_argument("--version", default="")
    submit.add_argument("--truncate", action="store_true")
    submit.add_argument(
        "--top-k", type=int, default=0, help="labels kept (classification), or sampling's top-k"
    )
    generate.add_sampling_arguments(submit)  # --task generate: each text is a prompt
    submit.add_argument("--priority", choices=["normal", "high", "low"], default="normal")
    submit.add_argument("--idempotency-key", default="")
    submit.add_argument("--timeout-s", type=int, default=0, help="expire the job after this")
    submit.set_defaults(run=_submit)
    results = commands.add_parser("results", help="a finished job's results, as JSONL")
    results.add_argument("id")
    results.set_defaults(run=_results)
    job = commands.add_parser("job", help="a job's state and progress")
    job.add_argument("id")
    job.add_argument("--json", action="store_true")
    job.set_defaults(run=_job)
    jobs = commands.add_parser("jobs", help="recent jobs, newest first")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(run=_jobs)
    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("id")
    cancel.set_defaults(run=_cancel)


def _certs(args: argparse.Namespace) -> None:
    hosts = [h for h in args.hosts.split(",") if h.strip()]
    issued = certs.generate(args.out, hosts, args.days, args.force)
    for path in issued.files:
        print(f"wrote {path}")
    print(
        f"\nTLS for a local cluster:  FMSERVE_CERTS={issued.folder} fmserve up\n"
        'For compose, write them to deploy/compose/certs (README, "TLS").'
    )


def _submit(args: argparse.Namespace) -> None:
    count, files = _check_jsonl(args.input)  # every line read once first: a bad one stops us
    if files and wire.generates(args.task):
        raise InputError('a text-generation job takes prompts: write {"text": ...} lines')
    options: dict[str, Any] = {
        "task": args.task,
        "version": args.version,
        "top_k": args.top_k,
        "idempotency_key": args.idempotency_key,
        "priority": args.priority,
        "timeout_s": args.timeout_s,
        "expected_items": count,
    }
    if not files:  # what only a text job has
        options["truncate"] = args.truncate
        options["params"] = generate.sampling_of(args) if wire.generates(args.task) else None
    with gateway_client(args) as client:
        send = client.submit_media if files else client.submit
        job = send(_items(args.input), args.model, **options)
        print(f"submitted job {job.id} ({count} items)", flush=True)
        if args.wait or args.output:
            status = job.wait(progress=sys.stderr.isatty())
            print(_status_line(status))
        if args.output:
            _write_results(job.results(), args.output)
            print(f"results written to {args.output}")


def _check_jsonl(path: Path) -> tuple[int, bool]:
    """Items in the file, and whether they are files (else texts); InputError naming the first
    malformed line, a file that is not there, or the first line of the other kind (the file
    is streamed)."""
    count, files = 0, False
    for line, item in _items(path, numbered=True):
        is_file = isinstance(item, Path)
        if count and is_file != files:
            raise InputError(
                f"{path} line {line}: a job is texts or files, not both: submit each kind as a "
                "job of its own"
            )
        if is_file and not item.is_file():
            raise InputError(f"{path} line {line}: no file at {item}")
        count, files = count + 1, is_file
    return count, files


def _items(path: Path, numbered: bool = False) -> Any:
    """Each line's text, or its file's path; with `numbered`, (line number, item) pairs."""
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    item = _item_of(line, path, number)
                    yield (number, item) if numbered else item
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None


def _item_of(line: str, path: Path, number: int) -> str | Path:
    where = f"{path} line {number}"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not JSON ({exc.msg}); write one JSON value per line") from None
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return str(value["text"])
    if isinstance(value, dict) and isinstance(value.get("file"), str):
        return path.parent / value["file"]  # an absolute path stays itself
    if isinstance(value, str):
        return value
    raise InputError(f'{where}: expected {{"text": "..."}}, {{"file": "..."}} or a JSON string')


def _write_results(items: Any, path: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        for item in items:
            out.write(_result_row(item) + "\n")


def _results(args: argparse.Namespace) -> None:
    with gateway_client(args) as client:
        for item in client.job(args.id).results():
            print(_result_row(item))


def _result_row(item: JobItem) -> str:
    """One JSON line: {"index": i, "result": ...} or {"index": i, "error": "..."}; a
    generation's result is {"text", "finish_reason", "usage", "token_ids", ...}."""
    row: dict[str, Any] = {"index": item.index}
    row.update({"result": _jsonable(item.result)} if item.ok else {"error": item.error})
    return json.dumps(row)


def _status_line(s: JobStatus) -> str:
    total = s.total if s.sealed else "?"
    line = f"{s.id}  {s.state:<9} {s.answered}/{total} answered, {s.failed} failed  {s.model}"
    return line + (f"  ({s.error})" if s.error else "")


def _job(args: argparse.Namespace) -> None:
    with gateway_client(args) as client:
        status = client.job(args.id).status()
    print(json.dumps(asdict(status)) if args.json else _status_line(status))


def _jobs(args: argparse.Namespace) -> None:
    with gateway_client(args) as client:
        jobs = client.jobs(args.limit)
    if args.json:
        print(json.dumps([asdict(j) for j in jobs]))
        return
    for status in jobs:
        print(_status_line(status))


def _cancel(args: argparse.Namespace) -> None:
    with gateway_client(args) as client:
        print(_status_line(client.job(args.id).cancel()))


DEFAULT_MODELS = {"embed": "minilm-embed", "vad": "silero-vad"}
TEXT_TASKS = {
    "embed": "embedding",
    "classify": "text-classification",
    "entities": "token-classification",
}
MEDIA_TASKS = {
    ("embed", "image"): "image-embedding",
    ("classify", "image"): "image-classification",
    ("classify", "audio"): "audio-classification",
    ("transcribe", "audio"): "speech-recognition",
    ("vad", "audio"): "voice-activity",
}


def _call(args: argparse.Namespace) -> None:
    kind = _input_kind(args)
    with gateway_client(args) as client:
        answer = _infer_media(client, args, kind) if kind else _infer_texts(client, args)
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


def _input_kind(args: argparse.Namespace) -> str:
    """ "image" or "audio" when the arguments are such files (all of them, of one kind), ""
    when they are texts."""
    kinds = {media.kind_of_path(argument) for argument in args.texts}
    if len(kinds) > 1:
        raise SystemExit("send texts, image files or audio files, one kind per call")
    kind = kinds.pop()
    if kind and (args.task, kind) not in MEDIA_TASKS:
        raise SystemExit(f"`fmserve {args.task}` does not take {kind} files")
    if not kind and args.task not in TEXT_TASKS:
        raise SystemExit(f"`fmserve {args.task}` takes audio files (.wav .flac) that exist")
    return kind


def _infer_texts(client: Client, args: argparse.Namespace) -> Answer:
    return client.infer(
        args.texts,
        args.model,
        task=TEXT_TASKS[args.task],
        version=args.version,
        truncate=args.truncate,
        top_k=args.top_k,
        cache=args.cache,
        routing_key=args.routing_key,
    )


def _infer_media(client: Client, args: argparse.Namespace, kind: str) -> Answer:
    labels = [label.strip() for label in getattr(args, "labels", "").split(",") if label.strip()]
    return client.infer_media(
        args.texts,
        args.model,
        task=MEDIA_TASKS[args.task, kind],
        version=args.version,
        top_k=args.top_k,
        cache=args.cache,
        labels=labels,
        routing_key=args.routing_key,
    )


def _jsonable(result: Any) -> Any:
    if result is None:
        return None
    if isinstance(result, np.ndarray):
        return result.tolist()
    if isinstance(result, VoiceActivity):
        return {**asdict(result), "frame_probabilities": result.frame_probabilities.tolist()}
    if isinstance(result, (Generation, Transcription)):
        return asdict(result)
    return [asdict(item) for item in result]


def _readable(result: Any) -> str:
    if isinstance(result, np.ndarray):
        head = ", ".join(f"{v:+.4f}" for v in result[:6])
        return f"  [{head}, …]  ({result.shape[0]} dimensions, norm {np.linalg.norm(result):.3f})"
    if isinstance(result, Transcription):
        words = " ".join(f"{w.word}@{w.start_s:.2f}-{w.end_s:.2f}s" for w in result.words)
        return f"  {result.text!r}\n  {words}" if words else "  (no speech recognised)"
    if isinstance(result, VoiceActivity):
        spans = ", ".join(f"{s.start_s:.2f}-{s.end_s:.2f} s" for s in result.segments)
        return f"  speech: {spans or 'none'}  ({len(result.frame_probabilities)} frames)"
    if not result:
        return "  (nothing found)"
    if hasattr(result[0], "start"):
        return "\n".join(
            f"  {e.label:<8} {e.score:.3f}  [{e.start}:{e.end}] {e.text!r}" for e in result
        )
    return "\n".join(f"  {s.label:<16} {s.score:.4f}" for s in result)


def _models(args: argparse.Namespace) -> None:
    if args.versions:
        rollout.print_versions(args)
        return
    with gateway_client(args) as client:
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
        _table(name, variables(settings_class(name), RepositorySettings))


def _table(title: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n**{title}**\n\n| variable | default | meaning |\n|---|---|---|")
    for env, default, doc in rows:
        default = default.replace(str(DEFAULT_REPOSITORY), "models/ (in the checkout)")
        default = default.replace(str(Path.home()), "~")
        print(f"| `{env}` | `{default}` | {doc} |")


def _up(args: argparse.Namespace) -> int:
    settings: ClientSettings = args.settings
    redis = stores.redis(settings.redis_url, args.log_dir.parent / "redis", args.log_dir)
    rabbitmq = stores.rabbitmq(settings.amqp_url)
    try:
        return _run_cluster(args, redis, rabbitmq)
    finally:
        for store in (rabbitmq, redis):
            store.stop()


def _run_cluster(args: argparse.Namespace, redis: stores.Store, rabbitmq: stores.Store) -> int:
    settings: ClientSettings = args.settings
    for store in (redis, rabbitmq):
        if store.state == "started":
            print(f"started {store.name} at {store.address} (stopped with the cluster)")
    # The same models' tokenizers load in preprocess, so "ready" means the first call is fast.
    preload = settings.inference_preload
    env = {"FMSERVE_INFERENCE_PRELOAD": preload, "FMSERVE_PREPROCESS_PRELOAD": preload}
    env.update(stores.cluster_env(redis, rabbitmq))
    ports = {name: args.base_port + i for i, name in enumerate(PORT_ORDER)}
    cluster = Cluster(
        env=env,
        ports=ports,
        replicas=_replicas(args.replicas),
        metrics_ports=metrics_ports(ports),
        log_dir=args.log_dir,
        certs=_checked_certs(settings.certs),
    )
    check_ports(cluster)
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stopping.append(signum))
    print("starting fmserve: cache, preprocess, inference, postprocess, gateway …", flush=True)
    auth = AuthSettings()
    logged_from = {r.log_path: _size(r.log_path) for r in cluster.replicas_of["gateway"]}
    try:
        cluster.start()
        if auth.auth and not auth.admin_key.get_secret_value():
            print(_first_admin_key(cluster, logged_from), flush=True)
        _print_cluster(cluster, stores.what_is_off(redis, rabbitmq), auth.auth)
        while not stopping:
            cluster.supervise_once()
            time.sleep(0.5)
    finally:
        print("stopping fmserve …", flush=True)
        cluster.stop()
        print("stopped", flush=True)
    return 0


def _checked_certs(folder: Path | None) -> Path | None:
    """The certificate folder, once every file a service will read is there and well formed:
    a missing one stops `fmserve up` here, not as a service that exits while starting."""
    if folder is None:
        return None
    for name in (*SERVICES, "client"):
        tls.from_folder(folder, name)
    return folder.resolve()


def security(cluster: Cluster) -> str:
    """What the ready line says about exposure: whether TLS is on."""
    if cluster.certs is None:
        return "TLS off"
    return f"TLS on: gateway TLS, mTLS between services ({cluster.certs})"


FIRST_ADMIN_KEY_WAIT_S = 10.0


def metrics_ports(ports: dict[str, int]) -> dict[str, int]:
    """Each service's /metrics port: its FMSERVE_<SERVICE>_METRICS_PORT when set (-1 turns it
    off), else its gRPC port + METRICS_PORT_OFFSET, or a free port where that is not a user
    port (a --base-port below 41924)."""
    chosen = {}
    for name, port in ports.items():
        configured = settings_class(name)().metrics_port
        derived = port + METRICS_PORT_OFFSET
        chosen[name] = configured or (derived if derived >= 1024 else 0)
    return chosen


def _replicas(spec: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for part in filter(None, spec.split(",")):
        name, _, count = part.partition("=")
        if name not in SERVICES or not count.isdigit():
            raise ClusterError(f"--replicas: {part!r} is not SERVICE=N (e.g. inference=2)")
        counts[name] = int(count)
    return counts


def _first_admin_key(cluster: Cluster, logged_from: dict[Path, int]) -> str:
    """With auth on and no FMSERVE_ADMIN_KEY, a new cluster's first gateway creates an admin key
    and logs it once: shown here too, where the person who started the cluster looks for it."""
    deadline = time.monotonic() + FIRST_ADMIN_KEY_WAIT_S
    while time.monotonic() < deadline:
        for path, offset in logged_from.items():
            for record in _json_lines(path, offset):
                if "first_admin_key" in record:
                    return (
                        "first admin key, shown once (FMSERVE_API_KEY=<it> fmserve keys create "
                        f"...):\n{record['first_admin_key']}"
                    )
                if record.get("first_admin_key_exists"):
                    return (
                        "admin key: the one shown when this cluster first started with auth on "
                        "(or set FMSERVE_ADMIN_KEY)"
                    )
        time.sleep(0.2)
    return f"admin key: see first_admin_key in {', '.join(map(str, logged_from))}"


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _json_lines(path: Path, offset: int) -> list[dict[str, Any]]:
    """The JSON records a service wrote to its log from `offset` on (other lines skipped)."""
    with path.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode("utf-8", "replace").splitlines()
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _print_cluster(cluster: Cluster, off: str, auth: bool) -> None:
    for r in cluster.all():
        pid = r.process.pid if r.process else "-"
        where = f"grpc {r.address:<16} metrics :{r.metrics_port:<6}"
        print(f"  {r.service:<12} {where} pid {pid:<8} {r.log_path}")
    gateway = cluster.replicas_of["gateway"][0]
    running_without = f"; running without {off}" if off else ""
    keys = "auth on: API keys required" if auth else "auth off (FMSERVE_AUTH=on requires API keys)"
    print(
        f"fmserve is ready: gateway at {gateway.address}, {keys}, {security(cluster)} "
        f"(Ctrl-C stops everything){running_without}",
        flush=True,
    )
