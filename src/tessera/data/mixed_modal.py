"""Mixed-modal training sequences: captioned digits in both orders plus text-only WikiText-2.

Vocabulary (byte level, so no tokenizer download): ids 0-255 are UTF-8 bytes, then PAD, BOS, EOS,
BOI (begin of image), EOI, then ``n_image_codes`` image tokens (Chameleon setting: pixel values of the
8x8 digits or VQ codes of MNIST).  Sequences:

- generation order (caption first, Transfusion's 80%): ``BOS caption BOI image EOI EOS``
- understanding order (image first): ``BOS BOI image EOI caption EOS``
- text only: ``BOS`` + a window of WikiText-2 bytes

Captions come from :data:`CAPTION_TEMPLATES` and always name the digit, so a generated caption can be
scored by :func:`parse_digit`.  In the Transfusion setting image positions hold continuous patches
(``patches``), their token id is PAD and they get no LM target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tessera.errors import InputError

TEXT, IMAGE = 0, 1  # modality ids of a token (the mixed-modal models dispatch on them)
MODALITIES = ("text", "image")

PAD, BOS, EOS, BOI, EOI = 256, 257, 258, 259, 260
N_BYTE_SPECIAL = 261
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word}",
    "a picture of a {word}",
    "an image of the digit {digit}",
    "this is a {digit}",
    "{word}, written by hand",
)
# one- and two-word captions: 9 bytes at most (the sentences above: 26), so a sequence is 30 tokens instead of 46
# and a CPU testbed trains 1.5x more sequences per second; the caption still names the digit
SHORT_CAPTION_TEMPLATES = ("{word}", "{digit}", "a {word}", "digit {digit}", "the {word}")
CAPTION_STYLES = {"sentences": CAPTION_TEMPLATES, "short": SHORT_CAPTION_TEMPLATES}
_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b|(\d)")


@dataclass
class MixedModalVocab:
    """Text ids, special tokens and ``n_image_codes`` image ids after them.

    The default is byte level (ids 0-255 = UTF-8 bytes, specials 256-260, image codes from 261).
    A subclass can put a real tokenizer behind :meth:`encode_text`/:meth:`decode_text` and move
    the special ids (e.g. a Hugging Face vocabulary with added BOI/EOI tokens): set ``text_size``
    (ids below it are text), the special ids and ``first_image_id``.
    """

    n_image_codes: int = 0
    pad: int = PAD
    bos: int = BOS
    eos: int = EOS
    boi: int = BOI
    eoi: int = EOI
    text_size: int = 256
    first_image_id: int = N_BYTE_SPECIAL

    @property
    def image_offset(self) -> int:
        return self.first_image_id

    @property
    def size(self) -> int:
        return self.first_image_id + max(self.n_image_codes, 1)

    def encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_text(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def caption_for(label: int, template: str) -> str:
    return template.format(word=DIGIT_WORDS[int(label)], digit=int(label))


def parse_digit(text: str) -> int | None:
    """The first digit named in ``text`` (a word like "seven" or a numeral), else ``None``."""
    m = _DIGIT_RE.search(text.lower())
    if not m:
        return None
    return DIGIT_WORDS.index(m.group(1)) if m.group(1) else int(m.group(2))


def load_image_set(name: str, mnist_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 [N, H, W] in [0, 1], labels int64)``: ``digits`` (sklearn 8x8) or ``mnist`` (test set)."""
    from tessera.data.images import load_digits_8x8, read_mnist

    if name == "digits":
        x, y = load_digits_8x8()
        return x.astype(np.float32) / 16.0, y
    if name == "mnist":
        if mnist_dir is None:
            raise InputError("dataset=mnist needs the MNIST folder; pass mnist_dir=../shared/data/mnist")
        x, y = read_mnist(mnist_dir, "test")
        return x.astype(np.float32) / 255.0, y
    raise InputError(f"unknown image dataset {name!r}; use digits or mnist")


