"""Continued pretraining after structured pruning (the recovery stage of DRAMA / Sheared-LLaMA).

Pruning a Llama to a fifth of its non-embedding parameters leaves a network whose
hidden states no longer mean much (SmolLM2-135M pruned to 1/5: WikiText-2 loss 3.6 ->
10.3).  DRAMA builds its small retrievers from pruned LLMs that were pretrained again
afterwards (Sheared-LLaMA prunes, then continues pretraining on the LM objective).
This module is that stage, with the option most recovery recipes add when the
unpruned model is at hand: distillation from it.

    loss = lm_weight * CE(student)                                   (next-token loss)
         + distill_weight * D(student, teacher)

``D`` is one of

* ``hidden``: ``mean_t (1 - cos(h_s[t], h_t[t]))`` over the final (normed) hidden
  states, i.e. the vectors a mean-pooled retriever averages.  Widths match because
  pruning keeps ``hidden_size``.  This costs no LM-head pass for the student, which
  at 1/5 of SmolLM2 is more than half of a forward pass.
* ``logits``: ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` per token (Hinton et al.;
  Minitron's recovery loss).
* ``none``: the LM loss alone (Sheared-LLaMA's continued pretraining).

Training runs through Hugging Face ``Trainer`` (so torchrun DDP / FSDP come from
accelerate); the teacher runs in inference mode beside it.  CPU defaults are small
(``steps`` x ``batch_size`` chunks of ``seq_len`` tokens); Sheared-LLaMA continues for
50B tokens.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field

from tessera.errors import InputError

DISTILL_MODES = ("hidden", "logits", "none")


@dataclass
class RecoveryReport:
    steps: int
    tokens: int
    distill: str
    lm_weight: float
    distill_weight: float
    loss_curve: list = field(default_factory=list)  # [step, loss]
    lm_loss_before: float | None = None
    lm_loss_after: float | None = None
    hidden_cos_before: float | None = None  # mean token cosine to the teacher's final hidden states (held-out)
    hidden_cos_after: float | None = None
    train_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def hidden_distill_loss(h_student, h_teacher, mask=None):
    """``mean_t (1 - cos(h_s[t], h_t[t]))`` over the positions where ``mask`` is true."""
    import torch.nn.functional as F

    d = 1 - F.cosine_similarity(h_student.float(), h_teacher.float(), dim=-1)
    if mask is None:
        return d.mean()
    mask = mask.to(d.dtype)
    return (d * mask).sum() / mask.sum().clamp(min=1)


def logit_distill_loss(z_student, z_teacher, temperature: float = 1.0):
    """``T^2 KL(p_t || p_s)`` per token with ``p = softmax(z / T)``, averaged over tokens."""
    import torch.nn.functional as F

    t = temperature
    log_ps = F.log_softmax(z_student.float() / t, dim=-1).flatten(0, -2)
    log_pt = F.log_softmax(z_teacher.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * t * t


def hidden_cosine(student, teacher, ids, batch_size: int = 4) -> float:
    """Mean token cosine between the two models' final hidden states on ``ids``."""
    import torch

    total, n = 0.0, 0
    with torch.inference_mode():
        for b in range(0, ids.shape[0], batch_size):
            x = ids[b:b + batch_size]
            hs = student(input_ids=x, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            ht = teacher(input_ids=x, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            total += float((1 - hidden_distill_loss(hs, ht)) * x.numel())
            n += x.numel()
    return total / max(n, 1)


def _loss_weights(distill: str, teacher, lm_weight: float | None, distill_weight: float, steps: int) -> tuple[float, float]:
    """Validate the recovery options; ``(lm_weight, distill_weight)`` with the defaults filled in."""
    if distill not in DISTILL_MODES:
        raise InputError(f"distill={distill!r} is not one of {', '.join(DISTILL_MODES)}")
    if distill != "none" and teacher is None:
        raise InputError(f"distill={distill} needs the unpruned teacher model; pass teacher= or distill=none")
    if lm_weight is None:
        lm_weight = 0.0 if distill == "hidden" else 1.0
    if distill == "none":
        distill_weight = 0.0
    if lm_weight <= 0 and distill_weight <= 0:
        raise InputError("both lm_weight and distill_weight are 0: nothing to train")
    if steps < 1:
        raise InputError(f"steps={steps}: continued pretraining needs at least one step")
    return lm_weight, distill_weight


def _training_chunks(tokenizer, texts: list[str], steps: int, batch_size: int, seq_len: int, held_out: int):
    """``(training token chunks, held-out chunks or None)`` cut from ``texts``."""
    from tessera.retrieval.prune import calibration_batch

    ids = calibration_batch(tokenizer, texts, n_samples=steps * batch_size, seq_len=seq_len)
    if ids.shape[0] < batch_size:
        raise InputError(f"only {ids.shape[0]} chunks of {seq_len} tokens in the text; give more text or a smaller batch")
    held = calibration_batch(tokenizer, texts, n_samples=held_out, seq_len=seq_len, offset=ids.shape[0]) if held_out else None
    return ids, held


def _held_out_metrics(student, teacher, held) -> tuple[float, float | None]:
    """``(LM loss, hidden-state cosine to the teacher or None)`` on the held-out chunks."""
    from tessera.retrieval.prune import lm_loss

    loss = lm_loss(student, held)
    return loss, (hidden_cosine(student, teacher, held) if teacher is not None else None)


def _recovery_loss(model, teacher, x, *, distill: str, lm_weight: float, distill_weight: float, temperature: float):
    """``(loss, student outputs)`` of one batch: ``lm_weight * CE + distill_weight * D`` (module doc)."""
    import torch

    need_logits = lm_weight > 0 or distill == "logits"
    out = model(input_ids=x, labels=x if lm_weight > 0 else None, output_hidden_states=distill == "hidden",
                logits_to_keep=0 if need_logits else 1)
    loss = lm_weight * out.loss if lm_weight > 0 else 0.0
    if distill_weight > 0:
        if next(teacher.parameters()).device != x.device:
            teacher.to(x.device)
        with torch.no_grad():
            t_out = teacher(input_ids=x, output_hidden_states=distill == "hidden",
                            logits_to_keep=0 if distill == "logits" else 1)
        if distill == "hidden":
            kd = hidden_distill_loss(out.hidden_states[-1], t_out.hidden_states[-1])
        else:
            kd = logit_distill_loss(out.logits, t_out.logits, temperature)
        loss = loss + distill_weight * kd
    return loss, out


def _train_recovery(student, teacher, ids, report: RecoveryReport, *, temperature: float, batch_size: int, lr: float,
                    warmup_ratio: float, seed: int, log_every: int, on_log) -> None:
    """Run Hugging Face ``Trainer`` on the chunks ``ids``; the loss curve and time go into ``report``."""
    import torch
    from torch.utils.data import Dataset
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from tessera import ui

    loss_kw = {"distill": report.distill, "lm_weight": report.lm_weight, "distill_weight": report.distill_weight,
               "temperature": temperature}

    class Chunks(Dataset):
        def __len__(self):
            return ids.shape[0]

        def __getitem__(self, i):
            return {"input_ids": ids[i]}

    class RecoveryTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = _recovery_loss(model, teacher, inputs["input_ids"], **loss_kw)
            return (loss, out) if return_outputs else loss

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                report.loss_curve.append([state.global_step, round(float(logs["loss"]), 5)])
                if on_log is not None:
                    on_log(state.global_step, float(logs["loss"]))

    steps = report.steps
    with tempfile.TemporaryDirectory(prefix="tessera-cpt-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
            lr_scheduler_type="cosine", warmup_steps=max(0, math.ceil(warmup_ratio * steps)), weight_decay=0.0,
            logging_steps=max(1, log_every), save_strategy="no", report_to="none", seed=seed,
            remove_unused_columns=False, dataloader_drop_last=True, disable_tqdm=ui.is_quiet(),
            use_cpu=not torch.cuda.is_available(),
        )
        student.train()
        t0 = time.perf_counter()
        trainer = RecoveryTrainer(model=student, args=args, train_dataset=Chunks(), callbacks=[Log()])
        trainer.remove_callback(PrinterCallback)  # progress goes through tessera.ui, not printed dicts
        trainer.train()
        report.train_s = round(time.perf_counter() - t0, 2)


def continued_pretraining(student, tokenizer, texts: list[str], *, teacher=None, distill: str = "hidden",
                          lm_weight: float | None = None, distill_weight: float = 1.0, temperature: float = 1.0,
                          steps: int = 100, batch_size: int = 8, seq_len: int = 128, lr: float = 2e-4,
                          warmup_ratio: float = 0.05, held_out: int = 8, seed: int = 0, log_every: int = 5,
                          on_log=None) -> RecoveryReport:
    """Train ``student`` (a pruned causal LM, in place) on chunks of ``texts``; see the module doc.

    ``lm_weight`` defaults to 0 for ``hidden`` distillation (hidden states only, no LM
    head) and to 1 otherwise.  ``held_out`` chunks after the training chunks measure the
    LM loss (and, with a teacher, the hidden-state cosine) before and after.
    ``on_log(step, loss)`` is called every ``log_every`` steps.
    """
    lm_weight, distill_weight = _loss_weights(distill, teacher, lm_weight, distill_weight, steps)
    ids, held = _training_chunks(tokenizer, texts, steps, batch_size, seq_len, held_out)
    report = RecoveryReport(steps=steps, tokens=int(steps * batch_size * seq_len), distill=distill,
                            lm_weight=lm_weight, distill_weight=distill_weight)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    if held is not None:
        report.lm_loss_before, report.hidden_cos_before = _held_out_metrics(student, teacher, held)
    _train_recovery(student, teacher, ids, report, temperature=temperature, batch_size=batch_size, lr=lr,
                    warmup_ratio=warmup_ratio, seed=seed, log_every=log_every, on_log=on_log)
    student.eval()
    if held is not None:
        report.lm_loss_after, report.hidden_cos_after = _held_out_metrics(student, teacher, held)
    return report
