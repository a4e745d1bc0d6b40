"""LMFusion (LlamaFusion, Shi et al. 2024): a frozen pretrained text LLM plus parallel image modules.

Every layer of a Hugging Face Llama-family causal LM gets a copy of its text modules for images
(section 3): input norm, Q/K/V/O projections, post-attention norm and FFN, plus a final image
norm, all initialised from the corresponding text modules.  Tokens are routed by modality with the
MoT router (:class:`~tessera.models.modality.ModalityRouter`: index lists computed once per batch,
reused in every layer, gather/scatter); text positions go through the text modules, image
positions through the image modules, and one shared self-attention with RoPE runs over the whole
sequence (LMFusion section 3, method): causal for text, bidirectional within an image (Transfusion mask,
:func:`~tessera.models.masks.transfusion_mask`).

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

The objective :class:`LMFusionLM` is Transfusion's ``L_LM + lambda * L_DDPM`` (lambda 5) with the
DDPM cosine schedule of :mod:`tessera.models.diffusion`; :func:`generate_images` samples with
classifier-free guidance; :func:`caption_images` runs the image prefix through the fused model and
hands its key/value cache to the base model's ``generate`` for the text.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tessera.errors import InputError, ModelNotFoundError
from tessera.lm.local import left_pad
from tessera.models import diffusion as D
from tessera.models.decoder import timestep_embedding
from tessera.models.masks import transfusion_mask
from tessera.models.modality import IMAGE, TEXT, ModalityIndex, ModalityRouter

CONFIG_NAME = "lmfusion_config.json"
WEIGHTS_NAME = "lmfusion_image.safetensors"
BASE_DIR_NAME = "base"  # where an unfrozen (baseline) run saves its changed base model
PATCHERS = ("linear", "unet")
_TEXT_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LMFusionConfig:
    """Image side of an LMFusion model; ``base_model`` names the frozen text LLM (a :mod:`tessera.hub` spec).

    ``layers``: use only the first N layers of the base model (0 = all) - a CPU-sized option, not in
    the paper.  ``patch_size`` 2 for 8x8 digits (16 patches), 4 for 28x28 MNIST (49 patches); the paper
    uses a VAE latent with 2x2 patches (Transfusion section 2.1), which these small grey images do not need.
    """

    base_model: str = "default"
    layers: int = 0
    image_height: int = 8
    image_width: int = 8
    channels: int = 1
    patch_size: int = 2
    patcher: str = "linear"  # linear | unet (Transfusion section 2.1: both options)
    unet_channels: int = 32
    num_train_timesteps: int = D.NUM_TRAIN_TIMESTEPS  # Transfusion: 1000
    freeze_text: bool = True  # LMFusion; False = train the whole pretrained model (baseline)
    vocab_size: int = 0  # the base vocabulary (filled in from the base model)
    hidden_size: int = 0  # filled in from the base model

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size * self.patch_size

    @property
    def image_len(self) -> int:
        return (self.image_height // self.patch_size) * (self.image_width // self.patch_size)

    @property
    def boi_id(self) -> int:
        return self.vocab_size

    @property
    def eoi_id(self) -> int:
        return self.vocab_size + 1

    def validate(self) -> None:
        if self.patcher not in PATCHERS:
            raise InputError(f"unknown patcher {self.patcher!r}; use linear or unet")
        if self.patch_size < 1 or self.image_height % self.patch_size or self.image_width % self.patch_size:
            raise InputError(f"patch_size {self.patch_size} does not divide the {self.image_height}x{self.image_width} "
                             "images; pick a divisor")
        if self.layers < 0:
            raise InputError("layers must be >= 0 (0 = every layer of the base model)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMFusionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- base model ----------------------------------------------------------------------------------

def check_base(base: nn.Module) -> None:
    """A Llama-family causal LM: ``model.layers[i]`` with ``self_attn.{q,k,v,o}_proj``, ``mlp`` and two norms."""
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    ok = layers is not None and len(layers) > 0 and hasattr(inner, "embed_tokens") and hasattr(inner, "norm") \
        and hasattr(inner, "rotary_emb") and hasattr(base, "lm_head")
    if ok:
        layer = layers[0]
        ok = all(hasattr(layer, p) for p in _TEXT_PARTS) and all(hasattr(layer.self_attn, p) for p in _ATTN_PARTS)
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


# -- image modules -------------------------------------------------------------------------------

class ImageLayer(nn.Module):
    """The image-specific modules of one layer (LMFusion section 3), copied from the text layer."""

    def __init__(self, text_layer: nn.Module):
        super().__init__()
        attn = text_layer.self_attn
        for name in _ATTN_PARTS:
            setattr(self, name, copy.deepcopy(getattr(attn, name)))
        for name in _TEXT_PARTS:
            setattr(self, name, copy.deepcopy(getattr(text_layer, name)))


class LinearPatcher(nn.Module):
    """Linear patch embedding in and out (Transfusion section 2.1, "simple linear layer")."""

    def __init__(self, cfg: LMFusionConfig, d: int, embed_std: float):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.patch_dim, d)
        self.out = nn.Linear(d, cfg.patch_dim)
        nn.init.normal_(self.inp.weight, std=embed_std / math.sqrt(cfg.patch_dim * 0.33))  # ~ token-embedding scale
        nn.init.zeros_(self.inp.bias)
        nn.init.zeros_(self.out.weight)  # epsilon prediction starts at 0 (as DiT's zero-initialised output layer)
        nn.init.zeros_(self.out.bias)

    def encode(self, patches: torch.Tensor, temb: torch.Tensor):
        """``patches [n, L, p]`` (one row per image) -> ``([n, L, d], state)``."""
        return self.inp(patches), None

    def decode(self, h: torch.Tensor, state) -> torch.Tensor:
        return self.out(h)


class UNetPatcher(nn.Module):
    """A small U-Net down/up block around the transformer (Transfusion section 2.1, U-Net option).

    Down: two 3x3 convolutions with the timestep added per channel (the skip features), then a
    ``p x p`` stride-``p`` convolution to one ``d``-wide vector per patch.  Up: a transposed ``p x p``
    convolution back to full resolution, concatenated with the skip, two 3x3 convolutions to noise.
    (Transfusion's U-Net has several resolution levels; one level suffices for 8x8 / 28x28 digits.)
    """

    def __init__(self, cfg: LMFusionConfig, d: int, embed_std: float):
        super().__init__()
        self.cfg = cfg
        c, C, p = cfg.unet_channels, cfg.channels, cfg.patch_size
        self.conv_in = nn.Conv2d(C, c, 3, padding=1)
        self.time_proj = nn.Linear(d, c)
        self.conv_skip = nn.Conv2d(c, c, 3, padding=1)
        self.down = nn.Conv2d(c, d, p, stride=p)
        self.up = nn.ConvTranspose2d(d, c, p, stride=p)
        self.conv_mid = nn.Conv2d(2 * c, c, 3, padding=1)
        self.conv_out = nn.Conv2d(c, C, 3, padding=1)
        nn.init.normal_(self.down.weight, std=embed_std / math.sqrt(c * p * p * 0.33))
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _grid(self, n: int):
        cfg = self.cfg
        return cfg.image_height // cfg.patch_size, cfg.image_width // cfg.patch_size

    def encode(self, patches: torch.Tensor, temb: torch.Tensor):
        cfg, n = self.cfg, patches.shape[0]
        img = D.unpatchify(patches, cfg.patch_size, cfg.image_height, cfg.image_width, cfg.channels)
        h = F.silu(self.conv_in(img) + self.time_proj(temb)[:, :, None, None])
        skip = F.silu(self.conv_skip(h))
        tokens = self.down(skip)  # [n, d, H/p, W/p]
        return tokens.flatten(2).transpose(1, 2), skip

    def decode(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        gh, gw = self._grid(h.shape[0])
        x = self.up(h.transpose(1, 2).reshape(h.shape[0], -1, gh, gw))
        x = self.conv_out(F.silu(self.conv_mid(torch.cat([x, skip.to(x.dtype)], 1))))
        return D.patchify(x, self.cfg.patch_size)


def _param_dtype(mod: nn.Module) -> torch.dtype:
    """Image modules stay fp32 when the frozen base runs in bf16; their inputs are cast to match."""
    return next(mod.parameters()).dtype


def _dispatch(text_mod: nn.Module, image_mod: nn.Module, x: torch.Tensor, index: ModalityIndex) -> torch.Tensor:
    """Apply ``text_mod`` to the text rows and ``image_mod`` to the image rows of ``x [N, d]`` (MoT Algorithm 1).

    Same gather/scatter as :class:`~tessera.models.modality.PerModality`, with the text module being the
    frozen base model's own (not re-registered) and a shortcut when one modality is absent (so text-only
    input runs the base modules on the very same tensor the base model sees).
    """
    n_text, n_img = index.counts[TEXT], index.counts[IMAGE]
    if n_img == 0:
        return text_mod(x)
    if n_text == 0:
        return image_mod(x.to(_param_dtype(image_mod))).to(x.dtype)
    yt = text_mod(x.index_select(0, index.idx[TEXT]))
    yi = image_mod(x.index_select(0, index.idx[IMAGE]).to(_param_dtype(image_mod)))
    out = yt.new_empty((x.shape[0], yt.shape[-1]))
    out[index.idx[TEXT]] = yt
    out[index.idx[IMAGE]] = yi.to(yt.dtype)
    return out


@dataclass
class FusionOutput:
    hidden: torch.Tensor  # [B, T, d] after the per-modality final norm
    index: ModalityIndex
    patch_state: object = None  # U-Net skip features for the image rows
    cache: object = None


class LMFusionModel(nn.Module):
    """A frozen Llama-family LM (``self.base``) plus parallel image modules (LMFusion section 3)."""

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
        self.image_layers = nn.ModuleList([ImageLayer(layer) for layer in base.model.layers]).to(dtype)
        self.image_norm = copy.deepcopy(base.model.norm).to(dtype)
        self.special_embed = nn.Embedding(2, d).to(device=emb.device)  # BOI, EOI (new rows; the base table is untouched)
        with torch.no_grad():  # new rows start at the mean embedding (as transformers' resize_token_embeddings)
            self.special_embed.weight.copy_(emb.detach().float().mean(0, keepdim=True).expand(2, d))
            self.special_embed.weight.add_(torch.randn(2, d) * 0.1 * std)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d)).to(emb.device)
        nn.init.normal_(self.time_mlp[2].weight, std=std / math.sqrt(d))
        nn.init.zeros_(self.time_mlp[2].bias)
        self.patcher = (LinearPatcher if cfg.patcher == "linear" else UNetPatcher)(cfg, d, std).to(emb.device)
        self.image_layers.to(emb.device)
        self.image_norm.to(emb.device)
        self.set_freeze_text(cfg.freeze_text)

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

    # -- forward --------------------------------------------------------------------------------
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

    def _layer(self, i: int, x: torch.Tensor, index: ModalityIndex, position_embeddings, mask, cache) -> torch.Tensor:
        """One fused layer (LMFusion section 3): per-modality norm and Q/K/V, one shared
        attention with RoPE over all tokens, per-modality O, norm and FFN, residuals."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        text, img = self.base.model.layers[i], self.image_layers[i]
        attn = text.self_attn
        B, T, d = x.shape
        xf = x.reshape(B * T, d)
        h = _dispatch(text.input_layernorm, img.input_layernorm, xf, index)
        shape = (B, T, -1, attn.head_dim)
        q = _dispatch(attn.q_proj, img.q_proj, h, index).view(shape).transpose(1, 2)
        k = _dispatch(attn.k_proj, img.k_proj, h, index).view(shape).transpose(1, 2)
        v = _dispatch(attn.v_proj, img.v_proj, h, index).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, i)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.base.config._attn_implementation,
                                                   sys.modules[type(attn).__module__].eager_attention_forward)
        a, _ = fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        a = a.reshape(B * T, -1).contiguous()
        xf = xf + _dispatch(attn.o_proj, img.o_proj, a, index)
        h = _dispatch(text.post_attention_layernorm, img.post_attention_layernorm, xf, index)
        xf = xf + _dispatch(text.mlp, img.mlp, h, index)
        return xf.view(B, T, d)

    def forward(self, tokens: torch.Tensor, modality: torch.Tensor | None = None, image_id: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, patches: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None) -> FusionOutput:
        """Hidden states of a mixed-modal batch.

        ``tokens``/``modality`` ``[B, T]`` (modality 0 text incl. BOI/EOI, 1 image patch; default all
        text); ``image_id`` ``[B, T]`` (-1 text, k for the k-th image; default: each run of image
        positions is one image); ``attention_mask`` ``[B, T]`` (1 = real token); ``patches``
        ``[B, T, patch_dim]`` and ``timesteps`` ``[B, T]`` read at image positions; ``cache``: a
        transformers ``DynamicCache`` to fill (the prefix for :func:`caption_images`).
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
        for i in range(len(self.base.model.layers)):
            x = self._layer(i, x, index, position_embeddings, mask, cache)
        hidden = _dispatch(self.base.model.norm, self.image_norm, x.reshape(B * T, -1), index).view(B, T, -1)
        return FusionOutput(hidden, index, state, cache)

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


# -- objective -----------------------------------------------------------------------------------

def trainable_positions(tokens: torch.Tensor, modality: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, T]`` bool: positions whose hidden state depends on an image or on BOI/EOI (the trainable inputs).

    With frozen text modules every other text position is a constant of the training, so its LM loss
    has no gradient; LMFusion skips it (saving the LM-head FLOPs).  Causal attention makes "depends on"
    = "at or after the first image/BOI/EOI position of its row".
    """
    new = (modality == IMAGE) | (tokens >= vocab_size)
    return new.long().cumsum(1) > 0


