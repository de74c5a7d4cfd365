"""Worker of tests/test_ddp.py: real `saferclip.train.train` runs under torchrun (2 CPU processes, gloo).

Usage (the test starts it):
  python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_child.py ROOT
Each rank runs, on the same tiny random data (only the data source is replaced, and the validation score is made
flat so that patience stops the run after epoch 2 of 3):
  full  ROOT/full to the end (early stop by patience);
  cut   ROOT/cut with max_steps=2 (stops in the middle of epoch 1), then
  resume ROOT/cut again with resume=True.
An audit hook records every write a rank makes under ROOT (open for writing, rename, remove, mkdir, chmod);
each rank writes ROOT/../report-<rank>.json (outside ROOT): its writes and, per run, the batch size of every loss
it computed. tests/test_ddp.py imports CONFIG and replacements() for its one-process reference run.
"""
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

torch.set_num_threads(1)

# 33 rows in batches of 16: 16, 16 and a last batch of 1 row, fewer than the 2 processes
N_TRAIN, N_VAL = 33, 8
CONFIG = dict(pretrained=None, method="safeclip", epochs=3, batch_size=16, lr=2e-3, lora_rank=4, lora_alpha=4.0,
              select="val_loss", patience=1, save_every=1, progress=False, device="cpu", seed=0,
              precision="fp32")
DIST_TIMEOUT_S = 90  # a rank stuck in a collective fails after this, so a hang shows up as an error, not a timeout


def replacements(T, batch_sizes: list | None = None) -> dict:
    """Attributes of saferclip.train to replace: tiny data, a flat validation score, a loss that logs batch sizes."""
    from conftest import make_quadruplets  # tests/ is on sys.path: this script lives there
    train_q, val_q = make_quadruplets(N_TRAIN, seed=1, name="train"), make_quadruplets(N_VAL, seed=2, name="val")
    real_validate, real_loss = T.validate, T.loss_for_method

    def flat_validate(*args, **kwargs):
        return dict(real_validate(*args, **kwargs), val_loss=1.0)  # never improves after epoch 1

    def logged_loss(method, weights=None):
        fn = real_loss(method, weights)

        def loss(emb):
            if batch_sizes is not None:
                batch_sizes.append(emb.batch_size)
            return fn(emb)
        return loss
    return {"load_training_data": lambda cfg: (train_q, val_q, {"source": "toy", "skipped": 0}),
            "validate": flat_validate, "loss_for_method": logged_loss}


def audit_writes(root: Path, log: list) -> None:
    """Append 'event path' to `log` for every write-like operation under `root` (sys.addaudithook)."""
    root_s = str(root.resolve())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    events = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.chmod", "os.truncate", "shutil.rmtree")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and bool(flags & write_flags))
        elif event == "os.rename":                      # os.replace too: log the destination
            path, writing = args[1], True
        elif event in events:
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.abspath(os.fsdecode(path))
            if p == root_s or p.startswith(root_s + os.sep):
                log.append(f"{event} {p}")
    sys.addaudithook(hook)


def main(root: Path) -> None:
    import torch.distributed as dist
    import saferclip.train as T
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=DIST_TIMEOUT_S))
    writes, runs = [], {}
    audit_writes(root, writes)
    common = dict(CONFIG, cache_dir=str(root / "cache"))
    plan = [("full", dict(common, out_dir=str(root / "full"))),
            ("cut", dict(common, out_dir=str(root / "cut"), max_steps=2)),
            ("resume", dict(common, out_dir=str(root / "cut"), resume=True))]
    originals = {attr: getattr(T, attr) for attr in replacements(T)}
    for name, params in plan:
        sizes = []
        for attr, value in originals.items():
            setattr(T, attr, value)
        for attr, value in replacements(T, sizes).items():
            setattr(T, attr, value)
        T.train(T.TrainConfig(**params))
        runs[name] = {"batch_sizes": sizes}
    report = {"rank": rank, "world": dist.get_world_size(), "writes": writes, "runs": runs}
    (root.parent / f"report-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    print(f"DONE rank {rank}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
