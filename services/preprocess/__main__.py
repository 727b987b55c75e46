"""`python -m services.preprocess`: the preprocess service process."""

from __future__ import annotations

import asyncio
import logging

from fmserve import logs
from fmserve.repository import ModelRepository
from fmserve.service import Service, run_until_signalled
from services.preprocess.server import servicer
from services.preprocess.settings import PreprocessSettings
from services.preprocess.tokenizers import Tokenizers
from services.preprocess.worker import worker_resources

log = logging.getLogger("fmserve.preprocess")


def build(settings: PreprocessSettings) -> Service:
    """The service wired from its settings: model repository → tokenizers → servicer, and the
    queue worker (stopped first, while the tokenizers still run)."""
    repository = ModelRepository(settings.model_repository)
    tokenizers = Tokenizers(repository, settings.tokenizer_threads)
    resources = [tokenizers, *worker_resources(settings, tokenizers)]
    return Service("preprocess", settings, [servicer(tokenizers)], resources=resources)


def main() -> None:
    settings = PreprocessSettings()
    logs.configure("preprocess", settings.log_level, settings.log_format)
    log.info("settings", extra={"settings": settings.model_dump(mode="json")})
    asyncio.run(run_until_signalled(build(settings)))


if __name__ == "__main__":
    main()
