"""saferclip.export: open_clip → transformers CLIPModel conversion, numerical equivalence, refusals, model card."""
import json
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="saferclip.export needs `transformers` (paper extra)")

import open_clip  # noqa: E402

from saferclip.core import TINY_ARCH, load_clip, save_checkpoint, seed_everything  # noqa: E402
from saferclip.export import (UnsupportedArchitecture, compare_embeddings, hf_clip_config,  # noqa: E402
                              open_clip_to_hf_state_dict, openai_style_config, to_hf_clip, write_model_card)

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    seed_everything(0)
    model, _, _ = load_clip(TINY_ARCH)
    meta = {"arch": TINY_ARCH, "pretrained": "world-base", "epoch": 2, "n_train": 123,
            "config": {"method": "saferclip", "data": "world", "lr": 1e-4, "batch_size": 48, "epochs": 2,
                       "lora_rank": 16},
            "metrics": {"val_rsum": 250.25}, "drift": {"text_l2": 0.5}}
    return save_checkpoint(model.state_dict(), d / "tiny.safetensors", meta)


def test_tiny_roundtrip_embeddings_match(tiny_ckpt, tmp_path):
    out = to_hf_clip(tiny_ckpt, tmp_path / "hf")
    assert out == tmp_path / "hf"
    for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "preprocessor_config.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["hidden_act"] == "gelu" and cfg["vision_config"]["hidden_act"] == "gelu"
    assert cfg["text_config"]["max_position_embeddings"] == 32 and cfg["vision_config"]["image_size"] == 64
    assert cfg["projection_dim"] == 128
    d = compare_embeddings(tiny_ckpt, out)
    print("tiny export max abs diff:", d)
    assert d["image_max_abs_diff"] < 1e-4 and d["text_max_abs_diff"] < 1e-4
    assert d["image_scale"] > 0.1 and d["text_scale"] > 0.1      # the comparison is not between zeros
    assert d["logit_scale_diff"] == 0


def test_wrong_activation_is_detected(tiny_ckpt, tmp_path):
    out = to_hf_clip(tiny_ckpt, tmp_path / "hf-q", hidden_act="quick_gelu", tokenizer=False)
    d = compare_embeddings(tiny_ckpt, out)
    assert max(d["image_max_abs_diff"], d["text_max_abs_diff"]) > 1e-3    # the check can fail


def test_tokenizer_matches_open_clip_ids(tiny_ckpt, tmp_path):
    from transformers import CLIPTokenizer
    out = to_hf_clip(tiny_ckpt, tmp_path / "hf")
    hf_tok = CLIPTokenizer.from_pretrained(str(out))
    assert hf_tok.model_max_length == 32
    oc_tok = open_clip.get_tokenizer(TINY_ARCH)
    caps = ["A vase filled with white flowers sits on top of a table.", "two DOGS, playing in the snow!"]
    a = oc_tok(caps)
    b = hf_tok(caps, padding="max_length", max_length=32, truncation=True, return_tensors="pt")["input_ids"]
    for r in range(len(caps)):
        end = int((a[r] == 49407).nonzero()[0]) + 1
        assert a[r, :end].tolist() == b[r, :end].tolist()


def test_b32_shaped_quickgelu(tmp_path):
    cfg = open_clip.get_model_config("ViT-B-32-quickgelu")
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 1
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "test-b32-1layer-quickgelu.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    seed_everything(3)
    model, _, _ = load_clip("test-b32-1layer-quickgelu")
    ck = save_checkpoint(model.state_dict(), tmp_path / "b.safetensors", {"arch": "test-b32-1layer-quickgelu"})
    out = to_hf_clip(ck, tmp_path / "hf", tokenizer=False)
    assert json.loads((out / "config.json").read_text())["text_config"]["hidden_act"] == "quick_gelu"
    d = compare_embeddings(ck, out)
    print("ViT-B-32-shaped export max abs diff:", d)
    assert d["image_max_abs_diff"] < 1e-4 and d["text_max_abs_diff"] < 1e-4


@pytest.mark.skipif(not os.environ.get("SAFERCLIP_SLOW_TESTS"), reason="full ViT-B-32 export takes ~1 min on CPU; "
                    "set SAFERCLIP_SLOW_TESTS=1")
def test_full_vit_b32(tmp_path):
    seed_everything(1)
    model, _, _ = load_clip("ViT-B-32")
    ck = save_checkpoint(model.state_dict(), tmp_path / "b32.safetensors", {"arch": "ViT-B-32"})
    del model
    d = compare_embeddings(ck, to_hf_clip(ck, tmp_path / "hf", tokenizer=False))
    assert d["image_max_abs_diff"] < 1e-4 and d["text_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", TINY_ARCH])
def test_supported_configs(arch):
    c = hf_clip_config(arch)
    oc = openai_style_config(arch)
    assert c.vision_config.image_size == oc["vision_cfg"]["image_size"]
    assert c.text_config.hidden_size == oc["text_cfg"]["width"]
    assert c.vision_config.num_attention_heads * 64 == oc["vision_cfg"]["width"] or arch == TINY_ARCH
    assert c.text_config.hidden_act == "gelu"
    assert hf_clip_config(arch + "-quickgelu" if arch != TINY_ARCH else arch,
                          "quick_gelu").text_config.hidden_act == "quick_gelu"


@pytest.mark.parametrize("arch", ["convnext_base", "ViT-B-16-SigLIP", "RN50", "coca_ViT-B-32", "no-such-arch"])
def test_refuses_other_architectures(arch, tiny_ckpt, tmp_path):
    with pytest.raises(UnsupportedArchitecture, match=arch):
        openai_style_config(arch)
    with pytest.raises(ValueError):
        to_hf_clip(tiny_ckpt, tmp_path / "x", arch=arch)
    assert not (tmp_path / "x").exists()


def test_arch_from_argument_and_conflicts(tiny_ckpt, tmp_path):
    model, _, _ = load_clip(TINY_ARCH)
    bare = save_checkpoint(model.state_dict(), tmp_path / "bare.safetensors", {})
    with pytest.raises(ValueError, match="arch="):
        to_hf_clip(bare, tmp_path / "a")
    assert (to_hf_clip(bare, tmp_path / "b", arch=TINY_ARCH, tokenizer=False) / "config.json").is_file()
    with pytest.raises(ValueError, match="saved for"):
        to_hf_clip(tiny_ckpt, tmp_path / "c", arch="ViT-B-32")


def test_state_dict_with_extra_keys_is_refused(tiny_ckpt):
    from saferclip.core import load_state_dict
    sd = load_state_dict(tiny_ckpt)
    sd["visual.attn_pool.query"] = torch.zeros(1)
    with pytest.raises(UnsupportedArchitecture, match="attn_pool"):
        open_clip_to_hf_state_dict(sd)


def test_model_card(tiny_ckpt, tmp_path):
    card = write_model_card(tiny_ckpt, tmp_path / "README.md", metrics={"nsfwcaps T*->V R@1": 12.5})
    text = card.read_text()
    for s in ["# SafeR-CLIP reproduction: `saferclip-tiny` fine-tuned with `saferclip`", "| lora_rank | 16 |",
              "| val_rsum | 250.2 |", "| nsfwcaps T*->V R@1 | 12.5 |", "| text_l2 | 0.5 |", "Safety caveats",
              "embedded toy world", "| n_train | 123 |", "Pretrained start: `world-base`"]:
        assert s in text, s
    with pytest.raises(FileNotFoundError):
        write_model_card(tmp_path / "nope.safetensors", tmp_path / "R.md")
