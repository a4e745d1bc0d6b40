"""LMFusion (LlamaFusion, Shi et al. 2024): a frozen pretrained text LLM plus parallel image modules.

Every layer of a Hugging Face Llama-family causal LM gets a copy of its text modules for images
(section 3): input norm, Q/K/V/O projections, post-attention norm and FFN, plus a final image
norm, all initialised from the corresponding text modules (:mod:`tessera.models.lmfusion_modules`).
Tokens are routed by modality with the MoT router (:class:`~tessera.models.modality.ModalityRouter`:
index lists computed once per batch, reused in every layer, gather/scatter); text positions go through
the text modules, image positions through the image modules, and one shared self-attention with RoPE
runs over the whole sequence (LMFusion section 3, method): causal for text, bidirectional within an
image (Transfusion mask, :func:`~tessera.models.masks.transfusion_mask`).  Per layer, with ``M(x)``
the text or image copy of module ``M`` by the token's modality::

    h = x + O_M(Attn(Q_M(norm1_M(x)), K_M(norm1_M(x)), V_M(norm1_M(x))))   # attention over all tokens
    x' = h + FFN_M(norm2_M(h))

Image input/output (Transfusion section 2.1-2.2): images are cut into ``patch_size`` patches and
mapped to the model width by a linear layer (or a small U-Net down block), a diffusion-timestep
embedding is added; at the output a linear layer (or the U-Net up block) predicts the noise of every
patch.  BOI/EOI are new ids ``vocab_size`` and ``vocab_size + 1`` embedded by a small trainable
table (:attr:`LMFusionModel.special_embed`), so the base embedding matrix is untouched; the LM head
stays the base model's (text logits are over the base vocabulary; the caller places BOI/EOI).

Freezing (section 3): text modules, embeddings and LM head are frozen and only the image side
trains (``freeze_text=True``); ``freeze_text=False`` trains everything (the "train the whole
pretrained model" baseline).  For text-only input the output equals the base model's bit for bit:
the text path runs the base model's own modules, RoPE, causal mask and attention function in the
same order.

This file reads top to bottom: the model (forward, one fused layer, embeddings and mask, outputs,
parameters, save/load), the per-modality dispatch, the base-model loading.  Elsewhere: the config and
image modules (:mod:`tessera.models.lmfusion_modules`); the objective
:class:`~tessera.models.lmfusion_objective.LMFusionLM`, Transfusion's ``L_LM + lambda * L_DDPM``
(section 2.3, lambda 5) with the DDPM cosine schedule of :mod:`tessera.models.diffusion`, and the
measured training FLOPs (:mod:`tessera.models.lmfusion_objective`); sampling
(:mod:`tessera.models.lmfusion_sampling`): :func:`~tessera.models.lmfusion_sampling.generate_images`
with classifier-free guidance, :func:`~tessera.models.lmfusion_sampling.caption_images` running the
image prefix through the fused model and handing its key/value cache to the base model's ``generate``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tessera.errors import InputError, ModelNotFoundError
from tessera.models.decoder import timestep_embedding
from tessera.models.lmfusion_modules import (ATTN_PARTS, TEXT_PARTS, ImageLayer, LinearPatcher, LMFusionConfig,
                                             UNetPatcher)
from tessera.models.masks import transfusion_mask
from tessera.models.modality import IMAGE, TEXT, ModalityIndex, ModalityRouter

CONFIG_NAME = "lmfusion_config.json"
WEIGHTS_NAME = "lmfusion_image.safetensors"
BASE_DIR_NAME = "base"  # where an unfrozen (baseline) run saves its changed base model


@dataclass
class FusionOutput:
    """What :meth:`LMFusionModel.forward` returns: hidden states plus what the two output heads need."""

    hidden: torch.Tensor  # [B, T, d] after the per-modality final norm
    index: ModalityIndex
    patch_state: object = None  # U-Net skip features for the image rows
    cache: object = None


class LMFusionModel(nn.Module):
    """A frozen Llama-family LM (``self.base``) plus parallel image modules (LMFusion section 3).

    ``image_layers[i]`` mirrors ``base.model.layers[i]`` (:class:`~tessera.models.lmfusion_modules.ImageLayer`),
    ``image_norm`` the final norm (both ``None`` with ``image_modules="shared"``: the Transfusion baseline, one
    dense transformer whose text modules also process the image tokens); ``special_embed`` holds BOI/EOI, ``time_mlp`` the diffusion-timestep
    embedding, ``patcher`` the patch embedding in and out.  :meth:`forward` returns hidden states;
    :meth:`text_logits` and :meth:`predict_noise` are the two output heads.
    """

    def __init__(self, base: nn.Module, cfg: LMFusionConfig):
        super().__init__()
        check_base(base)
        cfg = copy.deepcopy(cfg)
        cfg.validate()
        cfg.vocab_size = base.get_input_embeddings().num_embeddings
        cfg.hidden_size = base.config.hidden_size
        cfg.layers = len(base.model.layers)
        self.cfg = cfg
        self.base = base
        self.router = ModalityRouter(2)
        d = cfg.hidden_size
        emb = base.get_input_embeddings().weight
        std = float(emb.detach().float().std())
        dtype = torch.float32
        if cfg.image_modules == "separate":
            self.image_layers = nn.ModuleList([ImageLayer(layer) for layer in base.model.layers]).to(dtype)
            self.image_norm = copy.deepcopy(base.model.norm).to(dtype)
        else:  # Transfusion: one dense transformer, image tokens through the text modules
            self.image_layers, self.image_norm = None, None
        self.special_embed = nn.Embedding(2, d).to(device=emb.device)  # BOI, EOI (new rows; the base table is untouched)
        with torch.no_grad():  # new rows start at the mean embedding (as transformers' resize_token_embeddings)
            self.special_embed.weight.copy_(emb.detach().float().mean(0, keepdim=True).expand(2, d))
            self.special_embed.weight.add_(torch.randn(2, d) * 0.1 * std)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d)).to(emb.device)
        nn.init.normal_(self.time_mlp[2].weight, std=std / math.sqrt(d))
        nn.init.zeros_(self.time_mlp[2].bias)
        self.patcher = (LinearPatcher if cfg.patcher == "linear" else UNetPatcher)(cfg, d, std).to(emb.device)
        if self.image_layers is not None:
            self.image_layers.to(emb.device)
            self.image_norm.to(emb.device)
        self.set_freeze_text(cfg.freeze_text)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, modality: torch.Tensor | None = None, image_id: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, patches: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None) -> FusionOutput:
        """Hidden states of a mixed-modal batch.

        ``tokens``/``modality`` ``[B, T]`` (modality 0 text incl. BOI/EOI, 1 image patch; default all
        text); ``image_id`` ``[B, T]`` (-1 text, k for the k-th image; default: each run of image
        positions is one image); ``attention_mask`` ``[B, T]`` (1 = real token); ``patches``
        ``[B, T, patch_dim]`` and ``timesteps`` ``[B, T]`` read at image positions; ``cache``: a
        transformers ``DynamicCache`` to fill (the prefix for
        :func:`~tessera.models.lmfusion_sampling.caption_images`).
        """
        B, T = tokens.shape
        if modality is None:
            modality = torch.full_like(tokens, TEXT)
        index = self.router.route(modality)  # once per batch, reused by every layer
        x, state = self.embed(tokens, index, patches, timesteps)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:  # as the base model: 0..T-1 after the cache (left padding: pass position_ids)
            position_ids = (torch.arange(T, device=tokens.device) + past).unsqueeze(0)
        mask = self.attention_mask(modality, image_id, attention_mask, x, position_ids, cache)
        position_embeddings = self.base.model.rotary_emb(x, position_ids=position_ids)
        # the residual stream stays in modality order (text rows, then image rows) through every layer, so each
        # per-modality module runs on a contiguous slice; sequence order only for attention (identity for text only)
        xs = self._sort(index, x.reshape(B * T, -1))
        for i in range(len(self.base.model.layers)):
            xs = self._layer(i, xs, index, position_embeddings, mask, cache, (B, T))
        image_norm = self.image_norm if self.image_norm is not None else self.base.model.norm
        hidden = self._unsort(index, _dispatch(self.base.model.norm, image_norm, xs, index)).view(B, T, -1)
        return FusionOutput(hidden, index, state, cache)

    def _sort(self, index: ModalityIndex, x: torch.Tensor) -> torch.Tensor:
        """Sequence -> modality order (nothing to do for the Transfusion baseline: one set of modules)."""
        return index.sort(x) if self.image_layers is not None else x

    def _unsort(self, index: ModalityIndex, x: torch.Tensor) -> torch.Tensor:
        return index.unsort(x) if self.image_layers is not None else x

    def _layer(self, i: int, xs: torch.Tensor, index: ModalityIndex, position_embeddings, mask, cache,
               bt: tuple[int, int]) -> torch.Tensor:
        """One fused layer (LMFusion section 3): per-modality norm and Q/K/V, one shared
        attention with RoPE over all tokens, per-modality O, norm and FFN, residuals.
        ``xs [B*T, d]`` and the result are in modality order (:meth:`ModalityIndex.sort`)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        text = self.base.model.layers[i]
        attn = text.self_attn
        img = self.image_layers[i] if self.image_layers is not None else _SharedLayer(text)
        B, T = bt
        h = _dispatch(text.input_layernorm, img.input_layernorm, xs, index)
        shape = (B, T, -1, attn.head_dim)
        q = self._unsort(index, _dispatch(attn.q_proj, img.q_proj, h, index)).view(shape).transpose(1, 2)
        k = self._unsort(index, _dispatch(attn.k_proj, img.k_proj, h, index)).view(shape).transpose(1, 2)
        v = self._unsort(index, _dispatch(attn.v_proj, img.v_proj, h, index)).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, i)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.base.config._attn_implementation,
                                                   sys.modules[type(attn).__module__].eager_attention_forward)
        a, _ = fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        a = self._sort(index, a.reshape(B * T, -1).contiguous())
        xs = xs + _dispatch(attn.o_proj, img.o_proj, a, index)
        h = _dispatch(text.post_attention_layernorm, img.post_attention_layernorm, xs, index)
        return xs + _dispatch(text.mlp, img.mlp, h, index)

    def embed(self, tokens: torch.Tensor, index: ModalityIndex, patches: torch.Tensor | None,
              timesteps: torch.Tensor | None) -> tuple[torch.Tensor, object]:
        """Token embeddings (base table; BOI/EOI from :attr:`special_embed`), image patches + timestep embedding."""
        B, T = tokens.shape
        V = self.cfg.vocab_size
        base_emb = self.base.get_input_embeddings()
        special = tokens >= V
        n_img = index.counts[IMAGE]
        if not bool(special.any()) and n_img == 0:
            return base_emb(tokens), None
        x = base_emb(tokens.clamp(max=V - 1)).reshape(B * T, -1).clone()
        sf = special.reshape(-1)
        if bool(sf.any()):
            x[sf] = self.special_embed(tokens.reshape(-1)[sf] - V).to(x.dtype)
        state = None
        if n_img:
            if patches is None or timesteps is None:
                raise ValueError("image positions need patches [B, T, patch_dim] and timesteps [B, T]")
            L = self.cfg.image_len
            img = index.idx[IMAGE]
            if n_img % L:
                raise ValueError(f"{n_img} image positions is not a multiple of the {L} patches of one image")
            p = patches.reshape(B * T, -1)[img].reshape(n_img // L, L, -1).float()
            t = timesteps.reshape(-1)[img].reshape(n_img // L, L)[:, 0]
            temb = self.time_mlp(timestep_embedding(t, self.cfg.hidden_size).to(p.dtype))
            h, state = self.patcher.encode(p, temb)
            x[img] = (h + temb[:, None]).reshape(n_img, -1).to(x.dtype)
        return x.view(B, T, -1), state

    def attention_mask(self, modality: torch.Tensor, image_id: torch.Tensor | None, attention_mask: torch.Tensor | None,
                       inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache=None):
        """Text-only: exactly the base model's causal mask.  With images: causal + bidirectional within
        each image (Transfusion section 2.3), keys at padding masked (boolean; additive for eager)."""
        if not bool((modality == IMAGE).any()):
            from transformers.masking_utils import create_causal_mask

            return create_causal_mask(config=self.base.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      cache=cache, position_ids=position_ids)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("an image cannot follow a cached prefix; run the whole prefix in one call")
        if image_id is None:
            image_id = image_ids_from_modality(modality)
        mask = transfusion_mask(image_id)
        if attention_mask is not None:
            T = modality.shape[1]
            eye = torch.eye(T, dtype=torch.bool, device=mask.device)[None, None]
            mask = (mask & attention_mask.bool()[:, None, None, :]) | eye
        if self.base.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=inputs_embeds.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(inputs_embeds.dtype).min)
        return mask

    # -- outputs --------------------------------------------------------------------------------
    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base model's (frozen) LM head over the base vocabulary."""
        return self.base.lm_head(hidden)

    def logits(self, tokens: torch.Tensor, modality: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """``[B, T, V]`` text logits at every position (what ``base(tokens).logits`` is for text-only input)."""
        return self.text_logits(self(tokens, modality, **kw).hidden)

    def predict_noise(self, out: FusionOutput) -> torch.Tensor:
        """Predicted noise ``[n_image_positions, patch_dim]`` for the image rows (raster order)."""
        img = out.index.idx[IMAGE]
        L = self.cfg.image_len
        h = out.hidden.reshape(-1, out.hidden.shape[-1])[img].float()
        eps = self.patcher.decode(h.reshape(-1, L, h.shape[-1]), out.patch_state)
        return eps.reshape(img.numel(), -1)

    # -- parameters -----------------------------------------------------------------------------
    def set_freeze_text(self, freeze: bool) -> None:
        """Freeze (LMFusion) or unfreeze (baseline) every base-model parameter; image modules always train."""
        self.cfg.freeze_text = freeze
        for p in self.base.parameters():
            p.requires_grad_(not freeze)
        for p in self.image_parameters():
            p.requires_grad_(True)

    def image_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters LMFusion adds (everything outside ``base``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def image_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def text_parameters(self):
        return [p for n, p in self.named_parameters() if n.startswith("base.")]

    def num_params(self) -> dict[str, int]:
        return {"image": sum(p.numel() for p in self.image_parameters()),
                "text": sum(p.numel() for p in self.text_parameters()),
                "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad)}

    @property
    def device(self) -> torch.device:
        return self.special_embed.weight.device

    # -- save / load ----------------------------------------------------------------------------
    def save_image_modules(self, path: str | Path, tokenizer=None, base_path: str | None = None) -> Path:
        """Write ``lmfusion_image.safetensors`` (image modules only) and ``lmfusion_config.json``
        (naming the base model) to ``path``, atomically.  A model trained with ``freeze_text=False``
        changed its base, so the base and ``tokenizer`` are saved too (``base/``, a Hugging Face folder)."""
        from safetensors.torch import save_file

        from tessera.config import atomic_dir

        path = Path(path)
        with atomic_dir(path) as tmp:
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.image_state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            meta = {"format": "tessera-lmfusion", "version": 1, **self.cfg.to_dict(),
                    "base_model_path": base_path or getattr(self.base, "name_or_path", ""),
                    "base_model_type": self.base.config.model_type, "boi_id": self.cfg.boi_id, "eoi_id": self.cfg.eoi_id}
            if not self.cfg.freeze_text:
                if tokenizer is None:
                    raise ValueError("an unfrozen model saves its whole base model: pass its tokenizer")
                self.base.save_pretrained(tmp / BASE_DIR_NAME)
                tokenizer.save_pretrained(tmp / BASE_DIR_NAME)
                meta["base_model"] = BASE_DIR_NAME
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, base: nn.Module | None = None, tokenizer=None, device=None, dtype=None):
        """``(model, tokenizer)`` from :meth:`save_image_modules`'s folder; the base model is loaded
        from the spec in the config (or passed as ``base`` with its ``tokenizer``)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path = path / CONFIG_NAME
        if not cfg_path.is_file() or not (path / WEIGHTS_NAME).is_file():
            raise ModelNotFoundError(f"{path} has no {CONFIG_NAME} and {WEIGHTS_NAME}; pass a folder written by "
                                     "save_image_modules (a run's image_modules/)")
        meta = json.loads(cfg_path.read_text())
        cfg = LMFusionConfig.from_dict(meta)
        if base is None:
            spec = meta["base_model"]
            if spec == BASE_DIR_NAME:
                spec = str(path / BASE_DIR_NAME)
            base, tokenizer = load_base(spec, cfg.layers, device=device, dtype=dtype)
        else:
            truncate_layers(base, cfg.layers)
        if base.get_input_embeddings().num_embeddings != cfg.vocab_size or base.config.hidden_size != cfg.hidden_size:
            raise InputError(f"{path} was trained on a base model with vocab {cfg.vocab_size} and width {cfg.hidden_size}; "
                             f"the given base has {base.get_input_embeddings().num_embeddings} and {base.config.hidden_size}")
        model = cls(base, cfg)
        missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=False)
        missing = [k for k in missing if not k.startswith("base.")]
        if missing or unexpected:
            raise InputError(f"{path / WEIGHTS_NAME} does not match the model (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); save and load with the same patcher and layers")
        return model, tokenizer


# -- modality routing ----------------------------------------------------------------------------

def _param_dtype(mod: nn.Module) -> torch.dtype:
    """Image modules stay fp32 when the frozen base runs in bf16; their inputs are cast to match."""
    return next(mod.parameters()).dtype


def _dispatch(text_mod: nn.Module, image_mod: nn.Module, xs: torch.Tensor, index: ModalityIndex) -> torch.Tensor:
    """Apply ``text_mod`` to the text rows and ``image_mod`` to the image rows of ``xs [N, d]`` (MoT Algorithm 1),
    ``xs`` in modality order (:meth:`~tessera.models.modality.ModalityIndex.sort`: text rows first), so each
    module runs on a contiguous slice and the two results are concatenated.

    The text module is the frozen base model's own (not re-registered); when one modality is absent the
    module runs on the very tensor given (text-only input: exactly what the base model computes).
    """
    n_text, n_img = index.counts[TEXT], index.counts[IMAGE]
    if n_img == 0 or image_mod is text_mod:
        return text_mod(xs)
    if n_text == 0:
        return image_mod(xs.to(_param_dtype(image_mod))).to(xs.dtype)
    xt, xi = index.slices(xs)
    yt = text_mod(xt)
    yi = image_mod(xi.to(_param_dtype(image_mod)))
    return torch.cat([yt, yi.to(yt.dtype)], dim=0)


class _SharedLayer:
    """A text layer's modules under :class:`~tessera.models.lmfusion_modules.ImageLayer`'s names (Transfusion:
    image tokens use the text modules, so :func:`_dispatch` runs each module once over all tokens)."""

    def __init__(self, text_layer: nn.Module):
        for name in ATTN_PARTS:
            setattr(self, name, getattr(text_layer.self_attn, name))
        for name in TEXT_PARTS:
            setattr(self, name, getattr(text_layer, name))


def image_ids_from_modality(modality: torch.Tensor, image_len: int | None = None) -> torch.Tensor:
    """``[B, T]`` image index per position: -1 for text, k for the k-th run of image positions in a row
    (consecutive images are split every ``image_len`` positions when given)."""
    img = modality == IMAGE
    start = img & ~torch.cat([torch.zeros_like(img[:, :1]), img[:, :-1]], 1)
    run = start.long().cumsum(1) - 1
    if image_len:
        pos = torch.cumsum(img.long(), 1) - 1
        run = pos // image_len
    return torch.where(img, run, torch.full_like(run, -1))


# -- base model ----------------------------------------------------------------------------------

def check_base(base: nn.Module) -> None:
    """A Llama-family causal LM: ``model.layers[i]`` with ``self_attn.{q,k,v,o}_proj``, ``mlp`` and two norms."""
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    ok = layers is not None and len(layers) > 0 and hasattr(inner, "embed_tokens") and hasattr(inner, "norm") \
        and hasattr(inner, "rotary_emb") and hasattr(base, "lm_head")
    if ok:
        layer = layers[0]
        ok = all(hasattr(layer, p) for p in TEXT_PARTS) and all(hasattr(layer.self_attn, p) for p in ATTN_PARTS)
        ok = ok and not hasattr(layer.self_attn, "q_norm")  # Qwen3/OLMo2-style QK norms are not routed here
    if not ok:
        raise InputError(f"{type(base).__name__} is not a Llama-family causal LM (model.layers with q/k/v/o_proj, mlp "
                         "and RMS norms); pass a Llama, SmolLM2, Mistral or Qwen2 model")


def truncate_layers(base: nn.Module, layers: int) -> nn.Module:
    """Keep only the first ``layers`` decoder layers (in place); 0 keeps all.  A CPU-sized option."""
    n = len(base.model.layers)
    if layers and layers < n:
        base.model.layers = base.model.layers[:layers]
        base.config.num_hidden_layers = layers
        if getattr(base.config, "layer_types", None):
            base.config.layer_types = base.config.layer_types[:layers]
    elif layers > n:
        raise InputError(f"layers={layers} but the base model has only {n}; pass layers<={n} (0 = all)")
    return base


def load_base(spec: str = "default", layers: int = 0, device=None, dtype=None):
    """``(causal LM, tokenizer)`` through :func:`tessera.hub.load_lm`, truncated to ``layers`` (0 = all)."""
    from tessera import hub

    lm = hub.load_lm(spec, device=device, dtype=dtype)
    check_base(lm.model)
    if lm.model.config._attn_implementation not in ("sdpa", "eager"):
        lm.model.config._attn_implementation = "sdpa"  # arbitrary masks need sdpa or eager
    return truncate_layers(lm.model, layers), lm.tokenizer


__all__ = ["BASE_DIR_NAME", "CONFIG_NAME", "FusionOutput", "LMFusionModel", "WEIGHTS_NAME", "check_base",
           "image_ids_from_modality", "load_base", "truncate_layers"]
