"""NEST: mixture arithmetic, span copying and attribution, relaxed acceptance, masking, key cache, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from attribution_fixtures import one_thread  # noqa: F401  (module-scoped autouse: one torch thread)

from tessera.attribution import nest as N
from tessera.attribution import nest_baselines as B
from tessera.attribution import nest_store as S
from tessera.data.chunking import Passage
from tessera.data.types import Document
from tessera.errors import ContextTooLongError, EmptyCorpusError, InputError, TesseraError


DOCS = [
    Document("otters", "Sea otters",
             "Sea otters are marine mammals native to the coasts of the northern and eastern North Pacific Ocean. "
             "Adult sea otters typically weigh between 14 and 45 kg, making them the heaviest members of the weasel "
             "family but among the smallest marine mammals. Unlike most marine mammals, the sea otter's primary form "
             "of insulation is an exceptionally thick coat of fur, the densest in the animal kingdom."),
    Document("lighthouse", "Bell Rock Lighthouse",
             "The Bell Rock Lighthouse, off the coast of Angus, Scotland, is the world's oldest surviving sea-washed "
             "lighthouse. It was built between 1807 and 1810 by Robert Stevenson on the Bell Rock in the North Sea, "
             "11 miles east of the Firth of Tay. Standing 35 metres tall, its light is visible from 35 statute miles "
             "inland. The masonry work on which the lighthouse rests was constructed with such precision that it has "
             "not been replaced or adapted in 200 years."),
    Document("volcano", "Mount Erebus",
             "Mount Erebus is the second-highest volcano in Antarctica and the southernmost active volcano on Earth. "
             "It has been continuously active since 1972 and hosts one of the few long-lived lava lakes in the world."),
]


def _passages(docs=DOCS, size: int | None = None, overlap: int = 0) -> list[Passage]:
    out = []
    for d in docs:
        if size is None:
            out.append(Passage(f"{d.id}#0", d.id, d.title, d.text, 0, len(d.text)))
            continue
        start, k = 0, 0
        while start < len(d.text):
            end = min(len(d.text), start + size)
            out.append(Passage(f"{d.id}#{k}", d.id, d.title, d.text[start:end], start, end))
            if end == len(d.text):
                break
            start, k = end - overlap, k + 1
    return out


# --------------------------------------------------------------------------- arithmetic


def test_knn_distribution_matches_direct_computation():
    torch.manual_seed(0)
    d = torch.rand(3, 7) * 50
    v = torch.randint(0, 5, (3, 7))
    dim = 16
    got = N.knn_distribution(d, v, vocab_size=5, dim=dim)
    for r in range(3):
        w = [math.exp(-float(d[r, i]) / math.sqrt(dim)) for i in range(7)]
        z = sum(w)
        want = [sum(w[i] for i in range(7) if int(v[r, i]) == t) / z for t in range(5)]
        assert got[r].tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert torch.allclose(got.sum(-1), torch.ones(3))


def test_relative_retrieval_confidence_and_lambda_follow_nest_code():
    d = torch.tensor([[1.0, 2.0, 4.0, 8.0], [3.0, 3.0, 3.0, 3.0], [0.0, 5.0, 6.0, 10.0]])
    scores = -d  # the code's knn scores; compute_inter_coef: sigmoid((max/min - alpha) / tau)
    code = torch.sigmoid((scores.max(-1).values / scores.min(-1).values - 0.3) / 0.1)
    rrc = N.relative_retrieval_confidence(d)
    assert rrc.tolist() == pytest.approx([1 / 8, 1.0, 0.0])
    assert N.retrieval_lambda(rrc, 0.3, 0.1).tolist() == pytest.approx(code.tolist())
    assert N.retrieval_lambda(torch.tensor(0.3)).item() == pytest.approx(0.5)


def test_mixture_and_relaxed_acceptance():
    p_lm = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p_knn = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    lam = torch.tensor([0.25, 0.9])
    p_m = N.mixture(p_lm, p_knn, lam)
    assert p_m[0].tolist() == pytest.approx([0.175, 0.8, 0.025])
    assert p_m[1].tolist() == pytest.approx([0.14, 0.14, 0.72])
    assert torch.allclose(N.mixture(p_lm, p_knn, 1.0), p_lm)
    # accept x iff p_M(x) >= gamma * max p_M; the longest passing prefix
    assert N.relaxed_accept_length(p_m, torch.tensor([1, 0]), gamma=0.1) == 2  # 0.8 >= .08; 0.14 >= .072
    assert N.relaxed_accept_length(p_m, torch.tensor([1, 0]), gamma=0.5) == 1  # 0.14 < 0.36
    assert N.relaxed_accept_length(p_m, torch.tensor([2, 2]), gamma=0.5) == 0  # 0.025 < 0.4
    assert N.relaxed_accept_length(p_m, torch.tensor([1, 2]), gamma=1.0) == 2  # the argmax always passes gamma <= 1


def test_select_neighbour_takes_highest_mixture_token_then_nearest():
    values = torch.tensor([5, 3, 5, 7])
    p_m = torch.zeros(10)
    p_m[5], p_m[3], p_m[7] = 0.5, 0.2, 0.3
    assert N.select_neighbour(p_m, torch.tensor([1, 2, 0, 3]), values) == 2  # token 5, nearest of entries 2 and 0
    used = torch.tensor([False, False, True, False])
    assert N.select_neighbour(p_m, torch.tensor([1, 2, 0, 3]), values, used) == 0
    assert N.select_neighbour(p_m, torch.tensor([2]), values, used) == -1


def test_spans_render_and_ratio(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok(" hello world again", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    srcs = [None, S.TokenSource("d1", "d1#0", 10, 16), S.TokenSource("d1", "d1#0", 16, 22)]
    r = S.make_result(tiny_lm, ids, srcs, S.NestStats())
    assert [s.copied for s in r.spans] == [False, True]
    assert r.spans[1].start == 10 and r.spans[1].end == 22 and r.spans[1].n_tokens == 2
    assert r.render() == " hello world again [d1]"
    assert r.attribution_ratio == pytest.approx(2 / 3)
    d = r.to_dict()
    assert d["tokens"][1]["source"]["doc_id"] == "d1" and d["stats"]["copied_tokens"] == 2
    json.dumps(d)


# --------------------------------------------------------------------------- datastore and key cache


def test_datastore_offsets_point_into_documents(tiny_lm):
    ps = _passages(size=120, overlap=30)
    ds, info = S.build_datastore(tiny_lm, ps, cache=False, progress=False)
    assert info.built == len(ps) and info.cached == 0 and len(ds) == info.tokens > 0
    texts = {d.id: d.text for d in DOCS}
    for i in range(len(ds)):
        src = ds.source(i)
        assert texts[src.doc_id][src.start:src.end] == tiny_lm.tokenizer.decode([int(ds.values[i])])
    # continuation crosses into the next passage of the same document where it starts at the same character
    crossings = [i for i in range(len(ds)) if ds.next[i] >= 0 and ds.passage_index[ds.next[i]] != ds.passage_index[i]]
    for i in crossings:
        j = ds.next[i]
        assert ds.source(j).start == ds.source(i).end and ds.source(j).doc_id == ds.source(i).doc_id


def test_key_cache_is_reused_and_invalidated(tiny_lm, tessera_home):
    ps = _passages()[:2]
    ds1, info1 = S.build_datastore(tiny_lm, ps, progress=False)
    files = sorted((tessera_home / "nest" / "keys").rglob("*.safetensors"))
    assert info1.built + info1.cached == 2 and len(files) >= 2
    assert not list((tessera_home / "nest").rglob("*.tmp"))
    ds2, info2 = S.build_datastore(tiny_lm, ps, progress=False)
    assert info2.cached == 2 and info2.built == 0
    assert torch.equal(ds1.keys, ds2.keys) and torch.equal(ds1.values, ds2.values) and torch.equal(ds1.starts, ds2.starts)
    changed = Passage(ps[1].id, ps[1].doc_id, ps[1].title, ps[1].text.replace("1807", "1808"), ps[1].start, ps[1].end)
    ds3, info3 = S.build_datastore(tiny_lm, [ps[0], changed], progress=False)
    assert info3.cached == 1 and info3.built == 1
    assert not torch.equal(ds3.keys, ds1.keys)
    # a corrupt cache file is recomputed, not trusted
    path = S.key_cache_path(tiny_lm, ps[0])
    path.write_bytes(b"garbage")
    ds4, info4 = S.build_datastore(tiny_lm, ps, progress=False)
    assert info4.built == 1 and torch.equal(ds4.keys, ds1.keys)


# --------------------------------------------------------------------------- decoding


def _naive_mixture_greedy(lm, ds, ids, cfg, n):
    """Direct recomputation: full forward each step, cdist distances, the code's confidence formula."""
    seq = ids[0].tolist()
    out = []
    for _ in range(n):
        o = lm.model(input_ids=torch.tensor([seq]), output_hidden_states=True)
        logits, h = o.logits[0, -1].float(), o.hidden_states[-2][0, -1].float()
        p_lm = torch.softmax(logits / cfg.lm_temperature, -1)
        d = torch.cdist(h[None], ds.keys)[0] ** 2
        k = min(cfg.token_k, len(d))
        dist, idx = torch.topk(d, k, largest=False)
        w = torch.softmax(-dist / math.sqrt(h.numel()), -1)
        p_knn = torch.zeros_like(p_lm)
        for wi, vi in zip(w.tolist(), ds.values[idx].tolist()):
            p_knn[vi] += wi
        s = -dist
        lam = torch.sigmoid((s.max() / s.min() - cfg.alpha) / cfg.tau)
        tok = int(torch.argmax(lam * p_lm + (1 - lam) * p_knn))
        out.append(tok)
        seq.append(tok)
    return out