def shifted(x, dy: int, dx: int):
    """``x [..., H, W]`` (NumPy array or torch tensor) moved by ``(dy, dx)`` pixels, zero fill."""
    H, W = x.shape[-2:]
    out = x * 0
    out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = x[..., max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


class PatchCodebook:
    """Image tokens from a k-means codebook of ``patch x patch`` pixel patches (scikit-learn ``KMeans``): a VQ
    tokenizer whose encoder is the identity (van den Oord et al. 2017 with a fixed encoder), so an 8x8 digit
    becomes 16 tokens instead of 64 pixel values.  ``encode``: images ``[N, H, W]`` -> codes ``[N, L]`` (raster
    order of the patches); ``decode``: codes (tensor) -> images ``[N, H, W]`` in [0, 1]."""

    def __init__(self, centers: np.ndarray, patch: int, height: int, width: int):
        self.centers, self.patch, self.height, self.width = centers.astype(np.float32), patch, height, width

    @classmethod
    def fit(cls, images: np.ndarray, n_codes: int, patch: int = 2, seed: int = 0) -> "PatchCodebook":
        from sklearn.cluster import KMeans

        H, W = images.shape[1:]
        if H % patch or W % patch:
            raise InputError(f"patch {patch} does not divide the {H}x{W} images; pick a divisor")
        flat = cls._patches(images, patch).reshape(-1, patch * patch)
        distinct = len(np.unique(flat, axis=0))
        if distinct < n_codes:
            raise InputError(f"only {distinct} distinct {patch}x{patch} patches for {n_codes} codes; pass fewer codes")
        km = KMeans(n_clusters=n_codes, n_init=1, random_state=seed).fit(flat)
        return cls(km.cluster_centers_, patch, H, W)

    @staticmethod
    def _patches(images: np.ndarray, patch: int) -> np.ndarray:
        from tessera.data.images import patchify

        return patchify(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None], patch).numpy()

    def encode(self, images: np.ndarray) -> np.ndarray:
        # nearest centre: argmin ||p - c||^2 = argmin (||c||^2 - 2 p.c), one matrix product (cdist took 2x as long)
        p = torch.from_numpy(self._patches(images, self.patch))
        c = torch.from_numpy(self.centers)
        return torch.addmm((c * c).sum(1), p.reshape(-1, c.shape[1]), c.T, alpha=-2.0).argmin(-1) \
            .view(p.shape[:-1]).numpy().astype(np.int64)

    def decode(self, codes) -> torch.Tensor:
        from tessera.data.images import unpatchify

        x = torch.from_numpy(self.centers)[torch.as_tensor(codes, dtype=torch.long).cpu()]
        return unpatchify(x, self.patch, self.height, self.width)[:, 0].clamp(0, 1)

    def reconstruction_mse(self, images: np.ndarray) -> float:
        return float(((self.decode(self.encode(images)).numpy() - images) ** 2).mean())


