"""`fmserve rollout`, `fmserve rollback` and `fmserve models --versions`: traffic policies
through the gateway's admin RPCs (an admin key in FMSERVE_API_KEY).

    fmserve rollout minilm-embed --version 2 --canary 10        10% to version 2, once READY
    fmserve rollout minilm-embed --version 2 --canary 50 --sticky --max-error-ratio 0.05
    fmserve rollout minilm-embed --version 3 --shadow           copies of requests to 3
    fmserve rollout minilm-embed --promote                      the canary becomes stable
    fmserve rollback minilm-embed                               all traffic back, at once
    fmserve models --versions                                   state, memory, share, errors

A rollout keeps what it does not change (the stable version, the guard, the other of canary
and shadow); the first one takes the newest version other than the new one as stable (or
--stable). It returns once the new version is READY and its share in force, and fails with
the reason when the version cannot load (it then gets no traffic)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from typing import Any

from fmserve.cli.connect import gateway_client
from fmserve.client import Client, Guard, TrafficPolicy, VersionInfo
from fmserve.errors import InvalidInput, NotFound

ROLLOUT_TIMEOUT_S = 600.0


def add_commands(commands: Any) -> None:
    rollout = commands.add_parser("rollout", help="canary, shadow or promote a model version")
    rollout.add_argument("model")
    rollout.add_argument("--version", default="", help="the version to roll out")
    rollout.add_argument("--canary", type=int, default=None, metavar="PCT", help="its share, %%")
    rollout.add_argument("--shadow", action="store_true", help="send it copies of requests")
    rollout.add_argument("--sticky", action="store_true", help="route by the routing key")
    rollout.add_argument("--stable", default="", help="the stable version (first rollout)")
    rollout.add_argument("--promote", action="store_true", help="make the canary stable")
    rollout.add_argument("--max-error-ratio", type=float, default=None, help="guard, 0-1")
    rollout.add_argument("--max-p99-ms", type=float, default=None, help="guard, milliseconds")
    rollout.add_argument("--guard-window", type=int, default=None, help="seconds (default 60)")
    rollout.add_argument("--min-requests", type=int, default=None, help="to judge (default 20)")
    rollout.set_defaults(run=_rollout)
    rollback = commands.add_parser("rollback", help="all of a model's traffic back, at once")
    rollback.add_argument("model")
    rollback.set_defaults(run=_rollback)


def _rollout(args: argparse.Namespace) -> None:
    with gateway_client(args) as client:
        if args.promote:
            print(describe(client.promote(args.model)))
            return
        policy = _wanted(args, _current(client, args.model), client)
        print(describe(client.set_traffic_policy(policy, timeout=ROLLOUT_TIMEOUT_S)))


def _rollback(args: argparse.Namespace) -> None:
    with gateway_client(args) as client:
        print(describe(client.rollback(args.model)))


def _current(client: Client, model: str) -> TrafficPolicy | None:
    try:
        return client.traffic_policy(model)
    except NotFound:
        return None


def _wanted(args: argparse.Namespace, current: TrafficPolicy | None, client: Client) -> Any:
    """The policy the command asks for, on top of the current one."""
    if not args.version or (args.canary is None) == (not args.shadow):
        raise InvalidInput("give --version V and one of --canary PCT or --shadow (or --promote)")
    stable = args.stable or (current.stable if current else _stable(client, args))
    policy = current or TrafficPolicy(args.model, stable)
    policy = replace(policy, stable=stable, sticky=args.sticky or policy.sticky)
    if args.shadow:
        policy = replace(policy, shadow=args.version)
    else:
        policy = replace(policy, canary=args.version, canary_percent=args.canary)
    return replace(policy, guard=_guard(args, policy.guard))


def _stable(client: Client, args: argparse.Namespace) -> str:
    """The newest version other than the one rolled out."""
    versions = [m.versions for m in client.models() if m.name == args.model]
    others = sorted((v for v in (versions or [[]])[0] if v != args.version), key=_order)
    if not others:
        raise InvalidInput(f"{args.model!r} has no other version to keep as stable: --stable V")
    return others[-1]


def _order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def _guard(args: argparse.Namespace, guard: Guard) -> Guard:
    given = {
        "max_error_ratio": args.max_error_ratio,
        "max_p99_ms": args.max_p99_ms,
        "window_s": args.guard_window,
        "min_requests": args.min_requests,
    }
    return replace(guard, **{k: v for k, v in given.items() if v is not None})


def describe(policy: TrafficPolicy) -> str:
    """A policy in one paragraph."""
    lines = [f"{policy.model}: stable {policy.stable}"]
    if policy.canary:
        how = "sticky by routing key" if policy.sticky else "per request"
        lines.append(f"  canary {policy.canary} at {policy.canary_percent}% ({how})")
    if policy.shadow:
        lines.append(f"  shadow {policy.shadow} (copies, never returned)")
    g = policy.guard
    if g.max_error_ratio or g.max_p99_ms:
        lines.append(
            f"  guard: error ratio <= {g.max_error_ratio:g}, p99 <= {g.max_p99_ms:g} ms "
            f"(0: off) over {g.window_s or 60} s, from {g.min_requests or 20} requests"
        )
    if policy.state:
        why = f": {policy.reason}" if policy.reason else ""
        lines.append(f"  last change: version {policy.state_version} {policy.state.upper()}{why}")
    return "\n".join(lines)


def print_versions(args: argparse.Namespace) -> None:
    """`fmserve models --versions`: one line per version."""
    with gateway_client(args) as client:
        rows = client.model_versions()
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
        return
    print(
        f"{'MODEL':<22} {'VERSION':<8} {'STATE':<11} {'MEMORY':>9} {'TRAFFIC':>8} "
        f"{'REQUESTS':>9} {'ERRORS':>7}  REASON"
    )
    for row in rows:
        print(_version_line(row))


def _version_line(row: VersionInfo) -> str:
    memory = f"{row.memory_bytes / 2**20:.1f} MiB" if row.memory_bytes else "-"
    share = "shadow" if row.shadow else f"{row.traffic_percent:g}%"
    errors = f"{row.error_ratio:.1%}" if row.requests else "-"
    return (
        f"{row.model:<22} {row.version:<8} {row.state:<11} {memory:>9} {share:>8} "
        f"{row.requests:>9} {errors:>7}  {row.reason}"
    )
