"""Child process for tests/test_faults.py: a training run or a checkpoint write that the test kills with SIGKILL.

Usage (the test starts it with the repository's Python):
  python tests/fault_child.py train CONFIG_JSON [HANG_AT_STEP]
      Fine-tune on tiny random quadruplets (`saferclip.train.train`, real code path; only the data source is
      replaced). With HANG_AT_STEP = k, the k-th loss evaluation (the forward pass of optimizer step k) writes
      `<out_dir>/HANGING` and blocks, so the parent can kill the run mid-epoch at a known point.
  python tests/fault_child.py ckpt DIR
      Write checkpoint v1 (`saferclip.core.save_checkpoint`), then start writing v2 and block half-way through the
      safetensors payload after writing `DIR/HANGING`: the parent kills the process during the write.
"""
import json
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # deterministic and cheap: the parent compares runs bit for bit


def make_quadruplets(n: int, seed: int, name: str):
    """n random rows with distinct captions: the same recipe as the test suite (tests/conftest.py)."""
    from conftest import make_quadruplets as recipe  # tests/ is on sys.path: this script lives there
    return recipe(n=n, seed=seed, name=name)


def hang(marker: Path) -> None:
    """Announce that we are blocked at the planned point, then wait to be killed."""
    marker.write_text("hanging\n")
    while True:
        time.sleep(0.05)


def run_train(cfg_json: str, hang_at: int | None) -> None:
    import saferclip.train as T
    params = json.loads(cfg_json)
    train_q, val_q = make_quadruplets(48, 1, "train"), make_quadruplets(16, 2, "val")
    T.load_training_data = lambda cfg: (train_q, val_q, {"source": "toy", "skipped": 0})
    if hang_at is not None:
        real = T.loss_for_method

        def hanging(method, weights=None):
            fn, calls = real(method, weights), {"n": 0}

            def loss(emb):
                calls["n"] += 1
                if calls["n"] == hang_at:
                    hang(Path(params["out_dir"]) / "HANGING")
                return fn(emb)
            return loss
        T.loss_for_method = hanging
    out = T.train(T.TrainConfig(**params))
    print(f"DONE {out}", flush=True)


def run_ckpt(folder: str) -> None:
    import safetensors.torch as st
    from saferclip.core import save_checkpoint
    d = Path(folder)
    save_checkpoint({"w": torch.ones(4096), "b": torch.zeros(3)}, d / "model.safetensors", {"version": 1})
    real = st.save_file

    def half_write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)    # serialise for real, then leave only half on disk
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        hang(d / "HANGING")
    st.save_file = half_write
    save_checkpoint({"w": torch.full((4096,), 2.0), "b": torch.ones(3)}, d / "model.safetensors", {"version": 2})


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        run_train(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
    elif mode == "ckpt":
        run_ckpt(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected 'train' or 'ckpt'")
