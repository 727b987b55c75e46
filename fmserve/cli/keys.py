"""`fmserve keys`: API key administration through the gateway's admin RPCs (an admin key in
FMSERVE_API_KEY), and `generate`, which makes a key offline for FMSERVE_ADMIN_KEY.

    fmserve keys create --name ci --scopes "infer:minilm-*,jobs:submit" --rpm 600 --expires-in 30d
    fmserve keys list
    fmserve keys revoke ci
    fmserve keys generate

`create` prints the new key alone on its last line (shown once: only its hash is kept), so a
script can take it with `| tail -n 1`."""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict
from typing import Any

from fmserve.client import ApiKey, Client
from fmserve.core import apikeys
from fmserve.errors import InvalidInput

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_DURATION = re.compile(r"^(\d+)([smhd]?)$")


def add_commands(commands: Any) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys (admin)")
    actions = keys.add_subparsers(required=True, metavar="ACTION")
    create = actions.add_parser("create", help="a new key, printed once on the last line")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", required=True, help='e.g. "infer:minilm-*,jobs:submit"')
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    create.add_argument("--concurrency", type=int, default=0, help="calls at once (0: no limit)")
    create.add_argument("--daily-items", type=int, default=0, help="texts a day (0: no limit)")
    create.add_argument("--expires-in", default="", help="e.g. 30d, 12h, 90m (default: never)")
    create.set_defaults(run=_create)
    listing = actions.add_parser("list", help="every key (never their secrets)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)
    revoke = actions.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")
    revoke.set_defaults(run=_revoke)
    generate = actions.add_parser("generate", help="a new key for FMSERVE_ADMIN_KEY (offline)")
    generate.set_defaults(run=lambda _: print(apikeys.generate().api_key))


def duration_s(text: str) -> int:
    """Seconds in "30d", "12h", "90m", "45s" or "3600"; '' is 0 (never)."""
    if not text:
        return 0
    match = _DURATION.match(text.strip())
    if not match:
        raise InvalidInput(f"--expires-in {text!r}: use a number with s, m, h or d, e.g. 30d")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def _create(args: argparse.Namespace) -> None:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    with Client(args.address, api_key=args.api_key) as client:
        new = client.create_api_key(
            args.name,
            scopes,
            rpm=args.rpm,
            max_concurrency=args.concurrency,
            daily_items=args.daily_items,
            expires_in_s=duration_s(args.expires_in),
        )
    print(f"created {_line(new.info)}")
    print("the key is shown once, on the next line; only its hash is kept")
    print(new.api_key)


def _list(args: argparse.Namespace) -> None:
    with Client(args.address, api_key=args.api_key) as client:
        keys = client.api_keys()
    for key in keys:
        print(json.dumps(asdict(key)) if args.json else _line(key))


def _revoke(args: argparse.Namespace) -> None:
    with Client(args.address, api_key=args.api_key) as client:
        print(f"revoked {_line(client.revoke_api_key(args.name))}")


def _line(key: ApiKey) -> str:
    limits = f"rpm={key.rpm} concurrency={key.max_concurrency} daily_items={key.daily_items}"
    expires = time.strftime("%Y-%m-%d", time.gmtime(key.expires)) if key.expires else "never"
    state = "revoked" if key.revoked else "active"
    scopes = ",".join(key.scopes)
    return f"{key.name} ({key.key_id}) {state} scopes={scopes} {limits} expires={expires}"
