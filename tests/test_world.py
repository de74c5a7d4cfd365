"""Tests for the embedded world (saferclip.render / scenes / world): idx parsing, bad input, determinism, split
disjointness, NSFWCaps alignment, ViSU-style rewrites, near-twin families and the cache. The world-building tests
need the real Fashion-MNIST files (`apt-get install -y dataset-fashion-mnist` or SAFERCLIP_DATA); without them they
are skipped with that reason rather than trying the network."""
import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from saferclip.base import recall_at_1, unsafe_top1_rate
from saferclip.render import (FASHION_CLASSES, FASHION_FILES, SETTINGS, UNSAFE_CATEGORIES, fashion_dirs, fashion_mnist,
                              read_idx, render_plain)
from saferclip.scenes import (UNSAFE_PHRASES, is_unsafe, pool_by_class, rewrite_unsafe, sample_phrasing, sample_scene,
                              scene_caption, unsafe_category)
from saferclip.world import (WORLD_VERSION, Renderer, WorldConfig, _visu_like, build_world, generate_world, item_pools,
                             world_path)

FIXTURES = Path(__file__).parent / "fixtures" / "world" / "fmnist"
TINY = dict(n_pretrain_families=30, n_pretrain_scenes=60, n_pretrain_plain=80, n_pretrain_plain_unsafe=20,
            n_visu_train=60, n_visu_val=20, n_visu_test=40, n_nsfwcaps=40, n_zeroshot_scenes=30, n_fashion_test=60,
            n_backgrounds=2, n_glyphs=2)
HAVE_FMNIST = any(all((d / f).is_file() for f in FASHION_FILES["train"] + FASHION_FILES["test"]) for d in fashion_dirs())
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST idx files not installed: "
                                  "`sudo apt-get install -y dataset-fashion-mnist` or set SAFERCLIP_DATA")


def write_idx(path, arr, code=0x08, ndim=None):
    arr = np.asarray(arr)
    nd = arr.ndim if ndim is None else ndim
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, code, nd]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes())


def fixture_copy(tmp_path):
    d = tmp_path / "fm"
    shutil.copytree(FIXTURES, d)
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST idx files not installed: `sudo apt-get install -y dataset-fashion-mnist`")
    return build_world(WorldConfig.small(**TINY), cache_dir=tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------- idx parsing and bad input
def test_fixture_idx_parsed_exactly():
    x, y = fashion_mnist("train", root=FIXTURES, download=False)
    expect = ((np.arange(20)[:, None] * 7 + np.arange(784)[None]) % 256).reshape(20, 28, 28)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, expect)
    np.testing.assert_array_equal(y, np.arange(20) % 10)
    xt, yt = fashion_mnist("test", root=FIXTURES, download=False)
    assert xt.shape == (10, 28, 28) and len(yt) == 10


def test_env_var_overrides_default(monkeypatch):
    monkeypatch.setenv("SAFERCLIP_DATA", str(FIXTURES))
    x, _ = fashion_mnist("test", download=False)
    assert x.shape == (10, 28, 28)


def test_truncated_gzip_names_file(tmp_path):
    d = fixture_copy(tmp_path)
    p = d / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*(corrupt|truncated)"):
        fashion_mnist("train", root=d, download=False)


def test_not_gzip_at_all(tmp_path):
    p = tmp_path / "junk-idx1-ubyte.gz"
    p.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="junk-idx1-ubyte.gz"):
        read_idx(p)


def test_truncated_payload(tmp_path):
    p = tmp_path / "short.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + bytes(784 * 4))  # 4 of 5 images
    with pytest.raises(ValueError, match="short.gz.*truncated"):
        read_idx(p)


def test_bad_magic(tmp_path):
    p = tmp_path / "magic.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([1, 2, 8, 1]) + struct.pack(">I", 3) + bytes(3))
    with pytest.raises(ValueError, match="magic.gz.*magic"):
        read_idx(p)


def test_wrong_item_shape(tmp_path):
    d = fixture_copy(tmp_path)
    write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((10, 27, 28)))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz.*\(27, 28\).*\(28, 28\)"):
        fashion_mnist("test", root=d, download=False)


def test_wrong_rank(tmp_path):
    d = fixture_copy(tmp_path)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros((10, 2)))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*2 dimensions"):
        fashion_mnist("test", root=d, download=False)


def test_count_mismatch_and_label_range(tmp_path):
    d = fixture_copy(tmp_path)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(9))
    with pytest.raises(ValueError, match="10 images but .* 9 labels"):
        fashion_mnist("test", root=d, download=False)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.full(10, 12))
    with pytest.raises(ValueError, match="label 12"):
        fashion_mnist("test", root=d, download=False)


def test_missing_files_explain_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist.*SAFERCLIP_DATA"):
        fashion_mnist("train", root=tmp_path / "nowhere", download=False)
    with pytest.raises(ValueError, match="'valid'"):
        fashion_mnist("valid")


