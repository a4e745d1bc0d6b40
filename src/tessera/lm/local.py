"""Local transformers causal LM with tessera's own streaming decoding loop.

The loop is explicit (prefill once, then one cached forward pass per token) so
that decoding methods built on it (NEST's span verification, SelfCite's
constrained citations) can step in between tokens.  ``benchmarks/ask.py``
compares its speed with ``model.generate`` on the same prompt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.errors import ContextTooLongError, InputError
from tessera.lm.sampling import sample_next  # noqa: F401 - re-exported (tessera.lm.local.sample_next)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    stop_reason: str = ""
    drafted_tokens: int = 0  # prompt-lookup speculation (greedy, tessera engine): tokens proposed / accepted
    accepted_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


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


ENGINES = ("tessera", "hf", "llamacpp")


def engine_choice(spec: str = "default", engine: str | None = None) -> tuple[str, str]:
    """``(engine, why)`` for loading ``spec``: ``engine`` or ``$TESSERA_ENGINE`` when given, else ``auto``:
    llama.cpp for a GGUF spec (``default``, ``gguf:PATH``) when ``llama-cpp-python`` is installed and no GPU
    is in use, else tessera's engine (transformers' forward for architectures it does not know)."""
    import os

    from tessera import hub
    from tessera.lm import llamacpp

    asked = (engine or os.environ.get("TESSERA_ENGINE") or "auto").strip().lower()
    if asked not in ENGINES + ("auto",):
        raise InputError(f"unknown engine {asked!r}: use auto, llamacpp, tessera or hf")
    gguf = hub.gguf_file(spec)
    if asked == "llamacpp":
        if gguf is None:
            raise InputError(f"the llama.cpp engine runs GGUF files; {spec!r} is not one (pass --lm default or gguf:PATH, "
                             "or --engine tessera)")
        if not llamacpp.available():
            raise InputError(f"the llama.cpp engine needs llama-cpp-python; run `{llamacpp.INSTALL}`, or --engine tessera")
        return "llamacpp", "asked for"
    if asked != "auto":
        return asked, "asked for"
    if gguf is None:
        return "tessera", "a transformers model (llama.cpp runs GGUF files only)"
    if not llamacpp.available():
        return "tessera", f"llama-cpp-python is not installed ({llamacpp.INSTALL})"
    if hub.default_device().type != "cpu":
        return "tessera", "a GPU is in use (llama.cpp here is the CPU build)"
    return "llamacpp", "a GGUF model and llama-cpp-python is installed"


class LocalLM:
    """A causal LM + tokenizer with chat prompting and streaming, on one of three engines (``engine``):

    - ``"tessera"``: :mod:`tessera.lm.engine` over the transformers model (static KV cache, shared prefixes
      computed once, prompt-lookup speculation); Llama-family models;
    - ``"hf"``: transformers' own forward and ``model.generate`` (any causal LM; the reference);
    - ``"llamacpp"``: :mod:`tessera.lm.llamacpp` over a GGUF file (text and log-probabilities only).  The
      transformers model is then loaded on first use of :attr:`model` (NEST, SelfCite's internals, training).
    """

    def __init__(self, model, tokenizer, name: str = "", llama=None, spec: str | None = None,
                 eos_ids: Sequence[int] = (), remote=None):
        self._model = model
        self._llama = llama
        self._remote = remote
        self._spec = spec or name or "default"
        self.tokenizer = tokenizer
        self.name = name or (getattr(model.config, "_name_or_path", "") if model is not None else self._spec)
        eos = {tokenizer.eos_token_id, *eos_ids}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.stop_ids = {int(i) for i in eos if i is not None}
        from tessera.lm.engine import supports

        # "tessera": the static-cache, shared-prefix engine (tessera.lm.engine) for Llama-family models;
        # "hf": transformers' own forward / model.generate (any causal LM, and the reference the tests compare to);
        # "llamacpp": llama.cpp over the GGUF file (when loaded that way)
        if remote is not None:
            self.engine = "openai"
        elif llama is not None:
            self.engine = "llamacpp"
        else:
            self.engine = "tessera" if supports(model) else "hf"
        self.engine_reason = ""
        # greedy batch-1 decoding on the tessera engine checks up to this many prompt-lookup draft tokens per
        # pass (tessera.lm.engine.decode_lookup; the output is greedy decoding's); 0 turns it off
        self.lookup_tokens = 10
        self.batcher = None  # a ContinuousBatcher (enable_batching): streamed generations share decoding steps
        self._load_lock = threading.Lock()

    @classmethod
    def load(cls, spec: str = "default", device=None, engine: str | None = None, url: str | None = None,
             served_model: str | None = None) -> "LocalLM":
        """``spec``: see :mod:`tessera.hub`; ``engine``: ``auto`` (default, see :func:`engine_choice`),
        ``llamacpp``, ``tessera`` or ``hf``.  ``url``: an OpenAI-compatible server (vLLM, llama.cpp) that serves
        ``spec``; answers stream from it (engine ``"openai"``), and ``spec`` must name a local copy of the model
        (``default``, ``gguf:PATH``, a folder or a cached hub id) for its tokenizer, which fits prompts into the
        context, and for the paths that need log-probabilities or internals.  ``served_model``: the model's name
        on that server when it differs from ``spec`` (vLLM serves a hub id, llama.cpp's server any name)."""
        from tessera import hub

        if url:
            from tessera.lm.openai_backend import OpenAIBackend

            gguf = hub.gguf_file(spec)
            folder = hub.gguf_dir(gguf) if gguf is not None else hub.resolve_lm(spec)
            if Path(folder).is_dir():
                tokenizer = hub.load_tokenizer(folder)
            else:  # a cached hub id
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=hub._local_only())
            served = served_model or ("default" if spec.strip().lower() in hub.LM_ALIASES else spec)
            lm = cls(None, tokenizer, name=f"{spec}@{url}", spec=spec,
                     remote=OpenAIBackend(base_url=url, model=served, max_retries=1))
            lm.engine_reason = "--lm-url"
            return lm

        choice, why = engine_choice(spec, engine) if device is None or torch.device(device).type == "cpu" else \
            (engine or "tessera", "a GPU device was asked for")
        if choice == "llamacpp":
            import json

            from tessera.lm.llamacpp import LlamaCppEngine, run_file

            gguf = hub.gguf_file(spec)
            folder = hub.gguf_dir(gguf)  # the tokenizer and generation config (and the model, if a path needs it)
            tokenizer = hub.load_tokenizer(folder)  # FastTokenizer: no transformers import on the text path
            eos = []
            gen_cfg = folder / "generation_config.json"
            if gen_cfg.is_file():
                gen = json.loads(gen_cfg.read_text()).get("eos_token_id")
                eos = [e for e in (gen if isinstance(gen, list) else [gen]) if isinstance(e, int)]
            lm = cls(None, tokenizer, name=spec, llama=LlamaCppEngine(run_file(gguf)), spec=spec, eos_ids=eos)
        else:
            loaded = hub.load_lm(spec, device=device)
            lm = cls(loaded.model, loaded.tokenizer, name=spec)
            if choice in ("tessera", "hf") and (engine or "").strip().lower() in ("tessera", "hf"):
                lm.engine = lm._engine(choice)
        lm.engine_reason = why
        return lm

    @property
    def model(self):
        """The transformers model (loaded on first use when the LM runs on llama.cpp)."""
        if self._model is not None:
            return self._model
        with self._load_lock:  # concurrent requests (tessera serve) load it once
            return self._load_model()

    def _load_model(self):
        if self._model is None:
            from tessera import hub, ui

            ui.info(f"[dim]this step needs the transformers model ({self._spec}); loading it beside the {self.engine} engine[/dim]")
            self._model = hub.load_lm(self._spec, device="cpu").model
            gen_eos = getattr(getattr(self._model, "generation_config", None), "eos_token_id", None)
            self.stop_ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if i is not None)
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    def local_weights(self) -> bool:
        """Whether the model's weights are on this machine (loaded, or loadable from ``spec``): the paths that need
        log-probabilities or internals (SelfCite, NEST, scoring) need them when generation runs on a server."""
        if self._model is not None or self._llama is not None:
            return True
        if getattr(self, "_has_weights", None) is None:  # looked up once (tessera serve asks on every request)
            self._has_weights = self._find_weights()
        return self._has_weights

    def _find_weights(self) -> bool:
        from tessera import hub

        try:
            if hub.gguf_file(self._spec) is not None:
                return True
            folder = Path(hub.resolve_lm(self._spec))
        except Exception:  # noqa: BLE001 - not resolvable here: no local weights
            return False
        if not folder.is_dir():
            return True  # a cached hub id: resolve_lm found its config in the cache
        return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))

    def enable_batching(self, max_batch: int) -> str:
        """Let concurrent :meth:`stream` calls (from several threads) decode together, at most ``max_batch`` at a
        time (:class:`tessera.lm.batching.ContinuousBatcher`).  Returns how streams run now: ``"batched"``
        (llama.cpp engine), ``"concurrent"`` (an OpenAI-compatible server, which batches them itself) or
        ``"serial"`` (``max_batch`` 1, or an engine without continuous batching: the caller runs one at a time)."""
        if max_batch <= 1:
            return "serial"
        if self.engine == "openai":
            return "concurrent"
        if self.engine != "llamacpp":
            return "serial"
        if self.batcher is None or self.batcher.max_batch != max_batch:
            from tessera.lm.batching import ContinuousBatcher

            if self.batcher is not None:
                self.batcher.close()
            self.batcher = ContinuousBatcher(self._llama, max_batch)
        return "batched"

    def disable_batching(self) -> None:
        """Stop the batcher (its running streams end with an error); :meth:`stream` runs one at a time again."""
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None

    @property
    def device(self) -> torch.device:
        if self._model is None:
            return torch.device("cpu")
        return next(self._model.parameters()).device

    @property
    def context_window(self) -> int:
        if self._remote is not None:
            return self._remote.context_window
        if self._llama is not None:
            return self._llama.n_ctx
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def _engine(self, engine: str | None, text_stream: bool = False) -> str:
        engine = engine or self.engine
        if engine == "openai":
            if self._remote is None:
                raise ValueError("this LM has no server (--lm-url); use engine='tessera', 'hf' or 'llamacpp'")
            if text_stream:
                return engine
            # batches, log-probabilities and scores need the model itself: its local copy answers them
            from tessera.lm.engine import supports

            return "tessera" if supports(self.model) else "hf"
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}: use 'tessera', 'hf' or 'llamacpp'")
        if engine == "llamacpp" and self._llama is None:
            raise ValueError("this LM was not loaded from a GGUF file with llama.cpp; use engine='tessera' or 'hf'")
        if engine == "tessera":
            from tessera.lm.engine import supports

            if not supports(self.model):
                raise ValueError(f"the tessera engine runs Llama-family models; {type(self.model).__name__} needs engine='hf'")
        return engine

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

    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stats: GenerationStats | None = None,
        engine: str | None = None,
    ) -> Iterator[str]:
        """Yield decoded text pieces as tokens are generated (batch size 1, KV cache).

        ``engine``: ``"tessera"`` (default for Llama-family models: static KV cache, no per-step cache copies)
        or ``"hf"`` (transformers' forward with a ``DynamicCache``); greedy outputs are the same.
        """
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = int(input_ids.shape[1])
        self.check_fits(stats.prompt_tokens, max_new_tokens)
        engine = self._engine(engine, text_stream=True)
        if engine == "openai":
            yield from self._stream_remote(input_ids, max_new_tokens, temperature, top_p, seed, stats)
            return
        generator = torch.Generator(device=self.device).manual_seed(seed) if temperature > 0 else None
        t0 = time.perf_counter()
        generated: list[int] = []
        emitted = ""
        stats.stop_reason = "length"
        for step, token in enumerate(self._token_stream(input_ids, max_new_tokens, temperature, top_p, generator, engine,
                                                        stats)):
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
        stats.total_s = time.perf_counter() - t0

    def _stream_remote(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                       stats: GenerationStats) -> Iterator[str]:
        """Text pieces from the OpenAI-compatible server: the prompt goes as text with its special tokens written
        out (the server tokenizes it back to the same ids); new tokens are counted with the local tokenizer."""
        prompt = self.tokenizer.decode(input_ids[0].tolist(), skip_special_tokens=False)
        t0 = time.perf_counter()
        stats.stop_reason = "length"
        text = ""
        for piece, finish in self._remote.stream_completion(prompt, max_new_tokens=max_new_tokens,
                                                            temperature=temperature, top_p=top_p, seed=seed):
            if piece:
                if not text:
                    stats.time_to_first_token_s = time.perf_counter() - t0
                text += piece
                yield piece
            if finish:
                stats.stop_reason = "eos" if finish == "stop" else "length"
        stats.new_tokens = self.count_tokens(text) if text else 0
        stats.total_s = time.perf_counter() - t0

    @torch.inference_mode()
    def _token_stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                      generator, engine: str, stats: GenerationStats) -> Iterator[int]:
        """Token ids one at a time (a stop token is yielded, then the stream ends)."""
        if engine == "llamacpp":
            seed = int(generator.initial_seed()) if generator is not None else 0
            batcher = self.batcher
            if batcher is not None and batcher.fits(input_ids.shape[1], max_new_tokens):
                # continuous batching (tessera serve --max-batch): rows decode together
                yield from batcher.stream(input_ids[0].tolist(), max_new_tokens, self.stop_ids, temperature, top_p, seed)
                return
            for token in self._llama.tokens(input_ids[0].tolist(), max_new_tokens, temperature, top_p, seed):
                yield token
                if token in self.stop_ids:
                    return
            return
        if engine == "tessera":
            from tessera.lm.engine import decode

            def pick(logits, rows, states):
                return sample_next(logits, temperature, top_p, generator)

            prompt = input_ids[0].tolist()
            seen = 0
            lookup = self.lookup_tokens if temperature <= 0 else 0
            for _, states in decode(self.model, [prompt], max_new_tokens, set(), pick, pad_id=self.pad_id,
                                    lookup=lookup):
                st = states[0]
                stats.drafted_tokens, stats.accepted_tokens = st.drafted, st.accepted
                for t in st.tokens[seen:]:
                    yield t
                    if t in self.stop_ids:
                        return
                seen = len(st.tokens)
            return
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=input_ids.to(self.device), cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        for step in range(max_new_tokens):
            token = int(sample_next(logits, temperature, top_p, generator)[0])
            yield token
            if token in self.stop_ids:
                return
            if step + 1 < max_new_tokens:
                nxt = torch.tensor([[token]], device=self.device)
                logits = self.model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1]

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
                       repetition_penalty: float = 1.0, engine: str | None = None) -> list[BatchOutput]:
        """Generate for several prompts in one batch.

        Greedy when ``temperature == 0``, else temperature + top-p sampling seeded by
        ``seed``.  ``stop_when(text)`` (checked every ``stop_check_every`` tokens) ends a row
        early, e.g. once a JSON object is complete.  Rows are independent.

        ``engine="tessera"`` (default for Llama-family models, :mod:`tessera.lm.engine`): the
        prompts' common prefix is computed once, the KV cache is static and finished rows leave
        the batch.  ``engine="hf"``: one left-padded ``model.generate`` call.  Greedy outputs agree
        (tested); sampled ones use different random streams.
        """
        if not prompts:
            return []
        longest = max(len(p) for p in prompts)
        self.check_fits(longest, max_new_tokens)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        engine = self._engine(engine)
        if engine == "hf":
            return self._generate_batch_hf(prompts, max_new_tokens, temperature, top_p, seed, stop_when,
                                           stop_check_every, repetition_penalty)
        if engine == "llamacpp":
            check_row = None
            if stop_when is not None:
                def check_row(row, tokens):
                    return bool(stop_when(self.tokenizer.decode(tokens, skip_special_tokens=True)))
            rows = self._llama.generate(prompts, int(max_new_tokens), self.stop_ids, temperature, top_p, int(seed),
                                        check_row, max(1, int(stop_check_every)), repetition_penalty)
            return [BatchOutput(tokens, reason) for tokens, reason in rows]
        from tessera.lm.engine import decode

        generator = torch.Generator(device=self.device).manual_seed(int(seed)) if temperature > 0 else None

        def pick(logits, rows, states):
            if repetition_penalty != 1.0:
                logits = logits.clone()
                for b, row in enumerate(rows):
                    seen = torch.tensor(sorted(set(prompts[row]) | set(states[row].tokens)), device=logits.device)
                    val = logits[b, seen]
                    logits[b, seen] = torch.where(val < 0, val * repetition_penalty, val / repetition_penalty)
            return sample_next(logits, temperature, top_p, generator)

        check = None
        if stop_when is not None:
            def check(row, tokens):
                return bool(stop_when(self.tokenizer.decode(tokens, skip_special_tokens=True)))

        states = []
        greedy = temperature <= 0 and repetition_penalty == 1.0
        steps = decode(self.model, prompts, int(max_new_tokens), self.stop_ids, pick, pad_id=self.pad_id,
                       stop_when=check, stop_check_every=max(1, int(stop_check_every)),
                       lookup=self.lookup_tokens if greedy else 0)
        with torch.inference_mode():
            for _, states in steps:
                pass
        if not states:  # max_new_tokens == 0
            return [BatchOutput([], "length") for _ in prompts]
        return [BatchOutput(list(st.tokens), st.reason) for st in states]

    def _generate_batch_hf(self, prompts, max_new_tokens, temperature, top_p, seed, stop_when, stop_check_every,
                           repetition_penalty) -> list[BatchOutput]:
        """One left-padded ``model.generate`` call (the reference the tessera engine is tested against)."""
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

    def batched_last_logprobs(self, prompts: list[list[int]], engine: str | None = None) -> torch.Tensor:
        """Next-token log-probabilities [B, V] after each prompt.

        ``engine="tessera"``: the prompts' common prefix (with the longest prompt) is computed once;
        ``"hf"``: one left-padded forward pass."""
        self.check_fits(max(len(p) for p in prompts), 0)
        engine = self._engine(engine)
        if engine == "llamacpp":
            return self._llama.last_logprobs(prompts)
        if engine == "tessera":
            from tessera.lm.engine import last_logprobs

            return last_logprobs(self.model, prompts, batch_size=len(prompts), pad_id=self.pad_id)
        pad = self.pad_id
        ids, mask = left_pad(prompts, pad, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    def score(self, rows: list[tuple[list[int], int]], batch_size: int = 8, engine: str | None = None,
              anchor: list[int] | None = None) -> list[list[float]]:
        """Log-probability of each of the last ``n`` tokens of every ``(ids, n)`` row, in input order.

        ``engine="tessera"``: the anchor (default: the longest row) runs once and each row reuses the KV of
        its common prefix with it (SelfCite's ablations, which drop or keep sentences of one context, share
        most of their tokens); ``"hf"``: one left-padded forward pass per batch over whole rows.
        """
        if not rows:
            return []
        self.check_fits(max(len(r) for r, _ in rows), 0)
        engine = self._engine(engine)
        if engine == "llamacpp":
            out, self.last_score_stats = self._llama.score(rows)
            return out
        if engine == "tessera":
            from tessera.lm.engine import score_rows

            out, self.last_score_stats = score_rows(self.model, rows, batch_size=batch_size, anchor=anchor,
                                                    pad_id=self.pad_id)
            return out
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        out: list = [None] * len(rows)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            chunk = [rows[i] for i in idx]
            for seq, n in chunk:
                if n < 1 or n >= len(seq):
                    raise ValueError(f"a row of {len(seq)} tokens cannot score its last {n}: need 1 <= n < length")
            ids, mask = left_pad([list(r) for r, _ in chunk], self.pad_id, self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            n_max = max(n for _, n in chunk)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                    logits_to_keep=n_max + 1).logits[:, :-1]
            lp = torch.log_softmax(logits.float(), -1)
            for r, (seq, n) in enumerate(chunk):
                tgt = torch.tensor(list(seq[-n:]), device=lp.device)
                out[idx[r]] = lp[r, -n:].gather(-1, tgt[:, None])[:, 0].tolist()
        return out
