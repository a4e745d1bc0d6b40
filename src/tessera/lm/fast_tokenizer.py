"""A tokenizer that starts in milliseconds: the ``tokenizers`` library and the model's chat template, with the
full transformers tokenizer loaded only if something asks for more.

Importing transformers takes about 1.4 s of a ``tessera ask`` on this machine (its lazy import table scans
every model package), while the llama.cpp engine needs no transformers code at all.  :class:`FastTokenizer`
reads the same ``tokenizer.json``, ``tokenizer_config.json`` and chat template that transformers would and
answers the calls on the generation path (``tok(text)``, ``decode``, ``apply_chat_template``, the special
tokens) with the same results (tests compare them); any other attribute loads the transformers tokenizer
and is answered by it.
"""

from __future__ import annotations

import json
from pathlib import Path


def _token_text(value) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class FastTokenizer:
    """See the module docstring.  ``folder``: a transformers model folder with ``tokenizer.json``."""

    SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        self._folder = Path(folder)
        self._tok = Tokenizer.from_file(str(self._folder / "tokenizer.json"))
        cfg_path = self._folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if template is None and (self._folder / "chat_template.jinja").is_file():
            template = (self._folder / "chat_template.jinja").read_text()
        self.chat_template = template
        self._clean_up = bool(cfg.get("clean_up_tokenization_spaces", False))
        self._special = {name: _token_text(cfg.get(name)) for name in self.SPECIAL}
        if self._special["pad_token"] is None:
            self._special["pad_token"] = self._special["eos_token"]
        self._hf = None
        self._template = None

    # ------------------------------------------------------------------ special tokens
    def _id(self, name: str) -> int | None:
        text = self._special.get(name)
        return self._tok.token_to_id(text) if text is not None else None

    bos_token = property(lambda self: self._special["bos_token"])
    eos_token = property(lambda self: self._special["eos_token"])
    unk_token = property(lambda self: self._special["unk_token"])
    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))

    @property
    def pad_token(self) -> str | None:
        return self._special["pad_token"]

    @pad_token.setter
    def pad_token(self, value) -> None:
        self._special["pad_token"] = value
        if self._hf is not None:
            self._hf.pad_token = value

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ the generation path
    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        if kwargs or not isinstance(text, str):
            return self.full(text, add_special_tokens=add_special_tokens, **kwargs)
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if kwargs:
            return self.full.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if kwargs:
            return self.full.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            return self.full.decode(ids, skip_special_tokens=skip_special_tokens)
        return text

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True, **kwargs):
        if kwargs or self.chat_template is None or (conversation and not isinstance(conversation[0], dict)):
            return self.full.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tokenize=tokenize, **kwargs)
        if self._template is None:
            self._template = _compile(self.chat_template)
        text = self._template.render(messages=list(conversation), add_generation_prompt=add_generation_prompt,
                                     **{k: v for k, v in self._special.items() if v is not None})
        return self._tok.encode(text, add_special_tokens=False).ids if tokenize else text

    # ------------------------------------------------------------------ everything else
    @property
    def full(self):
        """The transformers tokenizer of the same folder (loaded on first use)."""
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self._folder, local_files_only=True)
            if self._hf.pad_token is None or self._hf.pad_token != self._special["pad_token"]:
                self._hf.pad_token = self._special["pad_token"]
        return self._hf

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.full, name)


def _compile(template: str):
    """The chat template under the Jinja settings transformers renders it with (sandboxed, trimmed blocks)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)
