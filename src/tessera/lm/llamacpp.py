"""llama.cpp (``llama-cpp-python``) as tessera's text engine for GGUF models.

The embedded SmolLM2-135M-Instruct ships as a GGUF file (Q4_1).  transformers can only run it
dequantized to fp32; llama.cpp runs the quantized weights as they are, with its own CPU kernels,
about 3-6x faster per decoded token on this 2-core machine (``benchmarks/lm.py``).

:class:`LlamaCppEngine` is what :class:`~tessera.lm.local.LocalLM` calls when its ``engine`` is
``"llamacpp"``; every path that needs only text and log-probabilities runs on it:

- generation (:meth:`LocalLM.stream`, :meth:`LocalLM.generate_batch`): greedy or sampled
  (temperature, top-p, seed), stop tokens, ``stop_when`` callbacks; prompts of a batch run one after
  another, ordered so that neighbours share their longest prefixes, and each reuses the KV cache of
  its common prefix with the previous one (the synthesis template, a reranked query's instruction);
- next-token log-probabilities (:meth:`LocalLM.batched_last_logprobs`) and row scoring
  (:meth:`LocalLM.score`): logits are computed only for the positions asked for.

Token ids come from the transformers tokenizer of the same GGUF (the same vocabulary), so prompts,
stop tokens and decoding are identical on both engines; the weights differ by dequantization, so
greedy outputs agree often but not always (``benchmarks/lm.py`` records how often).

Paths that need hidden states, attention or gradients (NEST's keys and span verification,
SelfCite's constrained decoding and ablation passes, training) use the transformers model:
``LocalLM.model`` loads it on first use and says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from tessera.errors import InputError

INSTALL = "pip install -e '.[llamacpp]' (builds llama-cpp-python from source: about 7 minutes on 2 cores)"


def available() -> bool:
    """True when ``llama_cpp`` can be imported (``llama-cpp-python`` is installed)."""
    return importlib.util.find_spec("llama_cpp") is not None


def run_file(gguf: Path) -> Path:
    """The file llama.cpp runs for ``gguf``: the embedded SmolLM2 (Q4_1) repacked once to Q8_0, any other GGUF as is.

    llama.cpp has no fast matrix-matrix kernel for Q4_1 on x86, so prompts of the shipped file prefill at
    about 290 tokens/s here; Q8_0 takes the fast path (about 600 tokens/s) and decodes as fast.  Every Q4_1
    weight (16 levels per block of 32) moves by at most half a Q8_0 step (255 levels per block), a change far
    below the Q4_1 quantization itself; ``benchmarks/lm.py`` records both files' speed and greedy agreement.
    ``TESSERA_LLAMACPP_REPACK=0`` runs the shipped file as it is.
    """
    import ctypes
    import os

    from tessera import hub

    gguf = Path(gguf)
    if os.environ.get("TESSERA_LLAMACPP_REPACK", "1") == "0" or gguf.resolve() != hub.embedded_lm_gguf().resolve():
        return gguf
    out = hub.embedded_lm_dir(convert=False).with_suffix(".q8_0.gguf")
    if out.is_file():
        return out
    import llama_cpp

    from tessera.config import atomic_file

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = max(1, torch.get_num_threads())
    try:
        with atomic_file(out) as tmp:
            if llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise _RepackFailed
    except _RepackFailed:
        return gguf  # could not repack: run the shipped file
    return out


class _RepackFailed(Exception):
    """llama.cpp's quantizer returned an error; the half-written file is dropped."""