def split_indices(n: int, n_val: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/validation split of ``n`` items."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val:], perm[:n_val]


def text_stream(docs: list[str], vocab: MixedModalVocab | None = None) -> np.ndarray:
    """Documents joined by newlines as one id array (the text-only source; bytes by default)."""
    joined = "\n".join(d.strip() for d in docs if d.strip())
    if vocab is not None:
        data = np.asarray(vocab.encode_text(joined), dtype=np.int64)
    else:
        data = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
    if data.size < 64:
        raise InputError("the text corpus has under 64 bytes; pass a larger text corpus")
    return data


class MixedModalData:
    """Samples training/validation batches of mixed-modal sequences (see the module docstring).

    ``images``: float ``[N, H, W]`` in ``[0, 1]``; ``codes``: ``[N, L]`` image-token codes for the
    Chameleon setting (``None`` for Transfusion, which uses ``patch_size`` patches scaled to [-1, 1]).
    ``text_fraction`` of the sequences are text only; of the image-caption pairs ``caption_first``
    come caption first (Transfusion: 80%); ``cond_dropout`` of the caption-first pairs lose their caption
    (``BOS BOI image EOI EOS``), the unconditional prompt of classifier-free guidance.
    """

    def __init__(self, setting: str, images: np.ndarray, labels: np.ndarray, text: np.ndarray,
                 codes: np.ndarray | None = None, n_image_codes: int = 0, patch_size: int = 2,
                 text_fraction: float = 0.25, caption_first: float = 0.8, templates=CAPTION_TEMPLATES,
                 vocab: MixedModalVocab | None = None, augment_shift: int = 0, augment_gain: float = 0.0,
                 encode=None, cond_dropout: float = 0.0):
        if setting not in ("chameleon", "transfusion"):
            raise InputError(f"unknown setting {setting!r}; use chameleon or transfusion")
        if setting == "chameleon" and codes is None:
            raise InputError("the chameleon setting needs image codes (pixel values or VQ codes)")
        self.setting, self.images, self.labels, self.text = setting, images, labels, text
        self.codes, self.patch_size, self.templates = codes, patch_size, tuple(templates)
        self.text_fraction, self.caption_first = text_fraction, caption_first
        if not 0.0 <= cond_dropout < 1.0:
            raise InputError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.cond_dropout = cond_dropout
        if augment_shift < 0 or not 0.0 <= augment_gain < 1.0:
            raise InputError(f"augment_shift must be >= 0 and augment_gain in [0, 1), got {augment_shift} and {augment_gain}")
        if setting == "chameleon" and (augment_shift or augment_gain) and encode is None:
            raise InputError("augmenting images in the chameleon setting needs encode (images -> image codes)")
        self.augment_shift, self.augment_gain, self.encode = augment_shift, augment_gain, encode
        self.vocab = vocab or MixedModalVocab(n_image_codes if setting == "chameleon" else 0)
        H, W = images.shape[1:]
        self.height, self.width = H, W
        if setting == "chameleon":
            self.image_len = codes.shape[1]
            self.patch_dim = 0
        else:
            if H % patch_size or W % patch_size:
                raise InputError(f"patch_size {patch_size} does not divide the {H}x{W} images; pick a divisor")
            self.image_len = (H // patch_size) * (W // patch_size)
            self.patch_dim = patch_size * patch_size
        max_cap = max(len(self.vocab.encode_text(caption_for(d, t))) for d in range(10) for t in self.templates)
        self.seq_len = 5 + self.image_len + max_cap

    @property
    def augments(self) -> bool:
        return bool(self.augment_shift or self.augment_gain)

    def augmented_many(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Images ``idx`` drawn anew, ``[len(idx), H, W]``: each shifted by up to ``augment_shift`` pixels each
        way (zero fill; a shift ``(dy, dx)`` reads ``x[y - dy, x - dx]``, as :func:`shifted`) and its ink scaled
        by a gain in ``[1 - augment_gain, 1]``, so that training images do not repeat."""
        imgs = self.images[idx]
        k, s = len(idx), self.augment_shift
        if s:
            H, W = imgs.shape[1:]
            d = rng.integers(-s, s + 1, size=(k, 2))
            pad = np.pad(imgs, ((0, 0), (s, s), (s, s)))
            rows, cols = (s - d[:, :1]) + np.arange(H), (s - d[:, 1:]) + np.arange(W)
            imgs = pad[np.arange(k)[:, None, None], rows[:, :, None], cols[:, None, :]]
        if self.augment_gain:
            imgs = imgs * (1.0 - self.augment_gain * rng.random(k)).astype(np.float32)[:, None, None]
        return imgs

    # -- one sequence ----------------------------------------------------------------------------
    def image_tokens(self, i: int, codes: np.ndarray | None = None) -> list[int]:
        return (np.asarray(self.codes[i] if codes is None else codes, dtype=np.int64) + self.vocab.image_offset).tolist()

    def image_patches(self, i: int, image: np.ndarray | None = None) -> np.ndarray:
        from tessera.data.images import patchify

        x = torch.from_numpy((self.images[i] if image is None else image)[None, None] * 2.0 - 1.0)
        return patchify(x, self.patch_size)[0].numpy()

    def patches_many(self, images: np.ndarray) -> np.ndarray:
        """:meth:`image_patches` of ``images [N, H, W]`` in one call: ``[N, L, patch_dim]``."""
        from tessera.data.images import patchify

        return patchify(torch.from_numpy(images[:, None] * 2.0 - 1.0), self.patch_size).numpy()

    def pair_tokens(self, i: int, caption: str, caption_first: bool,
                    codes: np.ndarray | None = None) -> tuple[list[int], list[int]]:
        """``(tokens, modality)`` of one image-caption pair (image positions: image ids or PAD);
        ``codes``: the image's codes when it was augmented (default: image ``i``'s own)."""
        v = self.vocab
        img = self.image_tokens(i, codes) if self.setting == "chameleon" else [v.pad] * self.image_len
        cap = v.encode_text(caption)
        im_mod = [IMAGE] * len(img)
        if caption_first:
            toks = [v.bos, *cap, v.boi, *img, v.eoi, v.eos]
            mod = [TEXT] * (len(cap) + 2) + im_mod + [TEXT, TEXT]
        else:
            toks = [v.bos, v.boi, *img, v.eoi, *cap, v.eos]
            mod = [TEXT, TEXT] + im_mod + [TEXT] * (len(cap) + 2)
        return toks, mod

    # -- batches ---------------------------------------------------------------------------------
    def batch(self, batch_size: int, rng: np.random.Generator, index: np.ndarray | None = None) -> dict:
        """A batch: ``tokens, modality, image_id, targets, target_modality, understanding, labels``
        (+ ``patches`` for Transfusion); image index ``i`` drawn from ``index`` (default all)."""
        T = self.seq_len
        tokens = np.full((batch_size, T), self.vocab.pad, dtype=np.int64)
        modality = np.full((batch_size, T), TEXT, dtype=np.int64)
        patches = np.zeros((batch_size, T, max(self.patch_dim, 1)), dtype=np.float32) if self.patch_dim else None
        understanding = np.zeros(batch_size, dtype=bool)
        labels = np.full(batch_size, -1, dtype=np.int64)
        pool = index if index is not None else np.arange(len(self.images))
        pairs = []  # (row, image index, caption first?, template)
        for b in range(batch_size):
            if rng.random() < self.text_fraction:
                start = int(rng.integers(0, self.text.size - (T - 1)))
                tokens[b, 0] = self.vocab.bos
                tokens[b, 1:] = self.text[start:start + T - 1]
                continue
            i = int(pool[rng.integers(0, len(pool))])
            first = bool(rng.random() < self.caption_first)
            template = self.templates[rng.integers(0, len(self.templates))]
            if first and self.cond_dropout and rng.random() < self.cond_dropout:
                template = ""  # caption dropped (classifier-free guidance): BOS BOI image EOI EOS
            pairs.append((b, i, first, template))
        images = None  # the pairs' images, augmented or not, [len(pairs), H, W]
        if self.augments and pairs:  # drawn after the layout, so a batch's sequences do not depend on augmentation
            arng = np.random.default_rng(int(rng.integers(2**63)))
            images = self.augmented_many(np.array([p[1] for p in pairs]), arng)
        codes = None
        if self.setting == "chameleon" and images is not None:
            codes = np.asarray(self.encode(images))
        for k, (b, i, first, template) in enumerate(pairs):
            toks, mod = self.pair_tokens(i, caption_for(self.labels[i], template), first,
                                         codes[k] if codes is not None else None)
            tokens[b, :len(toks)], modality[b, :len(mod)] = toks, mod
            understanding[b], labels[b] = not first, self.labels[i]
        if patches is not None and pairs:  # every pair row holds image_len image positions, rows in order
            if images is None:
                images = self.images[np.array([p[1] for p in pairs])]
            patches[modality == IMAGE] = self.patches_many(images).reshape(-1, self.patch_dim)
        return self.to_batch(tokens, modality, patches, understanding, labels)

    def to_batch(self, tokens: np.ndarray, modality: np.ndarray, patches: np.ndarray | None,
                 understanding: np.ndarray, labels: np.ndarray) -> dict:
        tokens_t, modality_t = torch.from_numpy(tokens), torch.from_numpy(modality)
        targets = torch.full_like(tokens_t, -100)
        targets[:, :-1] = tokens_t[:, 1:]
        target_modality = torch.full_like(modality_t, TEXT)
        target_modality[:, :-1] = modality_t[:, 1:]
        targets[targets == self.vocab.pad] = -100
        if self.setting == "transfusion":
            targets[target_modality == IMAGE] = -100
        image_id = torch.where(modality_t == IMAGE, 0, -1)
        out = {"tokens": tokens_t, "modality": modality_t, "image_id": image_id, "targets": targets,
               "target_modality": target_modality, "understanding": torch.from_numpy(understanding),
               "labels": torch.from_numpy(labels)}
        if patches is not None:
            out["patches"] = torch.from_numpy(patches)
        return out


def batch_to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
