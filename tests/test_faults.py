"""Fault tests: kill -9 mid-training and resume, a checkpoint write killed half-way, corrupt/missing/truncated inputs
for every loader, and checkpoints that never execute code.

Already covered elsewhere (not repeated here):
- resume equality in-process via `max_steps`, the NaN-loss guard, papermill bad parameters: tests/test_train.py
- a non-image file passed to `encode_images`, a `.pt` pickle refused by `load_state_dict`, garbage bytes named
  `.safetensors`, NaN tensors refused by `save_checkpoint`: tests/test_core.py
- idx files (truncated gzip, not gzip, truncated payload, bad magic, wrong shape/rank, count mismatch, missing files):
  tests/test_world.py; a corrupt world cache: tests/test_world.py::test_cache_round_trip_and_corruption
- ViSU/NSFWCaps bad rows (missing / corrupt images, empty captions, duplicate ids; error and skip policies with
  reports): tests/test_paperdata.py
- NaN/inf weights refused on load, pickles renamed `.safetensors`, 16-bit greyscale images, non-UTF-8 / truncated
  JSON, JSON-lines and CSV files: tests/test_core.py; the same through the ViSU / NSFWCaps loaders, non-integral
  `coco_id`s and records that are not objects: tests/test_paperdata.py
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import saferclip.train as T
from saferclip.core import TINY_ARCH, encode_images, load_clip, load_state_dict, read_meta, save_checkpoint
from saferclip.data import image_batch

HERE = Path(__file__).resolve().parent
CHILD = HERE / "fault_child.py"


# --------------------------------------------------------------------------------------------------- helpers
def _child(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start tests/fault_child.py with this interpreter (single-threaded, quiet)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(CHILD), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 150.0) -> None:
    """Block until `marker` exists (the child reached its planned point); fail if the child exits first."""
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child exited (rc {proc.returncode}) before reaching {marker.name}:\n{out}\n{err[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"child did not reach {marker.name} within {timeout}s")
        time.sleep(0.05)


def _kill9(proc: subprocess.Popen) -> None:
    """SIGKILL: no finally blocks, no atexit handlers, no flushing."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _run_to_end(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"child failed (rc {proc.returncode}):\n{out}\n{err[-3000:]}"
    assert "DONE" in out