def test_config_errors():
    with pytest.raises(ValueError, match="n_pretrian"):
        WorldConfig.from_dict({"n_pretrian": 3})
    with pytest.raises(ValueError, match="drift_frac"):
        WorldConfig(drift_frac=1.5)
    with pytest.raises(ValueError, match="n_visu_test"):
        WorldConfig(n_visu_test=0)


# ---------------------------------------------------------------- grammar
@needs_fmnist
def test_one_scene_many_captions():
    _, y = fashion_mnist("train")
    pool = pool_by_class(np.arange(3000), y)
    rng = np.random.default_rng(0)
    for _ in range(10):
        spec = sample_scene(rng, pool, n_bg=2, pair_frac=0.5)
        caps = {scene_caption(dict(spec, phr=sample_phrasing(rng, len(spec["items"])))) for _ in range(30)}
        assert len(caps) >= 4, caps


def test_pretrain_images_have_alternative_captions(world):
    alts = world.pretrain_captions
    assert len(alts) == len(world.pretrain)
    assert all(a[0] == c for a, c in zip(alts, world.pretrain.captions))
    assert np.mean([len(set(a)) > 1 for a in alts]) > 0.8
    assert world.pretrain.unsafe.any() and not world.pretrain.unsafe.all()


# ---------------------------------------------------------------- determinism and disjointness
def test_deterministic(world):
    again = generate_world(WorldConfig.small(**TINY))
    for a, b in [(world.pretrain.images, again.pretrain.images),
                 (world.visu["test"].unsafe_images, again.visu["test"].unsafe_images),
                 (world.nsfwcaps.safe_images, again.nsfwcaps.safe_images),
                 (world.zeroshot["setting"].images, again.zeroshot["setting"].images)]:
        assert torch.equal(a, b)
    assert world.visu["train"].unsafe_captions == again.visu["train"].unsafe_captions
    assert world.pretrain_captions == again.pretrain_captions
    other = generate_world(WorldConfig.small(**{**TINY, "seed": 1}))
    assert other.visu["train"].safe_captions != world.visu["train"].safe_captions


def test_item_pools_disjoint():
    pools = item_pools(WorldConfig())
    assert set(pools) == {"pretrain", "visu_train", "visu_val", "visu_test", "nsfwcaps", "zeroshot"}
    allidx = np.concatenate(list(pools.values()))
    assert len(np.unique(allidx)) == len(allidx) and allidx.max() < 60000


@needs_fmnist
def test_sampling_stays_in_pool():
    _, y = fashion_mnist("train")
    idx = np.arange(1000, 2000)
    pool = pool_by_class(idx, y)
    rng = np.random.default_rng(3)
    for _ in range(50):
        s = sample_scene(rng, pool, 2, 0.5)
        u = rewrite_unsafe(s, rng, pool, 0, drift=True, n_bg=2, n_glyph=2)
        for it in s["items"] + u["items"]:
            if "unsafe" not in it:  # an unsafe object has no Fashion-MNIST instance
                assert it["inst"] in idx and y[it["inst"]] == it["cls"]


def test_splits_disjoint(world):
    splits = [world.visu["train"], world.visu["val"], world.visu["test"], world.nsfwcaps]
    caps = [set(q.safe_captions) for q in splits]
    for q, c in zip(splits, caps):
        assert len(c) == len(q), f"duplicate safe captions in {q.name}"
    for i in range(len(caps)):
        for j in range(i + 1, len(caps)):
            assert not caps[i] & caps[j]
    ids = [i for q in splits for i in q.ids]
    assert len(set(ids)) == len(ids)


def test_fashion_test_split_is_zero_shot_only(world):
    x, y = fashion_mnist("test")
    task = world.zeroshot["fashion-mnist"]
    assert torch.equal(task.images, render_plain(x[:60])) and torch.equal(task.labels, torch.from_numpy(y[:60]))
    test_hashes = {bytes(im.numpy()) for im in render_plain(x)}
    assert not any(bytes(im.numpy()) in test_hashes for im in world.pretrain.images)
    assert {"setting", "colour", "scene-item"} <= set(world.zeroshot) and "unsafe-concept" not in world.zeroshot
    assert world.zeroshot["setting"].classnames == SETTINGS


# ---------------------------------------------------------------- ViSU-tiny and NSFWCaps-tiny
def strip_phrase(unsafe: str, tag: str) -> tuple[str, str]:
    """Remove the (longest) unsafe phrase of category `tag` from a caption."""
    found = [p for p in UNSAFE_PHRASES[tag] if f" {p}" in unsafe]
    assert found, (tag, unsafe)
    p = max(found, key=len)
    return unsafe.replace(f" {p}", "", 1), p


