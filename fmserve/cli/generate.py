"""`fmserve generate`: text from a text-generation model, printed as it arrives.

fmserve generate --model smollm2 "Write a haiku about the sea"
fmserve generate --model smollm2 --chat "What is 2+2?" --max-new-tokens 32
fmserve generate --model smollm2 "Once upon a time" --json     # the finished generation
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from fmserve.cli.connect import gateway_client
from fmserve.client import Generation, GenerationParams


def add_command(commands: Any) -> None:
    generate = commands.add_parser("generate", help="generate text, streamed as it arrives")
    generate.add_argument("prompt", metavar="PROMPT")
    generate.add_argument("--model", required=True)
    generate.add_argument("--version", default="")
    generate.add_argument("--routing-key", default="", help="sticky policies route by it")
    generate.add_argument(
        "--chat", action="store_true", help="send PROMPT as a user message (chat template)"
    )
    generate.add_argument("--system", default="", help="a system message (with --chat)")
    generate.add_argument("--top-k", type=int, default=0, help="0: every token")
    add_sampling_arguments(generate)
    generate.add_argument("--cache", choices=["use", "bypass", "refresh"], default="use")
    generate.add_argument("--timeout", type=float, default=300.0, help="seconds in all")
    generate.add_argument("--json", action="store_true", help="print the finished generation")
    generate.set_defaults(run=run)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling options of `generate` and `submit --task generate` (each adds its own
    --top-k: submit's also serves classification jobs)."""
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeat)")


def sampling_of(args: argparse.Namespace) -> GenerationParams:
    return GenerationParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        repetition_penalty=args.repetition_penalty,
    )


def run(args: argparse.Namespace) -> None:
    prompt, messages = _prompt(args)
    with gateway_client(args) as client:
        events = client.stream(
            prompt,
            messages=messages,
            model=args.model,
            version=args.version,
            routing_key=args.routing_key,
            params=sampling_of(args),
            cache=args.cache,
            timeout=args.timeout,
        )
        for event in events:
            if isinstance(event, Generation):
                _finished(event, args.json)
            elif not args.json:
                print(event.text, end="", flush=True)


def _prompt(args: argparse.Namespace) -> tuple[str | None, list[dict[str, str]] | None]:
    if not args.chat:
        return args.prompt, None
    system = [{"role": "system", "content": args.system}] if args.system else []
    return None, [*system, {"role": "user", "content": args.prompt}]


def _finished(generation: Generation, as_json: bool) -> None:
    if as_json:
        print(json.dumps(asdict(generation)))
        return
    usage = generation.usage
    cached = ", cached" if generation.cached else ""
    print(
        f"\n[{generation.finish_reason}: {usage.prompt_tokens} prompt + "
        f"{usage.completion_tokens} generated tokens{cached}]",
        file=sys.stderr,
    )
    if generation.finish_reason == "stop" and not generation.text.strip():
        # An instruct model given a bare prompt often ends it at once.
        print("the model ended its answer at once; a chat model may want --chat", file=sys.stderr)
