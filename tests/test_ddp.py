"""saferclip.train under torchrun: 2 CPU processes (gloo) against one process, on tiny random data.

One launch of tests/ddp_child.py (module fixture) runs three trainings on every rank: a full run that patience
stops after epoch 2 of 3, a run cut by max_steps in the middle of epoch 1, and its resumption. Each epoch has
batches of 16, 16 and 1 rows: the last one has fewer rows than processes.

Tolerance of the 1-process comparison: the 2-process run computes the same global-batch loss (embeddings are
gathered), so only float summation order differs (two 8-row encoder passes instead of one 16-row pass, the
gradient all-reduce). After 6 AdamW steps we require max |w2 - w1| <= ATOL = 1e-5 and ||w2 - w1|| <= REL = 1e-4
times the training update ||w1 - w0|| (measured: 3e-7 and 6e-6). The old per-rank split (InfoNCE over each
rank's half batch, no gather) misses by 3e-3: errors in the split are of the order of the update itself.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import saferclip.train as T
from saferclip.core import load_state_dict

import ddp_child

HERE = Path(__file__).resolve().parent
ATOL = 1e-5          # max |w_2proc - w_1proc| over every weight of the merged checkpoint
REL = 1e-4           # L2 of that difference / L2 of the training update (drift from the start weights)
TIMEOUT_S = 240      # the whole launch (it takes ~30 s on 2 cores); a hung collective fails sooner (ddp_child)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """(root, reports by rank) of one `torchrun --standalone --nproc_per_node 2` launch of tests/ddp_child.py."""
    root = tmp_path_factory.mktemp("ddp") / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    # --standalone: a local rendezvous on a free port chosen by torchrun (no fixed port to collide on)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_child.py"), str(root)]
    proc = subprocess.Popen(cmd, env=env, cwd=root.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S}s (a rank hung?):\n{out[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed (rc {proc.returncode}):\n{out[-6000:]}"
    reports = {r: json.loads((root.parent / f"report-{r}.json").read_text()) for r in (0, 1)}
    return root, reports


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same full run in this process (world size 1), with the same replacements as the workers."""
    root = tmp_path_factory.mktemp("one")
    mp = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for attr, value in ddp_child.replacements(T).items():
            mp.setattr(T, attr, value)
        T.train(T.TrainConfig(**ddp_child.CONFIG, out_dir=str(root / "full"), cache_dir=str(root / "cache")))
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return root / "full"


def test_two_processes_match_one_process(ddp_run, one_process):
    root, _ = ddp_run
    update = T.read_jsonl(one_process / "epochs.jsonl")[-1]                # L2 drift of each tower at the end
    update = (update["drift_text"] ** 2 + update["drift_vision"] ** 2) ** 0.5
    for name in ("final.safetensors", "last.safetensors"):
        two, one = load_state_dict(root / "full" / name), load_state_dict(one_process / name)
        assert two.keys() == one.keys()
        keys = [k for k in one if one[k].is_floating_point()]
        diff = max(float((two[k] - one[k]).abs().max()) for k in keys)
        l2 = sum(float((two[k] - one[k]).pow(2).sum()) for k in keys) ** 0.5
        assert diff <= ATOL, f"{name}: 2 processes differ from 1 by {diff:.2e} > {ATOL}"
        assert l2 <= REL * update, f"{name}: ||w2 - w1|| = {l2:.2e} > {REL} x update {update:.2e}"
    steps2, steps1 = T.read_jsonl(root / "full" / "steps.jsonl"), T.read_jsonl(one_process / "steps.jsonl")
    assert [s["step"] for s in steps2] == [s["step"] for s in steps1] == list(range(1, 7))
    assert [s["loss"] for s in steps2] == pytest.approx([s["loss"] for s in steps1], rel=1e-5)


def test_only_rank0_writes(ddp_run):
    root, reports = ddp_run
    assert reports[1]["world"] == 2
    assert reports[1]["writes"] == [], reports[1]["writes"][:10]
    written = {Path(w.split(" ", 1)[1]).name for w in reports[0]["writes"]}   # the hook does see rank 0's writes
    assert {"state.safetensors", "final.safetensors", "config.json"} <= written
    assert sorted(p.name for p in (root / "full").iterdir() if not p.name.startswith(".")) == [
        "config.json", "drift.jsonl", "epochs.csv", "epochs.jsonl", "final.safetensors", "final.safetensors.json",
        "last.safetensors", "last.safetensors.json", "state.safetensors", "steps.jsonl"]


def test_resume_under_ddp_equals_uninterrupted(ddp_run):
    root, reports = ddp_run
    assert [len(reports[r]["runs"]["cut"]["batch_sizes"]) for r in (0, 1)] == [2, 2]  # cut after 2 steps of epoch 1
    for name in ("final.safetensors", "last.safetensors"):
        a, b = load_state_dict(root / "full" / name), load_state_dict(root / "cut" / name)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume under DDP"
    full, cut = T.read_jsonl(root / "full" / "steps.jsonl"), T.read_jsonl(root / "cut" / "steps.jsonl")
    assert [s["step"] for s in cut] == list(range(1, 7)) and [s["loss"] for s in cut] == [s["loss"] for s in full]


def test_early_stop_stops_every_rank(ddp_run):
    root, reports = ddp_run
    epochs = T.read_jsonl(root / "full" / "epochs.jsonl")
    assert [e["epoch"] for e in epochs] == [0, 1, 2]                        # 3 epochs configured, 2 run
    assert "patience" in epochs[-1]["early_stop"]
    for r in (0, 1):  # both ranks stopped after epoch 2 (6 batches) and returned: none waits in a collective
        assert len(reports[r]["runs"]["full"]["batch_sizes"]) == 6, r


def test_last_batch_smaller_than_world_is_padded(ddp_run):
    _, reports = ddp_run
    # every rank computes the loss of the whole global batch, including the 1-row last batch (rank 1's share of it
    # is one padding row, dropped after the gather) — it neither crashes on an empty slice nor drops the row
    for r in (0, 1):
        assert reports[r]["runs"]["full"]["batch_sizes"] == [16, 16, 1, 16, 16, 1], r


@pytest.mark.parametrize("n,world", [(1, 2), (5, 2), (5, 4), (16, 2), (3, 8)])
def test_rank_rows_pads_never_empty(n, world):
    batch = np.arange(100, 100 + n)
    shares = [T.rank_rows(batch, r, world) for r in range(world)]
    per = -(-n // world)
    assert all(len(own) == per for own, _ in shares)                    # same shapes on every rank, none empty
    keep = shares[0][1]
    assert all(np.array_equal(k, keep) for _, k in shares)              # every rank agrees on what to drop
    assert np.concatenate([own for own, _ in shares])[keep].tolist() == batch.tolist()  # the gather is the batch
