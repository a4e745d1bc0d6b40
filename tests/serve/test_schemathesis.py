"""Property-based API tests: schemathesis generates requests from the app's own OpenAPI spec (bounded examples).

Every check schemathesis has runs (no 5xx, documented status codes, content types,
headers and response schemas, invalid data rejected) except ``positive_data_acceptance``:
schema-valid requests may still be refused by the server's own limits (``k`` above
``max_k``, an unknown corpus id, a whitespace question), with a 400 naming the field.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import CHECKS  # noqa: E402

MAX_EXAMPLES = 10  # per operation: the whole test stays within a few seconds on the tiny model


def conformance_failures(app, max_examples: int = MAX_EXAMPLES) -> dict[str, str]:
    """Run schemathesis on every operation of ``app``'s spec -> {operation: failure} (empty when all conform)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    excluded = [c for c in CHECKS.get_all() if c.__name__ == "positive_data_acceptance"]
    failures = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(excluded_checks=excluded)

        try:
            check()
        except Exception as e:  # noqa: BLE001 - collected, reported together
            failures[operation.label] = f"{type(e).__name__}: {e}"[:3000]
    return failures


def test_api_conforms_to_its_spec(tiny_lm, small_corpus_dir, tmp_path):
    from tessera.serve import ServeConfig, create_app

    cfg = ServeConfig(corpora=[str(small_corpus_dir)], encoder=None, max_new_tokens=4, max_new_tokens_limit=8,
                      upload_dir=str(tmp_path / "uploads"), max_upload_bytes=64 * 1024, max_uploaded_corpora=4,
                      request_timeout_s=30)
    app = create_app(cfg, lm=tiny_lm)
    failures = conformance_failures(app)
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
