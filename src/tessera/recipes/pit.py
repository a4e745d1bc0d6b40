"""Recipe ``pit``: PIT schedules (pre-instruction-tuning) on the biography testbed or your own data.

``tessera run pit [config.yaml] key=value ...``, e.g.
``tessera run pit schedules=[2,7] lm=default n_people=200`` or
``tessera run pit data=user documents=docs.jsonl qa=qa.jsonl lm=path/to/model``.

For every schedule in ``schedules`` (numbered as in the paper, see
:mod:`tessera.knowledge.schedules`): start from the same initial model, train through the
schedule's stages (one HF ``Trainer`` per stage, shuffled, answer-only QA loss), then answer the
test entities' questions greedily and score exact match, answer recall and per-attribute EM.
References: the starting model closed-book and open-book (the entity's document in the prompt), and the
majority-answer floor (always the most frequent train answer of the attribute).

Paper values (PIT section 2, Llama-2 7B): docs lr 3e-5 for 10 epochs, QA lr 5e-6 (1 epoch for
standard instruction-tuning, 3 for PIT), AdamW (0.9, 0.95), weight decay 0.1, cosine to 10%,
batch 256, 64 QA pairs kept in document stages.  The defaults here are the CPU testbed's
(scaled down, said so per field): a from-scratch hidden-64 Llama needs a far larger learning rate
and more epochs than a pretrained 7B model to absorb anything.  Schedules run in one process
append to ``schedules.jsonl`` (keyed by schedule and a fingerprint of the config), so a stopped
run resumes with the schedules it has not finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tessera.errors import InputError


@dataclass
class Config:
    seed: int = 0
    dump_dir: str = "runs/pit"
    schedules: list[int] = field(default_factory=lambda: [1, 2, 4, 5, 6, 7, 8])
    # model: "tiny" = a from-scratch Llama (below); "default" = embedded SmolLM2-135M-Instruct; a folder; a hub id
    lm: str = "tiny"
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_vocab: int = 2048  # 0 = SmolLM2's 49k tokenizer (hub.new_tiny_llama); N = a BPE of N trained on the run's documents (CPU)
    trainable_top_layers: int = 0  # 0 = train all; N = only the top N blocks (CPU saving for pretrained models)
    # data: "bios" (synthetic biographies) or "user" (documents + qa JSONL)
    data: str = "bios"
    documents: str = ""
    qa: str = ""
    n_people: int = 200
    test_fraction: float = 0.5
    bios_per_person: int = 1
    permute: bool = False
    fullname: bool = False
    attributes: list[str] = field(default_factory=lambda: ["birth_date", "birth_city", "university", "major", "employer",
                                                           "employer_city"])  # bioS's six; a subset = shorter bios
    # training (paper values in the module docstring; these are CPU testbed values)
    doc_epochs: float = 10.0  # paper: 10
    qa_epochs: float = 3.0  # paper: 3 (PIT)
    doc_lr: float = 1e-3  # paper: 3e-5 for a pretrained 7B model
    qa_lr: float = 1e-3  # paper: 5e-6
    batch_size: int = 16  # paper: 256
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.1  # paper
    keep_qa: int = 64  # paper: 64 QA pairs kept in document-only stages
    equal_budget: bool = True  # scale every schedule's epochs to schedule 2's token count
    qa_format: str = "plain"  # "plain" (Question:/Answer:, as the paper) or "chat" (the tokenizer's chat template)
    max_length: int = 512
    # evaluation
    max_new_tokens: int = 16
    eval_batch_size: int = 64
    eval_train_qa: int = 120  # also score this many (trained-on) train QA pairs: did training absorb anything?
    references: bool = True  # closed-book and open-book with the starting model
    # the storage gate: after the last stage with test documents, complete every attribute value inside each test
    # person's first biography (synthetic data only); QA EM compares extraction only where this is high
    storage_gate: bool = True
    # the gate's curve: also measure the gate (and test QA EM) at this many evenly spaced points of that
    # last test-document stage (0 = only at its end); recorded per schedule as storage_gate.curve
    gate_curve: int = 0
    save_models: bool = False
    threads: int = 0  # torch CPU threads; 0 = torch's default


def load_data(cfg: Config):
    if cfg.data == "bios":
        from tessera.data.bios import build_bios

        return build_bios(cfg.n_people, cfg.test_fraction, cfg.seed, cfg.bios_per_person, cfg.permute, cfg.fullname,
                          cfg.attributes)
    if cfg.data == "user":
        if not cfg.documents or not cfg.qa:
            raise InputError("data=user needs documents=DOCS.jsonl and qa=QA.jsonl")
        from tessera.data.knowledge import read_knowledge

        return read_knowledge(cfg.documents, cfg.qa, cfg.test_fraction, cfg.seed)
    raise InputError(f"data must be 'bios' or 'user', got {cfg.data!r}")


def load_model(cfg: Config, kset):
    """``(model, tokenizer)`` on the default device (fp32 on CPU, bf16 on CUDA)."""
    from tessera import hub

    device = hub.default_device()
    if cfg.lm == "tiny":
        from tessera.knowledge.vocab import tiny_llama

        texts = [d.text for d in kset.documents] + [f"{q.question} {q.answer}" for q in kset.train_qa]
        model, tok = tiny_llama(texts, vocab_size=cfg.tiny_vocab, hidden_size=cfg.tiny_hidden, num_layers=cfg.tiny_layers,
                                num_heads=cfg.tiny_heads, num_kv_heads=max(1, cfg.tiny_heads // 2), seed=cfg.seed)
        model.to(device=device, dtype=hub.default_dtype(device))
        return model, tok
    loaded = hub.load_lm(cfg.lm, device=device)
    return loaded.model, loaded.tokenizer


def _fingerprint(cfg: Config | dict) -> str:
    """What a finished schedule's result depends on (not: which schedules, where, how many threads)."""
    d = cfg if isinstance(cfg, dict) else asdict(cfg)
    d = {k: v for k, v in d.items() if k not in ("schedules", "dump_dir", "threads", "save_models")}
    if not d.get("gate_curve"):  # measuring a curve does not change training; runs without one keep their fingerprint
        d.pop("gate_curve", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _previous_references(path: Path, fingerprint: str) -> dict | None:
    """The references of an earlier run of the same config (they depend only on the starting model)."""
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if prev.get("references") and _fingerprint(prev.get("config", {})) == fingerprint:
        return prev["references"]
    return None


def _done_rows(path: Path, fingerprint: str) -> dict[int, dict]:
    from tessera.data.jsonl import read_jsonl

    if not path.is_file():
        return {}
    return {r["schedule"]: r for r in read_jsonl(path, skip_bad=True) if r.get("fingerprint") == fingerprint}


def plot_em(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["schedules"]
    names = [f"({r['schedule']}) {r['name']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.6))
    ax.bar(range(len(rows)), [r["test"]["em"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("test EM (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: Config) -> Path:
    """The recipe, stage by stage: check the schedules, prepare the run, references, every schedule, write results."""
    import torch

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    _check_schedules(cfg)
    t_start = time.perf_counter()
    run = _prepare(cfg)
    results = _results_header(run)
    done = _reuse_and_references(run, results)
    _run_schedules(run, done, results)
    results["seconds"] = time.perf_counter() - t_start
    run.dump.write_results(results)
    if not run.dump.main:
        return run.dump.path
    _write_summaries(cfg, results, run.dump.path)
    return run.dump.path


@dataclass
class _Run:
    """What every schedule of one run shares: the data, the starting model, how to train and how to score."""

    cfg: Config
    kset: object
    dump: object  # tessera.config.DumpDir
    model: object
    tok: object
    init_state: dict  # the starting model's weights, restored before each schedule
    encoded: dict
    plan_kw: dict
    budget: int | None  # schedule 2's token count when cfg.equal_budget
    settings: object  # tessera.knowledge.train.TrainSettings
    train_sample: list  # trained-on QA pairs scored after each schedule
    eval_kw: dict
    fingerprint: str


def _check_schedules(cfg: Config) -> None:
    from tessera.knowledge.schedules import check_schedule

    if not cfg.schedules:
        raise InputError("schedules is empty; pass e.g. schedules=[2,7]")
    for s in cfg.schedules:
        check_schedule(s)


def _prepare(cfg: Config) -> _Run:
    """Load the data, open the dump dir, load the starting model, encode everything, size the plans."""
    from tessera import ui
    from tessera.config import DumpDir
    from tessera.knowledge.schedules import build_plan
    from tessera.knowledge.train import TrainSettings, encode_all

    kset = load_data(cfg)
    dump = DumpDir(cfg.dump_dir, cfg, fresh=False)
    model, tok = load_model(cfg, kset)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    encoded = encode_all(tok, kset, cfg.max_length, cfg.qa_format)
    lengths = {k: len(v["input_ids"]) for k, v in encoded.items()}
    plan_kw = {"doc_epochs": cfg.doc_epochs, "qa_epochs": cfg.qa_epochs, "doc_lr": cfg.doc_lr, "qa_lr": cfg.qa_lr,
               "keep_qa": cfg.keep_qa, "seed": cfg.seed, "lengths": lengths}
    budget = build_plan(kset, 2, **plan_kw).tokens if cfg.equal_budget else None
    settings = TrainSettings(batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, weight_decay=cfg.weight_decay,
                             warmup_ratio=cfg.warmup_ratio, seed=cfg.seed, quiet=ui.is_quiet())
    train_sample = sorted(kset.train_qa, key=lambda q: hashlib.md5(f"{cfg.seed}:{q.id}".encode()).hexdigest())[:cfg.eval_train_qa]
    eval_kw = {"qa_format": cfg.qa_format, "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.eval_batch_size}
    return _Run(cfg, kset, dump, model, tok, init_state, encoded, plan_kw, budget, settings, train_sample, eval_kw,
                _fingerprint(cfg))


def _results_header(run: _Run) -> dict:
    cfg, kset, model = run.cfg, run.kset, run.model
    n_params = sum(p.numel() for p in model.parameters())
    return {"config": asdict(cfg), "data": {**kset.summary(), **kset.meta}, "model": {
        "lm": cfg.lm, "class": type(model).__name__, "parameters": n_params, "vocab": len(run.tok)},
        "budget_tokens": run.budget, "references": {}, "schedules": []}


def _reuse_and_references(run: _Run, results: dict) -> dict[int, dict]:
    """Reuse what an earlier run of the same config finished (references, schedule rows), drop the rest,
    and score the references: the starting model closed- and open-book, the majority-answer floor.
    Returns the finished schedules' rows by number."""
    from tessera.knowledge.evaluate import evaluate_qa, majority_baseline

    cfg, kset, dump, fp = run.cfg, run.kset, run.dump, run.fingerprint
    contexts = {d.entity: d.text for d in reversed(kset.documents)}  # the entity's first document
    previous = _previous_references(dump.path / "results.json", fp) if cfg.references else None
    done = _done_rows(dump.path / "schedules.jsonl", fp)
    # a rerun (after a kill, say) keeps the metric rows of what it reuses and nothing else
    dump.prune_metrics(lambda r: r.get("schedule") in done or (bool(previous) and r.get("stage") == "references"))
    for stale in dump.path.glob("pit-*") if dump.main else []:  # a schedule's folder a kill interrupted
        shutil.rmtree(stale, ignore_errors=True)
    if previous:
        results["references"] = previous
    elif cfg.references:
        t = time.perf_counter()
        closed = evaluate_qa(run.model, run.tok, kset.test_qa, **run.eval_kw)
        opened = evaluate_qa(run.model, run.tok, kset.test_qa, contexts=contexts, **run.eval_kw)
        results["references"] = {"closed_book": _brief(closed), "open_book": _brief(opened), "seconds": time.perf_counter() - t}
        dump.log(stage="references", closed_book_em=closed["em"], open_book_em=opened["em"])
    results["references"]["majority_answer"] = _brief(majority_baseline(kset.train_qa, kset.test_qa))
    return done


def _run_schedules(run: _Run, done: dict[int, dict], results: dict) -> None:
    """Every schedule of ``cfg.schedules`` in order (finished ones reused), rows appended to ``results``."""
    from tessera import ui

    with ui.progress() as bar:
        task = bar.add_task("PIT schedules", total=len(run.cfg.schedules))
        for number in run.cfg.schedules:
            results["schedules"].append(done[number] if number in done else _run_schedule(run, number))
            bar.advance(task)


def _run_schedule(run: _Run, number: int) -> dict:
    """Train the starting model through schedule ``number``, score it on the test (and some train) QA,
    append its row to ``schedules.jsonl`` (and save the model when asked); returns the row."""
    from tessera import ui
    from tessera.data.jsonl import append_jsonl
    from tessera.knowledge.evaluate import evaluate_qa
    from tessera.knowledge.schedules import DOCS_TEST, build_plan
    from tessera.knowledge.train import freeze_lower_layers, run_plan

    cfg, dump, model, tok, eval_kw = run.cfg, run.dump, run.model, run.tok, run.eval_kw
    t = time.perf_counter()
    model.load_state_dict(run.init_state)
    trainable = freeze_lower_layers(model, cfg.trainable_top_layers)
    plan = build_plan(run.kset, number, **run.plan_kw, budget_tokens=run.budget)
    last_doc_stage = max((k for k, st in enumerate(plan.stages) if DOCS_TEST in st.sources), default=None)
    gate: dict = {}
    curve: list = []
    after_stage, callbacks_for = _storage_gate_hooks(run, number, plan, last_doc_stage, gate, curve)
    with tempfile.TemporaryDirectory(prefix="pit-", dir=dump.path if dump.main else None) as tmp:
        history = run_plan(model, tok, plan, run.encoded, run.settings, tmp, on_stage=after_stage,
                           callbacks_for=callbacks_for)
    if gate and curve:
        gate["curve"] = curve
    t_train = time.perf_counter() - t
    test = evaluate_qa(model, tok, run.kset.test_qa, **eval_kw)
    train = evaluate_qa(model, tok, run.train_sample, **eval_kw) if run.train_sample else None
    row = {"schedule": number, "name": plan.name, "fingerprint": run.fingerprint, "plan": plan.describe(),
           "history": history, "trainable_parameters": trainable, "storage_gate": gate or None, "test": _brief(test),
           "train_qa": _brief(train) if train else None,
           "train_seconds": t_train, "seconds": time.perf_counter() - t}
    dump.log(schedule=number, test_em=test["em"], test_recall=test["recall"], train_qa_em=train["em"] if train else None)
    if dump.main:  # under torchrun only rank 0 writes
        if cfg.save_models:
            _save_model(model, tok, dump.path / f"model-{number}")
        append_jsonl(dump.path / "schedules.jsonl", row)
    stored = f", storage gate {gate['accuracy']:.1f}" if gate else ""
    ui.info(f"schedule {number} ({plan.name}): test EM {test['em']:.1f}, recall {test['recall']:.1f}{stored}")
    return row


def _storage_gate_hooks(run: _Run, number: int, plan, last_doc_stage: int | None, gate: dict, curve: list):
    """``(on_stage, callbacks_for)`` for :func:`~tessera.knowledge.train.run_plan`: log every stage; after the
    last stage with test documents measure the storage gate into ``gate``, and (``gate_curve``) at evenly
    spaced points of that stage, the gate and test EM into ``curve``."""
    from tessera.knowledge.evaluate import evaluate_qa, storage_gate
    from tessera.knowledge.schedules import DOCS_TEST
    from tessera.knowledge.train import eval_at_fractions

    cfg, kset, dump, model, tok = run.cfg, run.kset, run.dump, run.model, run.tok

    def after_stage(k, r, n=number, plan=plan, gate=gate, last=last_doc_stage):
        dump.log(schedule=n, **r)
        if cfg.storage_gate and k == last and any(d.spans for d in kset.test_docs):
            g = storage_gate(model, tok, kset.test_docs, batch_size=cfg.eval_batch_size)
            gate.update(accuracy=g["accuracy"], per_attribute=g["per_attribute"], n=g["n"], after_stage=k)
            dump.log(schedule=n, storage_gate=g["accuracy"])

    def callbacks_for(k, plan=plan, last=last_doc_stage, curve=curve):
        if not (cfg.storage_gate and cfg.gate_curve > 0 and k == last and any(d.spans for d in kset.test_docs)):
            return None
        epochs = plan.stages[k].epochs[DOCS_TEST]

        def point(step, fraction):
            g = storage_gate(model, tok, kset.test_docs, batch_size=cfg.eval_batch_size)
            qa = evaluate_qa(model, tok, kset.test_qa, **run.eval_kw)
            row = {"step": step, "test_doc_epochs": round(fraction * epochs, 2), "gate": g["accuracy"], "test_em": qa["em"]}
            curve.append(row)
            dump.log(schedule=plan.schedule, gate_curve=row)
            return row

        return [eval_at_fractions([(i + 1) / cfg.gate_curve for i in range(cfg.gate_curve)], point)]

    return after_stage, callbacks_for


def _write_summaries(cfg: Config, results: dict, path: Path) -> None:
    """``em.png`` (test EM per schedule) and ``summary.txt`` (one line per schedule)."""
    from tessera.config import atomic_write_text

    plot_em(results, path / "em.png", f"PIT schedules, {cfg.lm}, test EM (seed {cfg.seed})")
    atomic_write_text(path / "summary.txt", "\n".join(
        f"({r['schedule']}) {r['name']}: EM {r['test']['em']:.1f} recall {r['test']['recall']:.1f}" for r in results["schedules"]) + "\n")


def _brief(ev: dict) -> dict:
    return {**{k: v for k, v in ev.items() if k != "rows"}, "examples": ev["rows"][:8]}


def _save_model(model, tok, out: Path) -> None:
    from tessera.config import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
