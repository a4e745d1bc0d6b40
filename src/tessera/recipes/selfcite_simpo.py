"""Recipe ``selfcite-simpo``: SelfCite preference optimisation on HotpotQA, end to end.

``tessera run selfcite-simpo [config.yaml] key=value ...``

1. direct prompting on the evaluation slice (citation P/R/F1 against the gold
   supporting facts) - the "before" figure;
2. for each training example: a greedy cited response, best-of-N citations (or the
   reward-only search) as *chosen*, the original citations as *rejected*, length
   balanced (SelfCite section 2.4, "Preference Optimization") -> ``pairs.jsonl`` (resumable: rows keyed by id);
3. SimPO with TRL's CPOTrainer (beta 10, gamma/beta 0.3, SelfCite's values);
4. direct prompting again with the trained model - the "after" figure;
5. ``results.json``, ``metrics.jsonl`` (trainer log + evaluations), ``model/``.

Training and evaluation examples never overlap (``train_*`` and ``eval_*`` slices of
the HotpotQA file).  Scaled down for CPU, and said so in ``results.json``: contexts
keep the gold paragraphs + ``max_distractors`` others cut to
``max_sentences_per_paragraph`` sentences, answers to ``max_statements`` statements.
The paper's learning rate (3e-7 for 8B models, 1 epoch over ~2k pairs) is the default;
a short CPU run needs a larger one to move a 135M model at all (the benchmark says
which it used).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from tessera.errors import InputError

HOTPOT_FILE = "hotpotqa/hotpot_dev_distractor_v1_first40.json"


@dataclass
class Config:
    seed: int = 0
    dump_dir: str = "runs/selfcite-simpo"
    lm: str = "default"
    data: str = ""  # HotpotQA JSON; empty = ../shared/data/hotpotqa/hotpot_dev_distractor_v1_first40.json
    train_start: int = 0
    train_end: int = 20
    eval_start: int = 20
    eval_end: int = 40
    max_distractors: int = 1  # -1 = all 8 (the official distractor setting); 1 for CPU
    max_sentences_per_paragraph: int = 4  # -1 = whole paragraphs
    max_statements: int = 2
    max_new_tokens: int = 256
    best_of: int = 10  # SelfCite: N = 10
    bon_temperature: float = 1.2
    bon_top_p: float = 0.9
    chosen_from: str = "best_of_n"  # or "reward_search"
    beta: float = 10.0
    gamma_beta_ratio: float = 0.3
    learning_rate: float = 3e-7
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 1
    grad_accum: int = 1
    lora: bool = False
    max_length: int = 2048
    evaluate: bool = True
    save_model: bool = True
    threads: int = 0  # torch CPU threads; 0 = torch's default


def _data_path(cfg: Config) -> Path:
    if cfg.data:
        return Path(cfg.data).expanduser()
    from tessera.data.paths import shared_data_dir

    root = shared_data_dir()
    if root is None or not (root / HOTPOT_FILE).is_file():
        raise InputError(f"no HotpotQA data: pass data=PATH (the official JSON), or put it at ../shared/data/{HOTPOT_FILE}")
    return root / HOTPOT_FILE


def _slice(examples, a: int, b: int, what: str):
    if not 0 <= a < b <= len(examples):
        raise InputError(f"{what} slice [{a}, {b}) is outside the {len(examples)} examples; set {what}_start/{what}_end")
    return examples[a:b]


def build_pair(lm, example, cfg: Config, rng: random.Random):
    """(pair or None, info) for one training example."""
    from tessera.attribution.constrained import generate_cited
    from tessera.attribution.format import CitePrompt
    from tessera.attribution.hotpot import hotpot_context
    from tessera.attribution.selfcite import SelfCiteScorer, best_of_n, reward_search
    from tessera.attribution.simpo import make_pair

    ctx = hotpot_context(example, cfg.max_distractors, cfg.max_sentences_per_paragraph)
    prompt = CitePrompt(lm.tokenizer, ctx, example.question)
    resp = generate_cited(lm, prompt, max_new_tokens=cfg.max_new_tokens, max_statements=cfg.max_statements)
    scorer = SelfCiteScorer(lm, prompt, resp)
    if cfg.chosen_from == "reward_search":
        res = reward_search(lm, prompt, resp, scorer=scorer)
    elif cfg.chosen_from == "best_of_n":
        res = best_of_n(lm, prompt, resp, n=cfg.best_of, temperature=cfg.bon_temperature, top_p=cfg.bon_top_p,
                        seed=cfg.seed, scorer=scorer)
    else:
        raise InputError(f"chosen_from must be 'best_of_n' or 'reward_search', got {cfg.chosen_from!r}")
    original = [scorer.score(j, [s.spans])[0].reward for j, s in enumerate(resp.statements)]
    gain = sum(s.reward - o for s, o in zip(res.statements, original))
    pair = make_pair(example.id, prompt, [s.text for s in resp.statements], [s.spans for s in res.statements],
                     [s.spans for s in resp.statements], rng, reward_gain=gain)
    return pair, {"statements": len(resp.statements), "reward_gain": gain}


def main(cfg: Config) -> Path:
    """The recipe, stage by stage: data and model, evaluate before, preference pairs, SimPO, evaluate after,
    save the model, write ``results.json``."""
    import torch

    from tessera.config import DumpDir
    from tessera.lm import LocalLM

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    train, evals = _load_slices(cfg)
    dump = DumpDir(cfg.dump_dir, cfg)
    lm = LocalLM.load(cfg.lm)
    results: dict = {"config": asdict(cfg), "train_ids": [e.id for e in train], "eval_ids": [e.id for e in evals]}

    if evals:
        results["before"] = _evaluate(cfg, lm, evals, dump, "eval_before")
    pairs, results["pairs"] = _preference_pairs(cfg, lm, train, dump)
    model, results["train"] = _train(cfg, lm, pairs, dump)
    lm = LocalLM(model, lm.tokenizer, name=f"{cfg.lm}+selfcite-simpo")
    if evals:
        results["after"] = _evaluate(cfg, lm, evals, dump, "eval_after")
        results["f1_change"] = results["after"]["f1"] - results["before"]["f1"]
    if cfg.save_model and dump.main:
        results["model"] = str(_save_model(model, lm.tokenizer, dump.path / "model"))
    results["seconds"] = time.perf_counter() - t_start
    results["context_setting"] = _context_setting(cfg)
    dump.write_results(results)
    return dump.path


def _load_slices(cfg: Config):
    """``(train examples, eval examples)``: disjoint slices of the HotpotQA file (no eval slice when not evaluating)."""
    from tessera.data.qa import read_hotpotqa

    examples = read_hotpotqa(_data_path(cfg))
    train = _slice(examples, cfg.train_start, cfg.train_end, "train")
    evals = _slice(examples, cfg.eval_start, cfg.eval_end, "eval") if cfg.evaluate else []
    if {e.id for e in train} & {e.id for e in evals}:
        raise InputError("the train and eval slices overlap; pairs must come from other examples than the evaluation")
    return train, evals


def _evaluate(cfg: Config, lm, evals, dump, stage: str) -> dict:
    """Direct prompting on the evaluation slice: mean citation P/R/F1 (logged as ``stage`` with its time)."""
    from tessera.attribution.hotpot import direct_eval
    from tessera.attribution.metrics import mean_scores

    ctx_kw = {"max_distractors": cfg.max_distractors, "max_sentences_per_paragraph": cfg.max_sentences_per_paragraph,
              "max_statements": cfg.max_statements, "max_new_tokens": cfg.max_new_tokens}
    t = time.perf_counter()
    scores = mean_scores(direct_eval(lm, evals, **ctx_kw))
    dump.log(stage=stage, **dict(scores, seconds=time.perf_counter() - t))
    return scores


def _preference_pairs(cfg: Config, lm, train, dump):
    """``(pairs, summary)``: one preference pair per training example (:func:`build_pair`), resumable - one
    JSON line per example in ``pairs.jsonl``, rows of an earlier run reused."""
    import torch

    from tessera import ui
    from tessera.attribution.simpo import PreferencePair
    from tessera.data.jsonl import append_jsonl

    pairs_path = dump.path / "pairs.jsonl"
    done: dict[str, dict] = {}
    if pairs_path.is_file():
        for line in pairs_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                done[row["id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by an interruption: rebuild that example
    t = time.perf_counter()
    with ui.progress() as bar:
        task = bar.add_task("preference pairs", total=len(train))
        for ex in train:
            if ex.id not in done:
                # seeded per example, so a resumed run builds the pairs an uninterrupted one would
                ex_seed = zlib.crc32(f"{cfg.seed}:{ex.id}".encode())
                torch.manual_seed(ex_seed)
                pair, info = build_pair(lm, ex, cfg, random.Random(ex_seed))
                row = {"id": ex.id, "pair": pair.to_dict() if pair else None, **info}
                if dump.main:  # under torchrun only rank 0 writes
                    append_jsonl(pairs_path, row)  # a line torn by a kill is skipped above and rebuilt
                done[ex.id] = row
            bar.advance(task)
    pairs = [PreferencePair.from_dict(done[e.id]["pair"]) for e in train if done[e.id].get("pair")]
    summary = {"examples": len(train), "pairs": len(pairs),
               "balanced": sum(p.balanced for p in pairs), "seconds": time.perf_counter() - t,
               "mean_reward_gain": sum(p.reward_gain for p in pairs) / max(len(pairs), 1)}
    dump.log(stage="pairs", **summary)
    return pairs, summary


def _train(cfg: Config, lm, pairs, dump):
    """``(trained model, summary)``: SimPO with TRL's CPOTrainer (SelfCite's beta and gamma/beta) in a temporary
    folder under the dump dir; the trainer's log rows go to ``metrics.jsonl``."""
    import torch

    from tessera import ui
    from tessera.attribution.simpo import train_simpo

    t = time.perf_counter()
    for stale in dump.path.glob("simpo-*") if dump.main else []:  # the trainer folder of a run killed mid-training
        shutil.rmtree(stale, ignore_errors=True)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="simpo-", dir=dump.path if dump.main else None) as tmp:
        model, history = train_simpo(lm.model, lm.tokenizer, pairs, tmp, beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio,
                                     learning_rate=cfg.learning_rate, epochs=cfg.epochs, max_steps=cfg.max_steps,
                                     batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lora=cfg.lora,
                                     max_length=cfg.max_length, seed=cfg.seed, quiet=ui.is_quiet())
    for row in history:
        dump.log(stage="train", **{k: v for k, v in row.items() if isinstance(v, (int, float, str))})
    summary = {"steps": max((r.get("step", 0) for r in history), default=0), "seconds": time.perf_counter() - t,
               "loss": next((r["train_loss"] for r in reversed(history) if "train_loss" in r), None)}
    return model, summary


def _save_model(model, tokenizer, out: Path) -> Path:
    """The trained model and its tokenizer as a Hugging Face folder, written atomically."""
    from tessera.config import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _context_setting(cfg: Config) -> str:
    """The scaled-down context and answer sizes, in words (for ``results.json``)."""
    distractors = "all distractors" if cfg.max_distractors < 0 else f"{cfg.max_distractors} distractor paragraph(s)"
    sentences = "whole paragraphs" if cfg.max_sentences_per_paragraph < 0 else \
        f"<= {cfg.max_sentences_per_paragraph} sentences per paragraph (gold sentences kept)"
    return f"gold paragraphs + {distractors}, {sentences}; <= {cfg.max_statements} statements per answer"
