"""The ContextCite peer with our sentence partitioner (no NLTK download), on the tiny model."""

import numpy as np
from attribution_fixtures import one_thread  # noqa: F401

from tessera.attribution.contextcite import contextcite_citations, partitioner
from tessera.attribution.format import CitationContext

TEXT = "The museum opened in 1921. Bananas are rich in potassium. The secret code is 7391. Tennis is fun."


def test_partitioner_keeps_numbers():
    part = partitioner(TEXT)  # a plain string is split with pysbd
    assert part.num_sources == 4 and part.get_source(2) == "The secret code is 7391."
    assert part.get_context(np.array([False, True, False, True])) == "<C2> Bananas are rich in potassium.\n<C4> Tennis is fun.\n"
    assert part.get_context() == CitationContext.from_text(TEXT).numbered()


def test_contextcite_runs_on_tiny_model(tiny_lm):
    ctx = CitationContext.from_text(TEXT)
    statements, stats = contextcite_citations(tiny_lm, ctx, "What is the code?", ["The code is 7391.", "It is secret."],
                                              num_ablations=8)
    assert [s.text for s in statements] == ["The code is 7391.", "It is secret."]
    for s in statements:
        assert len(s.cited) <= 3 and all(1 <= a <= b <= 4 for a, b in s.spans)
    assert stats["sequences"] == 8 and stats["tokens"] > 8 * 20
