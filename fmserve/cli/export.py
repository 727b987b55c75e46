"""`fmserve export`: a model's torch version as a new ONNX version folder (fp32, or int8),
written only if it passes the quality gate against the torch fp32 version.

fmserve export --model minilm-embed --format onnx
fmserve export --model minilm-embed --format onnx --quantize int8 --sample texts.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fmserve.cli.connect import InputError
from fmserve.core.settings import RepositorySettings
from fmserve.export import AGREEMENT_GATE, COSINE_GATE


def add_command(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="write a model's ONNX (or int8) version, checked against torch fp32"
    )
    export.add_argument("--model", required=True)
    export.add_argument("--format", choices=["onnx"], required=True)
    export.add_argument("--quantize", choices=["int8"], default="")
    export.add_argument("--version", default="", help="the new version's number (default: next)")
    export.add_argument(
        "--repository",
        type=Path,
        help="the model repository (default: FMSERVE_MODEL_REPOSITORY, as the services read it)",
    )
    export.add_argument(
        "--sample", type=Path, help="texts to measure on, one per line (default: 32 built in)"
    )
    export.add_argument(
        "--min-cosine",
        type=float,
        default=COSINE_GATE,
        help=f"gate for embedding models: mean cosine to torch fp32 (default {COSINE_GATE})",
    )
    export.add_argument(
        "--min-agreement",
        type=float,
        default=AGREEMENT_GATE,
        help=f"gate for classifiers: top-1 agreement with torch fp32 (default {AGREEMENT_GATE})",
    )
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: torch, transformers and onnxruntime take seconds to load, which the
    # other commands do not need.
    from fmserve.export.version import ExportRefused, ExportRequest, export_version

    request = ExportRequest(
        model=args.model,
        repository=args.repository or RepositorySettings().model_repository,
        quantize=args.quantize,
        version=args.version,
        sample=args.sample,
        cosine_gate=args.min_cosine,
        agreement_gate=args.min_agreement,
    )
    try:
        version = export_version(request, say=print)
    except (ExportRefused, ValueError, OSError) as exc:
        raise InputError(str(exc)) from None
    print(f"wrote {args.model} version {version} (onnxruntime)")
    return 0
