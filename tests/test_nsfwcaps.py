"""saferclip.nsfwcaps: word diff, scores, selection rule, output files, recovery of tight pairs in the world."""
import csv
import json

import numpy as np
import pytest
import torch

from saferclip.core import TINY_ARCH, load_clip, seed_everything
from saferclip.data import Quadruplets
from saferclip.nsfwcaps import (BuilderConfig, build_nsfwcaps, caption_diff, otsu_threshold, precision_recall,
                                score_pairs, select_pairs)


def test_caption_diff_insertion_and_rewrite():
    d = caption_diff("Two dogs playing in the snow.", "Two dogs playing in the bloody snow.")
    assert d["phrase"] == "bloody" and d["kept"] == 1.0 and d["n_edits"] == 1
    assert d["unsafe_minus_phrase"] == "two dogs playing in the snow ."
    d = caption_diff("A delicious looking bunt cake on a table next to fruit",
                     "A deadly looking gun on a table next to a child")
    assert d["kept"] < 0.8 and "gun" in d["phrase"] and "child" in d["phrase"]
    d = caption_diff("same words", "same words")
    assert d["phrase"] == "" and d["kept"] == 1.0


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, 500), rng.normal(2, 0.1, 200)])
    t = otsu_threshold(x)
    assert 0.4 < t < 1.6
    assert otsu_threshold(np.ones(5)) == 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="max_pairs"):
        BuilderConfig(max_pairs=0)
    with pytest.raises(ValueError, match="min_kept"):
        BuilderConfig(min_kept=2)


def _toy(n=6, seed=0):
    """n tight rows (v* = v with a small patch, t* = t + phrase) and n loose rows (new image, rewritten caption)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 256, (2 * n, 3, 64, 64), dtype=torch.uint8, generator=g)
    vs = v.clone()
    vs[:n, :, 40:48, 40:48] = 255                                                  # tight: tiny edit
    vs[n:] = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)  # loose: another picture
    items = ["shirt", "boot", "bag", "coat", "dress", "sandal", "trouser", "sneaker"]
    safe = [f"a red {items[i % 8]} on the beach number {i}" for i in range(2 * n)]
    unsafe = [f"a red {items[i % 8]} next to a knife on the beach number {i}" if i < n else
              f"a burning car in a dark alley with a gun {i}" for i in range(2 * n)]
    return Quadruplets([f"r{i}" for i in range(2 * n)], safe, unsafe, v, vs, ["weapon"] * (2 * n), name="toy")


def test_builder_recovers_tight_rows_and_writes_files(tiny_clip, tmp_path):
    model, _, tok = tiny_clip
    q = _toy()
    b = build_nsfwcaps(q, model, tok, out_dir=tmp_path)
    pr = precision_recall(b.selected.ids, q.ids[:6])
    assert pr["precision"] == 1.0 and pr["recall"] == 1.0, (pr, b.thresholds)
    assert b.selected.name == "toy-nsfwcaps-style"
    sel = b.selected_scores
    assert [r["score"] for r in sel] == sorted([r["score"] for r in sel], reverse=True)
    assert all(r["phrase"] == "next to a knife" for r in sel)
    rows = list(csv.DictReader(open(tmp_path / "selected.csv")))
    assert [r["id"] for r in rows] == b.selected.ids and float(rows[0]["caption_sim"]) > 0.99
    js = json.loads((tmp_path / "selected.json").read_text())
    assert js["thresholds"]["n_selected"] == 6 and len(js["pairs"]) == 6
    assert js["thresholds"]["image_threshold_rule"].startswith("otsu")


def test_builder_max_pairs_and_given_threshold(tiny_clip):
    model, _, tok = tiny_clip
    q = _toy()
    b = build_nsfwcaps(q, model, tok, cfg=BuilderConfig(max_pairs=2))
    assert len(b.selected) == 2 and b.thresholds["n_selected"] == 2
    with pytest.raises(ValueError, match="no row"):
        build_nsfwcaps(q, model, tok, cfg=BuilderConfig(image_threshold=1.01))


def test_identical_captions_are_never_selected(tiny_clip):
    model, _, tok = tiny_clip
    q = _toy()
    q.unsafe_captions[0] = q.safe_captions[0]
    scores = score_pairs(q, model, tok)
    keep, _ = select_pairs(scores, BuilderConfig())
    assert 0 not in keep and scores[0]["identical_captions"]


def test_world_mix_precision_recall(tiny_clip, tmp_path):
    from saferclip.world import WorldConfig, build_world
    w = build_world(WorldConfig.small(), cache_dir=tmp_path)
    v, n = w.visu["train"], w.nsfwcaps
    pool = Quadruplets(v.ids + n.ids, v.safe_captions + n.safe_captions, v.unsafe_captions + n.unsafe_captions,
                       torch.cat([v.safe_images, n.safe_images]), torch.cat([v.unsafe_images, n.unsafe_images]),
                       v.tags + n.tags, name="mix")
    model, _, tok = tiny_clip
    b = build_nsfwcaps(pool, model, tok)
    pr = precision_recall(b.selected.ids, n.ids)
    print("world mix (random tiny scorer):", pr, b.thresholds["image_threshold"])
    base_rate = len(n) / len(pool)
    assert pr["recall"] >= 0.9 and pr["precision"] >= base_rate + 0.25
