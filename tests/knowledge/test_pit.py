"""PIT: schedules (on the built stage plans), answer-only QA loss, data readers, EM, and the recipe end to end."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tessera.data.bios import build_bios
from tessera.errors import DataFormatError, InputError
from tessera.knowledge.evaluate import answer_recall, clean_generation, exact_match, normalize_answer
from tessera.knowledge.format import IGNORE, KnowledgeCollator, encode_document, encode_qa
from tessera.knowledge.schedules import DOCS_TEST, DOCS_TRAIN, QA_TRAIN, SCHEDULES, build_plan, kept_qa_ids
from tessera_testing import run_cli

EXPECTED = {  # the paper's numbering (PIT, Figure 4 / Table 2)
    1: [{DOCS_TEST}],
    2: [{DOCS_TRAIN, DOCS_TEST}, {QA_TRAIN}],
    4: [{DOCS_TRAIN, DOCS_TEST, QA_TRAIN}],
    5: [{QA_TRAIN}, {DOCS_TEST}],
    6: [{QA_TRAIN}, {DOCS_TRAIN}, {DOCS_TEST}],
    7: [{QA_TRAIN, DOCS_TRAIN}, {DOCS_TEST}],
    8: [{QA_TRAIN}, {QA_TRAIN, DOCS_TRAIN}, {DOCS_TEST}],
}


@pytest.fixture(scope="module")
def kset():
    return build_bios(24, test_fraction=0.5, seed=0, bios_per_person=2)


def _sources(kset):
    return {DOCS_TRAIN: {("doc", d.id) for d in kset.train_docs}, DOCS_TEST: {("doc", d.id) for d in kset.test_docs},
            QA_TRAIN: {("qa", q.id) for q in kset.train_qa}}


def test_schedule_numbers_are_the_papers():
    assert sorted(SCHEDULES) == [1, 2, 4, 5, 6, 7, 8]
    assert SCHEDULES[7][0] == "PIT" and SCHEDULES[8][0] == "PIT++"


@pytest.mark.parametrize("number", sorted(EXPECTED))
def test_each_schedule_trains_on_exactly_its_stages(kset, number):
    plan = build_plan(kset, number, doc_epochs=3, qa_epochs=2, keep_qa=5, seed=1)
    src = _sources(kset)
    kept = {("qa", q) for q in kept_qa_ids(kset, 5, 1)}
    assert [set(s.sources) for s in plan.stages] == EXPECTED[number]
    test_qa = {q.id for q in kset.test_qa}
    for stage, want in zip(plan.stages, EXPECTED[number]):
        counts = Counter(stage.items)
        expected_items = set().union(*(src[s] for s in want))
        doc_only = QA_TRAIN not in want
        assert set(counts) == expected_items | (kept if doc_only else set())  # nothing more, nothing less
        for item, n in counts.items():
            epochs = 2 if item[0] == "qa" and not doc_only else 3
            assert n == epochs, (item, n)  # every item exactly its epochs
        assert not {i for k, i in stage.items if k == "qa"} & test_qa  # test people's QA never trained on
        assert stage.kept_qa == (tuple(sorted(q for _, q in kept)) if doc_only else ())


def test_no_test_qa_in_any_stage_of_any_schedule_even_with_a_budget(kset):
    lengths = {("doc", d.id): 50 for d in kset.documents} | {("qa", q.id): 20 for q in kset.qa}
    budget = build_plan(kset, 2, lengths=lengths).tokens
    test_qa = {q.id for q in kset.test_qa}
    for number in SCHEDULES:
        plan = build_plan(kset, number, lengths=lengths, budget_tokens=budget)
        assert abs(plan.tokens - budget) / budget < 0.02  # equal token budgets
        for stage in plan.stages:
            assert not {i for k, i in stage.items if k == "qa"} & test_qa


def test_stages_are_shuffled_and_deterministic(kset):
    a = build_plan(kset, 4, doc_epochs=2, qa_epochs=2, seed=0)
    b = build_plan(kset, 4, doc_epochs=2, qa_epochs=2, seed=0)
    c = build_plan(kset, 4, doc_epochs=2, qa_epochs=2, seed=1)
    assert a.stages[0].items == b.stages[0].items != c.stages[0].items
    kinds = [k for k, _ in a.stages[0].items]
    runs = sum(1 for x, y in zip(kinds, kinds[1:]) if x != y)
    assert runs > len(kinds) // 4  # documents and QA are interleaved, not in blocks
    ids = [i for k, i in a.stages[0].items if k == "doc"]
    assert ids[: len(kset.documents)] != [d.id for d in kset.documents]  # not in corpus order


def test_unknown_schedule_and_missing_sources(kset):
    with pytest.raises(InputError, match="known schedules"):
        build_plan(kset, 3)


@pytest.fixture(scope="module")
def tok(embedded_lm_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(embedded_lm_dir)
    t.pad_token = t.pad_token or t.eos_token
    return t


def test_qa_loss_masks_everything_but_the_answer(tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ex = encode_qa(tok, "Which city was Ann Lee born in?", "Porto")
    labelled = [t for t in ex["labels"] if t != IGNORE]
    assert tok.decode(labelled) == " Porto" + tok.eos_token  # answer + EOS only
    first = ex["labels"].index(labelled[0])
    assert all(t == IGNORE for t in ex["labels"][:first]) and ex["input_ids"][first:] == labelled
    assert ex["input_ids"][0] == tok.bos_token_id
    chat = encode_qa(tok, "Which city was Ann Lee born in?", "Porto", qa_format="chat")
    assert tok.decode([t for t in chat["labels"] if t != IGNORE]) == "Porto" + tok.eos_token
    assert "Which city was Ann Lee born in?" in tok.decode(chat["input_ids"])
    doc = encode_document(tok, "Ann Lee was born in Porto.")
    assert doc["input_ids"][0] == tok.bos_token_id and doc["input_ids"][-1] != tok.eos_token_id  # BOS, no EOS
    assert doc["labels"] == doc["input_ids"]
    batch = KnowledgeCollator(tok.pad_token_id)([ex, doc])
    assert (batch["labels"][1, len(doc["input_ids"]):] == IGNORE).all()
    # the model's loss is the cross-entropy of the answer tokens alone
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.tensor([ex["input_ids"]])
    loss = model(input_ids=ids, labels=torch.tensor([ex["labels"]])).loss
    logits = model(input_ids=ids).logits[0]
    pos = range(first - 1, len(ex["input_ids"]) - 1)
    manual = torch.nn.functional.cross_entropy(logits[list(pos)], ids[0, first:])
    assert torch.allclose(loss, manual, atol=1e-5)


def test_exact_match_normalization():
    assert normalize_answer("  The Lyon. ") == "lyon"
    assert exact_match("an Apple, Inc.", "apple inc") == 1.0
    assert exact_match("July 4, 1939", "July 4 1939") == 1.0
    assert exact_match("July 4, 1938", "July 4, 1939") == 0.0
    assert exact_match("Theodore", "odore") == 0.0  # articles only as whole words
    assert answer_recall("Halden Polytechnic in Graz", "Halden Polytechnic") == 1.0
    assert answer_recall("Halden College", "Halden Polytechnic") == 0.5
    assert clean_generation(" Porto\nQuestion: next") == "Porto"


def test_majority_answer_floor():
    from tessera.data.knowledge import KnowledgeQA
    from tessera.knowledge.evaluate import majority_baseline

    train = [KnowledgeQA(f"t{i}", f"p{i}", "q", a, "city") for i, a in enumerate(["Lyon", "Lyon", "Porto"])]
    test = [KnowledgeQA("x1", "p9", "q", "Lyon", "city"), KnowledgeQA("x2", "p8", "q", "Graz", "city")]
    res = majority_baseline(train, test)
    assert res["em"] == 50.0 and res["per_attribute"]["city"]["n"] == 2


def _write_user_data(tmp_path, bad_qa_line: str | None = None):
    docs = tmp_path / "docs.jsonl"
    qa = tmp_path / "qa.jsonl"
    names = ["Ann Lee", "Bob Roe", "Cid Poe", "Dee Fox"]
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": f"{n} was born in City{i}. {n} likes tea."}) + "\n"
                            for i, n in enumerate(names)))
    rows = [json.dumps({"doc_id": f"d{i}", "question": f"Where was {n} born?", "answer": f"City{i}", "attribute": "birth_city"})
            for i, n in enumerate(names)]
    if bad_qa_line is not None:
        rows.insert(2, bad_qa_line)
    qa.write_text("\n".join(rows) + "\n")
    return docs, qa


def test_read_user_data_and_errors_name_file_and_line(tmp_path):
    from tessera.data.knowledge import read_knowledge

    docs, qa = _write_user_data(tmp_path)
    kset = read_knowledge(docs, qa, test_fraction=0.5, seed=0)
    assert len(kset.test_entities) == 2 and len(kset.test_qa) == 2 and len(kset.train_qa) == 2
    docs, qa = _write_user_data(tmp_path, json.dumps({"doc_id": "nope", "question": "q?", "answer": "a"}))
    with pytest.raises(DataFormatError, match=r"qa.jsonl:3: doc_id 'nope'"):
        read_knowledge(docs, qa)
    docs, qa = _write_user_data(tmp_path, json.dumps({"doc_id": "d0", "question": "q?"}))
    with pytest.raises(DataFormatError, match=r"qa.jsonl:3: missing or empty 'answer'"):
        read_knowledge(docs, qa)
    docs, qa = _write_user_data(tmp_path, "{not json")
    with pytest.raises(DataFormatError, match=r"qa.jsonl:3"):
        read_knowledge(docs, qa)


def test_cli_bad_user_data_exits_2_with_file_line(tmp_path):
    docs, qa = _write_user_data(tmp_path, json.dumps({"doc_id": "d9", "question": "q?", "answer": "a"}))
    r = run_cli("run", "pit", "data=user", f"documents={docs}", f"qa={qa}", f"dump_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "qa.jsonl:3" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_recipe_end_to_end_on_bios_and_user_data(tmp_path, embedded_lm_dir, tiny_lm_dir):
    """Every schedule runs on the testbed (tiny from-scratch Llama); user data runs on an HF model folder."""
    from tessera.config import load_config
    from tessera.recipes import pit

    common = ["doc_epochs=1", "qa_epochs=1", "keep_qa=4", "batch_size=16", "eval_train_qa=6", "max_new_tokens=6", "threads=1"]
    cfg = load_config(pit.Config, None, [f"dump_dir={tmp_path / 'bios'}", "n_people=8", "tiny_hidden=32", "tiny_layers=1",
                                         "tiny_vocab=400", *common])
    out = pit.main(cfg)
    res = json.loads((out / "results.json").read_text())
    assert [r["schedule"] for r in res["schedules"]] == [1, 2, 4, 5, 6, 7, 8]
    tokens = [r["plan"]["tokens"] for r in res["schedules"]]
    assert max(tokens) / min(tokens) < 1.1  # equal token budgets
    for r in res["schedules"]:
        assert r["test"]["n"] == 24 and set(r["test"]["per_attribute"]) and 0 <= r["test"]["em"] <= 100
        gate = r["storage_gate"]  # measured after the last stage that trains on the test documents
        assert gate["n"] == 24 and 0 <= gate["accuracy"] <= 100 and len(gate["per_attribute"]) == 6
        assert r["plan"]["stages"][gate["after_stage"]]["sources"].count("docs_test") == 1
    assert {"closed_book", "open_book"} <= set(res["references"])
    assert (out / "em.png").stat().st_size > 0 and (out / "config.yaml").is_file()
    # resuming: a second run with the same config reuses every finished schedule
    before = (out / "schedules.jsonl").read_text()
    pit.main(cfg)
    assert (out / "schedules.jsonl").read_text() == before

    docs, qa = _write_user_data(tmp_path)
    cfg = load_config(pit.Config, None, [f"dump_dir={tmp_path / 'user'}", "data=user", f"documents={docs}", f"qa={qa}",
                                         f"lm={tiny_lm_dir}", "schedules=[2,7]", "references=false", *common])
    res = json.loads((pit.main(cfg) / "results.json").read_text())
    assert [r["schedule"] for r in res["schedules"]] == [2, 7] and res["model"]["vocab"] > 40000
    assert all(r["test"]["n"] == 2 and r["storage_gate"] is None for r in res["schedules"])  # user data: no spans


def test_biography_spans_locate_every_value():
    ks = build_bios(20, seed=4, bios_per_person=3, permute=True, fullname=False)
    answers = {(q.doc_id, q.attribute): q.answer for q in ks.qa}
    for d in ks.documents:
        assert sorted(a for a, _, _ in d.spans) == sorted({q.attribute for q in ks.qa if q.doc_id == d.entity})
        for attr, start, end in d.spans:
            assert d.text[start:end] == answers[(d.entity, attr)]


def test_storage_gate_separates_memorised_from_unseen_people():
    """A tiny Llama trained to memorise two people's biographies completes their values; on people it
    never read it does not (the gate measures storage, not the template)."""
    import torch

    from tessera.knowledge.evaluate import storage_gate
    from tessera.knowledge.vocab import tiny_llama

    ks = build_bios(6, seed=2, bios_per_person=1)
    seen, unseen = ks.documents[:2], ks.documents[2:]
    model, tok = tiny_llama([d.text for d in ks.documents], vocab_size=512, hidden_size=96, num_layers=2, seed=0)
    ids = [[tok.bos_token_id] + tok(d.text, add_special_tokens=False).input_ids for d in seen]
    width = max(len(x) for x in ids)
    x = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros_like(x)
    for i, row in enumerate(ids):
        x[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    labels = x.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    stored = storage_gate(model, tok, seen)
    assert stored["n"] == 12 and set(stored["per_attribute"]) == {q.attribute for q in ks.qa}
    assert stored["accuracy"] >= 90
    assert storage_gate(model, tok, unseen)["accuracy"] <= 40
    with pytest.raises(InputError, match="spans"):
        storage_gate(model, tok, [type(seen[0])(id="x", text="no spans", entity="x")])


def test_gate_curve_follows_the_test_document_stage(tmp_path):
    """``gate_curve=N`` measures the gate (and test EM) at N points of the last test-document stage; the
    last point is the stage's end, so it equals the final gate; a run without a curve keeps its fingerprint."""
    from dataclasses import replace

    from tessera.config import load_config
    from tessera.recipes import pit

    cfg = load_config(pit.Config, None, [f"dump_dir={tmp_path}", "n_people=6", "tiny_hidden=32", "tiny_layers=1",
                                         "tiny_vocab=300", "doc_epochs=2", "qa_epochs=1", "keep_qa=2", "batch_size=8",
                                         "eval_train_qa=0", "max_new_tokens=4", "threads=1", "references=false",
                                         "schedules=[7]", "gate_curve=2"])
    res = json.loads((pit.main(cfg) / "results.json").read_text())
    gate = res["schedules"][0]["storage_gate"]
    curve = gate["curve"]
    assert len(curve) == 2 and curve[0]["step"] < curve[1]["step"]
    stage = res["schedules"][0]["plan"]["stages"][gate["after_stage"]]
    assert curve[-1]["test_doc_epochs"] == pytest.approx(stage["epochs"]["docs_test"], abs=0.01)
    assert curve[-1]["gate"] == pytest.approx(gate["accuracy"])
    assert curve[-1]["test_em"] == pytest.approx(res["schedules"][0]["test"]["em"])
    assert pit._fingerprint(replace(cfg, gate_curve=0)) != pit._fingerprint(cfg)
    assert pit._fingerprint(replace(cfg, gate_curve=0)) == pit._fingerprint(
        {k: v for k, v in pit.asdict(replace(cfg, gate_curve=0)).items() if k != "gate_curve"})


def test_under_torchrun_only_rank_0_writes(tmp_path):
    """Two gloo processes run the recipe (HF Trainer DDP): every output is written once, by rank 0."""
    from tessera_testing import run_torchrun

    import tessera.cli

    dump = tmp_path / "run"
    run_torchrun(tessera.cli.__file__, "run", "pit", "n_people=8", "tiny_hidden=32", "tiny_layers=1", "tiny_vocab=400",
                 "schedules=[1]", "doc_epochs=1", "qa_epochs=1", "keep_qa=4", "batch_size=16", "eval_train_qa=0",
                 "max_new_tokens=6", "references=false", "threads=1", f"dump_dir={dump}", timeout=240)
    assert len((dump / "schedules.jsonl").read_text().splitlines()) == 1
    rows = (dump / "metrics.jsonl").read_text().splitlines()
    assert rows and len(rows) == len(set(rows))  # two writers would log every row twice
    assert json.loads((dump / "results.json").read_text())["schedules"][0]["schedule"] == 1
    assert (dump / "em.png").is_file() and not list(dump.glob("pit-*"))
