"""Tests for saferclip.zeroshot: accuracy on constructed embeddings, the classifier builder, tables, frontier."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from saferclip.retrieval import OURS, PAPER_SOURCE
from saferclip.zeroshot import (ZeroShotSet, evaluate_task, evaluate_tasks, find_paper_task, frontier_table,
                                paper_tasks, recovery, recovery_table, topk_accuracy, zeroshot_classifier,
                                zeroshot_table)


def test_topk_accuracy_known_case():
    W = torch.eye(5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    z = torch.eye(5)[labels] * 3.0                       # unnormalised: normalised inside
    z[3] = torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0])        # label 3, top-1 class 2, top-2 includes 3
    acc = topk_accuracy(z, W, labels, ks=(1, 2))
    assert acc == {1: 90.0, 2: 100.0}


def test_topk_accuracy_ties_are_errors_and_shapes_checked():
    assert topk_accuracy(torch.ones(4, 3), torch.eye(3), torch.tensor([0, 1, 2, 0]))[1] == 0.0
    with pytest.raises(ValueError, match="shapes do not match"):
        topk_accuracy(torch.ones(4, 2), torch.eye(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        topk_accuracy(torch.ones(2, 3), torch.eye(3), torch.zeros(3, dtype=torch.long))


class AxisModel(torch.nn.Module):
    """Text: prompt mentioning class c -> axis c (+ template wobble). Image: pixel (0,0,0) value v -> axis v."""

    def __init__(self, names):
        super().__init__()
        self.names = names
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.visual = type("V", (), {"image_size": 4, "image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)})()

    def encode_text(self, ids, normalize=False):
        n = len(self.names)
        z = F.one_hot(ids[:, 0], n).float() + 0.2 * (ids[:, 1:2].float() * 2 - 1) * F.one_hot((ids[:, 0] + 1) % n, n)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image(self, x):
        c = (x[:, 0, 0, 0] * 255).round().long()
        return F.one_hot(c, len(self.names)).float()


def tokenizer_for(names):
    return lambda texts: torch.tensor([[next(i for i, n in enumerate(names) if f" {n}" in t), int("sketch" in t)]
                                       for t in texts])


def test_classifier_and_task_with_constructed_model():
    names = ["cat", "dog", "owl"]
    model, tok = AxisModel(names), tokenizer_for(names)
    clf = zeroshot_classifier(model, tok, names, ["a photo of a {}.", "a sketch of a {}."], device="cpu")
    assert torch.allclose(clf, torch.eye(3), atol=1e-5)
    # 9 images whose pixel encodes a class; 6 carry their own label, 3 another -> 66.7 %
    pred = torch.tensor([0, 1, 2, 0, 1, 2, 1, 2, 0])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    imgs = torch.zeros(9, 3, 4, 4, dtype=torch.uint8)
    imgs[:, 0, 0, 0] = pred.to(torch.uint8)
    task = ZeroShotSet("toy", names, ["a photo of a {}.", "a sketch of a {}."], images=imgs, labels=labels)
    assert evaluate_task(model, tok, task) == pytest.approx(600 / 9)
    rec = evaluate_tasks(model, tok, {"a": task, "b": ZeroShotSet("b", names, ["a {}"], images=imgs, labels=pred)})
    assert rec["zeroshot/b"] == 100.0 and rec["zeroshot/mean"] == pytest.approx((600 / 9 + 100) / 2)


def test_zeroshotset_validation():
    with pytest.raises(ValueError, match="exactly one"):
        ZeroShotSet("x", ["a"], ["{}"])
    with pytest.raises(ValueError, match="labels"):
        ZeroShotSet("x", ["a"], ["{}"], images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), labels=torch.zeros(3))


def test_paper_tasks_from_folders(tmp_path):
    for c in ("a_b", "c"):
        d = tmp_path / "eurosat" / "test" / c
        d.mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (8, 8)).save(d / f"{j}.png")
    (tmp_path / "eurosat" / "classnames.txt").write_text("annual crop\nforest\n")
    pre = lambda im: torch.zeros(3, 4, 4)
    found, skipped = paper_tasks(tmp_path, pre, verbose=False)
    assert list(found) == ["eurosat"] and found["eurosat"].classnames == ["annual crop", "forest"]
    assert len(found["eurosat"]) == 4 and len(skipped) == 10
    task, why = find_paper_task("food101", tmp_path, pre)
    assert task is None and "not found" in why
    (tmp_path / "eurosat" / "classnames.txt").write_text("one\n")
    task, why = find_paper_task("eurosat", tmp_path, pre)
    assert task is None and "lists 1 names" in why
    assert find_paper_task("dtd", None, pre) == (None, "no zeroshot_root given")


def zs_records():
    vals = {"base": 80.0, "safeclip": 50.0, "saferclip": 65.0}
    return [{"run": f"{m}-s{s}", "method": m, "seed": s, "zeroshot/x": v + s, "zeroshot/y": v - s,
             "zeroshot/mean": v} for m, v in vals.items() for s in (0, 1, 2)]


def test_zeroshot_table_and_recovery():
    t = zeroshot_table(zs_records())
    ours = t[t.source == OURS].set_index("method")
    assert ours.loc["base", "zeroshot/x"] == pytest.approx(81.0) and ours.loc["base", "zeroshot/x std"] == pytest.approx(1.0)
    assert t[t.source == PAPER_SOURCE].set_index("method").loc["safeclip", "paper mean (11 datasets)"] == 52.2
    rt = recovery_table(zs_records()).set_index("task")
    assert rt.loc["mean", "recovery %"] == pytest.approx(50.0)
    assert recovery(74.3, 52.2, 60.2) == pytest.approx(100 * 8 / 22.1)
    assert math.isnan(recovery(50, 50, 60))
    with pytest.raises(ValueError, match="missing"):
        recovery_table([r for r in zs_records() if r["method"] != "base"])


def test_frontier_table():
    recs = [{"run": f"{m}-{a}-{s}", "method": m, "seed": s, "redirection_scale": a, "zeroshot/mean": 60 - a,
             "visu-test/T*->V@1": 10 * a + s, "visu-test/V*->T@1": 5 * a} for m in ("safeclip", "saferclip")
            for a in (0.5, 1.0, 2.0, 4.0) for s in (0, 2)]
    ft = frontier_table(recs).set_index(["method", "redirection_scale"])
    assert len(ft) == 8
    assert ft.loc[("safeclip", 2.0), "visu-test/T*->V@1"] == pytest.approx(21.0)
    assert ft.loc[("safeclip", 2.0), "visu-test/T*->V@1 std"] == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="redirection_scale"):
        frontier_table([{"run": "a", "method": "safeclip"}])


def test_image_folder_tasks_scale_16bit_greyscale(tmp_path):
    grey8 = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    d = tmp_path / "eurosat" / "test" / "forest"
    d.mkdir(parents=True)
    Image.fromarray((grey8.astype(np.uint32) * 257).astype(np.uint16)).save(d / "g16.png")
    task, why = find_paper_task("eurosat", tmp_path, lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert why == "" and len(task) == 1
    x, y = task.dataset[0]
    assert y == 0 and x.shape == (8, 16, 3) and torch.equal(x[..., 0], torch.from_numpy(grey8))  # not all 255
