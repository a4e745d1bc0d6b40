"""Worker for the two-process gloo FSDP2 test: ``torchrun --nproc_per_node 2 fsdp_resume_worker.py OUT_DIR``.

Each rank wraps the same tiny Transfusion MoMa model with FSDP2 (``fully_shard`` on every block, then the root,
on CPU), trains 2 AdamW steps, saves a checkpoint (gathered full state, rank 0 writes), trains 2
more steps; then a fresh FSDP model loads the checkpoint and trains the same 2 steps.  Rank 0
writes the largest difference between the two runs' final parameters and which files exist.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from mm_helpers import tiny_data, tiny_lm  # noqa: E402

from tessera.train import LoopState, init_distributed, load_checkpoint, save_checkpoint, train_loop, wrap_model  # noqa: E402


def full_params(model) -> torch.Tensor:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return torch.cat([sd[k].detach().reshape(-1).float() for k in sorted(sd)])


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    data = tiny_data("transfusion")
    ck = Path(out_dir) / "checkpoint"

    def get_batch(step: int) -> dict:
        return data.batch(4, np.random.default_rng([7, info.rank, step]))

    def build():
        lm = tiny_lm("transfusion", "moma", data, seed=0)
        model = wrap_model(lm, info, "fsdp", blocks=list(lm.model.layers))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, opt = build()
    torch.manual_seed(100 + info.rank)  # each rank draws its own diffusion noise: resume must restore each rank's RNG
    state = train_loop(model, opt, get_batch, 2, LoopState(), info, flops_fn=lambda b: 1.0)
    save_checkpoint(ck, model, opt, state, {"note": "fsdp"}, info.is_main)
    dist.barrier()
    state = train_loop(model, opt, get_batch, 4, state, info, flops_fn=lambda b: 1.0)
    straight = full_params(model)

    model2, opt2 = build()
    state2, extra = load_checkpoint(ck, model2, opt2)
    state2 = train_loop(model2, opt2, get_batch, 4, state2, info, flops_fn=lambda b: 1.0)
    resumed = full_params(model2)
    row = {"rank": info.rank, "max_diff": float((straight - resumed).abs().max()), "step": state2.step,
           "flops": state2.flops, "extra": extra, "files": sorted(p.name for p in ck.iterdir()),
           "sharded": type(model).__name__}
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
