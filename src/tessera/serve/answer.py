"""An :class:`~tessera.ask.AskResult` as the API's answer: statements with citations, spans, sources, timings."""

from __future__ import annotations


def citations_of(statement) -> list[dict]:
    """A SelfCite statement's cited sentences grouped by the source passage they come from (in citation order)."""
    groups: dict[tuple, dict] = {}
    for s in statement.cited:
        key = (s.source, s.doc_id)
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"doc_id": s.doc_id, "title": s.title, "sentence_ids": [], "text": "", "source": s.source,
                               "sentences": []}
        g["sentence_ids"].append(s.number)
        g["sentences"].append({"id": s.number, "text": " ".join(s.text.split()), "start": s.start, "end": s.end})
    for g in groups.values():
        g["text"] = " ".join(x["text"] for x in g["sentences"])
    return list(groups.values())


def spans_of(result) -> list[dict]:
    """NEST's spans (copied ones with their document and passage); greedy decoding: one span, the model's."""
    if result.nest is None:
        return [{"text": result.answer, "source": None}] if result.answer else []
    by_passage = {s.passage_id: s.number for s in result.sources}
    out = []
    for sp in result.nest.spans:
        src = None
        if sp.copied:
            src = {"doc_id": sp.doc_id, "start": sp.start, "end": sp.end, "passage_id": sp.passage_id,
                   "source": by_passage.get(sp.passage_id)}
        out.append({"text": sp.text, "source": src})
    return out


def source_dict(s) -> dict:
    return {"number": s.number, "doc_id": s.doc_id, "title": s.title, "passage_id": s.passage_id, "score": float(s.score),
            "text": s.text, "start": s.start, "end": s.end}


def ask_response(result, queue_s: float, total_s: float) -> dict:
    t = result.timings
    timings = {"queue_s": queue_s, "retrieve_s": t.get("retrieve_s", 0.0), "generate_s": t.get("generate_s", 0.0),
               "time_to_first_token_s": t.get("time_to_first_token_s", 0.0), "cite_s": t.get("cite_s"), "total_s": total_s}
    if result.nest is not None:  # NEST keys the retrieved passages before decoding (cached after the first time)
        timings["keys_s"] = result.nest.stats.keys_s
    return {
        "question": result.question,
        "answer": result.answer,
        "statements": [{"text": st.text, "citations": citations_of(st), "reward": st.reward} for st in result.statements],
        "spans": spans_of(result),
        "sources": [source_dict(s) for s in result.sources],
        "timings": timings,
        "corpus": result.corpus,
        "retriever": result.retriever,
        "decode": result.decode,
        "model": result.model,
        "prompt_tokens": result.stats.prompt_tokens,
        "new_tokens": result.stats.new_tokens,
        "attribution_ratio": result.nest.attribution_ratio if result.nest is not None else None,
    }