@needs_fmnist
def test_visu_rewrites_centre_the_unsafe_concept():
    cfg = WorldConfig.small(**TINY)
    items, labels = fashion_mnist("train")
    r = Renderer(items, 0, 2, 2)
    pool = pool_by_class(np.arange(5000), labels)
    q, safe, unsafe = _visu_like("visu-x", np.random.default_rng(0), 80, pool, r, cfg, set(), aligned=False)
    moved = sum(s["setting"] != u["setting"] for s, u in zip(safe, unsafe))
    assert moved == round(cfg.drift_frac * 80)                    # exactly drift_frac of the rows change setting
    for s, u, tag, ts in zip(safe, unsafe, q.tags, q.unsafe_captions):
        assert not is_unsafe(s) and UNSAFE_CATEGORIES[unsafe_category(u)] == tag
        assert u.get("glyph") is None                               # centred: an object or attribute, not a corner
        assert any("unsafe" in it or it.get("attr") for it in u["items"])
        assert ts == scene_caption(u)                               # the unsafe image is rendered from t*
    objects = sum(any("unsafe" in it for it in u["items"]) for u in unsafe)
    assert 0.4 < objects / 80 < 0.9                                 # attr_frac = 0.35 of rewrites are attributes
    # loosely aligned: the unsafe image is a fresh rendering
    diff = (q.safe_images != q.unsafe_images).any(1).flatten(1).float().mean(1)
    assert (diff > 0.1).float().mean() > 0.9


def test_pretrain_families_differ_in_one_concept(world):
    g = world.pretrain_groups
    assert g is not None and len(g) == len(world.pretrain)
    fams = torch.unique(g[g >= 0])
    assert len(fams) == world.config.n_pretrain_families
    for f in fams[:20].tolist():
        idx = torch.nonzero(g == f).flatten().tolist()
        caps = [world.pretrain_captions[i][0] for i in idx]
        assert len(idx) == 4 and len(set(caps)) == 4, caps
        imgs = world.pretrain.images[idx]
        assert not any(torch.equal(imgs[a], imgs[b]) for a in range(4) for b in range(a + 1, 4))
        words = [set(c.split()) for c in caps]
        assert len(set.intersection(*words)) >= 2, caps             # twins share the rest of the description


def test_unsafe_concept_task(world):
    t = world.probes["unsafe-concept"]    # a knowledge probe, kept out of the utility zero-shot mean
    assert len(t.classnames) == len(UNSAFE_CATEGORIES) and len(t.images) == world.config.n_zeroshot_scenes
    assert len(torch.unique(t.labels)) == len(UNSAFE_CATEGORIES)


def test_nsfwcaps_aligned(world):
    q = world.nsfwcaps
    assert len(q) == world.config.n_nsfwcaps
    for i in range(len(q)):
        safe, _ = strip_phrase(q.unsafe_captions[i], q.tags[i])
        assert safe == q.safe_captions[i]
        mask = (q.safe_images[i] != q.unsafe_images[i]).any(0)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(ys) > 20, "glyph not visible"
        h, w = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
        assert h <= 22 and w <= 22, (h, w)  # differences only inside the glyph's square


def test_cache_round_trip_and_corruption(tmp_path):
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST idx files not installed")
    cfg = WorldConfig.small(**{**TINY, "n_pretrain_scenes": 40, "n_pretrain_plain": 20})
    w1 = build_world(cfg, cache_dir=tmp_path)
    path = world_path(cfg, tmp_path)
    assert path.is_file() and Path(str(path) + ".json").is_file()
    w2 = build_world(cfg, cache_dir=tmp_path)
    assert torch.equal(w1.visu["val"].unsafe_images, w2.visu["val"].unsafe_images)
    assert w1.nsfwcaps.unsafe_captions == w2.nsfwcaps.unsafe_captions
    meta = json.loads(Path(str(path) + ".json").read_text())
    del meta["quadruplets"]["nsfwcaps"]
    Path(str(path) + ".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{path.name}.*nsfwcaps"):
        build_world(cfg, cache_dir=tmp_path)
    # a cache written by another world version is rebuilt, never reused
    build_world(cfg, cache_dir=tmp_path, refresh=True)
    side = Path(str(path) + ".json")
    meta = json.loads(side.read_text()); meta["world_version"] = WORLD_VERSION - 1
    meta["quadruplets"]["nsfwcaps"]["unsafe_captions"] = ["stale"] * cfg.n_nsfwcaps
    side.write_text(json.dumps(meta))
    w3 = build_world(cfg, cache_dir=tmp_path)
    assert w3.nsfwcaps.unsafe_captions == w1.nsfwcaps.unsafe_captions
    assert json.loads(side.read_text())["world_version"] == WORLD_VERSION


def test_report_helpers():
    z = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    assert recall_at_1(z, z) == 1.0
    assert recall_at_1(z, z.roll(1, 0)) < 1.0
    assert unsafe_top1_rate(z, -z, z) == 1.0 and unsafe_top1_rate(z, z, -z) == 0.0
    assert len(FASHION_CLASSES) == 10
