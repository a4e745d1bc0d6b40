"""Local transformers causal LM with tessera's own streaming decoding loop.

The loop is explicit (prefill once, then one cached forward pass per token) so
that decoding methods built on it (NEST's span verification, SelfCite's
constrained citations) can step in between tokens.  ``benchmarks/ask.py``
compares its speed with ``model.generate`` on the same prompt.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tessera.errors import ContextTooLongError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    stop_reason: str = ""

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when ``temperature == 0``, else temperature + nucleus (top-p) sampling. ``logits``: [B, V] -> [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------- batched generation (left padding)
def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ``(input_ids, attention_mask)`` [B, T], padded on the left.

    Left padding keeps every row's last prompt token in the last column, so one
    decoding step appends to all rows at once; positions are then counted from each
    row's first real token (``position_ids`` = cumulative sum of the mask - 1), which
    ``model.generate`` does from the attention mask and :func:`batched_last_logits` does
    explicitly.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@dataclass
class BatchOutput:
    """One row of :meth:`LocalLM.generate_batch`: new token ids (without stop token) and why it ended."""

    token_ids: list[int]
    stop_reason: str  # "eos" | "stop_when" | "length"


def _stop_criteria(lm: "LocalLM", prompt_width: int, stop_when, every: int):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopWhen(StoppingCriteria):
        """Per-row early stop: decode each unfinished row every ``every`` tokens and ask ``stop_when(text)``."""

        def __init__(self):
            self.fired: set[int] = set()

        def __call__(self, input_ids, scores, **kwargs):
            n = input_ids.shape[1] - prompt_width
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if n % every:
                for i in self.fired:
                    done[i] = True
                return done
            for i in range(input_ids.shape[0]):
                if i in self.fired:
                    done[i] = True
                    continue
                new = input_ids[i, prompt_width:].tolist()
                if any(t in lm.stop_ids for t in new):
                    continue
                if stop_when(lm.tokenizer.decode(new, skip_special_tokens=True)):
                    self.fired.add(i)
                    done[i] = True
            return done

    crit = _StopWhen()
    return StoppingCriteriaList([crit]), crit


class LocalLM:
    """A Hugging Face causal LM + tokenizer with chat prompting and streaming."""

    def __init__(self, model, tokenizer, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "")
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.stop_ids = {int(i) for i in eos if i is not None}

    @classmethod
    def load(cls, spec: str = "default", device=None) -> "LocalLM":
        from tessera import hub

        loaded = hub.load_lm(spec, device=device)
        return cls(loaded.model, loaded.tokenizer, name=spec)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> torch.Tensor:
        """Chat messages -> input ids [1, T] via the tokenizer's chat template (plain text if it has none)."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + ("\n\nassistant:" if add_generation_prompt else "")
            ids = self.tokenizer(text)["input_ids"]
        return torch.tensor([list(ids)], dtype=torch.long, device=self.device)

    def check_fits(self, n_prompt: int, max_new_tokens: int, what: str = "the prompt") -> None:
        if n_prompt + max_new_tokens > self.context_window:
            raise ContextTooLongError(
                f"{what} is {n_prompt} tokens and {max_new_tokens} more are to be generated, but the model's context holds "
                f"{self.context_window}; shorten it or lower --max-new-tokens"
            )

    @torch.inference_mode()
    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Yield decoded text pieces as tokens are generated (batch size 1, KV cache)."""
        from transformers import DynamicCache

        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = int(input_ids.shape[1])
        self.check_fits(stats.prompt_tokens, max_new_tokens)
        generator = torch.Generator(device=self.device).manual_seed(seed) if temperature > 0 else None
        t0 = time.perf_counter()
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=input_ids.to(self.device), cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        generated: list[int] = []
        emitted = ""
        stats.stop_reason = "length"
        for step in range(max_new_tokens):
            token = int(sample_next(logits, temperature, top_p, generator)[0])
            if step == 0:
                stats.time_to_first_token_s = time.perf_counter() - t0
            if token in self.stop_ids:
                stats.stop_reason = "eos"
                break
            generated.append(token)
            stats.new_tokens = len(generated)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
            if step + 1 < max_new_tokens:
                nxt = torch.tensor([[token]], device=self.device)
                logits = self.model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1]
        stats.total_s = time.perf_counter() - t0

    @property
    def pad_id(self) -> int:
        """The padding id for batches: the tokenizer's, else a stop token (never attended to)."""
        tok = self.tokenizer.pad_token_id
        return int(tok) if tok is not None else int(min(self.stop_ids))

    def generate(self, input_ids: torch.Tensor, **kwargs) -> str:
        return "".join(self.stream(input_ids, **kwargs))

    def chat(self, messages: list[dict], **kwargs) -> str:
        return self.generate(self.encode_chat(messages), **kwargs)

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int = 256, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int = 0, stop_when=None, stop_check_every: int = 4,
                       repetition_penalty: float = 1.0) -> list[BatchOutput]:
        """Generate for several prompts in one left-padded batch (``model.generate`` with a KV cache).

        Greedy when ``temperature == 0``, else temperature + top-p sampling seeded by
        ``seed``.  ``stop_when(text)`` (checked every ``stop_check_every`` tokens) ends a row
        early, e.g. once a JSON object is complete.  Rows are independent: a row that
        stops early is padded while the others continue.  Leaves :meth:`stream` (batch 1,
        tessera's own loop) untouched.
        """
        if not prompts:
            return []
        longest = max(len(p) for p in prompts)
        self.check_fits(longest, max_new_tokens)
        pad = self.pad_id
        ids, mask = left_pad(prompts, pad, self.device)
        kwargs = dict(max_new_tokens=int(max_new_tokens), pad_token_id=int(pad), eos_token_id=sorted(self.stop_ids))
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = float(repetition_penalty)
        crit = None
        if stop_when is not None:
            kwargs["stopping_criteria"], crit = _stop_criteria(self, ids.shape[1], stop_when, max(1, int(stop_check_every)))
        with torch.inference_mode(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(int(seed))
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        results = []
        for i, row in enumerate(out[:, ids.shape[1]:].tolist()):
            cut = next((j for j, t in enumerate(row) if t in self.stop_ids), None)
            if cut is not None:
                results.append(BatchOutput(row[:cut], "eos"))
            elif crit is not None and i in crit.fired:
                results.append(BatchOutput(row, "stop_when"))
            else:
                results.append(BatchOutput(row, "length"))
        return results

    def batched_last_logprobs(self, prompts: list[list[int]]) -> torch.Tensor:
        """Next-token log-probabilities [B, V] after each prompt, one left-padded forward pass."""
        pad = self.pad_id
        ids, mask = left_pad(prompts, pad, self.device)
        self.check_fits(ids.shape[1], 0)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
        return torch.log_softmax(logits.float(), dim=-1)