@torch.inference_mode()
def test_strict_gamma_accepts_nothing_and_equals_mixture_greedy(tiny_lm):
    ps = _passages()
    ds, _ = S.build_datastore(tiny_lm, ps, cache=False, progress=False)
    ids = N.encode_prompt(tiny_lm, "Sea otters are marine mammals native to")
    cfg = N.NestConfig(gamma=1.5, delta=1.01, token_k=64)  # always propose, never accept
    res = N.nest_decode(tiny_lm, ds, ids, cfg, max_new_tokens=12)
    assert res.stats.copied_tokens == 0 and res.stats.proposals > 0
    assert set(res.stats.accepted_span_lengths) == {0}
    ref = B.knn_lm_generate(tiny_lm, ds, ids, 12, config=cfg, knn_lambda=None)
    assert res.token_ids == ref.token_ids
    assert res.token_ids == _naive_mixture_greedy(tiny_lm, ds, ids, cfg, len(res.token_ids))
    assert res.stats.forward_passes == len(res.token_ids) - 1  # one pass per token, no span passes


@torch.inference_mode()
def test_used_positions_are_never_copied_twice(tiny_lm):
    ps = _passages(size=150, overlap=60)  # overlapping passages of the same documents
    ds, _ = S.build_datastore(tiny_lm, ps, cache=False, progress=False)
    ids = N.encode_prompt(tiny_lm, "Sea otters are")
    cfg = N.NestConfig(gamma=0.0, delta=1.01, window=16)  # accept everything, always propose
    res = N.nest_decode(tiny_lm, ds, ids, cfg, max_new_tokens=260)
    copied = [t.source for t in res.tokens if t.source is not None]
    assert len(copied) > 20 and res.stats.forward_passes < len(res.tokens)
    by_doc: dict[str, list[tuple[int, int]]] = {}
    for s in copied:
        by_doc.setdefault(s.doc_id, []).append((s.start, s.end))
    for spans in by_doc.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "a piece of a document was copied twice"
    texts = {d.id: d.text for d in DOCS}
    for span in res.spans:
        if span.copied:
            assert texts[span.doc_id][span.start:span.end] == span.text
    assert 0 < res.stats.attribution_ratio < 1  # the datastore ran out, the model wrote the rest


