"""Recipe ``lmfusion-train``: give a frozen pretrained LLM image generation and understanding (LMFusion).

    tessera run lmfusion-train layers=2 steps=300            # CPU smoke run: SmolLM2's first 2 layers, 8x8 digits
    tessera run lmfusion-train layers=4 steps=2500 caption_first=0.5   # CPU, ~16 min on 2 cores: understanding 93.5% on 8x8
    tessera run lmfusion-train dataset=mnist layers=4 patch_size=4
    tessera run lmfusion-train freeze_text=false             # baseline: train the whole pretrained model
    tessera run lmfusion-train freeze_text=false image_modules=shared base_init=random text_fraction=0.3
                                                             # baseline: Transfusion from scratch, same shape and tokenizer
    tessera run lmfusion-train base_model=/path/to/llama steps=20000 batch_size=64 lr=1e-4   # GPU

Top to bottom: the base LLM (``base_model``, default the embedded SmolLM2-135M; ``layers=N`` keeps its
first N layers) -> :class:`~tessera.models.lmfusion.LMFusionModel` (image modules copied from the text
modules, BOI/EOI as new rows, linear or U-Net patches) -> captioned digits in both orders
(:mod:`tessera.models.lmfusion_data`, the mixed-modal captions) -> ``L_LM + 5 L_DDPM`` with frozen text
modules, through the training loop of :mod:`tessera.train` (AdamW, warm-up + cosine, bf16 autocast on
GPU) with the training FLOPs measured as executed (:class:`~tessera.models.lmfusion_objective.FlopMeter`) ->
validation losses -> text-to-image sampling with classifier-free guidance, scored by the mixed-modal
digit classifier, and image-to-text through the base model's ``generate``, scored by the digit named
-> proof that the text side is untouched (logits of a freshly loaded base model on WikiText text).

Dump dir: ``config.yaml``, ``metrics.jsonl`` (``kind=train|eval|track`` rows with ``step``, ``flops``,
``tokens``; ``track`` rows, every ``track_every`` steps, hold generation and understanding accuracy on a small sample), ``checkpoint/`` (trainable parameters + optimizer as safetensors, loop state as JSON; resumed automatically),
``classifier.safetensors``, ``image_modules/`` (the small safetensors file + config naming the base model:
load with ``LMFusionModel.load``), ``samples.png``, ``results.json``.

Defaults are the paper's where it has one (lambda 5, 1000 DDPM steps with the cosine schedule,
caption-first 80%, 10% caption dropout for guidance, AdamW betas (0.9, 0.95)); scaled down for CPU:
steps 300, batch 16, lr 1e-3 (LMFusion trains 8B-scale image modules at 1e-4 for hundreds of
thousands of steps), 50 sampling steps instead of 250.  GPU users: leave ``layers=0`` (all 30 of
SmolLM2, or any Llama-family folder / hub id), raise ``steps`` and ``batch_size``, lower ``lr`` to
1e-4, ``sample_steps=250``; the base runs in bf16 with fp32 image modules under autocast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Config:
    base_model: str = "default"  # tessera.hub spec: default (SmolLM2-135M), a Llama-family folder or cached hub id
    layers: int = 0  # use only the first N layers of the base model (0 = all); CPU: 4 (2 learns far slower)
    freeze_text: bool = True  # LMFusion; false = baseline "train the whole pretrained model"
    image_modules: str = "separate"  # separate (LMFusion) | shared (Transfusion: one dense transformer; needs freeze_text=false)
    base_init: str = "pretrained"  # pretrained | random (the base's shape, re-initialised: a from-scratch baseline)
    dataset: str = "digits"  # digits (scikit-learn 8x8, no download) | mnist (../shared/data/mnist, 28x28)
    mnist_dir: str = ""  # default ../shared/data/mnist
    text_dir: str = ""  # WikiText-2 folder (valid.txt for text-only sequences, test.txt for the text check)
    dump_dir: str = "runs/lmfusion-train"
    seed: int = 0
    # image side
    patch_size: int = 0  # 0 -> 2 for digits (16 patches), 4 for MNIST (49 patches)
    patcher: str = "linear"  # linear | unet
    unet_channels: int = 32
    # data
    caption_first: float = 0.8  # Transfusion: 80% of pairs caption first
    cond_dropout: float = 0.1  # captions dropped for classifier-free guidance
    caption_style: str = "sentences"  # sentences ("a handwritten digit seven") | short ("digit 7", "the seven")
    start_token: str = "none"  # none | bos | eos: a token before every image-text sequence (the text model's document start)
    text_fraction: float = 0.0  # text-only sequences (no gradient when the text side is frozen)
    text_sources: str = ""  # text-only sequences from these corpora's training splits (e.g. wiki:wikitext2,docs:python-docs,
    #                         tessera.btx.data sources; held-out perplexity on the first one's held-out split); "" = WikiText-2 valid
    n_val_images: int = 300
    # objective
    diffusion_lambda: float = 5.0  # Transfusion / LMFusion lambda
    understanding_max_t: int = 500  # noise cap for image-first (understanding) pairs
    understanding_diffusion: bool = True  # false: image-first images only condition their caption (no diffusion loss)
    # optimisation
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # logging, evaluation, checkpoints
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 100
    resume: bool = True
    final_eval: bool = True
    sample_per_class: int = 5
    sample_steps: int = 50  # sampling steps (Transfusion: 250 DDPM steps; scaled down for CPU)
    sampler: str = "ddim"  # ddim (deterministic, good at few steps) | ddpm (Transfusion's ancestral sampler)
    guidance_scale: float = 3.0  # classifier-free guidance (1 = none)
    n_caption_eval: int = 100
    caption_tokens: int = 8
    classifier_steps: int = 600
    text_check_tokens: int = 256
    ppl_blocks: int = 32  # held-out text perplexity over this many 128-token blocks (0 = skip)
    track_every: int = 0  # also measure generation and understanding accuracy every N steps (kind=track rows; 0 = off)
    track_per_class: int = 3  # generated images per digit at each tracking point
    track_captions: int = 100  # validation images captioned at each tracking point
    threads: int = 0  # torch CPU threads; 0 = torch's default
    device: str = ""  # "" = CUDA when present, else CPU


def _wikitext_dir(cfg: Config) -> Path | None:
    from tessera.data.paths import shared_data_dir
    from tessera.errors import InputError

    if cfg.text_dir:
        root = Path(cfg.text_dir)
        if not (root / "test.txt").is_file():
            raise InputError(f"{cfg.text_dir} has no WikiText-2 test.txt; pass the wikitext2 folder")
        return root
    root = shared_data_dir()
    return root / "wikitext2" if root is not None and (root / "wikitext2" / "test.txt").is_file() else None


def text_for(cfg: Config, split: str) -> str:
    """WikiText-2 ``split`` (valid/test) text, or Python's docs when WikiText-2 is absent."""
    from tessera.data.text import python_docs_corpus, read_wikitext

    root = _wikitext_dir(cfg)
    if root is not None and (root / f"{split}.txt").is_file():
        return "\n".join(d.text for d in read_wikitext(root / f"{split}.txt"))
    docs = [d.text for d in python_docs_corpus()]
    return "\n".join(docs[: len(docs) // 2] if split == "valid" else docs[len(docs) // 2:])


def _source_texts(cfg: Config) -> tuple[list[str], list[str]]:
    """``(train, held-out)`` texts of ``text_sources`` (:func:`tessera.recipes.text_pretrain.corpus`)."""
    from tessera.recipes.text_pretrain import corpus

    return corpus([s for s in cfg.text_sources.split(",") if s.strip()])


def heldout_text(cfg: Config) -> str:
    """Text for the held-out perplexity: the first ``text_sources`` corpus's held-out split, else WikiText-2 test."""
    return "\n".join(_source_texts(cfg)[1]) if cfg.text_sources.strip() else text_for(cfg, "test")


def _start_id(cfg: Config, tok) -> int:
    from tessera.errors import InputError

    if cfg.start_token == "none":
        return -1
    tid = tok.bos_token_id if cfg.start_token == "bos" else tok.eos_token_id
    if tid is None:
        raise InputError(f"the tokenizer has no {cfg.start_token.upper()} token; use start_token=none or the other one")
    return int(tid)


def build(cfg: Config, device: str):
    """``(model, objective, tokenizer, train_data, val_data, train_idx, val_idx)``."""
    import numpy as np
    import torch

    from tessera.data.mixed_modal import CAPTION_STYLES, load_image_set, split_indices
    from tessera.data.paths import shared_data_dir
    from tessera.models.lmfusion import LMFusionModel, load_base
    from tessera.models.lmfusion_modules import LMFusionConfig
    from tessera.models.lmfusion_objective import LMFusionLM
    from tessera.models.lmfusion_data import LMFusionData

    mnist_dir = cfg.mnist_dir or (str(shared_data_dir() / "mnist") if shared_data_dir() else None)
    images, labels = load_image_set(cfg.dataset, mnist_dir)
    train_idx, val_idx = split_indices(len(images), cfg.n_val_images, seed=0)
    patch = cfg.patch_size or (2 if cfg.dataset == "digits" else 4)
    H, W = images.shape[1:]
    base, tok = load_base(cfg.base_model, cfg.layers, device=device)
    torch.manual_seed(cfg.seed)
    if cfg.base_init == "random":  # same shape and tokenizer, fresh weights: trained from scratch
        base = type(base)(base.config).to(device=base.device, dtype=base.dtype)
    if not cfg.freeze_text:  # trained text modules keep fp32 weights (bf16 compute comes from autocast on GPU)
        base = base.float()
    mcfg = LMFusionConfig(base_model=cfg.base_model, layers=cfg.layers, image_height=H, image_width=W,
                          patch_size=patch, patcher=cfg.patcher, unet_channels=cfg.unet_channels,
                          freeze_text=cfg.freeze_text, image_modules=cfg.image_modules,
                          start_id=_start_id(cfg, tok))
    model = LMFusionModel(base, mcfg)
    text_tokens = None
    if cfg.text_fraction > 0:
        text = "\n".join(_source_texts(cfg)[0]) if cfg.text_sources.strip() else text_for(cfg, "valid")
        text_tokens = np.asarray(tok(text, add_special_tokens=False).input_ids, dtype=np.int64)
    common = dict(patch_size=patch, caption_first=cfg.caption_first, cond_dropout=cfg.cond_dropout,
                  text_fraction=cfg.text_fraction, text_tokens=text_tokens, templates=CAPTION_STYLES[cfg.caption_style],
                  start_ids=model.cfg.start_ids)
    train = LMFusionData(tok, images, labels, model.cfg.boi_id, model.cfg.eoi_id, **common)
    val = LMFusionData(tok, images, labels, model.cfg.boi_id, model.cfg.eoi_id, **common)
    objective = LMFusionLM(model, cfg.diffusion_lambda, cfg.understanding_max_t, cfg.understanding_diffusion)
    return model, objective, tok, train, val, train_idx, val_idx


def generation_accuracy(model, tok, classifier, per_class: int, steps: int, guidance_scale: float, seed: int = 0,
                        template: str | None = None, sampler: str = "ddim"):
    """Conditional generation accuracy: ``per_class`` images per digit from a caption, judged by ``classifier``."""
    import torch

    from tessera.data.mixed_modal import CAPTION_TEMPLATES, caption_for
    from tessera.models.lmfusion_sampling import generate_images

    labels = [d for d in range(10) for _ in range(per_class)]
    caps = [caption_for(d, template or CAPTION_TEMPLATES[0]) for d in labels]
    images = generate_images(model, tok, caps, guidance_scale, steps, torch.Generator().manual_seed(seed), sampler=sampler)
    pred = classifier.predict(images)
    return float((pred == torch.tensor(labels)).float().mean()), images, labels


def understanding_accuracy(model, tok, images, labels, max_new_tokens: int = 8) -> tuple[float, list[dict]]:
    """Fraction of images whose greedy caption (through the base model's ``generate``) names the right digit."""
    import torch

    from tessera.data.mixed_modal import parse_digit
    from tessera.models.lmfusion_sampling import caption_images

    caps = caption_images(model, tok, torch.as_tensor(images), max_new_tokens=max_new_tokens)
    rows = [{"label": int(y), "caption": c, "parsed": parse_digit(c)} for c, y in zip(caps, labels)]
    return sum(r["parsed"] == r["label"] for r in rows) / max(len(rows), 1), rows


def text_side_check(model, cfg: Config, tok, device: str) -> dict:
    """Logits of the fused model vs a freshly loaded copy of the base model on WikiText-2 test text."""
    import torch

    from tessera.models.lmfusion import load_base

    ref, _ = load_base(cfg.base_model, cfg.layers, device=device)
    ids = torch.tensor([tok(text_for(cfg, "test")[:20000], add_special_tokens=False).input_ids[:cfg.text_check_tokens]],
                       device=device)
    with torch.no_grad():
        a, b = model.logits(ids), ref(ids).logits
    del ref
    return {"tokens": int(ids.shape[1]), "bit_identical": bool(torch.equal(a, b)),
            "max_abs_logit_diff": float((a.float() - b.float()).abs().max())}


def _save_ckpt(path: Path, model, opt, state, is_main: bool = True) -> None:
    """The trainable parameters (the image modules and the image FFN copies), the optimizer, the
    loop state and every rank's RNG states, as a checkpoint folder (safetensors + JSON, no
    pickle).  Every rank calls it (the RNG states are gathered); rank 0 writes."""
    from tessera.train.checkpoint import gathered_rng_states, write_checkpoint

    rng = gathered_rng_states()
    if not is_main:
        return
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    write_checkpoint(path, trainable, opt.state_dict(), state.to_dict(), rng=rng)


def _load_ckpt(path: Path, model, opt, rank: int = 0):
    import torch

    from tessera.errors import InputError
    from tessera.train import LoopState
    from tessera.train.checkpoint import read_checkpoint

    ck = read_checkpoint(path, restore_rng=True, rank=rank)
    params = dict(model.named_parameters())
    unknown = sorted(set(ck["model"]) - set(params))
    if unknown:
        raise InputError(f"{path} holds parameters this model lacks ({unknown[0]}, ...); resume with the same config or rerun with resume=false")
    with torch.no_grad():
        for n, v in ck["model"].items():
            params[n].copy_(v)
    opt.load_state_dict(ck["optimizer"])
    return LoopState(**ck["state"])


def main(cfg: Config) -> Path:
    """The recipe, stage by stage: check the config, build, resume, train, evaluate, write ``results.json``."""
    import torch

    from tessera.models.scoring import validation_batches
    from tessera.train import init_distributed, wrap_model

    _check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    dump_path = Path(cfg.dump_dir)

    # 1. base LLM + image modules, data (nothing is written before these load), the judge classifier
    model, objective, tok, train_data, val_data, train_idx, val_idx = build(cfg, info.device)
    clf, clf_acc, dump, opt = _prepare_run(cfg, info, model, train_data, train_idx, val_idx, dump_path)
    # 2. resume
    state = _resume(cfg, info, model, opt, dump_path)
    net = wrap_model(objective, info, "ddp" if info.world_size > 1 else "none", find_unused_parameters=True)
    # 3. train, with the FLOPs that really run (frozen modules: no weight gradients)
    val_batches = validation_batches(val_data, val_idx, cfg.batch_size, cfg.eval_batches)
    track = _tracker(cfg, model, tok, clf, val_data, val_idx) if cfg.track_every and info.is_main else None
    state = _train(cfg, info, net, model, objective, opt, state, train_data, train_idx, val_batches, dump,
                   dump_path / "checkpoint", track)
    # 4. final evaluation
    results = _run_summary(cfg, info, model, objective, state, val_batches, clf_acc)
    if info.is_main:
        model.save_image_modules(dump_path / "image_modules", tok)
        if cfg.base_init == "pretrained":
            results["text_side"] = text_side_check(model, cfg, tok, info.device)
        if cfg.ppl_blocks:
            model.eval()
            results["text_perplexity"] = text_perplexity(model.logits, tok, heldout_text(cfg), cfg.ppl_blocks, info.device)
    if cfg.final_eval and info.is_main:
        results.update(_sample_and_caption(cfg, model, tok, clf, val_data, val_idx, dump_path))
    if dump:
        _write_results(dump, results)
    return dump_path


def _check_config(cfg: Config) -> None:
    """Reject unknown choices and empty runs before anything loads."""
    from tessera.data.mixed_modal import CAPTION_STYLES
    from tessera.errors import InputError
    from tessera.models.lmfusion_modules import IMAGE_MODULES, PATCHERS

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise InputError("steps and batch_size must be >= 1")
    if cfg.sampler not in ("ddim", "ddpm"):
        raise InputError(f"unknown sampler {cfg.sampler!r}; use ddim or ddpm")
    if cfg.dataset not in ("digits", "mnist"):
        raise InputError(f"unknown dataset {cfg.dataset!r}; use digits or mnist")
    if cfg.patcher not in PATCHERS:
        raise InputError(f"unknown patcher {cfg.patcher!r}; use linear or unet")
    if cfg.caption_style not in CAPTION_STYLES:
        raise InputError(f"unknown caption_style {cfg.caption_style!r}; use {' or '.join(CAPTION_STYLES)}")
    if cfg.start_token not in ("none", "bos", "eos"):
        raise InputError(f"unknown start_token {cfg.start_token!r}; use none, bos or eos")
    if cfg.base_init not in ("pretrained", "random"):
        raise InputError(f"unknown base_init {cfg.base_init!r}; use pretrained or random")
    if cfg.image_modules not in IMAGE_MODULES:
        raise InputError(f"unknown image_modules {cfg.image_modules!r}; use separate (LMFusion) or shared (Transfusion)")
    if cfg.image_modules == "shared" and cfg.freeze_text:
        raise InputError("image_modules=shared routes images through the text modules (Transfusion): set freeze_text=false")


def _prepare_run(cfg: Config, info, model, train_data, train_idx, val_idx, dump_path: Path):
    """``(classifier, its val accuracy, DumpDir or None, optimizer)``: the judge classifier (cached in the
    dump dir), the dump dir itself (rank 0) and AdamW over the trainable parameters."""
    import torch

    from tessera.config import DumpDir
    from tessera.models.scoring import get_classifier

    dump_path.mkdir(parents=True, exist_ok=True)
    clf, clf_acc = get_classifier(train_data, train_idx, val_idx, dump_path if info.is_main else None,
                                  steps=cfg.classifier_steps, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # training draws do not depend on whether the classifier was cached
    dump = DumpDir(dump_path, cfg, fresh=False) if info.is_main else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    return clf, clf_acc, dump, opt


def _resume(cfg: Config, info, model, opt, dump_path: Path):
    """The loop state of the latest checkpoint (loaded into ``model`` and ``opt``), or a fresh one."""
    from tessera import ui
    from tessera.models.scoring import drop_metrics_after
    from tessera.train import LoopState
    from tessera.train.checkpoint import resolve_checkpoint

    state = LoopState()
    found = resolve_checkpoint(dump_path / "checkpoint") if cfg.resume else None
    if found is not None:
        state = _load_ckpt(found, model, opt, info.rank)
        if info.is_main:  # drop metric rows logged after the checkpoint
            drop_metrics_after(dump_path / "metrics.jsonl", state.step)
        ui.info(f"resumed from {found} at step {state.step}")
    elif info.is_main:
        (dump_path / "metrics.jsonl").unlink(missing_ok=True)
    return state


def _train(cfg: Config, info, net, model, objective, opt, state, train_data, train_idx, val_batches, dump, ckpt: Path,
           track=None):
    """The training loop of :mod:`tessera.train` under a :class:`~tessera.models.lmfusion_objective.FlopMeter`,
    with train/eval rows in ``metrics.jsonl`` and checkpoints; returns the final loop state."""
    import numpy as np

    from tessera import ui
    from tessera.models.lmfusion_objective import FlopMeter
    from tessera.models.scoring import mean_val_losses
    from tessera.train import LoopState, cosine_lr, train_loop

    meter = FlopMeter()

    def get_batch(step: int) -> dict:
        return train_data.batch(cfg.batch_size, np.random.default_rng([cfg.seed, info.rank, step]), train_idx)

    def run_eval(step: int) -> None:
        row = mean_val_losses(objective, val_batches, info.device, cfg.seed)
        meter.skip()
        if dump:
            dump.log(kind="eval", step=step, flops=state.flops, tokens=state.tokens, **row)

    bar = ui.progress()
    task = bar.add_task("lmfusion" if cfg.freeze_text else "unfrozen", total=cfg.steps, completed=state.step)

    def on_step(st: LoopState, logs: dict, dt: float) -> None:
        bar.update(task, completed=st.step)
        if dump and (st.step % cfg.log_every == 0 or st.step == 1):
            dump.log(kind="train", step=st.step, flops=st.flops, tokens=st.tokens, step_s=round(dt, 4),
                     lr=opt.param_groups[0]["lr"], **{k: round(v, 5) for k, v in logs.items()})
        if st.step % cfg.eval_every == 0 or st.step == cfg.steps:
            run_eval(st.step)
        if track is not None and (st.step % cfg.track_every == 0 or st.step == cfg.steps):
            row = track(st.step)
            meter.skip()
            if dump:
                dump.log(kind="track", step=st.step, flops=st.flops, tokens=st.tokens, **row)
        if st.step % cfg.ckpt_every == 0 or st.step == cfg.steps:  # every rank: the RNG states are gathered
            _save_ckpt(ckpt, model, opt, st, info.is_main)

    with meter:
        if state.step == 0:
            run_eval(0)
        with bar:
            state = train_loop(net, opt, get_batch, cfg.steps, state, info, flops_fn=lambda b: meter.delta(),
                               lr_fn=lambda s: cosine_lr(s, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio),
                               grad_clip=cfg.grad_clip, on_step=on_step)
    return state


def _template(cfg: Config) -> str:
    """The caption template generation is scored with: the style's first one that names the digit as a word."""
    from tessera.data.mixed_modal import CAPTION_STYLES

    return CAPTION_STYLES[cfg.caption_style][0]


def _tracker(cfg: Config, model, tok, clf, val_data, val_idx):
    """``track(step) -> {generation_accuracy, understanding_accuracy}`` on a small fixed sample (``track_per_class``
    images per digit, ``track_captions`` validation images), the model put back in training mode after."""
    sel = val_idx[:cfg.track_captions]

    def track(step: int) -> dict:
        gen, _, _ = generation_accuracy(model, tok, clf, cfg.track_per_class, cfg.sample_steps, cfg.guidance_scale,
                                        cfg.seed, template=_template(cfg), sampler=cfg.sampler)
        und, _ = understanding_accuracy(model, tok, val_data.images[sel], val_data.labels[sel], cfg.caption_tokens)
        model.train()
        return {"generation_accuracy": round(gen, 4), "understanding_accuracy": round(und, 4)}

    return track


def text_perplexity(logits_fn, tok, text: str, blocks: int, device: str, seq_len: int = 128) -> dict:
    """Perplexity of ``logits_fn`` (``[B, T] -> [B, T, V]``; an LMFusion model's text side is ``model.logits``)
    on the first ``blocks`` ``seq_len``-token blocks of held-out ``text`` (the first token of a block is context only)."""
    import math

    import torch

    ids = tok(text, add_special_tokens=False).input_ids[:blocks * seq_len]
    n = len(ids) // seq_len
    if n == 0:
        return {"blocks": 0, "perplexity": None}
    x = torch.tensor(ids[:n * seq_len], device=device).view(n, seq_len)
    nll = 0.0
    with torch.no_grad():
        for i in range(0, n, 8):
            logits = logits_fn(x[i:i + 8])[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[i:i + 8, 1:].reshape(-1),
                                                           reduction="sum"))
    return {"blocks": n, "tokens": n * (seq_len - 1), "perplexity": round(math.exp(nll / (n * (seq_len - 1))), 4)}


def _run_summary(cfg: Config, info, model, objective, state, val_batches, clf_acc: float) -> dict:
    """The run's figures: config, parameters, FLOPs, tokens, step time, validation losses."""
    import numpy as np

    from tessera.models.scoring import mean_val_losses

    n_params = model.num_params()
    results: dict = {"freeze_text": cfg.freeze_text, "image_modules": cfg.image_modules, "base_init": cfg.base_init,
                     "base_model": cfg.base_model, "layers": model.cfg.layers,
                     "dataset": cfg.dataset, "patcher": cfg.patcher, "params": n_params, "model_config": model.cfg.to_dict(),
                     "classifier_val_accuracy": round(clf_acc, 4), "steps": state.step, "train_flops": state.flops,
                     "train_tokens": state.tokens, "world_size": info.world_size}
    times = state.step_times[5:] or state.step_times
    results["median_step_s"] = float(np.median(times)) if times else None
    results["val"] = mean_val_losses(objective, val_batches, info.device, cfg.seed)
    return results


def _sample_and_caption(cfg: Config, model, tok, clf, val_data, val_idx, dump_path: Path) -> dict:
    """Text to image (judged by the classifier, ``samples.png``) and image to text (the digit named)."""
    from tessera.models.scoring import save_samples_png

    acc, imgs, labs = generation_accuracy(model, tok, clf, cfg.sample_per_class, cfg.sample_steps,
                                          cfg.guidance_scale, cfg.seed, template=_template(cfg), sampler=cfg.sampler)
    out: dict = {"generation_accuracy": round(acc, 4), "guidance_scale": cfg.guidance_scale}
    sel = val_idx[:cfg.n_caption_eval]
    u_acc, rows = understanding_accuracy(model, tok, val_data.images[sel], val_data.labels[sel], cfg.caption_tokens)
    out["understanding_accuracy"] = round(u_acc, 4)
    out["caption_examples"] = rows[:5]
    save_samples_png(imgs, labs, dump_path / "samples.png",
                     f"LMFusion ({'frozen text' if cfg.freeze_text else 'unfrozen'}) generation accuracy {acc:.2f}")
    return out


def _write_results(dump, results: dict) -> None:
    from tessera import ui

    dump.write_results(results)
    summary = {k: results.get(k) for k in ("val", "generation_accuracy", "understanding_accuracy")}
    ui.info(f"lmfusion-train: {json.dumps(summary)}")


__all__ = ["Config", "main", "build", "generation_accuracy", "heldout_text", "text_perplexity", "text_side_check",
           "understanding_accuracy"]
