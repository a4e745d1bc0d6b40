"""``tessera serve``: an HTTP API and a web page for grounded answers with citations.

One FastAPI app (:func:`create_app`) serves

- ``POST /v1/ask`` (JSON) and ``POST /v1/ask/stream`` (server-sent events): the
  answer of :func:`tessera.ask.ask` with SelfCite statement citations and NEST
  attributed spans;
- ``GET/POST /v1/corpora``, ``DELETE /v1/corpora/{id}``, ``GET /v1/jobs/{id}``:
  corpora addressed by id, uploads indexed by background jobs;
- ``GET /healthz`` and the OpenAPI spec at ``/openapi.json``;
- the page at ``/`` (plain HTML, CSS and JavaScript from ``static/``).

One model instance answers up to ``max_batch`` requests at once from a bounded
queue (:class:`~tessera.serve.engine.AskWorker`): on llama.cpp their tokens decode
together (:class:`~tessera.lm.batching.ContinuousBatcher`), with ``lm_url`` they go
together to that server; a full queue answers ``429`` with ``Retry-After``.
Models and corpus paths come only from the server's
:class:`~tessera.serve.config.ServeConfig`, never from a request.
"""

from tessera.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(*args, **kwargs):
    from tessera.serve.app import create_app as _create

    return _create(*args, **kwargs)