@pytest.mark.integration
def test_copies_the_exact_continuation_and_attributes_it(embedded_lm, tmp_path):
    from tessera.retrieval.corpus_index import CorpusIndex

    index = CorpusIndex.from_documents(DOCS, name="nest-test", cache=False)
    doc = DOCS[1]
    ids = embedded_lm.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    prompt = embedded_lm.tokenizer.decode(ids[:20])
    assert doc.text.startswith(prompt)
    streamed = []
    res = N.nest_generate(prompt, corpus=index, lm=embedded_lm, max_new_tokens=40, on_token=streamed.append)
    assert res.stats.new_tokens == 40
    assert doc.text[len(prompt):].startswith(res.text), (res.text, doc.text[len(prompt):])
    assert res.stats.attribution_ratio == 1.0 and {t.source.doc_id for t in res.tokens} == {"lighthouse"}
    assert res.spans[0].start == len(prompt) and res.spans[-1].end == len(prompt) + len(res.text)
    assert res.stats.forward_passes <= 2 and max(res.stats.accepted_span_lengths) >= 20
    assert res.render().endswith("[lighthouse]") and "".join(streamed) == res.text


@torch.inference_mode()
def test_baselines_run_in_the_same_harness(tiny_lm):
    ds, _ = S.build_datastore(tiny_lm, _passages(), cache=False, progress=False)
    ids = N.encode_prompt(tiny_lm, "Mount Erebus is")
    g = B.greedy_generate(tiny_lm, ids, 10)
    ref = tiny_lm.model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tiny_lm.tokenizer.pad_token_id)
    assert g.token_ids == [t for t in ref[0, ids.shape[1]:].tolist()][: len(g.token_ids)]
    knn = B.knn_lm_generate(tiny_lm, ds, ids, 10)
    assert knn.method == "knn-lm" and knn.stats.new_tokens == len(knn.token_ids) and knn.stats.copied_tokens == 0
    rag_ids = N.encode_prompt(tiny_lm, B.rag_prompt(ds.passages, "Mount Erebus is"))
    pl = B.prompt_lookup_generate(tiny_lm, rag_ids, 10)
    assert pl.token_ids == B.greedy_generate(tiny_lm, rag_ids, 10).token_ids


