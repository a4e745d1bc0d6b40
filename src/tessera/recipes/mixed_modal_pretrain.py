"""Recipe ``mixed-modal-pretrain``: dense, MoT, MoE, MoMa and MoD mixed-modal decoders, one config switch.

    tessera run mixed-modal-pretrain setting=chameleon variant=mot
    tessera run mixed-modal-pretrain setting=transfusion variant=moma n_text_experts=2 n_image_experts=2
    torchrun --nproc_per_node 2 -m tessera.cli run mixed-modal-pretrain variant=moma_mod

Top to bottom: captioned digits (scikit-learn 8x8 ``digits`` or ``mnist``) in both orders plus
WikiText-2 text-only sequences (:mod:`tessera.data.mixed_modal`) -> images as discrete tokens
(Chameleon setting: pixel values for 8x8 digits, a VQ tokenizer trained here for MNIST) or as
continuous patches (Transfusion setting: DDPM loss, lambda 5, bidirectional attention within an
image) -> a :class:`~tessera.models.objectives.MixedModalLM` of the chosen ``variant`` -> the training
loop of :mod:`tessera.train` (DDP under torchrun, FSDP on GPU) with cumulative training FLOPs logged
with every metric -> validation loss on text and image tokens separately (expert-choice and MoD
models also with their causal auxiliary routers) -> image-from-caption generation and captioning,
scored by a digit classifier trained here.  ``ema_decay=0.999`` evaluates, samples and captions with an
exponential moving average of the weights (:mod:`tessera.train.ema`; checkpointed beside them; single
process or DDP), as diffusion models are judged.  Dump dir: ``config.yaml``, ``metrics.jsonl`` (rows
``kind=train|eval`` with ``step``, ``flops``, ``tokens``), ``checkpoint/`` (safetensors + JSON; resumed automatically),
``classifier.safetensors``, ``vq.safetensors`` (MNIST + Chameleon), ``samples.png``, ``results.json``.

Defaults are CPU-sized (d_model 64, 4 layers, batch 32, 400 steps: a few minutes on one core).
Paper scale (MoT: Chameleon 7B and 443M-1.4B; MoMa 1.4B; GPU, bf16, FSDP) is set by the model keys;
sizes for GPU users (SwiGLU hidden 4d; "active" = parameters a token uses, dense = MoT active):

=========  =========================================================  ===========  ============
size       keys                                                       dense total  MoT total
=========  =========================================================  ===========  ============
~40M       d_model=512 n_layers=8 n_heads=8                           ~34M         ~67M
~200M      d_model=1024 n_layers=12 n_heads=16                        ~200M        ~400M
~500M      d_model=1536 n_layers=16 n_heads=24                        ~600M        ~1.2B
~1B        d_model=2048 n_layers=16 n_heads=16 batch_size=64 lr=3e-4   ~1.07B       ~2.1B
=========  =========================================================  ===========  ============

MoMa 1.4B-style: ``variant=moma n_text_experts=4 n_image_experts=4`` (8 experts, active = dense);
add ``_mod`` for mixture-of-depths, and ``router_noise=gumbel`` for the paper's Gumbel-sigmoid
expert-choice router in training (eq. 5; default ``none``).  At those sizes also raise ``steps``,
``warmup_steps`` (MoT: 4000 at 7B), lower ``lr`` (Chameleon: 1e-4 at 7B; MoT 443M-1.4B: 3e-4), and run
with ``torchrun``; the byte vocabulary and the digit data stay, so large runs need the user's own data to be meaningful.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Config:
    setting: str = "chameleon"  # chameleon (images as tokens, AR loss) | transfusion (patches, LM + lambda * DDPM)
    variant: str = "dense"  # dense | mot | moe_tc | moe_ec | moma | <any>_mod (mixture-of-depths)
    dataset: str = "digits"  # digits (scikit-learn 8x8, no download) | mnist (../shared/data/mnist)
    mnist_dir: str = ""  # default ../shared/data/mnist
    text_dir: str = ""  # WikiText-2 folder (test.txt = training text, valid.txt = validation); default ../shared/data/wikitext2
    dump_dir: str = "runs/mixed-modal-pretrain"
    seed: int = 0
    # model (CPU-sized; see the docstring for GPU sizes)
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 0  # 0 -> 4 * d_model
    n_experts: int = 4  # moe_tc / moe_ec
    top_k: int = 1
    capacity_factor: float = 1.0  # expert choice: capacity 1/E per expert (MoMa)
    n_text_experts: int = 4  # MoMa 4t4i headline
    n_image_experts: int = 4
    untie_attention: bool = False
    mod_capacity: float = 0.25  # MoMa: 25%
    mod_every: int = 2
    aux_router: bool = True
    router_noise: str = "none"  # moe_ec / moma: "gumbel" = Gumbel-sigmoid router in training (MoMa eq. 5; the paper's setting)
    # data
    patch_size: int = 0  # transfusion patches: 0 -> 2 for digits (16 patches), 4 for MNIST (49 patches)
    patch_positions: bool = True  # transfusion: learned position embedding of each patch (ViT / DiT), beside RoPE
    text_fraction: float = 0.25  # share of text-only sequences
    caption_first: float = 0.8  # Transfusion: 80% of pairs caption first
    captions: str = "sentences"  # caption templates: sentences ("a handwritten digit seven") | short ("seven", "digit 7")
    # transfusion: share of caption-first pairs whose caption is dropped (BOS BOI image EOI EOS), so that sampling can
    # use classifier-free guidance at guidance_scale (eps_u + s * (eps_c - eps_u)); chameleon ignores both
    cond_dropout: float = 0.1
    guidance_scale: float = 3.0
    n_val_images: int = 300
    # training images drawn anew each time (validation images never): shifted by up to augment_shift pixels
    # each way and their ink scaled by a gain in [1 - augment_gain, 1], so a long run does not see repeats
    # (1,497 training digits repeat every ~60 steps of batch 32 otherwise, and the model overfits)
    augment_shift: int = 1
    augment_gain: float = 0.3
    # chameleon + digits: image tokens are the 64 pixel values (17 grey levels) or one token per 2x2 patch (16 tokens,
    # nearest entry of a digit_codes-entry k-means codebook: a VQ tokenizer without a learned encoder)
    digit_tokens: str = "pixels"
    digit_codes: int = 256
    vq_codes: int = 64  # MNIST VQ tokenizer (Chameleon: 8192 codes; scaled down)
    vq_steps: int = 800
    # objective
    diffusion_lambda: float = 5.0  # Transfusion lambda
    # transfusion, image-first (captioning) pairs: noise capped at t < understanding_max_t (Transfusion: 500 for part of
    # them), and whether their image also gets the diffusion loss (false: the image only conditions its caption)
    understanding_max_t: int = 500
    understanding_diffusion: bool = True
    # transfusion: what the network predicts, epsilon (Transfusion) or v_prediction (v = sqrt(abar) eps - sqrt(1-abar) x0)
    prediction_type: str = "epsilon"
    snr_gamma: float = 0.0  # transfusion: diffusion-loss weight min(1, gamma / SNR) (Min-SNR, Hang et al. 2023: 5); 0 = off
    aux_coef: float = 1.0
    lb_coef: float = 0.01  # Switch alpha
    # optimisation (AdamW beta2 0.95 and weight decay 0.1 as Chameleon/MoT; lr scaled up for tiny models)
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # evaluate, sample and caption with an exponential moving average of the weights (decay warmed up as
    # min(decay, (1 + n) / (10 + n)), tessera.train.ema); 0 = the raw weights.  Diffusion models are judged by their EMA
    # (DDPM, DiT): with a few images per batch the raw weights wander by several percent between evaluations
    ema_decay: float = 0.0
    # stop once an evaluation (batch routing) reaches every one of these validation losses (0 = not a target): the
    # run up to there is the same run (the schedule stays that of ``steps``); benchmarks use it for "steps to match"
    stop_text_loss: float = 0.0
    stop_image_loss: float = 0.0
    stop_model_loss: float = 0.0
    # logging, evaluation, checkpoints
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 100
    resume: bool = True
    final_eval: bool = True
    sample_per_class: int = 5
    sample_steps: int = 50  # DDPM sampling steps (Transfusion: 250; scaled down for CPU)
    n_caption_eval: int = 100
    classifier_steps: int = 600
    threads: int = 0  # torch CPU threads; 0 = torch's default
    device: str = ""  # "" = CUDA when present, else CPU
    distributed: str = "auto"  # auto (FSDP on GPU, DDP on CPU) | ddp | fsdp | none


def model_config(cfg: Config, vocab_size: int, patch_dim: int, image_len: int = 0):
    """The model's architecture; ``image_len``: patches per image (Transfusion: learned patch positions, when
    ``cfg.patch_positions``)."""
    from tessera.models.decoder import MixedModalConfig

    return MixedModalConfig(vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                            ffn_hidden=cfg.ffn_hidden, variant=cfg.variant, n_experts=cfg.n_experts, top_k=cfg.top_k,
                            capacity_factor=cfg.capacity_factor, n_text_experts=cfg.n_text_experts,
                            n_image_experts=cfg.n_image_experts, untie_attention=cfg.untie_attention,
                            mod_capacity=cfg.mod_capacity, mod_every=cfg.mod_every, aux_router=cfg.aux_router,
                            router_noise=cfg.router_noise, patch_dim=patch_dim,
                            image_positions=image_len if patch_dim and cfg.patch_positions else 0)


def routings_for(variant: str, aux_router: bool) -> list[str]:
    """``["batch"]`` plus ``"aux"`` for models with non-causal routing (expert choice, MoD)."""
    from tessera.models.decoder import parse_variant

    base, mod = parse_variant(variant)
    return ["batch", "aux"] if aux_router and (mod or base in ("moe_ec", "moma")) else ["batch"]


def _text_docs(cfg: Config) -> tuple[list[str], list[str], str]:
    from tessera.data.paths import shared_data_dir
    from tessera.data.text import python_docs_corpus, read_wikitext
    from tessera.errors import InputError

    root = Path(cfg.text_dir) if cfg.text_dir else (shared_data_dir() / "wikitext2" if shared_data_dir() else None)
    if root is not None and (root / "test.txt").is_file() and (root / "valid.txt").is_file():
        return ([d.text for d in read_wikitext(root / "test.txt")], [d.text for d in read_wikitext(root / "valid.txt")],
                f"wikitext2 ({root})")
    if cfg.text_dir:
        raise InputError(f"{cfg.text_dir} has no WikiText-2 test.txt and valid.txt; pass the wikitext2 folder")
    docs = [d.text for d in python_docs_corpus()]
    cut = max(1, len(docs) * 9 // 10)
    return docs[:cut], docs[cut:], "python docs (WikiText-2 not found)"


def build_data(cfg: Config, dump: Path | None = None):
    """``(train_data, val_data, train_idx, val_idx, codes_to_images, info)``; trains/loads the VQ tokenizer for MNIST."""
    from tessera.data.mixed_modal import CAPTION_STYLES, MixedModalData, load_image_set, split_indices, text_stream
    from tessera.data.paths import shared_data_dir
    from tessera.errors import InputError

    if cfg.setting not in ("chameleon", "transfusion"):
        raise InputError(f"unknown setting {cfg.setting!r}; use setting=chameleon or setting=transfusion")
    if cfg.captions not in CAPTION_STYLES:
        raise InputError(f"unknown captions {cfg.captions!r}; use captions=sentences or captions=short")
    if cfg.digit_tokens not in ("pixels", "patches"):
        raise InputError(f"unknown digit_tokens {cfg.digit_tokens!r}; use digit_tokens=pixels or digit_tokens=patches")
    mnist_dir = cfg.mnist_dir or (str(shared_data_dir() / "mnist") if shared_data_dir() else None)
    images, labels = load_image_set(cfg.dataset, mnist_dir)
    train_idx, val_idx = split_indices(len(images), cfg.n_val_images, seed=0)
    train_docs, val_docs, text_source = _text_docs(cfg)
    info = {"images": cfg.dataset, "n_train_images": len(train_idx), "n_val_images": len(val_idx), "text": text_source,
            "augment_shift": cfg.augment_shift, "augment_gain": cfg.augment_gain}
    codes, n_codes, codes_to_images, encode = None, 0, None, None
    if cfg.setting == "chameleon":
        codes, n_codes, codes_to_images, encode = _image_tokens(cfg, images, train_idx, val_idx, dump, info)
    patch = cfg.patch_size or (2 if cfg.dataset == "digits" else 4)
    common = dict(codes=codes, n_image_codes=n_codes, patch_size=patch, text_fraction=cfg.text_fraction,
                  caption_first=cfg.caption_first, templates=CAPTION_STYLES[cfg.captions])
    train = MixedModalData(cfg.setting, images, labels, text_stream(train_docs), augment_shift=cfg.augment_shift,
                           augment_gain=cfg.augment_gain, encode=encode,
                           cond_dropout=cfg.cond_dropout if cfg.setting == "transfusion" else 0.0, **common)
    val = MixedModalData(cfg.setting, images, labels, text_stream(val_docs), **common)
    info.update(seq_len=train.seq_len, image_tokens=train.image_len, vocab_size=train.vocab.size)
    return train, val, train_idx, val_idx, codes_to_images, info


def _image_tokens(cfg: Config, images, train_idx, val_idx, dump: Path | None, info: dict):
    """Chameleon setting: images as discrete tokens, ``(codes, n_codes, codes_to_images, encode)``.

    8x8 digits: the pixel values (17 grey levels) or one token per 2x2 patch (nearest entry of a k-means
    codebook); MNIST: a VQ tokenizer trained here (:func:`_vq_tokens`).  Reconstruction errors go to ``info``.
    """
    import numpy as np

    from tessera.data.mixed_modal import PatchCodebook

    if cfg.dataset == "digits" and cfg.digit_tokens == "pixels":  # pixel-value tokens: 17 grey levels
        codes = np.rint(images.reshape(len(images), -1) * 16).astype(np.int64)

        def codes_to_images(c):
            return c.float().view(-1, 8, 8) / 16.0

        def encode(imgs):
            return np.rint(imgs.reshape(len(imgs), -1) * 16).astype(np.int64)

        return codes, 17, codes_to_images, encode
    if cfg.dataset == "digits":  # one token per 2x2 patch: nearest entry of a k-means codebook
        book = PatchCodebook.fit(images[train_idx], cfg.digit_codes, patch=2, seed=0)
        info["codebook_reconstruction_mse"] = round(book.reconstruction_mse(images[val_idx]), 5)
        return book.encode(images), cfg.digit_codes, book.decode, book.encode
    return _vq_tokens(cfg, images, train_idx, dump, info)


def _vq_tokens(cfg: Config, images, train_idx, dump: Path | None, info: dict):
    """MNIST: ``(codes, n_codes, codes_to_images, encode)`` of a VQ tokenizer, loaded from ``dump/vq.safetensors``
    or trained on the training images (and saved there)."""
    import numpy as np
    import torch

    from tessera.models.vq import VQTokenizer, train_vq_tokenizer
    from tessera.train.checkpoint import load_tensors, save_tensors

    path = dump / "vq.safetensors" if dump is not None else None
    if path is not None and path.is_file():
        vq = VQTokenizer(n_codes=cfg.vq_codes)
        vq.load_state_dict(load_tensors(path))
        vq.eval()
    else:
        vq, mse = train_vq_tokenizer(images[train_idx], steps=cfg.vq_steps, n_codes=cfg.vq_codes, seed=cfg.seed)
        info["vq_reconstruction_mse"] = round(mse, 5)
        if path is not None:
            save_tensors(path, vq.state_dict())
    codes = torch.cat([vq.encode(torch.from_numpy(images[i:i + 1000])) for i in range(0, len(images), 1000)]).numpy()
    H, W = images.shape[1:]

    def codes_to_images(c):
        return vq.decode(c, H, W)

    def encode(imgs):
        with torch.no_grad():
            return vq.encode(torch.from_numpy(np.ascontiguousarray(imgs, dtype=np.float32))).numpy()

    return codes, cfg.vq_codes, codes_to_images, encode


def main(cfg: Config) -> Path:
    """The recipe, stage by stage: check the config, data, model, resume, train, evaluate, write ``results.json``."""
    import torch

    from tessera import ui
    from tessera.config import DumpDir
    from tessera.models.scoring import get_classifier, validation_batches
    from tessera.train import init_distributed

    _check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    if cfg.ema_decay:
        from tessera.errors import InputError
        from tessera.train.loop import resolve_strategy

        if resolve_strategy(info, cfg.distributed) == "fsdp":
            raise InputError("ema_decay averages unsharded weights and this run shards them (FSDP); "
                             "run with distributed=ddp, or ema_decay=0")
    torch.manual_seed(cfg.seed)
    dump_path = Path(cfg.dump_dir)

    # 1. data (and, for MNIST + Chameleon, the VQ tokenizer), the judge classifier
    dump_path.mkdir(parents=True, exist_ok=True)
    train_data, val_data, train_idx, val_idx, codes_to_images, data_info = build_data(cfg, dump_path if info.is_main else None)
    clf, clf_acc = get_classifier(train_data, train_idx, val_idx, dump_path if info.is_main else None,
                                  steps=cfg.classifier_steps, seed=cfg.seed, shift=cfg.augment_shift)
    dump = DumpDir(dump_path, cfg, fresh=False) if info.is_main else None
    # 2. the model and its objective (seeded here: a cached classifier must not change the draws)
    torch.manual_seed(cfg.seed)
    mcfg, model, core, opt = _build_model(cfg, info, train_data)
    ema = None
    if cfg.ema_decay:
        from tessera.train.ema import weight_ema

        ema = weight_ema(core, cfg.ema_decay)
    judged = ema.module if ema is not None else core  # what evaluation, sampling and captioning see
    # 3. resume (into the wrapped model: a full state dict is sharded by FSDP, loaded by every DDP rank)
    state = _resume(cfg, info, model, opt, dump_path, ema)
    # 4. train
    val_batches = validation_batches(val_data, val_idx, cfg.batch_size, cfg.eval_batches)
    routings = routings_for(cfg.variant, cfg.aux_router)
    state = _train(cfg, info, mcfg, model, core, opt, state, train_data, train_idx, val_batches, routings, dump,
                   dump_path / "checkpoint", ema)
    # 5. final evaluation: losses (both routings), generation and captioning accuracy
    results = _run_summary(cfg, info, mcfg, judged, state, train_data, val_batches, routings, data_info, clf_acc)
    if cfg.final_eval:
        results.update(_generation_and_captioning(cfg, judged, val_data, val_idx, clf, codes_to_images, routings,
                                                  dump_path if dump else None))
    if dump:
        dump.write_results(results)
        summary = {k: results[k] for k in ("val", "generation", "captioning") if k in results}
        ui.info(f"{cfg.setting}/{cfg.variant}: {json.dumps(summary)}")
    return dump_path


def _check_config(cfg: Config) -> None:
    """Reject unknown variants, router noises and prediction types, and empty runs, before anything loads."""
    from tessera.errors import InputError
    from tessera.models.decoder import parse_variant
    from tessera.models.routers import ROUTER_NOISES

    try:
        parse_variant(cfg.variant)
    except ValueError as e:
        raise InputError(f"{e}; pass variant=NAME") from None
    if cfg.router_noise not in ROUTER_NOISES:
        raise InputError(f"unknown router_noise {cfg.router_noise!r}; pass router_noise=none or router_noise=gumbel")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise InputError("steps and batch_size must be >= 1")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise InputError(f"ema_decay must be in [0, 1) (0 = no weight average), got {cfg.ema_decay}")
    from tessera.models.diffusion import PREDICTION_TYPES

    if cfg.prediction_type not in PREDICTION_TYPES:
        raise InputError(f"unknown prediction_type {cfg.prediction_type!r}; pass one of {', '.join(PREDICTION_TYPES)}")


def _build_model(cfg: Config, info, train_data):
    """``(model config, wrapped model, unwrapped MixedModalLM, AdamW)``; weight decay on matrices, not embeddings."""
    import torch

    from tessera.models.objectives import MixedModalLM
    from tessera.train import unwrap, wrap_model

    mcfg = model_config(cfg, train_data.vocab.size, train_data.patch_dim, train_data.image_len)
    lm = MixedModalLM(mcfg, cfg.setting, diffusion_lambda=cfg.diffusion_lambda, aux_coef=cfg.aux_coef,
                      lb_coef=cfg.lb_coef, prediction_type=cfg.prediction_type,
                      snr_gamma=cfg.snr_gamma, understanding_max_t=cfg.understanding_max_t,
                      understanding_diffusion=cfg.understanding_diffusion).to(info.device)
    # wrapped before the optimizer is built: FSDP2 replaces the parameters (DTensors) in place
    model = wrap_model(lm, info, cfg.distributed, blocks=list(lm.model.layers))
    core = unwrap(model)
    decay = [p for n, p in core.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in core.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    # the fused kernel (one pass over all parameters; 3x the single-tensor loop's speed at d64 on CPU) where every
    # parameter is a plain tensor; FSDP2's DTensors take the default implementation
    fused = all(type(p.data) is torch.Tensor for p in core.parameters())
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)
    return mcfg, model, core, opt


def _resume(cfg: Config, info, model, opt, dump_path: Path, ema=None):
    """The loop state of the latest checkpoint (loaded into ``model``, ``opt`` and the weight average ``ema``),
    or a fresh one."""
    from tessera import ui
    from tessera.models.scoring import drop_metrics_after
    from tessera.train import LoopState, load_checkpoint
    from tessera.train.checkpoint import resolve_checkpoint

    state = LoopState()
    found = resolve_checkpoint(dump_path / "checkpoint") if cfg.resume else None
    if found is not None:
        state, _ = load_checkpoint(found, model, opt, averaged=ema)  # keeps this run's AdamW implementation flags
        if info.is_main:  # drop metric rows logged after the checkpoint
            drop_metrics_after(dump_path / "metrics.jsonl", state.step)
        ui.info(f"resumed from {found} at step {state.step}")
    elif info.is_main:
        (dump_path / "metrics.jsonl").unlink(missing_ok=True)
    return state


def _train(cfg: Config, info, mcfg, model, core, opt, state, train_data, train_idx, val_batches, routings, dump,
           ckpt: Path, ema=None):
    """The training loop of :mod:`tessera.train` with analytic FLOPs per batch, train/eval rows in
    ``metrics.jsonl`` (eval under every routing, of the weight average ``ema`` where there is one) and
    checkpoints; returns the final loop state."""
    import numpy as np

    from tessera import ui
    from tessera.models.flops import batch_train_flops
    from tessera.models.scoring import mean_val_losses
    from tessera.train import LoopState, cosine_lr, save_checkpoint, train_loop

    def get_batch(step: int) -> dict:
        return train_data.batch(cfg.batch_size, np.random.default_rng([cfg.seed, info.rank, step]), train_idx)

    targets = {k: v for k, v in (("val_text_loss", cfg.stop_text_loss), ("val_image_loss", cfg.stop_image_loss),
                                 ("val_model_loss", cfg.stop_model_loss)) if v > 0}

    def run_eval(step: int) -> bool:
        """Evaluate under every routing; ``True`` when the batch routing reached every stop target."""
        reached = False
        for r in routings:
            row = mean_val_losses(judged, val_batches, info.device, cfg.seed, routing=r)
            if dump:
                dump.log(kind="eval", step=step, flops=state.flops, tokens=state.tokens, routing=r, **row)
            if r == "batch" and targets:
                reached = all(row[k] <= v for k, v in targets.items())
        return reached

    bar = ui.progress()
    task = bar.add_task(f"{cfg.setting}/{cfg.variant}", total=cfg.steps, completed=state.step)

    judged = ema.module if ema is not None else core

    def on_step(st: LoopState, logs: dict, dt: float) -> bool:
        bar.update(task, completed=st.step)
        if ema is not None:
            ema.update_parameters(core)
        if dump and (st.step % cfg.log_every == 0 or st.step in (1, cfg.steps)):
            dump.log(kind="train", step=st.step, flops=st.flops, tokens=st.tokens, step_s=round(dt, 4),
                     lr=opt.param_groups[0]["lr"], **{k: round(v, 5) for k, v in logs.items()})
        stop = (st.step % cfg.eval_every == 0 or st.step == cfg.steps) and run_eval(st.step) and st.step < cfg.steps
        if stop or st.step % cfg.ckpt_every == 0 or st.step == cfg.steps:
            save_checkpoint(ckpt, model, opt, st, {"model_config": mcfg.to_dict()}, info.is_main, averaged=ema)
        return stop

    if state.step == 0:
        run_eval(0)
    with bar:
        state = train_loop(model, opt, get_batch, cfg.steps, state, info,
                           flops_fn=lambda b: batch_train_flops(mcfg, b["modality"], cfg.setting),
                           lr_fn=lambda s: cosine_lr(s, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio),
                           grad_clip=cfg.grad_clip, on_step=on_step)
    return state


def _run_summary(cfg: Config, info, mcfg, core, state, train_data, val_batches, routings, data_info: dict,
                 clf_acc: float) -> dict:
    """The run's figures: data, parameters, training FLOPs per token and in all, step time, validation
    losses under every routing."""
    import numpy as np

    from tessera.models.flops import forward_flops_per_token
    from tessera.models.modality import IMAGE, TEXT
    from tessera.models.scoring import mean_val_losses

    results: dict = {"setting": cfg.setting, "variant": cfg.variant, "data": data_info, "params": core.model.num_params(),
                     "model_config": mcfg.to_dict(), "classifier_val_accuracy": round(clf_acc, 4),
                     "train_flops_per_token": {m: 3 * forward_flops_per_token(mcfg, train_data.seq_len, i, cfg.setting)
                                               for m, i in (("text", TEXT), ("image", IMAGE))},
                     "steps": state.step, "stopped_at_match": state.step < cfg.steps, "train_flops": state.flops, "train_tokens": state.tokens,
                     "world_size": info.world_size}
    times = state.step_times[5:] or state.step_times
    results["median_step_s"] = float(np.median(times)) if times else None
    results["val"] = {r: mean_val_losses(core, val_batches, info.device, cfg.seed, routing=r) for r in routings}
    return results


def _generation_and_captioning(cfg: Config, core, val_data, val_idx, clf, codes_to_images, routings,
                               samples_dir: Path | None) -> dict:
    """Image-from-caption accuracy (judged by ``clf``) and captioning accuracy under every routing; the
    samples of the causal routing go to ``samples_dir / samples.png`` (rank 0 passes the dump dir)."""
    from tessera.models.sampling import captioning_accuracy, generation_accuracy
    from tessera.models.scoring import save_samples_png

    gen_routing = "aux" if "aux" in routings else "batch"
    out: dict = {"generation": {}, "captioning": {}}
    for r in routings:
        acc, imgs, labs = generation_accuracy(core, val_data, clf, cfg.sample_per_class, r, cfg.seed,
                                              cfg.sample_steps, codes_to_images,
                                              guidance_scale=cfg.guidance_scale if cfg.setting == "transfusion" else 1.0)
        out["generation"][r] = round(acc, 4)
        cap_acc, rows = captioning_accuracy(core, val_data, val_idx[:cfg.n_caption_eval], r)
        out["captioning"][r] = round(cap_acc, 4)
        out.setdefault("caption_examples", {})[r] = rows[:5]
        if samples_dir is not None and r == gen_routing:
            save_samples_png(imgs, labs, samples_dir / "samples.png",
                             f"{cfg.setting}/{cfg.variant} routing={r} classifier accuracy {acc:.2f}")
    out["generation_routing_causal"] = gen_routing
    return out


__all__ = ["Config", "main"]