def _state_progress(path: Path) -> dict:
    """The progress record inside a training state file."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["saferclip_state"])["progress"]


# --------------------------------------------------------------------------------- kill -9 mid-epoch, resume
def test_kill9_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    # 48 rows, batch 8, saferclip curriculum: epochs of 2, 4 and 6 optimizer steps (12 in all); a resumable state
    # every 3 steps. The killed run blocks inside the forward pass of step 11 (epoch 3, batch 5), so the state on
    # disk is the one after step 9 and step 10's finished work is lost and must be recomputed identically.
    common = dict(pretrained=None, method="saferclip", epochs=3, batch_size=8, lr=1e-3, lora_rank=4, lora_alpha=4.0,
                  lora_dropout=0.1, save_every=3, patience=0, progress=False, device="cpu",
                  cache_dir=str(tmp_path / "cache"))
    full_cfg = dict(common, out_dir=str(tmp_path / "full"))
    cut_cfg = dict(common, out_dir=str(tmp_path / "cut"), cache_dir=str(tmp_path / "cache_cut"))
    full = _child(["train", json.dumps(full_cfg)], tmp_path)          # the two runs share the two cores
    proc = _child(["train", json.dumps(cut_cfg), "11"], tmp_path)
    _wait_for(tmp_path / "cut" / "HANGING", proc)
    _kill9(proc)
    _run_to_end(full)
    cut = tmp_path / "cut"
    prog = _state_progress(cut / "state.safetensors")
    assert prog["global_step"] == 9 and prog["epoch"] == 2 and 0 < prog["batch"] < 6, prog  # mid-epoch 3
    assert [r["epoch"] for r in T.read_jsonl(cut / "epochs.jsonl")] == [0, 1, 2]

    resumed = dict(cut_cfg, resume=True)
    _run_to_end(_child(["train", json.dumps(resumed)], tmp_path))
    for name in ("last.safetensors", "final.safetensors"):
        a, b = load_state_dict(tmp_path / "full" / name), load_state_dict(cut / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after kill -9 + resume"
    steps_full = T.read_jsonl(tmp_path / "full" / "steps.jsonl")
    steps_cut = T.read_jsonl(cut / "steps.jsonl")
    assert [s["step"] for s in steps_cut] == list(range(1, 13))  # no step lost, none logged twice
    assert [s["loss"] for s in steps_cut] == [s["loss"] for s in steps_full]
    ep_full, ep_cut = T.read_jsonl(tmp_path / "full" / "epochs.jsonl"), T.read_jsonl(cut / "epochs.jsonl")
    assert [e["val_rsum"] for e in ep_cut] == [e["val_rsum"] for e in ep_full]


# ------------------------------------------------------------------------- a checkpoint write killed half-way
@pytest.fixture(scope="module")
def killed_write(tmp_path_factory):
    """A folder where checkpoint v1 was written, then the process was SIGKILLed half-way through writing v2."""
    d = tmp_path_factory.mktemp("killed_write")
    proc = _child(["ckpt", str(d)], d)
    _wait_for(d / "HANGING", proc, timeout=90)
    _kill9(proc)
    return d


def test_kill9_during_checkpoint_write_keeps_previous_weights(killed_write):
    path = killed_write / "model.safetensors"
    sd = load_state_dict(path)  # the previous, complete checkpoint
    assert torch.equal(sd["w"], torch.ones(4096)) and torch.equal(sd["b"], torch.zeros(3))
    # the half-written payload exists only under a hidden temp name that no loader looks for
    leftovers = [f.name for f in killed_write.iterdir()
                 if f.name not in ("model.safetensors", "model.safetensors.json", "HANGING")]
    assert leftovers and all(n.startswith(".model.safetensors.") and n.endswith(".tmp") for n in leftovers), leftovers
    assert sorted(p.name for p in killed_write.glob("*.safetensors")) == ["model.safetensors"]


def test_kill9_during_checkpoint_write_keeps_previous_sidecar(killed_write):
    assert read_meta(killed_write / "model.safetensors")["version"] == 1


def test_training_state_write_failing_midway_keeps_previous_state(tmp_path, monkeypatch, tiny_clip):
    import safetensors.torch as st
    model = T.build_trainable(tiny_clip[0], T.TrainConfig(pretrained=None, lora_rank=2, lora_alpha=2.0))
    opt = torch.optim.AdamW(T.trainable_parameters(model).values(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = tmp_path / "state.safetensors"
    T.save_state(path, model, opt, sched, {"epoch": 0, "batch": 1, "global_step": 1})
    before = path.read_bytes()
    real = st.save_file

    def dies_midway(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 3])
        raise OSError("No space left on device (simulated)")
    monkeypatch.setattr(st, "save_file", dies_midway)
    with pytest.raises(OSError, match="simulated"):
        T.save_state(path, model, opt, sched, {"epoch": 0, "batch": 2, "global_step": 2})
    assert path.read_bytes() == before
    assert _state_progress(path)["global_step"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["state.safetensors"]  # temp file cleaned up


# ---------------------------------------------------------------------------------- corrupt / missing images
def _png(path: Path, colour=(10, 200, 30)) -> Path:
    from PIL import Image
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def _jpeg(path: Path) -> Path:
    from PIL import Image
    import numpy as np
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    return path


@pytest.mark.parametrize("kind", ["missing", "truncated-jpeg", "truncated-png", "empty"])
def test_bad_image_files_named(tmp_path, tiny_clip, kind):
    model, pre, _ = tiny_clip
    good = _png(tmp_path / "good.png")
    if kind == "missing":
        bad = tmp_path / "missing.jpg"
    elif kind == "truncated-jpeg":
        j = _jpeg(tmp_path / "full.jpg").read_bytes()
        bad = tmp_path / "cut.jpg"
        bad.write_bytes(j[: len(j) // 2])
    elif kind == "truncated-png":
        p = _png(tmp_path / "full.png").read_bytes()
        bad = tmp_path / "cut.png"
        bad.write_bytes(p[: len(p) // 2])
    else:
        bad = tmp_path / "empty.png"
        bad.write_bytes(b"")
    with pytest.raises(ValueError, match=bad.name):
        encode_images(model, [good, bad], preprocess=pre)
    with pytest.raises(ValueError, match=bad.name):  # the trainer's image path (Quadruplets of files)
        image_batch([good, bad], [0, 1], preprocess=pre)


def test_bad_image_in_file_dataset_named(tmp_path, tiny_clip):
    pytest.importorskip("datasets")
    from saferclip.data import Quadruplets
    from saferclip.paperdata import QuadrupletImages
    _, pre, _ = tiny_clip
    good = _png(tmp_path / "good.png")
    j = _jpeg(tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(j[:200])
    q = Quadruplets(["a"], ["safe"], ["unsafe"], [good], [tmp_path / "cut.jpg"], ["x"])
    with pytest.raises(ValueError, match="cut.jpg"):
        QuadrupletImages(q, pre)[0]


# ------------------------------------------------------------------------------ corrupt / truncated manifests
def test_truncated_visu_manifests_named(tmp_path):
    pytest.importorskip("datasets")
    from saferclip.paperdata import load_visu
    rec = {"coco_id": 9, "safe": "a shelf", "nsfw": "a shelf with a knife", "tag": "x", "nsfw_im_path": "train/0.jpg"}
    man = tmp_path / "json_root" / "manifests" / "train" / "visu_train.json"
    man.parent.mkdir(parents=True)
    text = json.dumps({"0": rec, "1": rec})
    man.write_text(text[: len(text) // 2])  # cut mid-record
    with pytest.raises(ValueError, match="visu_train.json.*not valid JSON"):
        load_visu(tmp_path / "json_root", "train")
    jl = tmp_path / "jsonl_root" / "manifests" / "train" / "visu_train.jsonl"
    jl.parent.mkdir(parents=True)
    line = json.dumps(rec)
    jl.write_text(line + "\n" + line[:25] + "\n")  # the last line was cut by an interrupted copy
    with pytest.raises(ValueError, match="visu_train.jsonl: line 2 is not valid JSON"):
        load_visu(tmp_path / "jsonl_root", "train")
    empty = tmp_path / "empty_root" / "manifests" / "train" / "visu_train.json"
    empty.parent.mkdir(parents=True)
    empty.write_text("")
    with pytest.raises(ValueError, match="visu_train.json"):
        load_visu(tmp_path / "empty_root", "train")


def test_truncated_nsfwcaps_sources_named(tmp_path):
    pytest.importorskip("datasets")
    from saferclip.paperdata import load_nsfwcaps
    fix = HERE / "fixtures" / "nsfwcaps"
    lines = (fix / "manifest.jsonl").read_text().splitlines()
    cut = tmp_path / "manifest.jsonl"
    cut.write_text("\n".join(lines[:-1] + [lines[-1][: len(lines[-1]) // 2]]) + "\n")
    with pytest.raises(ValueError, match="manifest.jsonl"):
        load_nsfwcaps(cut, image_root=fix / "images", progress=False)
    pq = (fix / "hf" / "train-00000-of-00001.parquet").read_bytes()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "train-00000-of-00001.parquet").write_bytes(pq[: len(pq) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*train-00000-of-00001\.parquet as parquet: Parquet magic bytes "
                                         r"not found in footer"):
        load_nsfwcaps(hf, image_root=fix / "images", progress=False)


# ------------------------------------------------------------------------------------ corrupt checkpoints
@pytest.fixture
def good_ckpt(tmp_path, tiny_clip):
    return save_checkpoint(tiny_clip[0].state_dict(), tmp_path / "good.safetensors", {"arch": TINY_ARCH})


def test_truncated_safetensors_named_by_every_loader(tmp_path, good_ckpt):
    data = good_ckpt.read_bytes()
    for cut in (7, len(data) // 2, len(data) - 1):  # inside the header length, the header, the last tensor
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=bad.name):
            load_state_dict(bad)
        with pytest.raises(ValueError, match=bad.name):
            load_clip(TINY_ARCH, bad)


def test_corrupt_sidecar_named(tmp_path, good_ckpt):
    # the header's metadata wins; a sidecar is only read for files written without it (e.g. by other tools)
    side = good_ckpt.with_name(good_ckpt.name + ".json")
    side.write_text(side.read_text()[:10])
    assert read_meta(good_ckpt)["arch"]
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    plain.with_name(plain.name + ".json").write_text('{"arch": ')
    with pytest.raises(ValueError, match="plain.safetensors.json"):
        read_meta(plain)


def test_missing_checkpoint_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")


def test_truncated_training_state_named_on_resume(tmp_path, tiny_clip):
    model = T.build_trainable(tiny_clip[0], T.TrainConfig(pretrained=None, lora_rank=2, lora_alpha=2.0))
    opt = torch.optim.AdamW(T.trainable_parameters(model).values(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = T.save_state(tmp_path / "state.safetensors", model, opt, sched, {"epoch": 0, "batch": 1, "global_step": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="state.safetensors"):
        T.load_state(path, model, opt, sched)


# ------------------------------------------------------------------ loading a checkpoint never executes code
class _Payload:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _evil_files(tmp_path: Path, marker: Path) -> list[Path]:
    raw = pickle.dumps({"visual.conv1.weight": _Payload(marker)})
    files = []
    for name in ("evil.pt", "evil.pth", "evil.bin", "evil.ckpt", "evil.pkl", "evil.safetensors", "evil"):
        p = tmp_path / name
        p.write_bytes(raw)
        files.append(p)
    z = tmp_path / "evil_zip.safetensors"  # torch.save's zip container carrying the payload, renamed
    torch.save({"w": _Payload(marker)}, z)
    return files + [z]


def test_payload_is_live(tmp_path):
    # guards the tests below: the payload really does run code when unpickled
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("loader", ["load_state_dict", "load_clip", "load_state"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tiny_clip, loader):
    marker = tmp_path / "PWNED"
    files = _evil_files(tmp_path, marker)
    if loader == "load_state":
        model = T.build_trainable(tiny_clip[0], T.TrainConfig(pretrained=None, lora_rank=2, lora_alpha=2.0))
        opt = torch.optim.AdamW(T.trainable_parameters(model).values(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for f in files:
        if loader == "load_state":  # the trainer's resume path: refused as an unreadable training state
            expected = rf"cannot resume from .*{f.name}: not a readable training state"
        elif f.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):  # refused by name, before the file is opened
            expected = rf"{f.name} is a pickle-based checkpoint \({f.suffix}\); saferclip loads only \.safetensors"
        else:  # evil.safetensors, evil, evil_zip.safetensors: recognised by their first bytes
            expected = rf"{f.name} looks like a pickle/torch file, not safetensors: its first bytes are those of a " \
                       rf"{'zip archive' if 'zip' in f.name else 'pickle'}"
        with pytest.raises(ValueError, match=expected):
            if loader == "load_state_dict":
                load_state_dict(f)
            elif loader == "load_clip":
                load_clip(TINY_ARCH, f)
            else:
                T.load_state(f, model, opt, sched)
        assert not marker.exists(), f"loading {f.name} with {loader} executed code"
