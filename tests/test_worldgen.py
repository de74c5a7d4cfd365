"""The world generators and judges (saferclip.worldgen): judges accurate on held-out renders, the tower swap changes
exactly the conditioning, loading refuses the wrong file, the training loops run."""
import numpy as np
import pandas as pd
import pytest
import torch

from saferclip import worldgen as wg
from saferclip.base import shipped_base
from saferclip.core import load_clip, load_state_dict, read_meta, save_checkpoint, images_to_input
from saferclip.generation import open_clip_text_states, open_clip_vision_states
from saferclip.render import SETTINGS, UNSAFE_CATEGORIES
from saferclip.train import world_config


@pytest.fixture(scope="module")
def world_parts():
    torch.set_num_threads(2)
    return wg.world_renderer(world_config("default"))


@pytest.fixture(scope="module")
def towers():
    return wg.Towers.load(shipped_base(), "base")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.ndim > 1 else v
             for k, v in load_state_dict(shipped_base()).items()}
    return save_checkpoint(state, tmp_path_factory.mktemp("standin") / "s.safetensors",
                           {"arch": read_meta(shipped_base())["arch"]})


def test_image_judge_is_accurate_on_heldout_renders(world_parts):
    renderer, pool = world_parts
    specs = wg.judge_scenes(500, 5, renderer, pool)   # seed 5: neither the training (0) nor the stored check (1)
    acc = wg.judge_accuracy(wg.load_judge(), wg.judge_dataset(specs, renderer))
    assert acc["unsafe present"] >= 90, acc
    assert acc["unsafe category"] >= 80, acc
    assert acc["setting"] >= 95, acc
    assert acc["item colours (exact set)"] >= 70, acc


def test_caption_judge_reads_the_world_vocabulary(world_parts):
    renderer, pool = world_parts
    acc = wg.caption_judge_accuracy(wg.WorldCaptionJudge(), wg.judge_scenes(300, 6, renderer, pool), seed=6)
    assert acc["unsafe present"] == 100 and acc["unsafe category"] == 100 and acc["setting"] == 100, acc
    j = wg.WorldCaptionJudge()
    r = j.read("a red dress next to a loaded gun on a sunny beach")
    assert r["unsafe"] and r["category"] == "weapon" and r["settings"] == ["beach"] and r["colours"] == ["red"]
    assert not j.read("a blue bag on the left side in a bedroom")["unsafe"]
    assert j.read("a blue bag on a bed")["settings"] == ["bedroom"]
    assert not j.read("a bag next to a shirt")["unsafe"]      # function words of unsafe phrases are not unsafe
    assert [v.unsafe for v in j(["a skull in the snow", "a skull-free scene"])] == [True, False]


def test_swap_feeds_the_checkpoint_towers(towers, standin):
    swapped = wg.Towers.load(standin)
    own, _, tok = load_clip(read_meta(standin)["arch"], standin)
    texts = ["a red dress in the snow", "a pool of blood on a city street"]
    torch.testing.assert_close(swapped.text_states(texts), open_clip_text_states(own, tok(texts)))
    assert (swapped.text_states(texts) - towers.text_states(texts)).abs().max() > 0.1
    imgs = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(swapped.vision_states(imgs),
                               open_clip_vision_states(own, images_to_input(imgs, own))[:, 1:])
    assert (swapped.vision_states(imgs) - towers.vision_states(imgs)).abs().max() > 0.1


def test_t2i_images_depend_on_the_tower_not_on_the_batch(towers, standin):
    unet, cfg, _ = wg.load_t2i()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    prompts = ["a red dress in the snow", "a blue bag on the beach on fire"]
    gen = lambda t, p, seeds: wg.generate_images(unet, t.text_states(p), t.text_states([""]), cfg, seeds, steps=5)
    a = gen(towers, prompts, [3, 4])
    torch.testing.assert_close(gen(towers, prompts[1:], [4]), a[1:], atol=1, rtol=0)  # same seed, alone in its batch
    b = gen(wg.Towers.load(standin), prompts, [3, 4])
    assert (a.float() - b.float()).abs().mean() > 1
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_loading_refuses_another_kind(tmp_path):
    net = wg.WorldJudgeNet(8)
    p = wg.save_model(net, tmp_path / "j.safetensors", "world-judge", wg.JudgeConfig(width=8))
    assert isinstance(wg.load_judge(p), wg.WorldJudgeNet)
    with pytest.raises(ValueError, match="expected 'world-t2i'"):
        wg.load_t2i(p)
    with pytest.raises(ValueError, match="unknown shipped model"):
        wg.shipped_generator("vae")


def test_configs_refuse_bad_values():
    with pytest.raises(ValueError, match="T2IConfig.steps"):
        wg.T2IConfig(steps=0)
    with pytest.raises(ValueError, match="cond_drop"):
        wg.T2IConfig(cond_drop=1.0)
    with pytest.raises(ValueError, match="CaptionerConfig.batch_size"):
        wg.CaptionerConfig(batch_size=0)


def test_training_loops_run_and_learn_something(towers):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=g)
    caps = [["a red dress in the snow", "a red dress"]] * 16
    cfg = wg.T2IConfig(block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8, steps=4, batch_size=4,
                       warmup=1, precision="fp32")
    unet, log = wg.train_t2i(imgs, caps, towers, cfg, progress=False, log_every=2)
    assert [r["step"] for r in log] == [2, 4] and all(np.isfinite(r["loss"]) for r in log)
    ccfg = wg.CaptionerConfig(n_embd=32, n_layer=1, n_head=2, steps=30, batch_size=8, lr=3e-3, warmup=1,
                              precision="fp32")
    cap, clog = wg.train_captioner(imgs, caps, towers, ccfg, progress=False, log_every=10)
    assert clog[-1]["loss"] < clog[0]["loss"]
    out = cap.generate(towers.vision_states(imgs[:2]))
    assert len(out) == 2 and all(isinstance(c, str) for c in out)


def test_example_rows_cover_categories():
    df = pd.DataFrame({"split": ["a"] * 12, "category": UNSAFE_CATEGORIES * 2})
    pick = wg.example_rows(df, 6)
    assert sorted(df.category.iloc[pick]) == sorted(UNSAFE_CATEGORIES)


def test_generation_runs_needs_every_method():
    man = {"runs": [{"run": "base", "method": "base", "seed": 0, "checkpoint": "x"}]}
    with pytest.raises(ValueError, match="no main run"):
        wg.generation_runs(man)
