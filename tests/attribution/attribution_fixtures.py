"""Shared helpers for the attribution tests (imported by the test modules; not a conftest, so
its name cannot clash with tests/conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine is shared: one torch thread is several times faster than two under load."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_hotpot_examples(n: int = 4) -> list[dict]:
    """Small HotpotQA-format examples (constructed here, not taken from the real data)."""
    out = []
    for k in range(n):
        out.append({
            "_id": f"ex{k}", "question": f"Who founded company {k}?", "answer": f"Person {k}", "type": "bridge", "level": "easy",
            "context": [[f"Company {k}", [f"Company {k} makes tools.", f" It was founded by Person {k}.", " It is old."]],
                        [f"Person {k}", [f"Person {k} is an engineer.", " She lives in Paris."]],
                        ["Other", ["The sky is blue.", " Grass is green."]]],
            "supporting_facts": [[f"Company {k}", 1], [f"Person {k}", 0]],
        })
    return out


def write_tiny_hotpot(path, n: int = 4):
    path.write_text(json.dumps(tiny_hotpot_examples(n)))
    return path