def _lcp(a: np.ndarray, b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``."""
    limit = min(limit, len(a), len(b))
    if limit <= 0:
        return 0
    diff = np.nonzero(np.asarray(a[:limit]) != np.asarray(b[:limit], dtype=a.dtype))[0]
    return int(diff[0]) if len(diff) else limit


def prefix_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Indices of ``prompts`` in lexicographic token order: prompts that share a long prefix become neighbours."""
    return sorted(range(len(prompts)), key=lambda i: list(prompts[i]))


_PARAMS_LOCK = threading.Lock()


def amx_build() -> bool:
    """Whether this llama.cpp build carries its AMX kernels (compiled with ``-march=native`` on a CPU with AMX)."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def extra_buffers() -> bool:
    """Whether weights load into llama.cpp's extra CPU buffer types (AMX tiles, repacked layouts).

    Off for builds with AMX kernels: there ``ggml_backend_amx_mul_mat`` crashes the process (SIGSEGV) on the first
    prompt (llama-cpp-python 0.3.36 on a Xeon with AMX-INT8, both the Q8_0 and the Q4_1 file), and a crash cannot be
    caught.  Plain CPU buffers run the same kernels as a build without AMX.  ``TESSERA_LLAMACPP_EXTRA_BUFTS=1``
    forces them on, ``=0`` off."""
    import os

    forced = os.environ.get("TESSERA_LLAMACPP_EXTRA_BUFTS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return not amx_build()


@contextlib.contextmanager
def _model_params(use_extra_bufts: bool):
    """``Llama(...)`` takes no ``use_extra_bufts``; set it on the defaults its constructor starts from."""
    import llama_cpp

    if use_extra_bufts:
        yield
        return
    with _PARAMS_LOCK:
        original = llama_cpp.llama_cpp.llama_model_default_params

        def defaults():
            p = original()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_cpp.llama_model_default_params = defaults
        try:
            yield
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = original


class LlamaCppEngine:
    """One llama.cpp context over a GGUF file (see the module docstring); not thread-safe."""

    def __init__(self, path: str | Path, n_ctx: int = 0, n_threads: int | None = None, n_batch: int = 512):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise InputError(f"the llama.cpp engine needs llama-cpp-python; run `{INSTALL}`, or pass --engine tessera") from None
        threads = int(n_threads or max(1, torch.get_num_threads()))
        self.path = Path(path)
        try:
            # flash attention: about 20% faster prompts of 500 tokens here, decoding unchanged
            self.extra_buffers = extra_buffers()
            with _model_params(self.extra_buffers):
                self.llm = Llama(model_path=str(path), n_ctx=int(n_ctx), n_batch=n_batch, n_ubatch=n_batch,
                                 n_threads=threads, n_threads_batch=threads, logits_all=False, flash_attn=True,
                                 verbose=False)
        except ValueError as e:
            raise InputError(f"llama.cpp could not load {self.path.name} ({str(e)[:160]}); pass a GGUF language model") from None
        self.n_vocab = int(self.llm.n_vocab())
        self.threads = threads
        # one caller at a time on this context (tessera serve answers several requests on worker threads;
        # their streamed generations go through tessera.lm.batching on a context of their own)
        self.lock = threading.RLock()
        # free the context while the interpreter still runs (Llama.__del__ at shutdown finds its modules gone)
        weakref.finalize(self, self.llm.close)

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    # ------------------------------------------------------------------ KV cache and evaluation
    def _reuse(self, tokens: Sequence[int], limit: int) -> int:
        """Keep the cached KV of the common prefix of ``tokens`` with what was evaluated last (at most
        ``limit`` tokens) and drop the rest; returns the number of tokens kept."""
        llm = self.llm
        n = _lcp(llm.input_ids[: llm.n_tokens], tokens, limit)
        if not llm._ctx.kv_cache_seq_rm(-1, n, -1):  # always: llm.reset() forgets the tokens, not the cache
            n = 0
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm.n_tokens = n
        llm._requires_eval = True  # llm.generate re-evaluates the last prompt token before sampling
        return n

    def _eval(self, tokens: Sequence[int], logits_from: int) -> np.ndarray:
        """Evaluate ``tokens`` after the cached ones; logits [k, V] of the positions ``>= logits_from``
        (indices into ``tokens``); only those run the output head."""
        llm = self.llm
        batch = llm._batch.batch
        out = []
        for s in range(0, len(tokens), llm.n_batch):
            chunk = list(tokens[s:s + llm.n_batch])
            n_past = llm.n_tokens
            batch.n_tokens = len(chunk)
            k = 0
            for j, t in enumerate(chunk):
                batch.token[j] = t
                batch.pos[j] = n_past + j
                batch.seq_id[j][0] = 0
                batch.n_seq_id[j] = 1
                want = s + j >= logits_from
                batch.logits[j] = want
                k += want
            llm._ctx.decode(llm._batch)
            if k:
                rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(k * self.n_vocab,))
                out.append(rows.reshape(k, self.n_vocab).copy())
            llm.input_ids[n_past:n_past + len(chunk)] = chunk
            llm.n_tokens += len(chunk)
        return np.concatenate(out) if out else np.zeros((0, self.n_vocab), dtype=np.float32)

    # ------------------------------------------------------------------ text
    def tokens(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, repetition_penalty: float = 1.0) -> Iterator[int]:
        """Token ids one at a time (greedy when ``temperature <= 0``); the caller stops at its stop tokens.

        ``repetition_penalty`` is llama.cpp's: over the last 64 tokens (transformers' covers the whole row)."""
        llm = self.llm
        with self.lock:
            self._reuse(prompt, len(prompt) - 1)
            llm.set_seed(int(seed))
            gen = llm.generate(list(prompt), temp=float(temperature) if temperature > 0 else 0.0, top_p=float(top_p),
                               top_k=0, min_p=0.0, typical_p=1.0, repeat_penalty=float(repetition_penalty))
            try:
                for i, token in enumerate(gen):
                    yield int(token)
                    if i + 1 >= max_new_tokens:
                        return
            finally:
                gen.close()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int], temperature: float,
                 top_p: float, seed: int, stop_when: Callable[[int, list[int]], bool] | None = None,
                 stop_check_every: int = 4, repetition_penalty: float = 1.0) -> list[tuple[list[int], str]]:
        """``[(new token ids without the stop token, "eos" | "stop_when" | "length")]`` in input order; row
        ``i`` samples with seed ``seed + i``."""
        with self.lock:
            return self._generate(prompts, max_new_tokens, stop_ids, temperature, top_p, seed, stop_when,
                                  stop_check_every, repetition_penalty)

    def _generate(self, prompts, max_new_tokens, stop_ids, temperature, top_p, seed, stop_when, stop_check_every,
                  repetition_penalty) -> list[tuple[list[int], str]]:
        out: list = [None] * len(prompts)
        for i in prefix_order(prompts):
            new: list[int] = []
            reason = "length"
            for token in self.tokens(prompts[i], max_new_tokens, temperature, top_p, seed + i, repetition_penalty):
                if token in stop_ids:
                    reason = "eos"
                    break
                new.append(token)
                if stop_when is not None and len(new) % stop_check_every == 0 and stop_when(i, new):
                    reason = "stop_when"
                    break
            out[i] = (new, reason)
        return out

    # ------------------------------------------------------------------ log-probabilities
    def last_logprobs(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Next-token log-probabilities [B, V] after each prompt."""
        out = torch.empty(len(prompts), self.n_vocab)
        with self.lock:
            self._last_logprobs(prompts, out)
        return out

    def _last_logprobs(self, prompts, out: torch.Tensor) -> None:
        for i in prefix_order(prompts):
            p = list(prompts[i])
            n = self._reuse(p, len(p) - 1)
            logits = self._eval(p[n:], len(p) - 1 - n)
            out[i] = torch.log_softmax(torch.from_numpy(logits[-1]).float(), -1)

    def score(self, rows: Sequence[tuple[Sequence[int], int]]) -> tuple[list[list[float]], dict]:
        """Log-probability of each of the last ``n`` tokens of every ``(ids, n)`` row, in input order, and
        the number of tokens evaluated (rows reuse the KV of their common prefix with the previous row)."""
        with self.lock:
            return self._score(rows)

    def _score(self, rows: Sequence[tuple[Sequence[int], int]]) -> tuple[list[list[float]], dict]:
        out: list = [None] * len(rows)
        computed = 0
        for i in prefix_order([r for r, _ in rows]):
            seq, n = list(rows[i][0]), int(rows[i][1])
            if n < 1 or n >= len(seq):
                raise ValueError(f"a row of {len(seq)} tokens cannot score its last {n}: need 1 <= n < length")
            first = len(seq) - n - 1  # the position whose logits predict the first scored token
            kept = self._reuse(seq, first)
            logits = torch.from_numpy(self._eval(seq[kept:-1], first - kept)).float()
            computed += len(seq) - 1 - kept
            lp = torch.log_softmax(logits, -1)
            tgt = torch.tensor(seq[-n:])
            out[i] = lp.gather(-1, tgt[:, None])[:, 0].tolist()
        return out, {"rows": len(rows), "tokens": sum(len(r) for r, _ in rows), "computed_tokens": computed}
