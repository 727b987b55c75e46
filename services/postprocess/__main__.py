"""`python -m services.postprocess`: the postprocess service process."""

from __future__ import annotations

from fmserve.core.watch import RepositoryWatcher
from fmserve.rpc import service
from fmserve.rpc.service import Service
from services.postprocess.detokenizers import Detokenizers
from services.postprocess.postprocessor import Postprocessor
from services.postprocess.server import servicer
from services.postprocess.settings import PostprocessSettings
from services.postprocess.worker import worker_resources


def build(settings: PostprocessSettings) -> Service:
    """The service wired from its settings: model repository (watched) → postprocessor →
    servicer, and the queue workers (stopped first, while the postprocessor still runs)."""
    watcher = RepositoryWatcher.of(settings)
    repository = watcher.repository
    postprocessor = Postprocessor(repository, settings.offload_min_rows, settings.worker_threads)
    detokenizers = Detokenizers(repository)
    resources = [
        watcher,
        postprocessor,
        detokenizers,
        *worker_resources(settings, postprocessor, detokenizers),
    ]
    servicers = [servicer(postprocessor, detokenizers)]
    return Service("postprocess", settings, servicers, resources=resources)


def main() -> None:
    service.main(PostprocessSettings(), build, "postprocess")


if __name__ == "__main__":
    main()
