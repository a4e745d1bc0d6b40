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
    batching: str = "serial"  # how concurrent answers run: batched | concurrent | serial (LocalLM.enable_batching)

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
        mode = model.enable_batching(config.max_batch) if hasattr(model, "enable_batching") else "serial"
        worker = AskWorker(config.queue_size, config.request_timeout_s, workers=config.max_batch if mode != "serial" else 1)
        return cls(config, model, corpora, jobs, worker, mode)

    def batching_info(self) -> dict:
        """How requests share the model: the mode, the configured and effective batch, rows decoding now."""
        batcher = getattr(self.lm, "batcher", None) if self.batching == "batched" else None
        reason = {"batched": "continuous batching on the llama.cpp engine",
                  "concurrent": "generations go to the LM server at --lm-url together; it batches them",
                  "serial": "--max-batch 1" if self.config.max_batch <= 1 else
                  f"the {getattr(self.lm, 'engine', '?')} engine answers one request at a time (continuous batching "
                  "runs on the llama.cpp engine and with --lm-url)"}[self.batching]
        return {"mode": self.batching, "max_batch": self.config.max_batch, "workers": self.worker.workers,
                "decoding_rows": batcher.counts()[0] if batcher is not None else None, "reason": reason}

    def close(self) -> None:
        """Stop the ask worker, then the batcher and the job thread."""
        self.worker.close()
        if self.batching == "batched":
            self.lm.disable_batching()
        self.jobs.close()


def server_state(request: Request) -> ServerState:
    """The app's :class:`ServerState` (a FastAPI dependency)."""
    return request.app.state.tessera


State = Annotated[ServerState, Depends(server_state)]
