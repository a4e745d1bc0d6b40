"""Query rewriting with an LM before retrieval (ReasonIR's test-time compute; BRIGHT's "reasoning queries").

ReasonIR (PAPERS.md) retrieves with an LLM-written reasoning query: the model reasons
about what the query needs, then writes an expanded query; the text retrieved with
is the original query followed by the reasoning and the expansion.  Gains grow with
longer rewrites (ReasonIR-8B on BRIGHT: 24.4 -> 29.9 nDCG@10 with GPT-4 reasoning
queries); ``max_new_tokens`` is the length knob (ReasonIR's rewrites are several
hundred tokens; 128 by default here, scaled down for CPU).

Replies are asked for as JSON ``{"reasoning": ..., "expanded_query": ...}`` with the
reply started for the model; what cannot be parsed is used as raw text (recorded as
``method="raw"``), and a failed generation falls back to the original query.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REWRITE_MODES = ("none", "reason")
REWRITE_INSTRUCTION = (
    "You help a search engine. Think step by step about what the query is really asking, which concepts, mechanisms "
    "or evidence would answer it, and what a relevant document would contain. Then write an expanded search query "
    "with those terms. Reply with one JSON object with the keys reasoning and expanded_query.")


@dataclass
class Rewrite:
    query: str
    text: str  # what is retrieved with
    reasoning: str = ""
    expanded: str = ""
    method: str = "none"  # json | repaired | fields | raw | failed | none
    new_tokens: int = 0


def rewrite_messages(query: str) -> list[dict]:
    return [{"role": "system", "content": REWRITE_INSTRUCTION}, {"role": "user", "content": f"Query: {query}"}]


def _text(value) -> str:
    """The strings in a parsed JSON value, joined (a small model may nest lists or objects where text belongs)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return " ".join(t for t in (_text(v) for v in value.values()) if t)
    if isinstance(value, list):
        return " ".join(t for t in (_text(v) for v in value) if t)
    return ""


def rewrite_queries(backend, queries: Sequence[str], mode: str = "reason", max_new_tokens: int = 128,
                    seed: int = 0) -> list[Rewrite]:
    """``mode="reason"``: one LM rewrite per query (batched); ``"none"``: the queries as they are."""
    from tessera.errors import InputError
    from tessera.lm.jsonx import parse_json_reply

    if mode not in REWRITE_MODES:
        raise InputError(f"unknown --rewrite {mode!r}; use one of {', '.join(REWRITE_MODES)}")
    if mode == "none" or not queries:
        return [Rewrite(q, q) for q in queries]
    gens = backend.chat([rewrite_messages(q) for q in queries], max_new_tokens=max_new_tokens, seed=seed,
                        prefix='{"reasoning": "')
    out = []
    for q, g in zip(queries, gens):
        if g.error:
            out.append(Rewrite(q, q, method="failed"))
            continue
        obj, method = parse_json_reply(g.text, ("reasoning", "expanded_query"))
        if obj is None:
            obj, method = parse_json_reply(g.text, ("reasoning",))
        if obj is not None:
            reasoning, expanded = _text(obj.get("reasoning")), _text(obj.get("expanded_query"))
        else:
            reasoning, expanded, method = g.text.removeprefix('{"reasoning": "').strip(), "", "raw"
        text = "\n".join(t for t in (q, reasoning, expanded) if t)
        out.append(Rewrite(q, text, reasoning, expanded, method, g.new_tokens))
    return out


class RewriteCache:
    """Rewrites kept in a JSONL file keyed by (model, mode, length, query), so evaluations resume and reuse them."""

    def __init__(self, path: str | Path, backend_name: str, mode: str, max_new_tokens: int):
        self.path = Path(path)
        self.tag = f"{backend_name}|{mode}|{max_new_tokens}"
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            from tessera.data.jsonl import read_jsonl

            self.rows = {r["key"]: r for r in read_jsonl(self.path, skip_bad=True) if "key" in r}

    def key(self, query: str) -> str:
        return hashlib.sha1(f"{self.tag}|{query}".encode()).hexdigest()[:16]

    def rewrite(self, backend, queries: Sequence[str], mode: str, max_new_tokens: int, seed: int = 0) -> list[Rewrite]:
        from tessera.data.jsonl import append_jsonl

        todo = [q for q in dict.fromkeys(queries) if self.key(q) not in self.rows]
        for r in rewrite_queries(backend, todo, mode, max_new_tokens, seed):
            row = {"key": self.key(r.query), **r.__dict__}
            append_jsonl(self.path, row)
            self.rows[row["key"]] = row
        return [Rewrite(**{k: v for k, v in self.rows[self.key(q)].items() if k != "key"}) for q in queries]


def rewrite_stats(rewrites: Sequence[Rewrite]) -> dict:
    from collections import Counter

    n = max(1, len(rewrites))
    return {"n": len(rewrites), "methods": dict(Counter(r.method for r in rewrites)),
            "mean_new_tokens": round(sum(r.new_tokens for r in rewrites) / n, 1),
            "mean_words_added": round(sum(len(r.text.split()) - len(r.query.split()) for r in rewrites) / n, 1)}


def dumps(rewrites: Sequence[Rewrite]) -> str:
    return json.dumps([r.__dict__ for r in rewrites], ensure_ascii=False, indent=2)
