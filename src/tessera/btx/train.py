"""Training and evaluation for BTX: HF Trainer for branch (dense) and MoE finetuning, FLOPs, perplexity.

Both stages use the Hugging Face ``Trainer``, so ``torchrun``/``accelerate launch`` give DDP,
and FSDP comes from ``TrainingArguments(fsdp=...)``, with no change here.  The MoE stage adds
the load-balancing loss (:func:`tessera.btx.routing.btx_load_balancing_loss` or transformers'
built-in auxiliary loss) in :class:`MoETrainer.compute_loss`.

Compute matching uses the usual ``6 * active parameters * tokens`` training FLOPs (plus the
output head and the attention score term), counted by :func:`train_flops_per_token`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from tessera.btx.routing import BALANCE_LOSSES, BTX_BALANCE_ALPHA, btx_load_balancing_loss
from tessera.errors import InputError


@dataclass
class TrainSettings:
    """Optimisation settings shared by the branch, dense and MoE stages.

    The BTX paper trains 7B experts with AdamW at lr 1e-4..6e-5 (cosine, warmup) for
    tens of billions of tokens; the defaults here are scaled down for CPU studies.
    """

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    logging_steps: int = 10
    bf16: bool = False


def training_args(out_dir: str | Path, s: TrainSettings, **extra) -> TrainingArguments:
    from tessera import ui

    bf16 = s.bf16 or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=s.steps, per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum, learning_rate=s.lr, warmup_steps=max(0, int(round(s.warmup_ratio * s.steps))),
        weight_decay=s.weight_decay, lr_scheduler_type=s.scheduler, max_grad_norm=s.max_grad_norm, seed=s.seed,
        data_seed=s.seed, logging_steps=s.logging_steps, save_strategy="no", report_to=[], disable_tqdm=ui.is_quiet(),
        dataloader_num_workers=0, dataloader_pin_memory=False, bf16=bf16, remove_unused_columns=False, **extra,
    )


class MoETrainer(Trainer):
    """``Trainer`` for the BTX MoE finetuning stage: LM loss + load balancing.

    ``balance``: ``btx`` (alpha * N * sum_i u_i p_i per layer, summed; BTX Sec. 3.3; alpha 0.01),
    ``hf`` (transformers' Mixtral auxiliary loss times ``model.router_aux_loss_coef``,
    default 0.001) or ``none`` (the paper's ablation where an expert goes unused).
    """

    def __init__(self, *args, balance: str = "btx", balance_coef: float | None = None, routing: str = "topk", **kwargs):
        super().__init__(*args, **kwargs)
        if balance not in BALANCE_LOSSES:
            raise InputError(f"balance={balance!r}; use one of {', '.join(BALANCE_LOSSES)}")
        self.balance, self.routing = balance, routing
        self.balance_coef = balance_coef if balance_coef is not None else (BTX_BALANCE_ALPHA if balance == "btx" else None)
        model = self.model
        if balance == "hf" and balance_coef is not None:
            model.router_aux_loss_coef = balance_coef
        elif balance != "hf":
            model.router_aux_loss_coef = 0.0  # transformers adds coef * aux to the loss itself
        self.last_balance = float("nan")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, output_router_logits=True)
        loss = outputs.loss  # includes router_aux_loss_coef * aux_loss (zero unless balance == "hf")
        if self.balance == "btx":
            cfg = model.config if hasattr(model, "config") else model.module.config
            lb = btx_load_balancing_loss(outputs.router_logits, cfg.num_experts_per_tok, inputs.get("attention_mask"),
                                         alpha=self.balance_coef, routing=self.routing)
            loss = loss + lb
            self.last_balance = float(lb.detach())
        elif self.balance == "hf" and outputs.aux_loss is not None:
            self.last_balance = float(outputs.aux_loss.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and not math.isnan(self.last_balance):
            logs["balance_loss"] = self.last_balance
        super().log(logs, *args, **kwargs)


class HeldOutLoss(TrainerCallback):
    """Held-out loss per domain every ``every`` steps (and at step 0 and the end), kept in ``curve``.

    ``curve`` rows: ``{"step", "loss": {domain: mean NLL}, "mean": mean over domains}``; pass
    ``on_eval`` to also log/print each row.  :func:`plateau` turns the curve into the seed gate.
    """

    def __init__(self, blocks: dict[str, torch.Tensor], every: int, on_eval=None):
        self.blocks, self.every, self.on_eval = blocks, max(1, every), on_eval
        self.curve: list[dict] = []

    def _eval(self, model, step: int) -> None:
        loss = {n: float(-token_logprobs(model, b).mean()) for n, b in self.blocks.items()}
        row = {"step": step, "loss": loss, "mean": sum(loss.values()) / len(loss)}
        self.curve.append(row)
        if self.on_eval:
            self.on_eval(row)

    def on_train_begin(self, args, state, control, model=None, **kw):
        if not self.curve:
            self._eval(model, 0)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._eval(model, state.global_step)


def plateau(curve: list[dict], tail: float = 0.2) -> float:
    """Relative held-out loss improvement over the last ``tail`` of the steps:
    ``(L(t0) - L(T)) / L(t0)``, ``t0`` the evaluated step nearest ``(1 - tail) * T``."""
    if len(curve) < 2:
        raise InputError("a plateau needs at least two held-out evaluations")
    last = curve[-1]
    t0 = (1 - tail) * last["step"]
    ref = min(curve[:-1], key=lambda r: abs(r["step"] - t0))
    return (ref["mean"] - last["mean"]) / ref["mean"]


def train_model(model, blocks: torch.Tensor, out_dir: str | Path, settings: TrainSettings, *, moe: bool = False,
                balance: str = "btx", balance_coef: float | None = None, routing: str = "topk", callbacks=None):
    """Train ``model`` on ``blocks`` (``[n, seq_len]``) with the HF Trainer; returns ``(model, log_history)``."""
    from tessera.btx.data import BlockDataset

    if blocks.shape[0] == 0:
        raise InputError("no training blocks; add text to the domain or lower seq_len")
    args = training_args(out_dir, settings)
    cls = MoETrainer if moe else Trainer
    kw = {"balance": balance, "balance_coef": balance_coef, "routing": routing} if moe else {}
    trainer = cls(model=model, args=args, train_dataset=BlockDataset(blocks), callbacks=callbacks, **kw)
    model.train()
    trainer.train()
    model.eval()
    return model, [dict(r) for r in trainer.state.log_history]


def train_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token, ``6 * (active non-embedding params + head) + 6 * 2 * L * seq * d_attn`` (Kaplan-style).

    For a Mixtral config only ``num_experts_per_tok`` experts count as active, plus the router.
    """
    h, L = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    kv = config.num_key_value_heads * hd
    attn = h * heads * hd * 2 + 2 * h * kv
    ffn = 3 * h * config.intermediate_size
    if getattr(config, "num_local_experts", None):
        ffn = ffn * config.num_experts_per_tok + h * config.num_local_experts
    per_layer = attn + ffn
    head = h * config.vocab_size
    return 6.0 * (L * per_layer + head) + 6.0 * 2 * L * seq_len * heads * hd / 2  # causal: half the score matrix


@torch.no_grad()
def token_logprobs(model, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``[n, seq_len - 1]`` log-probabilities of each next token (fp32)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i:i + batch_size].to(dev)
        logits = model(input_ids=x).logits[:, :-1].float()
        out.append(torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1).cpu())
    if was:
        model.train()
    return torch.cat(out)


def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Held-out perplexity: ``exp`` of the mean next-token negative log-likelihood over all blocks."""
    return float(math.exp(-token_logprobs(model, blocks, batch_size).mean()))
