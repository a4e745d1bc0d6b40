"""A text-only Llama pretrained from scratch until its held-out loss plateaus: the CPU stand-in for
LMFusion's pretrained LLM (Llama-3 in the paper).

LMFusion's claim rests on the text model being a real, converged language model: its text ability is
what the frozen modules keep, and what a Transfusion model trained from scratch has to learn beside
the images.  SmolLM2 cut to a few layers is not one (perplexity ~1e8), and the full SmolLM2 is too slow
to train image modules around on two CPU cores.  :func:`pretrain_text_llama` builds one that is:

- corpus: WikiText-2 (the articles of ``valid.txt`` and ``test.txt``, held-out articles by a hash of the
  title: :func:`tessera.btx.data.domain_texts`) plus Python's documentation topics;
- tokenizer: a byte-level BPE of ``vocab_size`` tokens trained on the training split
  (:func:`tessera.knowledge.vocab.corpus_tokenizer`; SmolLM2's 49k vocabulary would make the output
  layer most of the compute);
- model: a Hugging Face ``LlamaForCausalLM`` (:func:`tessera.hub.new_tiny_llama`), the same family and
  code path as SmolLM2, so :class:`~tessera.models.lmfusion.LMFusionModel` takes it unchanged;
- training: the Hugging Face ``Trainer`` over packed blocks (:func:`tessera.btx.train.train_model`),
  cosine schedule, held-out WikiText-2 loss every ``eval_every`` steps
  (:class:`~tessera.btx.train.HeldOutLoss`); the plateau is the relative improvement over the last fifth
  read off a least-squares line (:func:`tessera.models.scoring.plateau`).

The result is a model folder (``save_pretrained`` + tokenizer) with ``pretrain.json`` beside it: the
config, the curve, the plateau, held-out perplexity and the training FLOPs.  A folder whose
``pretrain.json`` holds the same config is reused.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPORT = "pretrain.json"


@dataclass
class TextPretrainConfig:
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 0  # 0 = 8/3 * hidden (Llama's SwiGLU ratio)
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 1500
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    eval_every: int = 100
    eval_blocks: int = 64
    sources: tuple[str, ...] = ("wiki:wikitext2", "docs:python-docs")
    seed: int = 0

    def key(self) -> dict:
        d = asdict(self)
        d["sources"] = list(self.sources)
        return d


def corpus(sources) -> tuple[list[str], list[str]]:
    """``(train_texts, heldout_texts)`` of :mod:`tessera.btx.data` sources (``name:source`` specs): every source's
    training split; the first source's held-out split (WikiText-2's held-out articles by default) for the curve
    and the perplexity."""
    from tessera.btx.data import Domain, domain_texts

    train, held = [], []
    for i, spec in enumerate(sources):
        tr, ho = domain_texts(Domain.parse(spec))
        train += tr
        if i == 0:
            held = ho
    return train, held


def pretrain_text_llama(cfg: TextPretrainConfig, out: str | Path, threads: int = 0) -> dict:
    """Train (or reuse) a text Llama in ``out``; returns the report (also ``out/pretrain.json``)."""
    import torch

    from tessera import hub
    from tessera.btx.data import pack_blocks
    from tessera.btx.train import HeldOutLoss, TrainSettings, perplexity, train_flops_per_token, train_model
    from tessera.config import atomic_dir
    from tessera.knowledge.vocab import corpus_tokenizer
    from tessera.models.scoring import plateau

    out = Path(out)
    report_path = out / REPORT
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("config") == cfg.key():
            return report
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    train_texts, held_texts = corpus(cfg.sources)
    tok = corpus_tokenizer(train_texts, vocab_size=cfg.vocab_size)
    model, tok = hub.new_tiny_llama(tok, hidden_size=cfg.hidden_size, num_layers=cfg.layers, num_heads=cfg.heads,
                                    num_kv_heads=cfg.kv_heads, max_positions=max(1024, cfg.seq_len),
                                    intermediate_size=cfg.intermediate_size or cfg.hidden_size * 8 // 3, seed=cfg.seed)
    blocks = pack_blocks(train_texts, tok, cfg.seq_len)
    held = pack_blocks(held_texts, tok, cfg.seq_len, max_blocks=cfg.eval_blocks)
    curve: list[dict] = []
    cb = HeldOutLoss({"heldout": held}, cfg.eval_every,
                     on_eval=lambda r: curve.append({"step": r["step"], "val_loss": round(r["mean"], 5)}))
    settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio,
                             seed=cfg.seed, logging_steps=max(1, cfg.eval_every))
    with atomic_dir(out) as tmp:
        train_model(model, blocks, tmp / "trainer", settings, callbacks=[cb])
        ppl = perplexity(model, held)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)  # the Trainer's output folder (nothing kept)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tokens = cfg.steps * cfg.batch_size * cfg.seq_len
        report = {
            "config": cfg.key(), "model_dir": str(out),
            "params": {"total": sum(p.numel() for p in model.parameters()),
                       "non_embedding": sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)},
            "train_tokens": tokens, "corpus_tokens": int(blocks.numel()), "epochs": round(tokens / blocks.numel(), 2),
            "heldout_tokens": int(held.numel()),
            "train_flops": train_flops_per_token(model.config, cfg.seq_len) * tokens,
            "curve": curve, "plateau": round(plateau(curve, "val_loss"), 5),
            "best_val_loss": min(r["val_loss"] for r in curve), "final_val_loss": curve[-1]["val_loss"],
            "heldout_perplexity": round(ppl, 3), "wall_s": round(time.time() - t0, 1),
        }
        (tmp / REPORT).write_text(json.dumps(report, indent=1))
    return report


__all__ = ["REPORT", "TextPretrainConfig", "corpus", "pretrain_text_llama"]
