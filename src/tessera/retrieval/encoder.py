"""Retrievers in sentence-transformers format, from encoder or Llama-family backbones.

A retriever is a plain :class:`sentence_transformers.SentenceTransformer` built only
from sentence-transformers' own modules (``Transformer`` -> ``Pooling`` ->
``Normalize``), so a saved one loads anywhere with ``SentenceTransformer(path)``,
with or without tessera installed.  Queries are encoded with ``model.encode_query``
and documents with ``model.encode_document``; the instruction prefixes live in the
model's ``prompts`` (``{"query": ..., "document": ...}``) and embeddings are
L2-normalized.

Decoder backbones (ReasonIR and DRAMA, as summarised in PAPERS.md; the papers' training setups):

- **Bidirectional attention.**  Both papers encode with bidirectional attention.
  Setting ``self_attn.is_causal = False`` on the layers is not enough: with a
  padded batch transformers builds a *causal* 4D mask from the 2D padding mask
  (DESIGN.md, measured pitfall).  transformers >= 5.2 reads ``config.is_causal``
  instead: when it is ``False``, ``create_causal_mask`` builds a padding-only
  bidirectional mask from the 2D mask (``masking_utils.create_bidirectional_mask``).
  We set it on the backbone's config, so it is saved in ``config.json`` and holds
  after reloading; :func:`check_bidirectional` probes a padded batch and
  :func:`build_retriever` refuses to return a model that is still causal.  (A custom
  module class would do the same with its own 4D mask, but sentence-transformers
  >= 6 refuses to import module classes from outside its own package unless the
  loader passes ``trust_remote_code=True``; the config flag keeps the plain
  ``SentenceTransformer(path)`` contract.)
- **Pooling.**  Mean pooling (ReasonIR, GritLM) or last-token pooling; the
  instruction prefix is excluded from the pool (sentence-transformers'
  ``Pooling(include_prompt=False)``, which drops the first ``prompt_length`` tokens).
- **Prompts.**  ReasonIR/GritLM: query ``<|user|>\\n{instruction}\\n<|embed|>\\n``,
  document ``<|embed|>\\n``.  DRAMA: query ``Query: ``, document without prefix.
- **Matryoshka dimensions** (DRAMA): trained with ``MatryoshkaLoss``
  (:mod:`tessera.retrieval.train`); ``truncate_dim`` picks one at inference (it is
  saved with the model).  Truncated vectors are not unit-length unless
  ``normalize_embeddings=True`` is passed to ``encode_*``.

Right padding is used: Llama's rotary positions count from the first column, so
left padding would shift every position of a short text.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tessera.errors import InputError, ModelNotFoundError, TesseraError

log = logging.getLogger(__name__)

# Decoder families whose transformers implementation builds its mask with
# ``create_causal_mask`` and so honours ``config.is_causal = False``.
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# ReasonIR's instruction template (PAPERS.md: "Given a {task} post, retrieve relevant
# passages that help answer the post"), made generic for the default.
DEFAULT_INSTRUCTION = "Given a query, retrieve relevant passages that help answer the query"
GRITLM_EMBED = "<|embed|>\n"
GRITLM_QUERY = "<|user|>\n{instruction}\n<|embed|>\n"
DRAMA_QUERY = "Query: "
PROMPT_STYLES = ("reasonir", "drama", "none")
POOLING_MODES = {"mean": "mean", "last": "lasttoken", "lasttoken": "lasttoken", "cls": "cls"}


def format_prompt(style: str, instruction: str = "", role: str = "query") -> str:
    """The prefix for one text: ``style`` in ``reasonir | drama | none``, ``role`` in ``query | document``.

    ``reasonir`` (GritLM's format, as ReasonIR trains): ``<|user|>\\n{instruction}\\n<|embed|>\\n``
    when an instruction is given, else ``<|embed|>\\n`` (documents normally have none).
    ``drama``: ``Query: `` for queries, nothing for documents (instructions unused).
    """
    if role not in ("query", "document"):
        raise InputError(f"role must be 'query' or 'document', got {role!r}")
    if style == "reasonir":
        return GRITLM_QUERY.format(instruction=instruction) if instruction else GRITLM_EMBED
    if style == "drama":
        return DRAMA_QUERY if role == "query" else ""
    if style == "none":
        return ""
    raise InputError(f"unknown prompt style {style!r}; use one of {', '.join(PROMPT_STYLES)}")


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def resolve_backbone(spec: str) -> tuple[str, str]:
    """A backbone spec -> ``(path, kind)`` with kind ``sentence-transformers | encoder | decoder``.

    ``default-encoder`` (MiniLM) and ``default`` (SmolLM2) are the embedded models;
    a folder is classified by its files (``modules.json`` = a sentence-transformers
    model) and its ``config.json`` (``model_type`` in :data:`DECODER_TYPES` or a
    ``*ForCausalLM`` architecture = decoder).
    """
    from tessera import hub

    s = (spec or "default-encoder").strip()
    if s.lower() in hub.ENCODER_ALIASES:
        return hub.resolve_encoder(s), "sentence-transformers"
    if s.lower() in hub.LM_ALIASES:
        return hub.resolve_lm(s), "decoder"
    path = Path(s).expanduser()
    if not path.is_dir():
        # a cached hub id: let hub validate it offline, then classify its config
        resolved = hub.resolve_encoder(s)
        from huggingface_hub import try_to_load_from_cache
        from transformers import AutoConfig

        if isinstance(try_to_load_from_cache(resolved, "modules.json"), str):
            return resolved, "sentence-transformers"
        cfg = AutoConfig.from_pretrained(resolved, local_files_only=hub._local_only()).to_dict()
        kind = "decoder" if _is_decoder(cfg) else "encoder"
        return resolved, kind
    if (path / "modules.json").is_file():
        return str(path), "sentence-transformers"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{spec} has no config.json or modules.json; pass a Hugging Face or sentence-transformers model folder")
    return str(path), "decoder" if _is_decoder(_read_config(path)) else "encoder"


def _is_decoder(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") in DECODER_TYPES or any(str(a).endswith("ForCausalLM") for a in archs)


def check_matryoshka_dims(dims, dim: int) -> list[int]:
    """Matryoshka dimensions, largest first, each in ``1..dim`` (DRAMA trains e.g. 256 inside 768+)."""
    try:
        out = sorted({int(d) for d in dims}, reverse=True)
    except (TypeError, ValueError):
        raise InputError(f"matryoshka_dims must be a list of integers, got {dims!r}") from None
    if not out or out[-1] < 1 or out[0] > dim:
        raise InputError(f"matryoshka_dims {list(dims)} must lie in 1..{dim} (the embedding size); e.g. [{dim}, {max(1, dim // 2)}]")
    return out


def prompt_boundary_ok(tokenizer, prompt: str, probe: str = "retrieval") -> bool:
    """Whether ``prompt``'s tokens are a prefix of ``prompt + text``'s tokens.

    sentence-transformers excludes the prompt from pooling by dropping as many tokens
    as the prompt alone tokenizes to; a prompt whose tail merges with the text (a
    trailing space in byte-level BPE, e.g. DRAMA's ``Query: ``) makes it drop the
    text's first token too.
    """
    if not prompt:
        return True
    a = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    b = tokenizer(prompt + probe, add_special_tokens=False)["input_ids"]
    return b[: len(a)] == a


def _decoder_transformer(path: str, bidirectional: bool, max_seq_length: int):
    import torch
    from sentence_transformers.base.modules.transformer import Transformer

    from tessera.hub import _local_only, _quiet_transformers

    _quiet_transformers()
    try:
        module = Transformer(
            path,
            model_kwargs={"dtype": torch.float32, "local_files_only": _local_only()},
            processor_kwargs={"local_files_only": _local_only()},
            config_kwargs={"local_files_only": _local_only()},
            # pin plain text input: a tokenizer with a chat template would otherwise make
            # sentence-transformers wrap every text in it (the "message" modality)
            modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
            module_output_name="token_embeddings",
            max_seq_length=max_seq_length,
        )
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"could not load decoder backbone {path} ({str(e).splitlines()[0][:160]}); pass a Llama-family model folder or 'default'") from None
    tok = module.tokenizer
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Llama-family configs carry no is_causal attribute: absent = causal.
    if bidirectional:
        module.model.config.is_causal = False
    elif hasattr(module.model.config, "is_causal"):
        module.model.config.is_causal = True
    return module


def _load_st_retriever(path: str, device: str, max_seq_length: int | None, override_prompts: bool, q_prompt: str,
                       d_prompt: str):
    """A saved sentence-transformers folder, with its own pooling; ``(model, query prompt, document prompt)``."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    from tessera.hub import load_encoder

    model = load_encoder(path, device=device)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    if override_prompts or not model.prompts:
        model.prompts = {**model.prompts, "query": q_prompt, "document": d_prompt}
    q_prompt, d_prompt = model.prompts.get("query", ""), model.prompts.get("document", "")
    if q_prompt or d_prompt:  # instruction tokens stay out of the pool
        for m in model:
            if isinstance(m, Pooling):
                m.include_prompt = False
    if not any(isinstance(m, Normalize) for m in model):
        model.append(Normalize())
    return model, q_prompt, d_prompt


def _assemble_retriever(path: str, kind: str, pooling: str, bidirectional: bool, max_seq_length: int | None,
                        q_prompt: str, d_prompt: str, device: str):
    """``Transformer -> Pooling -> Normalize`` over an encoder or decoder backbone."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    max_seq_length = max_seq_length or 512
    if kind == "decoder":
        first = _decoder_transformer(path, bidirectional, max_seq_length)
    else:
        from sentence_transformers.base.modules.transformer import Transformer

        first = Transformer(path, max_seq_length=max_seq_length)
    dim = first.get_embedding_dimension()
    modules = [first, Pooling(dim, POOLING_MODES[pooling], include_prompt=False), Normalize()]
    return SentenceTransformer(modules=modules, prompts={"query": q_prompt, "document": d_prompt}, device=device)


def _finish_retriever(model, kind: str, bidirectional: bool, truncate_dim: int | None, matryoshka_dims,
                      q_prompt: str, d_prompt: str) -> None:
    """Set the output and Matryoshka dimensions, warn about prompts that merge with the text, and check that a
    bidirectional decoder really is."""
    dim = model.get_embedding_dimension()
    if truncate_dim is not None:
        if not 1 <= int(truncate_dim) <= dim:
            raise InputError(f"truncate_dim={truncate_dim} must lie in 1..{dim}")
        model.truncate_dim = int(truncate_dim)
    model.matryoshka_dims = check_matryoshka_dims(matryoshka_dims, dim) if matryoshka_dims else None
    tok = model[0].tokenizer
    for role, prompt in (("query", q_prompt), ("document", d_prompt)):
        if prompt and not prompt_boundary_ok(tok, prompt):
            log.warning("the %s prompt %r merges with the text's first token in this tokenizer, so pooling also drops "
                        "that token; end the prompt with a newline or punctuation to avoid it", role, prompt)
    if kind == "decoder" and bidirectional and not check_bidirectional(model):
        raise TesseraError(
            "this transformers version ignores config.is_causal=False, so the decoder would stay causal; "
            "upgrade transformers to >= 5.2 or pass bidirectional=False")


def build_retriever(
    backbone: str = "default-encoder",
    pooling: str = "mean",
    bidirectional: bool = True,
    query_prompt: str | None = None,
    doc_prompt: str | None = None,
    prompt_style: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    matryoshka_dims: list[int] | None = None,
    truncate_dim: int | None = None,
    max_seq_length: int | None = None,
    device=None,
):
    """A retriever (``SentenceTransformer``) from an encoder or a Llama-family decoder.

    - ``backbone``: ``default-encoder`` (embedded MiniLM), ``default`` (embedded
      SmolLM2-135M-Instruct), a model folder (Hugging Face or sentence-transformers)
      or a cached hub id.
    - ``pooling``: ``mean`` (ReasonIR) or ``last`` (last non-padding token), with
      the prompt excluded; a sentence-transformers folder keeps its own pooling.
    - ``bidirectional``: decoders only (ReasonIR and DRAMA encode bidirectionally);
      ``False`` keeps causal attention.
    - prompts: ``query_prompt`` / ``doc_prompt`` verbatim, else from
      ``prompt_style`` (:func:`format_prompt`; default ``reasonir`` for decoders with
      ``instruction`` for queries, ``none`` for encoders; a sentence-transformers
      folder keeps its saved prompts unless one of these is given).
    - ``matryoshka_dims``: validated and kept on ``model.matryoshka_dims`` for
      training; ``truncate_dim``: output size at inference (saved with the model).
    - ``max_seq_length``: 512 by default (ReasonIR trains at 2048; scaled down for CPU);
      a sentence-transformers folder keeps its own unless this is given.
    """
    from tessera.hub import default_device

    if pooling not in POOLING_MODES:
        raise InputError(f"unknown pooling {pooling!r}; use 'mean' or 'last'")
    if max_seq_length is not None and max_seq_length < 8:
        raise InputError(f"max_seq_length={max_seq_length} is too short; use at least 8 tokens")
    path, kind = resolve_backbone(backbone)
    style = prompt_style or ("reasonir" if kind == "decoder" else "none")
    q_prompt = query_prompt if query_prompt is not None else format_prompt(style, instruction, "query")
    d_prompt = doc_prompt if doc_prompt is not None else format_prompt(style, "", "document")
    device = str(device) if device is not None else str(default_device())

    if kind == "sentence-transformers":
        override = query_prompt is not None or doc_prompt is not None or prompt_style is not None
        model, q_prompt, d_prompt = _load_st_retriever(path, device, max_seq_length, override, q_prompt, d_prompt)
    else:
        model = _assemble_retriever(path, kind, pooling, bidirectional, max_seq_length, q_prompt, d_prompt, device)
    _finish_retriever(model, kind, bidirectional, truncate_dim, matryoshka_dims, q_prompt, d_prompt)
    return model


def token_states(model, texts: list[str], prompt: str | None = None):
    """Last-layer token states ``(batch, seq, dim)`` and the attention mask, for a padded batch."""
    import torch

    first = model[0]
    feats = first.preprocess(texts, prompt=prompt)
    feats = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}
    with torch.inference_mode():
        out = first(feats)
    return out["token_embeddings"], feats["attention_mask"]


def check_bidirectional(model) -> bool:
    """Probe a padded batch: does changing a later token change the first token's state?"""
    import torch

    a = "alpha beta gamma delta epsilon"
    b = "alpha beta gamma delta zeta"
    h, mask = token_states(model, [a, b, "alpha"])  # the short row forces padding
    return not torch.allclose(h[0, 0], h[1, 0], atol=1e-6)


def is_bidirectional(model) -> bool:
    """What the backbone's config says (``config.is_causal is False``)."""
    cfg = getattr(getattr(model[0], "model", None), "config", None)
    return cfg is not None and getattr(cfg, "is_causal", True) is False