def test_nest_answer_uses_ask_sources_as_datastore(tiny_lm):
    from tessera.ask import Source, build_messages

    sources = [Source(i + 1, p.doc_id, p.title, p.id, 1.0, p.text, p.start, p.end) for i, p in enumerate(_passages()[:2])]
    messages = build_messages("How heavy are sea otters?", sources)
    res = N.nest_answer(tiny_lm, None, "How heavy are sea otters?", messages, passages=sources, max_new_tokens=6)
    assert [p.id for p in res.passages] == [s.passage_id for s in sources]
    assert res.stats.datastore_tokens > 0 and 0 < res.stats.new_tokens <= 6
    with pytest.raises(InputError):
        N.nest_answer(tiny_lm, None, "q", messages, max_new_tokens=4)  # no passages and no index


# --------------------------------------------------------------------------- bad input and CLI


def test_bad_input_raises_tessera_errors(tiny_lm, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmptyCorpusError):
        N.nest_generate("Sea otters", corpus=str(empty), lm=tiny_lm)
    with pytest.raises(ContextTooLongError):
        N.nest_generate("otter " * 1100, corpus=str(empty), lm=tiny_lm, max_new_tokens=8)
    with pytest.raises(InputError):
        N.nest_generate("   ", corpus=str(empty), lm=tiny_lm)
    with pytest.raises(InputError):
        N.NestConfig(window=0)
    with pytest.raises(InputError):
        N.nest_decode(tiny_lm, None, torch.tensor([[1, 2]]), max_new_tokens=0)
    assert issubclass(EmptyCorpusError, TesseraError)


def test_cli_generate(tiny_lm_dir, tmp_path):
    from typer.testing import CliRunner

    from tessera.attribution.nest_cli import nest_app

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) for d in DOCS))
    runner = CliRunner()
    r = runner.invoke(nest_app, ["generate", "Sea otters are marine mammals", "--corpus", str(corpus), "--lm", str(tiny_lm_dir),
                                 "--max-new-tokens", "6", "--json", "--gamma", "0.05"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["stats"]["new_tokens"] <= 6 and "rendered" in out and out["passages"]
    r = runner.invoke(nest_app, ["generate", "Sea otters are", "--corpus", str(corpus), "--lm", str(tiny_lm_dir),
                                 "--max-new-tokens", "4", "--gamma", "0", "--delta", "1.01"])
    assert r.exit_code == 0, r.output
    assert "[otters]" in r.stdout and "attribution" in r.stdout
    r = runner.invoke(nest_app, ["generate", " ", "--corpus", str(corpus), "--lm", str(tiny_lm_dir)])
    assert isinstance(r.exception, InputError)
