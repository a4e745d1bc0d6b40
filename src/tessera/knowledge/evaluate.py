"""Knowledge QA evaluation: greedy answers, normalized exact match, answer recall, per attribute.

PIT (section 2, "Evaluation metrics"): greedy decoding; exact match (EM) after lower-casing and
removing articles, punctuation and extra whitespace (the SQuAD normalization); answer recall =
the share of the gold answer's normalized tokens found in the prediction.  Closed-book: the
question alone; open-book: the entity's document before the question (the paper's reference
that shows how much a model could answer when the knowledge is in context).

:func:`storage_gate` asks the other question a comparison of schedules depends on: did the model
store the facts at all?  It completes each attribute value inside the entity's own document
(Physics of Language Models 3.1 separates storage from extraction the same way).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict

from tessera.errors import InputError
from tessera.knowledge.format import _bos, prompt_ids

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def answer_recall(prediction: str, gold: str) -> float:
    """Share of the gold answer's normalized tokens present in the prediction (multiset)."""
    gold_toks = normalize_answer(gold).split()
    if not gold_toks:
        return float(not normalize_answer(prediction))
    pred = defaultdict(int)
    for t in normalize_answer(prediction).split():
        pred[t] += 1
    hit = 0
    for t in gold_toks:
        if pred[t] > 0:
            pred[t] -= 1
            hit += 1
    return hit / len(gold_toks)


def clean_generation(text: str) -> str:
    """The answer is the first line of the generation (the model may continue with a new question)."""
    text = text.strip()
    for stop in ("\n", "Question:"):
        text = text.split(stop, 1)[0]
    return text.strip()


def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 16, batch_size: int = 64) -> list[str]:
    """Greedy answers for token-id prompts, in batches of similar length, through
    :meth:`tessera.lm.local.LocalLM.generate_batch` (tessera's engine for Llama-family models: the QA
    template's shared prefix is computed once per batch, finished answers leave the batch)."""
    from tessera.lm.local import LocalLM

    model.eval()
    lm = LocalLM(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = lm.generate_batch([prompts[i] for i in idx], max_new_tokens=max_new_tokens)
        for r, i in zip(rows, idx):
            answers[i] = clean_generation(tokenizer.decode(r.token_ids, skip_special_tokens=True))
    return answers


def evaluate_qa(model, tokenizer, qa: list, *, qa_format: str = "plain", contexts: dict[str, str] | None = None,
                max_new_tokens: int = 16, batch_size: int = 64) -> dict:
    """EM and answer recall (in %) over ``qa`` (KnowledgeQA rows), overall and per attribute.

    ``contexts`` maps an entity (``doc_id``) to its document for open-book answering.
    """
    prompts = [prompt_ids(tokenizer, q.question, (contexts or {}).get(q.doc_id), qa_format) for q in qa]
    preds = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = [{"id": q.id, "attribute": q.attribute, "answer": q.answer, "prediction": p,
             "em": exact_match(p, q.answer), "recall": answer_recall(p, q.answer)} for q, p in zip(qa, preds)]
    return summarize(rows)


def summarize(rows: list[dict]) -> dict:
    def agg(rs):
        n = len(rs)
        return {"em": 100 * sum(r["em"] for r in rs) / n if n else 0.0,
                "recall": 100 * sum(r["recall"] for r in rs) / n if n else 0.0, "n": n}

    by_attr: dict[str, list] = defaultdict(list)
    for r in rows:
        by_attr[r["attribute"] or "-"].append(r)
    return {**agg(rows), "per_attribute": {a: agg(rs) for a, rs in sorted(by_attr.items())}, "rows": rows}


def majority_baseline(train_qa: list, test_qa: list) -> dict:
    """EM of always answering an attribute's most frequent *train* answer: the floor a model reaches
    without knowing anything about the test entities (an empty attribute is one group)."""
    from collections import Counter

    top: dict[str, str] = {}
    for attr in {q.attribute for q in train_qa}:
        top[attr] = Counter(q.answer for q in train_qa if q.attribute == attr).most_common(1)[0][0]
    rows = [{"id": q.id, "attribute": q.attribute, "answer": q.answer, "prediction": top.get(q.attribute, ""),
             "em": exact_match(top.get(q.attribute, ""), q.answer), "recall": answer_recall(top.get(q.attribute, ""), q.answer)}
            for q in test_qa]
    return summarize(rows)


def storage_gate(model, tokenizer, docs: list, *, per_entity: int = 1, batch_size: int = 64) -> dict:
    """Completion accuracy (in %) of the attribute values inside ``docs``, overall and per attribute.

    ``docs``: :class:`~tessera.data.knowledge.KnowledgeDoc` rows with ``spans`` (synthetic biographies
    from :func:`tessera.data.bios.build_bios`); the first ``per_entity`` documents of each entity are used.
    The model reads the document up to each value (BOS + the text before it, as the document stage
    trained it) and completes it greedily; a hit is a completion whose normalized text is the value's or
    starts with it followed by a word boundary.  A model that stored the facts passes; QA exact match
    then measures only whether questions can extract them.
    """
    seen: dict[str, int] = defaultdict(int)
    items = []
    for d in docs:
        if not d.spans or seen[d.entity] >= per_entity:
            continue
        seen[d.entity] += 1
        for attr, start, end in d.spans:
            items.append((d, attr, d.text[:start].rstrip(), d.text[start:end]))
    if not items:
        raise InputError("the storage gate needs documents with attribute spans (synthetic biographies from build_bios)")
    prompts = [_bos(tokenizer) + tokenizer(prefix, add_special_tokens=False).input_ids for _, _, prefix, _ in items]
    longest = max(len(tokenizer(" " + value, add_special_tokens=False).input_ids) for *_, value in items)
    from tessera.lm.local import LocalLM

    model.eval()
    lm = LocalLM(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        for r, i in zip(lm.generate_batch([prompts[i] for i in idx], max_new_tokens=longest + 2), idx):
            completions[i] = tokenizer.decode(r.token_ids, skip_special_tokens=True)
    rows = []
    for (d, attr, _, value), text in zip(items, completions):
        got, want = normalize_answer(text), normalize_answer(value)
        hit = bool(want) and (got == want or got.startswith(want + " "))
        rows.append({"doc": d.id, "attribute": attr, "value": value, "completion": text.strip(), "hit": hit})
    by_attr: dict[str, list] = defaultdict(list)
    for r in rows:
        by_attr[r["attribute"]].append(r["hit"])
    return {"accuracy": 100 * sum(r["hit"] for r in rows) / len(rows), "n": len(rows),
            "per_attribute": {a: 100 * sum(h) / len(h) for a, h in sorted(by_attr.items())}, "rows": rows}
