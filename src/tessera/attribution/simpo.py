"""SelfCite preference optimisation: length-balanced pairs and SimPO through TRL.

SelfCite section 2.4 ("Preference Optimization"): chosen = the response with best-of-N
(reranked) citations, rejected = the same response with its original citations.  Without care the model
learns "cite more" (better citations tend to be longer), so the rejected side is
length-balanced: it gets as many citation ranges and covers as many sentences as the
chosen side, by adding nearby fake ranges and moving range boundaries (the official
``length_balancing.py`` does this; :func:`length_balance` is our implementation of the
same rule).  Training is SimPO (Meng et al., 2024) via TRL's ``CPOTrainer`` with
``loss_type="simpo"`` and ``cpo_alpha=0`` (TRL 1.16: ``trl.experimental.cpo``), at
SelfCite's settings: beta 10, gamma/beta 0.3, learning rate 3e-7, 1 epoch, cosine
schedule with 10% warm-up (official ``longcite-8b-simpo.yaml``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tessera.attribution.format import CitePrompt, Span, format_response, span_numbers, spans_from_numbers

SIMPO_BETA = 10.0
SIMPO_GAMMA_BETA_RATIO = 0.3
SIMPO_LR = 3e-7
SIMPO_EPOCHS = 1
SIMPO_WARMUP = 0.1


def _cover(spans: Sequence[Span]) -> int:
    return len(span_numbers(spans))


def length_balance(rejected: Sequence[Span], chosen: Sequence[Span], n_sentences: int,
                   rng: random.Random | None = None) -> list[Span]:
    """The rejected citation reshaped to the chosen one's number of ranges and coverage.

    SelfCite section 2.4 and the official length_balancing.py: (1) too few ranges -> add one-sentence
    fake ranges a few sentences (3-10 when the context allows) before or after the
    chosen ones, never touching the chosen sentences or another range; too many -> keep
    the first; (2) fewer cited sentences than chosen -> extend ranges into free
    neighbours; more -> shrink ranges from their ends.  The rejected ranges never take
    a chosen sentence.  Best effort when the context is too small: check with
    :func:`is_balanced`.
    """
    rng = rng or random.Random(0)
    chosen_n = set(span_numbers(chosen))
    target_ranges, target_cover = len(spans_from_numbers(chosen_n)), len(chosen_n)
    rej = spans_from_numbers(span_numbers(rejected))

    def free(i: int, spans, own: Span | None = None) -> bool:
        """Sentence i can join the rejected side without merging two ranges or touching chosen."""
        if not 1 <= i <= n_sentences or i in chosen_n:
            return False
        others = [s for s in spans if s != own]
        return all(not (a - 1 <= i <= b + 1) for a, b in others)

    # (1) number of ranges
    if len(rej) > target_ranges:
        rej = rej[:target_ranges]
    lo = min(chosen_n) if chosen_n else rng.randint(1, max(1, n_sentences))
    hi = max(chosen_n) if chosen_n else lo
    while len(rej) < target_ranges:
        near = [i for i in range(1, n_sentences + 1) if (3 <= lo - i <= 10 or 3 <= i - hi <= 10) and free(i, rej)]
        pool = near or [i for i in range(1, n_sentences + 1) if free(i, rej)]
        if not pool:
            break
        i = rng.choice(pool)
        rej = sorted(rej + [(i, i)])
    # (2) coverage
    for _ in range(4 * n_sentences + 4):
        cov = _cover(rej)
        if cov == target_cover or not rej:
            break
        if cov < target_cover:
            moves = []
            for k, (a, b) in enumerate(rej):
                if free(a - 1, rej, (a, b)):
                    moves.append((k, (a - 1, b)))
                if free(b + 1, rej, (a, b)):
                    moves.append((k, (a, b + 1)))
        else:
            moves = [(k, m) for k, (a, b) in enumerate(rej) if b > a for m in ((a + 1, b), (a, b - 1))]
        if not moves:
            break
        k, new = rng.choice(moves)
        rej[k] = new
        rej = sorted(rej)
    return rej


def is_balanced(rejected: Sequence[Span], chosen: Sequence[Span]) -> bool:
    """Same number of (merged) ranges and the same number of cited sentences."""
    r, c = spans_from_numbers(span_numbers(rejected)), spans_from_numbers(span_numbers(chosen))
    return len(r) == len(c) and _cover(r) == _cover(c)


@dataclass
class PreferencePair:
    """One SimPO training row: ``prompt`` (chat-templated text), ``chosen``/``rejected`` responses."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    statements: list[str]
    chosen_spans: list[list[Span]]
    rejected_spans: list[list[Span]]
    original_spans: list[list[Span]]
    balanced: bool = True
    reward_gain: float = 0.0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("chosen_spans", "rejected_spans", "original_spans"):
            d[k] = [[list(s) for s in spans] for spans in d[k]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreferencePair":
        d = dict(d)
        for k in ("chosen_spans", "rejected_spans", "original_spans"):
            d[k] = [[tuple(s) for s in spans] for spans in d[k]]
        return cls(**d)


def make_pair(pair_id: str, prompt: CitePrompt, statements: Sequence[str], chosen: Sequence[Sequence[Span]],
              original: Sequence[Sequence[Span]], rng: random.Random | None = None, reward_gain: float = 0.0,
              balance: bool = True) -> PreferencePair | None:
    """A length-balanced pair, or ``None`` when chosen and rejected cite the same sentences everywhere."""
    rng = rng or random.Random(0)
    n = len(prompt.context)
    norm = lambda spans: spans_from_numbers(span_numbers(spans))  # noqa: E731
    chosen_n = [norm(c) for c in chosen]
    original_n = [norm(o) for o in original]
    if all(c == o for c, o in zip(chosen_n, original_n)):
        return None
    rejected = [o if c == o or not balance else length_balance(o, c, n, rng) for c, o in zip(chosen_n, original_n)]
    if all(c == r for c, r in zip(chosen_n, rejected)):
        return None
    return PreferencePair(
        id=pair_id, prompt=prompt.text(), chosen=format_response(zip(statements, chosen_n)),
        rejected=format_response(zip(statements, rejected)), statements=list(statements), chosen_spans=chosen_n,
        rejected_spans=rejected, original_spans=original_n,
        balanced=all(is_balanced(r, c) for r, c in zip(rejected, chosen_n)), reward_gain=reward_gain,
    )


def train_simpo(model, tokenizer, pairs: Sequence[PreferencePair], output_dir: str, beta: float = SIMPO_BETA,
                gamma_beta_ratio: float = SIMPO_GAMMA_BETA_RATIO, learning_rate: float = SIMPO_LR,
                epochs: float = SIMPO_EPOCHS, max_steps: int = -1, batch_size: int = 1, grad_accum: int = 1,
                warmup: float = SIMPO_WARMUP, lora: bool = False, lora_r: int = 16, lora_alpha: int = 32,
                max_length: int = 2048, seed: int = 0, logging_steps: int = 1, quiet: bool = True):
    """SimPO on the pairs with TRL's ``CPOTrainer`` (``loss_type="simpo"``, ``cpo_alpha=0``).

    ``simpo_gamma = gamma_beta_ratio * beta`` (TRL takes the margin gamma itself; SimPO
    and SelfCite quote gamma/beta).  ``lora=True`` trains a LoRA adapter (peft) and
    merges it back.  Returns ``(model, log_history)``; the model is in eval mode.
    """
    import os

    import torch
    from datasets import Dataset

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL 1.16 moved CPO/SimPO to trl.experimental
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    if not pairs:
        from tessera.errors import InputError

        raise InputError("no preference pairs to train on (best-of-N never changed a citation); use more examples or a larger N")
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    cuda = torch.cuda.is_available()
    args = CPOConfig(
        output_dir=str(output_dir), loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=gamma_beta_ratio * beta,
        learning_rate=learning_rate, num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, lr_scheduler_type="cosine", warmup_steps=warmup,
        logging_steps=logging_steps, save_strategy="no", report_to=[], seed=seed, max_length=max_length,
        use_cpu=not cuda, bf16=cuda, disable_tqdm=quiet, dataloader_num_workers=0,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model.train()
    trainer = CPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    trained = trainer.model
    if lora:
        trained = trained.merge_and_unload()
    trained.eval()
    return trained, list(trainer.state.log_history)
