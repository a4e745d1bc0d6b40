"""Sampling from a :class:`~tessera.models.objectives.MixedModalLM`: image from caption, caption from image.

- Chameleon setting: images are sampled autoregressively token by token (logits restricted to the
  image vocabulary inside the image, as Chameleon does), temperature 1.
- Transfusion setting: the image positions start as noise and are denoised with DDPM (cosine
  schedule) while attending bidirectionally to each other and causally to the caption.
- Captions: greedy byte decoding (restricted to text bytes and EOS) after ``BOS BOI image EOI``.

Expert-choice and MoD models must sample with ``routing="aux"`` (the causal auxiliary routers):
batch expert choice would let a token's routing depend on tokens not generated yet.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from tessera.data.mixed_modal import MixedModalData, caption_for, parse_digit
from tessera.models import diffusion as D
from tessera.models.masks import transfusion_mask
from tessera.models.modality import IMAGE, TEXT


def _rows(ids: list[int], n: int, device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)[None].expand(n, -1).clone()


@torch.no_grad()
def generate_images(lm, data: MixedModalData, caption: str, n: int, routing: str = "batch",
                    generator: torch.Generator | None = None, num_inference_steps: int = D.NUM_INFERENCE_STEPS,
                    codes_to_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    temperature: float = 1.0, guidance_scale: float = 1.0) -> torch.Tensor:
    """``n`` images ``[n, H, W]`` in [0, 1] for ``caption`` (``BOS caption BOI`` then the image)."""
    lm.eval()
    dev = next(lm.parameters()).device
    v = data.vocab
    prompt = [v.bos, *v.encode_text(caption), v.boi]
    L = data.image_len
    if lm.setting == "chameleon":
        off, K = data.vocab.image_offset, data.vocab.n_image_codes
        tokens, modality = _rows(prompt, n, dev), torch.full((n, len(prompt)), TEXT, dtype=torch.long, device=dev)
        for _ in range(L):
            hidden, _ = lm.model(tokens, modality, routing=routing)
            logits = lm.model.lm_head(hidden[:, -1])[:, off:off + K].float() / max(temperature, 1e-6)
            codes = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(dev)
            tokens = torch.cat([tokens, codes + off], 1)
            modality = torch.cat([modality, torch.full_like(codes, IMAGE)], 1)
        codes = tokens[:, -L:] - off
        if codes_to_images is None:
            raise ValueError("the chameleon setting needs codes_to_images (pixel values or a VQ decoder)")
        return codes_to_images(codes.cpu())

    def eps_for(prefix: list[int]) -> Callable:
        T = len(prefix) + L
        tokens = _rows(prefix + [v.pad] * L, n, dev)
        modality = torch.full((n, T), TEXT, dtype=torch.long, device=dev)
        modality[:, -L:] = IMAGE
        mask = transfusion_mask(torch.where(modality == IMAGE, 0, -1))

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            patches = torch.zeros(n, T, data.patch_dim, device=dev)
            patches[:, -L:] = x_t
            hidden, _ = lm.model(tokens, modality, mask=mask, patches=patches,
                                 timesteps=torch.full((n, T), int(t), device=dev), routing=routing)
            return lm.model.patch_out(hidden[:, -L:])
        return eps_fn

    x = D.ddpm_sample(eps_for(prompt), (n, L, data.patch_dim), D.make_scheduler(lm.num_train_timesteps, lm.prediction_type),
                      num_inference_steps, generator=generator, guidance_scale=guidance_scale,
                      uncond_eps_fn=eps_for([v.bos, v.boi]) if guidance_scale != 1.0 else None, device=dev)
    images = D.unpatchify(x.cpu(), data.patch_size, data.height, data.width)[:, 0]
    return ((images + 1.0) / 2.0).clamp(0, 1)


@torch.no_grad()
def caption_images(lm, data: MixedModalData, indices, routing: str = "batch", max_new_tokens: int = 40) -> list[str]:
    """Greedy captions for the images ``data.images[indices]`` (``BOS BOI image EOI`` -> text ... EOS)."""
    lm.eval()
    dev = next(lm.parameters()).device
    n, L, v = len(indices), data.image_len, data.vocab
    if lm.setting == "chameleon":
        tokens = torch.tensor([[v.bos, v.boi, *data.image_tokens(int(i)), v.eoi] for i in indices], device=dev)
        patches = None
    else:
        tokens = _rows([v.bos, v.boi, *([v.pad] * L), v.eoi], n, dev)
        patches = torch.zeros(n, L + 3, data.patch_dim, device=dev)
        patches[:, 2:2 + L] = torch.from_numpy(np.stack([data.image_patches(int(i)) for i in indices])).to(dev)
    modality = torch.full_like(tokens, TEXT)
    modality[:, 2:2 + L] = IMAGE
    allowed = torch.full((data.vocab.size,), float("-inf"), device=dev)
    allowed[:v.text_size] = 0.0
    allowed[v.eos] = 0.0
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    out = [[] for _ in range(n)]
    for _ in range(max_new_tokens):
        T = tokens.shape[1]
        if lm.setting == "chameleon":
            hidden, _ = lm.model(tokens, modality, routing=routing)
        else:
            p = torch.cat([patches, patches.new_zeros(n, T - patches.shape[1], data.patch_dim)], 1)
            hidden, _ = lm.model(tokens, modality, mask=transfusion_mask(torch.where(modality == IMAGE, 0, -1)),
                                 patches=p, timesteps=torch.zeros_like(tokens), routing=routing)
        nxt = (lm.model.lm_head(hidden[:, -1]).float() + allowed).argmax(-1)
        for b in range(n):
            if not done[b] and int(nxt[b]) != v.eos:
                out[b].append(int(nxt[b]))
        done |= nxt == v.eos
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        modality = torch.cat([modality, torch.full_like(nxt[:, None], TEXT)], 1)
        if bool(done.all()):
            break
    return [data.vocab.decode_text(o) for o in out]


def generation_accuracy(lm, data: MixedModalData, classifier, per_class: int = 5, routing: str = "batch",
                        seed: int = 0, num_inference_steps: int = D.NUM_INFERENCE_STEPS,
                        codes_to_images: Callable | None = None, template: str | None = None,
                        guidance_scale: float = 1.0) -> tuple[float, torch.Tensor, list[int]]:
    """Conditional generation accuracy: ``per_class`` images per digit from a caption, judged by ``classifier``
    (Transfusion: ``guidance_scale`` != 1 = classifier-free guidance against the caption-less prompt).

    Returns ``(accuracy, images [10 * per_class, H, W], intended labels)``.
    """
    g = torch.Generator().manual_seed(seed)
    tmpl = template or data.templates[0]
    images, labels = [], []
    for d in range(10):
        images.append(generate_images(lm, data, caption_for(d, tmpl), per_class, routing, g, num_inference_steps,
                                      codes_to_images, guidance_scale=guidance_scale))
        labels += [d] * per_class
    images_t = torch.cat(images)
    pred = classifier.predict(images_t)
    return float((pred == torch.tensor(labels)).float().mean()), images_t, labels


def captioning_accuracy(lm, data: MixedModalData, indices, routing: str = "batch",
                        batch_size: int = 50) -> tuple[float, list[dict]]:
    """Fraction of images whose greedy caption names the right digit (:func:`parse_digit`)."""
    rows = []
    for s in range(0, len(indices), batch_size):
        chunk = list(indices[s:s + batch_size])
        for i, cap in zip(chunk, caption_images(lm, data, chunk, routing)):
            rows.append({"index": int(i), "label": int(data.labels[i]), "caption": cap, "parsed": parse_digit(cap)})
    acc = sum(r["parsed"] == r["label"] for r in rows) / max(len(rows), 1)
    return acc, rows
