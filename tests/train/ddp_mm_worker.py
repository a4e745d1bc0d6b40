"""Worker for the two-process gloo DDP test: ``torchrun --nproc_per_node 2 ddp_mm_worker.py OUT_DIR``.

Each rank builds the same tiny MoMa model, trains one SGD step on its own batch through
:func:`tessera.train.train_loop` under DDP, and writes its parameters' checksum; rank 0 also
computes the single-process reference (mean of the two ranks' losses, one SGD step) and the max
difference from the DDP result.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from mm_helpers import tiny_data, tiny_lm  # noqa: E402

from tessera.train import LoopState, init_distributed, train_loop, unwrap, wrap_model  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    data = tiny_data("chameleon")

    def batch_for(rank: int) -> dict:
        return data.batch(4, np.random.default_rng([7, rank]))

    lm = tiny_lm("chameleon", "moma", data, seed=0)
    reference = tiny_lm("chameleon", "moma", data, seed=0)
    model = wrap_model(lm, info, "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state = train_loop(model, opt, lambda step: batch_for(info.rank), 1, LoopState(), info, grad_clip=0.0,
                       flops_fn=lambda b: 1.0)
    params = torch.cat([p.detach().reshape(-1) for p in unwrap(model).parameters()])
    row = {"rank": info.rank, "world": info.world_size, "checksum": float(params.double().sum()), "flops": state.flops}
    if info.rank == 0:
        ropt = torch.optim.SGD(reference.parameters(), lr=0.5)
        loss = (reference(batch_for(0))["loss"] + reference(batch_for(1))["loss"]) / 2
        loss.backward()
        ropt.step()
        ref = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
        row["max_diff_vs_reference"] = float((ref - params).abs().max())
        row["moved"] = float((ref - torch.cat([p.detach().reshape(-1) for p in tiny_lm("chameleon", "moma", data, seed=0).parameters()])).abs().max())
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(row))
    if dist.is_initialized():  # a clean shutdown: without it gloo's threads can abort the exit (SIGABRT)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
