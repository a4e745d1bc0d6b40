"""Baselines for NEST, decoded on the same harness (same LM, same datastore, same result type).

- :func:`greedy_generate`: plain greedy decoding (also in-context RAG: greedy on a
  :func:`rag_prompt` that puts the passages in front of the prompt);
- :func:`knn_lm_generate`: kNN-LM (Khandelwal et al. 2020; NEST's baseline, lambda
  0.25, k 1024) over NEST's token datastore, or NEST's own adaptive mixture decoded
  token by token (NEST with no span accepted);
- :func:`prompt_lookup_generate`: transformers' prompt-lookup decoding.

None of them attributes a token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from tessera.attribution.nest import NestConfig, mixture_at
from tessera.attribution.nest_store import (
    Emitter,
    NestResult,
    NestStats,
    TokenDatastore,
    as_passage,
    check_prompt,
    lm_forward,
    make_result,
)


def _token_by_token(lm, ids: torch.Tensor, max_new_tokens: int, stats: NestStats, on_token, forward, pick) -> list[int]:
    """The baselines' shared loop: ``state = forward(ids, cache)``, then ``token = pick(state)`` and
    ``state = forward([[token]], cache)`` until a stop token or ``max_new_tokens``."""
    from transformers import DynamicCache

    emit = Emitter(lm.tokenizer, on_token)
    t0 = time.perf_counter()
    cache = DynamicCache(config=lm.model.config)
    state = forward(ids, cache)
    stats.prefill_s = time.perf_counter() - t0
    out: list[int] = []
    while True:
        token = pick(state)
        if token in lm.stop_ids:
            stats.stop_reason = "eos"
            break
        out.append(token)
        emit.add([token])
        if len(out) >= max_new_tokens:
            break
        state = forward(torch.tensor([[token]], device=ids.device), cache)
        stats.forward_passes += 1
    stats.generate_s = time.perf_counter() - t0
    return out


@torch.inference_mode()
def greedy_generate(lm, input_ids: torch.Tensor, max_new_tokens: int = 128, on_token: Callable[[str], None] | None = None,
                    method: str = "greedy") -> NestResult:
    """Plain greedy decoding of the same LM with a KV cache (one forward pass per token); no attribution."""
    ids = check_prompt(lm, input_ids, max_new_tokens)
    stats = NestStats(prompt_tokens=int(ids.shape[1]), stop_reason="length")
    out = _token_by_token(
        lm, ids, max_new_tokens, stats, on_token,
        forward=lambda x, cache: lm.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1],
        pick=lambda logits: int(torch.argmax(logits)))
    return make_result(lm, out, [None] * len(out), stats, method=method)


KNN_LM_LAMBDA = 0.25
"""kNN-LM's interpolation weight *of the kNN distribution* (Khandelwal et al. 2020; NEST's baseline)."""


@torch.inference_mode()
def knn_lm_generate(lm, datastore: TokenDatastore, input_ids: torch.Tensor, max_new_tokens: int = 128,
                    config: NestConfig | None = None, knn_lambda: float | None = KNN_LM_LAMBDA,
                    on_token: Callable[[str], None] | None = None) -> NestResult:
    """Token-by-token greedy decoding of a kNN mixture over the same datastore; no spans, no masking.

    ``knn_lambda=0.25`` is the kNN-LM baseline: ``p = 0.75 p_LM + 0.25 p_kNN`` with
    ``p_LM`` at temperature 1 and ``token_k`` neighbours (p_kNN as
    :func:`knn_distribution`, so both methods read the same keys the same way).
    ``knn_lambda=None`` decodes NEST's own mixture (adaptive lambda from the RRC,
    ``config.lm_temperature``): NEST with nothing accepted reduces to this.
    No token is attributed (the kNN-LM has no notion of a copied span).
    """
    cfg = config or NestConfig()
    ids = check_prompt(lm, input_ids, max_new_tokens)
    datastore.reset()
    fixed = None if knn_lambda is None else 1.0 - knn_lambda
    temp = None if knn_lambda is None else 1.0
    stats = NestStats(prompt_tokens=int(ids.shape[1]), datastore_tokens=len(datastore), stop_reason="length")
    out = _token_by_token(
        lm, ids, max_new_tokens, stats, on_token,
        forward=lambda x, cache: lm_forward(lm.model, x, cache, last_only=True),
        pick=lambda state: int(torch.argmax(mixture_at(*state, datastore, cfg, fixed_lambda=fixed, lm_temperature=temp).p_m[-1])))
    return make_result(lm, out, [None] * len(out), stats, datastore.passages,
                       method="knn-lm" if knn_lambda is not None else "nest-mixture-greedy")


def rag_prompt(passages: Sequence, prompt: str) -> str:
    """In-context RAG for text continuation: the passages (title, text), a blank line, then the prompt."""
    blocks = []
    for p in (as_passage(x) for x in passages):
        blocks.append(f"{p.title}\n{p.text.strip()}" if p.title else p.text.strip())
    return "\n\n".join(blocks + [prompt]) if blocks else prompt


@torch.inference_mode()
def prompt_lookup_generate(lm, input_ids: torch.Tensor, max_new_tokens: int = 128, num_tokens: int = 10) -> NestResult:
    """transformers' prompt-lookup decoding (``model.generate(..., prompt_lookup_num_tokens=...)``), greedy.

    Drafts are n-grams copied from the prompt (here: the passages plus the prompt,
    see :func:`rag_prompt`) and verified by the LM, so the output equals greedy
    decoding of the same prompt.  ``forward_passes`` is not observable and left 0.
    """
    ids = check_prompt(lm, input_ids, max_new_tokens)
    stats = NestStats(prompt_tokens=int(ids.shape[1]))
    tok = lm.tokenizer
    t0 = time.perf_counter()
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                            prompt_lookup_num_tokens=num_tokens, pad_token_id=tok.pad_token_id,
                            eos_token_id=sorted(lm.stop_ids) or None)
    stats.generate_s = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in lm.stop_ids), None)
    stats.stop_reason = "eos" if cut is not None else "length"
    new = new[:cut] if cut is not None else new
    return make_result(lm, new, [None] * len(new), stats, method="prompt-lookup")
