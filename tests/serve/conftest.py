"""Fixtures of the serve tests: a small corpus and apps over the tiny random-weight Llama."""

from __future__ import annotations

import json

import pytest

TEA = "# Tea\n\nGreen tea is steeped at 80 degrees for two minutes. Black tea takes boiling water. Oolong sits in between.\n"
BIKES = "A bicycle chain should be oiled every few hundred kilometres. Tyres need regular pumping.\n"
KITES = {"id": "k1", "title": "Kites", "text": "Kites fly best in steady wind. A long tail keeps a kite stable."}


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_corpus")
    (d / "tea.md").write_text(TEA)
    (d / "bikes.txt").write_text(BIKES)
    (d / "kites.jsonl").write_text(json.dumps(KITES) + "\n")
    return d


@pytest.fixture()
def make_client(tiny_lm, small_corpus_dir, tmp_path):
    """``make_client(**config)`` -> a started TestClient over the tiny LM; closed after the test."""
    from fastapi.testclient import TestClient

    from tessera.serve import ServeConfig, create_app

    clients = []

    def make(**overrides):
        cfg = {"corpora": [str(small_corpus_dir)], "encoder": None, "upload_dir": str(tmp_path / "uploads"),
               "max_new_tokens": 24, **overrides}
        client = TestClient(create_app(ServeConfig(**cfg), lm=tiny_lm))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)