class LMFusionLM(nn.Module):
    """LMFusion's training objective: ``L = L_LM + lambda * L_DDPM`` (Transfusion section 2.3; lambda 5).

    Same recipe as the Transfusion setting of :class:`~tessera.models.objectives.MixedModalLM`: one
    timestep per image, uniform in ``[0, 1000)`` (cosine schedule), noise capped at
    ``understanding_max_t`` when the image comes before its caption; the LM loss on text targets (with
    frozen text only where it has a gradient, see :func:`trainable_positions`) and the DDPM
    epsilon-prediction loss on image patches.  ``forward(batch) -> {"loss", "text_loss", "image_loss",
    "model_loss"}`` as the training loop of :mod:`tessera.train` expects.
    """

    def __init__(self, model: LMFusionModel, diffusion_lambda: float = 5.0, understanding_max_t: int = 500):
        super().__init__()
        self.model = model
        self.diffusion_lambda, self.understanding_max_t = diffusion_lambda, understanding_max_t
        self.num_train_timesteps = model.cfg.num_train_timesteps
        self.scheduler = D.make_scheduler(self.num_train_timesteps)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        tokens, modality, targets = batch["tokens"], batch["modality"], batch["targets"]
        B, T = tokens.shape
        img = modality.reshape(-1) == IMAGE
        x0 = batch["patches"].reshape(B * T, -1)
        max_t = torch.where(batch["understanding"].cpu(), self.understanding_max_t, self.num_train_timesteps)
        t_seq = D.sample_timesteps(B, self.num_train_timesteps, max_t, generator).to(tokens.device)
        t_tok = t_seq[:, None].expand(B, T)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        noisy = x0.clone()
        if bool(img.any()):
            noisy[img] = D.add_noise(self.scheduler, x0[img], noise[img], t_tok.reshape(-1)[img])
        out = self.model(tokens, modality, batch.get("image_id"), batch.get("attention_mask"),
                         noisy.view(B, T, -1), t_tok)
        valid = (targets != -100) & (modality == TEXT)
        if self.model.cfg.freeze_text:
            valid &= trainable_positions(tokens, modality, self.model.cfg.vocab_size)
        rows = torch.nonzero(valid.reshape(-1), as_tuple=False).squeeze(1)
        hf = out.hidden.reshape(B * T, -1)
        if rows.numel():
            logits = self.model.text_logits(hf[rows])
            lm = F.cross_entropy(logits.float(), targets.reshape(-1)[rows])
        else:
            lm = hf.sum() * 0.0
        if bool(img.any()):
            diff = D.diffusion_loss(self.model.predict_noise(out), noise[img])
        else:
            diff = hf.sum() * 0.0
        loss = lm + self.diffusion_lambda * diff
        return {"loss": loss, "model_loss": loss, "text_loss": lm, "image_loss": diff}


