"""Tests for saferclip.base: the shipped world base (loadable by stock open_clip, same embeddings through PIL
preprocessing as through the package's own path, its metadata complete, its premise report stored), resolution of
`pretrained="world-base"`, and clear errors for a missing or corrupt shipped file."""
import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import saferclip  # noqa: F401  registers saferclip-tiny with open_clip
from saferclip.base import (SHIPPED_BASE, TESTBED_TARGETS, PretrainBatches, base_checkpoint, premise_rows,
                            shipped_base, write_testbed)
from saferclip.core import TINY_ARCH, encode_images, load_state_dict, read_meta
from saferclip.train import TrainConfig, resolve_pretrained
from saferclip.world import WorldConfig


def test_shipped_base_is_resolved_and_tracked():
    path = resolve_pretrained(TrainConfig())
    assert path == str(SHIPPED_BASE) == str(shipped_base())
    assert base_checkpoint() == SHIPPED_BASE                      # the default pair never pretrains
    meta = read_meta(path)
    assert meta["arch"] == TINY_ARCH and meta["world_key"] == WorldConfig().key()
    for k in ("pretrain_config", "data_hash", "train_seconds", "metrics", "losses", "world_config"):
        assert k in meta, k
    assert set(k for k, *_ in TESTBED_TARGETS) <= set(meta["metrics"])
    sd = load_state_dict(path)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    assert SHIPPED_BASE.stat().st_size < 30 * 2 ** 20


def test_stock_open_clip_loads_it_and_pil_preprocessing_matches():
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(SHIPPED_BASE))
    model.eval()
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 256, (4, 3, 64, 64), dtype=np.uint8))
    ours = encode_images(model, imgs)
    pil = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in imgs])
    with torch.no_grad():
        stock = torch.nn.functional.normalize(model.encode_image(pil), dim=-1)
    assert torch.allclose(ours, stock, atol=1e-5), (ours - stock).abs().max()
    sd = load_state_dict(SHIPPED_BASE)
    assert torch.equal(model.token_embedding.weight, sd["token_embedding.weight"].float())


def test_missing_or_corrupt_shipped_base_names_file_and_make_base(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"world-base.*make base"):
        shipped_base(tmp_path / "world-base.safetensors")
    bad = tmp_path / "world-base.safetensors"
    bad.write_bytes(b"\x80\x02junk" * 10)
    with pytest.raises(ValueError, match=r"world-base.safetensors.*make base"):
        shipped_base(bad)
    other = tmp_path / "other.safetensors"
    shutil.copyfile(SHIPPED_BASE, other)  # a copy elsewhere is still a valid base (the header carries the metadata)
    assert shipped_base(other) == other


def test_resolve_refuses_a_base_from_another_world(monkeypatch):
    import saferclip.world as w
    monkeypatch.setattr(w, "WORLD_VERSION", w.WORLD_VERSION + 100)
    with pytest.raises(ValueError, match="make base"):
        resolve_pretrained(TrainConfig())


def test_family_batches_are_whole_families():
    groups = torch.tensor([g for g in range(10) for _ in range(4)] + [-1] * 24)
    b = PretrainBatches(len(groups), groups, 16, hard_frac=1.0, seed=1)
    for _ in range(5):
        idx, hard = b.next()
        assert hard and len(idx) == 16
        fam = groups[torch.from_numpy(idx)].view(4, 4)
        assert (fam == fam[:, :1]).all() and len(torch.unique(fam[:, 0])) == 4
    b0 = PretrainBatches(len(groups), groups, 16, hard_frac=0.0, seed=1)
    assert not any(b0.next()[1] for _ in range(5))


def test_testbed_files_from_the_shipped_report(tmp_path):
    meta = read_meta(SHIPPED_BASE)
    md, csv = write_testbed(meta["metrics"], tmp_path, meta)
    text = md.read_text()
    assert "targets met" in text and meta["world_key"] in text
    rows = premise_rows(meta["metrics"])
    assert len(csv.read_text().strip().splitlines()) == len(rows) + 1
    assert all(r["property"] in text for r in rows)


def test_stored_report_is_what_the_shipped_weights_measure():
    """The premise numbers in the sidecar (and results/testbed.md) are re-measured from the shipped bytes."""
    from saferclip.base import premise_report
    from saferclip.core import load_clip
    from saferclip.world import build_world
    world = build_world(WorldConfig())
    model, _, tok = load_clip(TINY_ARCH, SHIPPED_BASE)
    got, stored = premise_report(model, tok, world), read_meta(SHIPPED_BASE)["metrics"]
    # CPU float sums depend on the thread count, so a tie in a top-1 may flip: allow a few items in 1,000
    bad = {k: (got[k], v) for k, v in stored.items() if abs(got[k] - v) > 0.005 * max(1.0, abs(v))}
    assert not bad, bad


def test_pretraining_is_deterministic_for_a_fixed_recipe(tmp_path):
    """`make base` can only reproduce the shipped report if a recipe run is a pure function of (world, recipe)."""
    from saferclip.base import PretrainConfig, pretrain_base
    from saferclip.world import build_world
    w = build_world(WorldConfig.small(n_pretrain_families=20, n_pretrain_scenes=40, n_pretrain_plain=40,
                                      n_pretrain_plain_unsafe=10), cache_dir=tmp_path)
    cfg = PretrainConfig(steps=3, batch_size=16, warmup=1, threads=1)
    runs = [pretrain_base(w, cfg, progress=False) for _ in range(2)]
    (m1, l1), (m2, l2) = runs
    assert l1["losses"] == l2["losses"] and l1["family_batch"] == l2["family_batch"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    m3, _ = pretrain_base(w, PretrainConfig(steps=3, batch_size=16, warmup=1, threads=1, seed=1), progress=False)
    assert not torch.equal(m1.visual.conv1.weight, m3.visual.conv1.weight)
