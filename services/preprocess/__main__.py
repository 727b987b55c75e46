"""`python -m services.preprocess`: the preprocess service process."""

from __future__ import annotations

from fmserve.core.watch import RepositoryWatcher
from fmserve.rpc import service
from fmserve.rpc.service import Service
from services.preprocess.featurizers import Featurizers
from services.preprocess.server import servicer
from services.preprocess.settings import PreprocessSettings
from services.preprocess.tokenizers import Tokenizers
from services.preprocess.worker import worker_resources


def build(settings: PreprocessSettings) -> Service:
    """The service wired from its settings: model repository (watched) → tokenizers and
    featurizers → servicer, and the queue worker (stopped first, while the tokenizers and
    featurizers still run)."""
    watcher = RepositoryWatcher.of(settings)
    tokenizers = Tokenizers(watcher.repository, settings.tokenizer_threads, settings.preload_models)
    featurizers = Featurizers(watcher.repository, settings)
    resources = [
        watcher,
        tokenizers,
        featurizers,
        *worker_resources(settings, tokenizers, featurizers),
    ]
    servicers = [servicer(tokenizers, featurizers)]
    return Service("preprocess", settings, servicers, resources=resources)


def main() -> None:
    service.main(PreprocessSettings(), build, "preprocess")


if __name__ == "__main__":
    main()
