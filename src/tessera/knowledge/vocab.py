"""Small from-scratch Llamas for CPU knowledge studies.

With SmolLM2's 49k-token vocabulary the output layer is most of a tiny model's compute (a
hidden-64, 2-layer Llama trains about 5x slower than the same model with a 2k vocabulary
here).  For from-scratch studies - where no pretrained embedding is reused - a byte-level BPE
trained on the run's own documents and train QA (never on the test questions' answers as
such: those words only appear through the test documents, which are trained on anyway) keeps
the model cheap.  ``vocab_size=0`` uses :func:`tessera.hub.new_tiny_llama` unchanged.
"""

from __future__ import annotations


def corpus_tokenizer(texts: list[str], base="default", vocab_size: int = 2048):
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts``, with ``base``'s special
    tokens (BOS/EOS/pad) and chat template, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tessera import hub

    if isinstance(base, str):
        base = AutoTokenizer.from_pretrained(hub.resolve_lm(base), local_files_only=True)
    specials = list(dict.fromkeys(t for t in (base.bos_token, base.eos_token, base.pad_token, *base.all_special_tokens) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=base.bos_token, eos_token=base.eos_token,
                                   pad_token=base.pad_token or base.eos_token)
    if getattr(base, "chat_template", None):
        fast.chat_template = base.chat_template
    return fast


def tiny_llama(texts: list[str] | None = None, *, vocab_size: int = 0, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0, tokenizer: str = "default"):
    """``(model, tokenizer)``: :func:`tessera.hub.new_tiny_llama` (``vocab_size=0``), or the same
    Llama shape over a :func:`corpus_tokenizer` of ``vocab_size`` tokens trained on ``texts``."""
    from tessera import hub

    tok = corpus_tokenizer(texts or [], tokenizer, vocab_size) if vocab_size else tokenizer
    return hub.new_tiny_llama(tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                              num_kv_heads=num_kv_heads, seed=seed)
