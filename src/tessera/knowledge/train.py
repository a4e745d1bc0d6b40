"""Training a causal LM through a PIT plan, one Hugging Face ``Trainer`` per stage.

Each stage gets a fresh AdamW (beta 0.9/0.95, weight decay 0.1) and a cosine schedule that
decays to 10% of the peak learning rate (PIT section 2); the stage's items were unrolled and
shuffled by :func:`~tessera.knowledge.schedules.build_plan`, and the Trainer's random sampler
shuffles again (seeded).  DDP / FSDP come from the Trainer under ``torchrun``; bf16 on CUDA,
fp32 on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tessera.knowledge.format import KnowledgeCollator, encode_document, encode_qa


@dataclass
class TrainSettings:
    batch_size: int = 16  # paper: 256 sequences (scaled down for CPU)
    grad_accum: int = 1
    weight_decay: float = 0.1  # paper
    adam_beta1: float = 0.9  # paper
    adam_beta2: float = 0.95  # paper
    min_lr_ratio: float = 0.1  # paper: cosine to 10% of the peak
    warmup_ratio: float = 0.0  # paper: not stated
    max_grad_norm: float = 1.0
    seed: int = 0
    quiet: bool = True
    logging_steps: int = 10


def encode_all(tokenizer, kset, max_length: int = 512, qa_format: str = "plain") -> dict[tuple[str, str], dict]:
    """``(kind, id) -> {"input_ids", "labels"}`` for every document and every *train* QA pair."""
    enc = {("doc", d.id): encode_document(tokenizer, d.text, max_length, d.id) for d in kset.documents}
    for q in kset.train_qa:
        enc[("qa", q.id)] = encode_qa(tokenizer, q.question, q.answer, max_length, qa_format, q.id)
    return enc


def freeze_lower_layers(model, trainable_top_layers: int) -> int:
    """Train only the top ``trainable_top_layers`` decoder blocks and the final norm (CPU saving).

    Returns the number of trainable parameters.  ``0`` (or more than the model has) trains
    everything.  Embeddings and the output layer are frozen when layers are frozen.
    """
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if trainable_top_layers > 0 and layers is not None and trainable_top_layers < len(layers):
        for p in model.parameters():
            p.requires_grad_(False)
        for block in list(layers)[-trainable_top_layers:]:
            for p in block.parameters():
                p.requires_grad_(True)
        norm = getattr(model.get_decoder(), "norm", None)
        if norm is not None:
            for p in norm.parameters():
                p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_stage(model, tokenizer, examples: list[dict], lr: float, settings: TrainSettings, output_dir: str,
                callbacks: list | None = None) -> dict:
    """One stage with ``transformers.Trainer``; returns loss, steps and time.  ``callbacks``: extra
    ``transformers.TrainerCallback`` objects (e.g. :class:`EvalAtFractions`)."""
    import torch
    from transformers import Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=output_dir, num_train_epochs=1, learning_rate=lr, per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, max_grad_norm=settings.max_grad_norm,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": settings.min_lr_ratio},
        warmup_steps=settings.warmup_ratio, logging_steps=settings.logging_steps, save_strategy="no", report_to=[],
        seed=settings.seed, data_seed=settings.seed, use_cpu=not cuda, bf16=cuda, disable_tqdm=settings.quiet,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    model.train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=KnowledgeCollator(pad),
                      callbacks=callbacks)
    if settings.quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every log dict
    t = time.perf_counter()
    out = trainer.train()
    model.eval()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"train_loss": out.training_loss, "last_logged_loss": losses[-1] if losses else None,
            "steps": trainer.state.global_step, "seconds": time.perf_counter() - t, "log": trainer.state.log_history}


def eval_at_fractions(fractions, evaluate):
    """A ``TrainerCallback`` that calls ``evaluate(step, fraction)`` when training has done each of
    ``fractions`` (0-1] of its steps, in eval mode, then returns the model to training.  The
    storage-gate curve (gate accuracy against document epochs) is measured this way."""
    from transformers import TrainerCallback

    class EvalAtFractions(TrainerCallback):
        def __init__(self):
            self.rows: list = []
            self._at: dict[int, float] = {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            self._at = {max(1, round(f * state.max_steps)): f for f in sorted(fractions)}

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step in self._at:
                was_training = model.training
                self.rows.append(evaluate(state.global_step, self._at[state.global_step]))
                model.train(was_training)

    return EvalAtFractions()


def run_plan(model, tokenizer, plan, encoded: dict, settings: TrainSettings, output_dir: str, on_stage=None,
             callbacks_for=None) -> list[dict]:
    """Train through every stage of ``plan`` in order; ``on_stage(k, stats)`` after each;
    ``callbacks_for(k)`` -> extra Trainer callbacks for stage ``k`` (or None)."""
    history = []
    for k, stage in enumerate(plan.stages):
        examples = [encoded[item] for item in stage.items]
        stats = train_stage(model, tokenizer, examples, stage.lr, settings, output_dir,
                            callbacks_for(k) if callbacks_for is not None else None)
        row = {"stage": k, "name": stage.name, "examples": len(examples), "tokens": stage.tokens, "lr": stage.lr,
               **{key: v for key, v in stats.items() if key != "log"}}
        history.append(row)
        if on_stage is not None:
            on_stage(k, row)
    return history
