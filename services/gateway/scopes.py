"""What an API key may do: the scope grammar, its validation, and matching a needed scope
against a key's granted ones.

    admin                               everything, the admin RPCs included
    jobs:submit                         submit and cancel jobs (the job's model needs infer too)
    jobs:read                           read, watch and list the key's own jobs
    infer:<model-glob>                  call the matching models, any task
    infer:<model-glob>:<task-glob>      call the matching models for the matching tasks only

Globs are fnmatch patterns (`*`, `?`, `[...]`), case-sensitive: `infer:minilm-*`,
`infer:*:embedding`. A needed scope is concrete (`infer:minilm-embed:embedding`); the bare
`infer` (ListModels) is met by any infer scope.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

from fmserve.errors import InvalidInput

ADMIN = "admin"
JOBS_SUBMIT = "jobs:submit"
JOBS_READ = "jobs:read"
INFER = "infer"

_GLOB = re.compile(r"^[A-Za-z0-9._*?\[\]!-]+$")


def validate(scope: str) -> str:
    """The scope, or InvalidInput saying what the grammar allows."""
    if scope in (ADMIN, JOBS_SUBMIT, JOBS_READ):
        return scope
    kind, _, rest = scope.partition(":")
    parts = rest.split(":")
    if kind == INFER and 1 <= len(parts) <= 2 and all(_GLOB.match(p) for p in parts):
        return scope
    raise InvalidInput(
        f"unknown scope {scope!r}: use admin, jobs:submit, jobs:read, infer:<model-glob> or "
        "infer:<model-glob>:<task-glob>"
    )


def infer_scope(model: str, task: str) -> str:
    """The scope a call of `model` for `task` needs ('' task: not known)."""
    return f"{INFER}:{model}:{task}"


def allows(granted: Iterable[str], needed: str) -> bool:
    """Whether any granted scope meets the needed one."""
    return _allows(tuple(granted), needed)


@functools.lru_cache(maxsize=4096)
def _allows(granted: tuple[str, ...], needed: str) -> bool:
    """Remembered: keys and models are few, and every call asks (fnmatch is the cost)."""
    return any(_meets(scope, needed) for scope in granted)


def _meets(scope: str, needed: str) -> bool:
    if scope in (ADMIN, needed):
        return True
    kind, _, globs = scope.partition(":")
    if kind != INFER or not needed.startswith(INFER):
        return False
    if needed == INFER:
        return True
    model_glob, _, task_glob = globs.partition(":")
    _, model, task = needed.split(":", 2)
    return fnmatchcase(model, model_glob) and fnmatchcase(task, task_glob or "*")
