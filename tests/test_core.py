"""saferclip.core: model loading, checkpoints, seeding, encoding."""
import json

import open_clip
import pytest
import torch

from saferclip.core import (TINY_ARCH, data_hash, encode_images, encode_texts, file_hash, images_to_input,
                            load_clip, load_state_dict, read_meta, save_checkpoint, seed_everything)


def test_tiny_arch_registered_on_import():
    assert TINY_ARCH in open_clip.list_models()
    model, _, _ = open_clip.create_model_and_transforms(TINY_ARCH)
    assert model.visual.image_size == (64, 64) or model.visual.image_size == 64


def test_tokenizer_is_open_clip_bpe(tiny_clip):
    _, _, tok = tiny_clip
    ids = tok(["a photo of a sneaker"])
    assert ids.shape == (1, 32)
    # real BPE vocabulary: start/end tokens of open_clip's SimpleTokenizer
    assert ids[0, 0].item() == 49406 and 49407 in ids[0].tolist()


def test_roundtrip_local_file_and_stock_open_clip(tmp_path, tiny_clip):
    model, _, _ = tiny_clip
    p = save_checkpoint(model.state_dict(), tmp_path / "m.safetensors", {"arch": TINY_ARCH, "metrics": {"x": 1}})
    m2, pre, tok = load_clip(TINY_ARCH, p)
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    m3, _, _ = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(p))
    assert torch.equal(m3.logit_scale, model.logit_scale)
    meta = read_meta(p)
    assert meta["arch"] == TINY_ARCH and meta["metrics"] == {"x": 1} and "git_revision" in meta


def test_load_clip_errors(tmp_path, tiny_clip):
    with pytest.raises(ValueError, match="Available open_clip architectures"):
        load_clip("ViT-Nope-1")
    with pytest.raises(ValueError, match="Available tags"):
        load_clip("ViT-B-32", "not-a-tag")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_clip(TINY_ARCH, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="precision"):
        load_clip(TINY_ARCH, precision="fp8")
    # a file for another architecture: named in the error
    model, _, _ = tiny_clip
    p = save_checkpoint(model.state_dict(), tmp_path / "x.safetensors", {"arch": "ViT-B-32"})
    with pytest.raises(ValueError, match="ViT-B-32"):
        load_clip(TINY_ARCH, p)
    # right sidecar, wrong tensors
    q = save_checkpoint({"w": torch.zeros(1)}, tmp_path / "y.safetensors", {})
    with pytest.raises(ValueError, match="does not match"):
        load_clip(TINY_ARCH, q)


def test_pickles_refused_and_corrupt_files_named(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1)}, p)
    with pytest.raises(ValueError, match="pickle"):
        load_state_dict(p)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_state_dict(bad)


def test_save_is_atomic_and_refuses_nan(tmp_path):
    p = save_checkpoint({"w": torch.ones(3)}, tmp_path / "m.safetensors", {"v": 1})
    with pytest.raises(ValueError, match="NaN"):
        save_checkpoint({"w": torch.tensor([1.0, float("nan")])}, p, {"v": 2})
    assert torch.equal(load_state_dict(p)["w"], torch.ones(3))
    assert read_meta(p)["v"] == 1
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_seed_and_hashes(tmp_path):
    seed_everything(3); a = torch.randn(4)
    seed_everything(3); b = torch.randn(4)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        seed_everything(-1)
    assert data_hash(["a", 1]) == data_hash(["a", 1]) != data_hash(["a", 2])
    assert data_hash(torch.zeros(3)) != data_hash(torch.zeros(4))
    f = tmp_path / "f.bin"; f.write_bytes(b"abc")
    h = file_hash(f); f.write_bytes(b"abd")
    assert file_hash(f) != h


def test_encoding_shapes_and_batch_invariance(tiny_clip):
    model, _, tok = tiny_clip
    imgs = torch.randint(0, 256, (7, 3, 64, 64), dtype=torch.uint8)
    z1 = encode_images(model, imgs, batch_size=3)
    z2 = encode_images(model, imgs, batch_size=7)
    assert z1.shape == (7, 128) and torch.allclose(z1, z2, atol=1e-5)
    assert torch.allclose(z1.norm(dim=-1), torch.ones(7), atol=1e-5)
    zt = encode_texts(model, tok, ["a", "b", "c"], batch_size=2)
    assert zt.shape == (3, 128)
    # a different image size is resized to the model's input
    assert images_to_input(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), model).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="uint8"):
        images_to_input(torch.zeros(2, 3, 64, 64), model)


def test_encode_image_files(tmp_path, tiny_clip):
    from PIL import Image
    model, pre, _ = tiny_clip
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (80, 60), (40 * i, 10, 200)).save(p)
        paths.append(p)
    z = encode_images(model, paths, preprocess=pre, batch_size=2)
    assert z.shape == (3, 128)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        encode_images(model, [tmp_path / "broken.png"], preprocess=pre)


def test_openai_tags_resolve_to_quickgelu():
    from saferclip.core import resolve_arch
    assert resolve_arch("ViT-L-14", "openai") == "ViT-L-14-quickgelu"
    assert resolve_arch("ViT-L-14-quickgelu", "openai") == "ViT-L-14-quickgelu"
    assert resolve_arch(TINY_ARCH, None) == TINY_ARCH
    assert resolve_arch("ViT-L-14", "some/file.safetensors") == "ViT-L-14"
