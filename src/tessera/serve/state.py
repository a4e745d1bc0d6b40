"""The state one ``tessera serve`` app shares between its routes: config, model, corpora, jobs, the ask worker.

:func:`create_app <tessera.serve.app.create_app>` builds one :class:`ServerState` and
keeps it on ``app.state.tessera``; routes get it through the :data:`State` dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from tessera.serve.config import ServeConfig
from tessera.serve.corpora import CorpusRegistry
from tessera.serve.engine import AskWorker, JobManager


@dataclass
class ServerState:
    config: ServeConfig
    lm: object
    corpora: CorpusRegistry
    jobs: JobManager
    worker: AskWorker

    @classmethod
    def open(cls, config: ServeConfig, lm=None) -> ServerState:
        """Open the configured corpora, then load the model (unless ``lm`` is given) and restore earlier uploads."""
        from tessera.lm.local import LocalLM

        jobs = JobManager()
        corpora = CorpusRegistry(config, jobs)
        for spec in config.corpora:  # corpora first: a bad --corpus fails before the model loads
            corpora.add_configured(spec)
        model = lm if lm is not None else LocalLM.load(config.lm, engine=config.engine, url=config.lm_url)
        corpora.restore_uploads()
        worker = AskWorker(config.queue_size, config.request_timeout_s)
        return cls(config, model, corpora, jobs, worker)

    def close(self) -> None:
        """Stop the ask worker, then the job thread."""
        self.worker.close()
        self.jobs.close()


def server_state(request: Request) -> ServerState:
    """The app's :class:`ServerState` (a FastAPI dependency)."""
    return request.app.state.tessera


State = Annotated[ServerState, Depends(server_state)]
