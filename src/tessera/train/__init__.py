"""One short, explicit training loop for tessera's own nn.Modules (torch.distributed aware)."""

from tessera.train.loop import (DistInfo, LoopState, cosine_lr, init_distributed, load_checkpoint, save_checkpoint,
                                train_loop, unwrap, wrap_model)

__all__ = ["DistInfo", "LoopState", "cosine_lr", "init_distributed", "load_checkpoint", "save_checkpoint",
           "train_loop", "unwrap", "wrap_model"]
