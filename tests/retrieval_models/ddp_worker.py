"""Worker for the two-process DDP test: ``torchrun --nproc_per_node 2 ddp_worker.py MODEL_DIR OUT_DIR``.

Trains a tiny retriever for a few steps with negatives gathered across ranks and
records, per rank, how many candidate documents each query was scored against and
a checksum of the weights (DDP keeps the ranks' weights equal).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from retrieval_synthetic import synthetic_task  # noqa: E402

from tessera.retrieval import train as T  # noqa: E402
from tessera.retrieval.encoder import build_retriever  # noqa: E402


def main(model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    rows, _ = synthetic_task(n_train=32, n_test=4)
    model = build_retriever(model_dir, max_seq_length=32, device="cpu")
    ds, prompts = T.build_datasets(T.examples_from_rows(rows, 1), "reasonir")
    loss = T.make_loss(model, gather_across_devices=True)
    shapes = []
    inner = loss.similarity_fct

    def recording(a, b):
        shapes.append([int(a.shape[0]), int(b.shape[0])])
        return inner(a, b)

    loss.similarity_fct = recording
    stats = T.train_retriever(model, ds, prompts, loss, Path(out_dir) / f"scratch{os.environ['RANK']}", steps=3,
                              batch_size=4, lr=1e-3, logging_steps=1, quiet=True)
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world, "shapes": shapes, "checksum": checksum, "steps": stats["steps"]}))
    if dist.is_initialized():  # a clean shutdown: without it gloo's threads can abort the exit (SIGABRT)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