# -- measured FLOPs ------------------------------------------------------------------------------

class FlopMeter:
    """Training FLOPs as executed: ``torch.utils.flop_counter`` over forward and backward.

    Counts matrix products (2 FLOPs per multiply-add) that autograd really runs, so frozen modules
    cost their forward and only the input-gradient half of their backward (no weight gradient), and
    positions with no trainable parameter upstream cost no backward at all - which is where LMFusion's
    saving comes from.  CPU attention (``_scaled_dot_product_flash_attention_for_cpu``) is added to
    the counter's registry.  Use as a context around training; :meth:`delta` gives the FLOPs since
    the last call, :meth:`skip` drops what ran since (evaluation).
    """

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

        def fwd(q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(q, k, v)

        def bwd(g, q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(g, q, k, v)

        aten = torch.ops.aten
        custom = {}
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
            custom[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
            custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
        self.mode = FlopCounterMode(display=False, custom_mapping=custom)
        self._last = 0

    def __enter__(self) -> FlopMeter:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return self.mode.get_total_flops()

    def delta(self) -> int:
        total = self.total
        d, self._last = total - self._last, total
        return d

    def skip(self) -> None:
        self._last = self.total


# -- generation ----------------------------------------------------------------------------------

def make_sampler(name: str, num_train_timesteps: int = D.NUM_TRAIN_TIMESTEPS):
    """``ddpm`` (ancestral, Transfusion's sampler: :func:`tessera.models.diffusion.make_scheduler`) or ``ddim``
    (Song et al. 2021, deterministic, same cosine schedule).

    DDIM runs without x0 clipping: diffusers' DDIM clips the predicted x0 but keeps the unclipped noise
    for the step direction, and under classifier-free guidance (whose extrapolated noise puts x0 far out
    of range) that mismatch drives every sample to the same saturated image.  Measured with a small
    conditional denoiser on 8x8 digits, 25 steps, guidance 3: digit accuracy 0.10 with clipping, 1.00
    without (DDPM, which re-derives its mean from the clipped x0, is fine either way: 1.00).
    """
    if name == "ddpm":
        return D.make_scheduler(num_train_timesteps)
    if name == "ddim":
        from diffusers import DDIMScheduler

        return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                             prediction_type="epsilon", clip_sample=False)
    raise InputError(f"unknown sampler {name!r}; use ddpm or ddim")


@torch.no_grad()
def generate_images(model: LMFusionModel, tokenizer, captions: list[str], guidance_scale: float = 3.0,
                    num_inference_steps: int = D.NUM_INFERENCE_STEPS, generator: torch.Generator | None = None,
                    batch_size: int = 64, sampler: str = "ddpm") -> torch.Tensor:
    """Text to image: one image per caption, ``[n, H, W]`` in [0, 1] (``caption BOI <noise>`` denoised by DDPM).

    Classifier-free guidance (Transfusion section 4.4; Ho & Salimans 2022): ``eps_u + s (eps_c - eps_u)``
    with the unconditional prompt ``BOI`` alone (the training data drops the caption 10% of the time).
    ``guidance_scale`` 1 = no guidance.  Transfusion samples 250 DDPM steps; CPU runs use fewer, with
    ``sampler="ddim"``.
    """
    model.eval()
    cfg, dev = model.cfg, model.device
    L = cfg.image_len
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scheduler = make_sampler(sampler, cfg.num_train_timesteps)
    results = []
    for s in range(0, len(captions), batch_size):
        chunk = captions[s:s + batch_size]
        n = len(chunk)
        prompts = [tokenizer(c, add_special_tokens=False).input_ids + [cfg.boi_id] for c in chunk]
        guided = guidance_scale != 1.0
        if guided:
            prompts = prompts + [[cfg.boi_id]] * n
        ids, att = left_pad([p + [pad] * L for p in prompts], pad)
        att[:, -L:] = 1
        ids, att = ids.to(dev), att.to(dev)
        modality = torch.zeros_like(ids)
        modality[:, -L:] = IMAGE
        image_id = torch.where(modality == IMAGE, 0, -1)
        positions = (att.cumsum(-1) - 1).clamp(min=0)
        rows = ids.shape[0]

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            xt = torch.cat([x_t, x_t]) if guided else x_t
            patches = torch.zeros(rows, ids.shape[1], cfg.patch_dim, device=dev)
            patches[:, -L:] = xt.to(dev)
            out = model(ids, modality, image_id, att, patches, torch.full_like(ids, int(t)), position_ids=positions)
            eps = model.predict_noise(out).view(rows, L, -1).float()
            if not guided:
                return eps
            eps_c, eps_u = eps[:n], eps[n:]
            return eps_u + guidance_scale * (eps_c - eps_u)

        x = D.ddpm_sample(eps_fn, (n, L, cfg.patch_dim), scheduler, num_inference_steps, generator=generator, device=dev)
        images = D.unpatchify(x.float().cpu(), cfg.patch_size, cfg.image_height, cfg.image_width, cfg.channels)
        results.append(((images[:, 0] + 1.0) / 2.0).clamp(0, 1))
    return torch.cat(results)


def image_prefix(model: LMFusionModel, images: torch.Tensor, prompt_ids: list[int] | None = None):
    """``(tokens, modality, patches)`` for ``BOI <image> EOI [prompt]`` rows, images ``[n, H, W]`` in [0, 1]."""
    cfg = model.cfg
    n, L = images.shape[0], cfg.image_len
    prompt_ids = list(prompt_ids or [])
    row = [cfg.boi_id] + [0] * L + [cfg.eoi_id] + prompt_ids
    tokens = torch.tensor(row, dtype=torch.long)[None].repeat(n, 1)
    modality = torch.zeros_like(tokens)
    modality[:, 1:1 + L] = IMAGE
    x = images.float().reshape(n, cfg.channels, cfg.image_height, cfg.image_width) * 2.0 - 1.0
    patches = torch.zeros(n, tokens.shape[1], cfg.patch_dim)
    patches[:, 1:1 + L] = D.patchify(x, cfg.patch_size)
    return tokens, modality, patches


@torch.no_grad()
def caption_images(model: LMFusionModel, tokenizer, images: torch.Tensor, max_new_tokens: int = 10,
                   prompt: str = "", batch_size: int = 64) -> list[str]:
    """Image to text (understanding / captioning), greedy.

    The prefix ``BOI <clean image> EOI [prompt]`` runs through the fused model, which fills a
    ``DynamicCache`` with every layer's keys and values (image positions from the image modules);
    the base model's own ``generate`` continues from that cache with its frozen text modules - which
    is exactly LMFusion's routing, since every generated token is text.
    """
    from transformers import DynamicCache

    model.eval()
    dev = model.device
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    for s in range(0, len(images), batch_size):
        tokens, modality, patches = image_prefix(model, images[s:s + batch_size], prompt_ids)
        tokens, modality, patches = tokens.to(dev), modality.to(dev), patches.to(dev)
        cache = DynamicCache(config=model.base.config)
        out = model(tokens, modality, patches=patches, timesteps=torch.zeros_like(tokens), cache=cache)
        first = model.text_logits(out.hidden[:, -1]).argmax(-1, keepdim=True)
        if max_new_tokens <= 1:
            gen = first
        else:
            ids = torch.cat([torch.full_like(tokens, pad), first], 1)  # cached positions are not re-read
            full = model.base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                                       max_new_tokens=max_new_tokens - 1, do_sample=False, pad_token_id=pad,
                                       eos_token_id=tokenizer.eos_token_id)
            gen = full[:, tokens.shape[1]:]
        texts += tokenizer.batch_decode(gen, skip_special_tokens=True)
    return [t.strip() for t in texts]


__all__ = ["LMFusionConfig", "LMFusionModel", "LMFusionLM", "ImageLayer", "LinearPatcher", "UNetPatcher",
           "FlopMeter", "FusionOutput", "caption_images", "check_base", "generate_images", "image_ids_from_modality",
           "image_prefix", "make_sampler", "load_base", "trainable_positions", "truncate_layers", "CONFIG_NAME",
           "WEIGHTS_NAME", "PATCHERS"]
