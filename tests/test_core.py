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


# ------------------------------------------------------------------- bad input fails naming file and place
def test_nonfinite_weights_refused_on_load_naming_tensor_and_file(tmp_path, tiny_clip):
    from safetensors.torch import save_file
    sd = {k: v.clone() for k, v in tiny_clip[0].state_dict().items()}
    sd["visual.conv1.weight"][0, 0, 0, 0] = float("nan")
    sd["token_embedding.weight"][1, 2] = float("-inf")
    bad = tmp_path / "diverged.safetensors"
    save_file(sd, str(bad))  # another tool wrote it: save_checkpoint would have refused
    with pytest.raises(ValueError, match=r"refusing to load .*diverged\.safetensors: tensor 'token_embedding\.weight' "
                                         r"holds NaN or inf \(and 1 more, e\.g\. \['visual\.conv1\.weight'\]\)"):
        load_clip(TINY_ARCH, bad)
    with pytest.raises(ValueError, match="diverged.safetensors: tensor 'token_embedding.weight' holds NaN or inf"):
        load_state_dict(bad)
    assert torch.isnan(load_state_dict(bad, finite=False)["visual.conv1.weight"][0, 0, 0, 0])  # explicit opt-out
    # integer tensors cannot hold NaN and are not checked; finite float files load
    save_file({"w": torch.ones(2), "n": torch.arange(3)}, str(tmp_path / "ok.safetensors"))
    assert load_state_dict(tmp_path / "ok.safetensors")["n"].tolist() == [0, 1, 2]


def _renamed_pickles(tmp_path):
    import pickle
    zipped = tmp_path / "zipped.safetensors"
    torch.save({"w": torch.zeros(2)}, zipped)  # torch.save's zip container
    files = [zipped]
    for proto in (2, 3, 4, 5):
        p = tmp_path / f"proto{proto}.safetensors"
        p.write_bytes(pickle.dumps({"w": [0.0, 1.0]}, protocol=proto))
        files.append(p)
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    return files + [legacy]


def test_pickle_renamed_safetensors_is_explained(tmp_path):
    for f in _renamed_pickles(tmp_path):
        for load in (load_state_dict, read_meta, lambda p: load_clip(TINY_ARCH, p)):
            with pytest.raises(ValueError, match=rf"{f.name} looks like a pickle/torch file, not safetensors") as e:
                load(f)
            assert "safetensors.torch.save_file(torch.load(p, weights_only=True), 'model.safetensors')" in str(e.value)
    assert "zip archive" in str(pytest.raises(ValueError, load_state_dict, tmp_path / "zipped.safetensors").value)
    assert "protocol 5" in str(pytest.raises(ValueError, load_state_dict, tmp_path / "proto5.safetensors").value)


def test_safetensors_whose_header_length_looks_like_pickle_magic_still_loads(tmp_path):
    # a header of 0x280 = 640 bytes starts the file with 80 02, a pickle's protocol-2 magic: the sniffer must not care
    from safetensors.torch import save_file
    p = tmp_path / "m.safetensors"
    for n in range(700):
        save_file({"w": torch.ones(2)}, str(p), metadata={"pad": "x" * n})
        if p.read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("could not build a safetensors file whose first bytes are 80 02")
    assert torch.equal(load_state_dict(p)["w"], torch.ones(2))


def _png16(path, arr):
    import numpy as np
    from PIL import Image
    Image.fromarray(np.asarray(arr, dtype=np.uint16)).save(path)
    return path


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path, tiny_clip):
    import numpy as np
    from PIL import Image
    from saferclip.core import open_image, to_rgb
    model, pre, _ = tiny_clip
    grey8 = np.tile(np.linspace(0, 255, 80).round().astype(np.uint8), (60, 1))
    p16 = _png16(tmp_path / "g16.png", grey8.astype(np.uint32) * 257)   # the same picture in 16 bits
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    with Image.open(p16) as im:
        assert im.mode in ("I;16", "I")
    rgb = np.asarray(open_image(p16))
    assert rgb.dtype == np.uint8 and rgb.shape == (60, 80, 3)
    assert (rgb == grey8[..., None]).all()
    z16 = encode_images(model, [p16], preprocess=pre)
    z8 = encode_images(model, [tmp_path / "g8.png"], preprocess=pre)
    assert torch.allclose(z16, z8, atol=1e-6)
    # mode "I" (32-bit int) holds 16-bit samples; values outside 0..65535 are clipped
    im_i = Image.fromarray(np.array([[0, 257 * 128, 65535, 70000, -5]], dtype=np.int32))
    assert im_i.mode == "I"
    assert np.asarray(to_rgb(im_i))[0, :, 0].tolist() == [0, 128, 255, 255, 0]
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)  # 8-bit images as before


def test_read_utf8_names_file_offset_and_line(tmp_path):
    from saferclip.core import read_utf8
    p = tmp_path / "latin1.csv"
    p.write_bytes("a,b\nfine,row\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv is not UTF-8 text: byte 0xe9 at offset 16 \(line 3, column 4\)"
                                         r".*Re-encode it as UTF-8, e\.g\. iconv -f latin1 -t utf-8"):
        read_utf8(p)
    q = tmp_path / "bom.txt"
    q.write_bytes("\ufeffcaf\xe9".encode("utf-8"))
    assert read_utf8(q) == "caf\xe9"  # a UTF-8 byte-order mark is dropped


def test_json_readers_name_line_and_cause(tmp_path):
    from saferclip.core import read_json, read_json_lines
    p = tmp_path / "m.json"
    p.write_text('{"a": {"b": [1, 2')
    with pytest.raises(ValueError, match=r"m\.json is not valid JSON \(unterminated JSON: the text ends inside a value "
                                         r"\(the file looks truncated"):
        read_json(p)
    p.write_text("")
    with pytest.raises(ValueError, match=r"m\.json is not valid JSON \(the text is empty\)"):
        read_json(p)
    p.write_text('{"a": 1,, "b": 2}')
    with pytest.raises(ValueError, match=r"m\.json is not valid JSON \(malformed JSON\): .* at line 1, column 9"):
        read_json(p)
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"a": 1}\n\n{"a": "cut here\n')
    with pytest.raises(ValueError, match=r"m\.jsonl: line 3 is not valid JSON \(unterminated JSON: the text ends inside "
                                         r"a value; it is the last line, so the file looks truncated"):
        read_json_lines(jl)
    jl.write_text('{"a": 1\n{"a": 2}\n')  # a cut line in the middle is not called truncation of the file
    with pytest.raises(ValueError, match=r"m\.jsonl: line 1 is not valid JSON \(unterminated JSON: the text ends inside "
                                         r"a value\): Expecting ',' delimiter at column 8$"):
        read_json_lines(jl)
    jl.write_text('{"a": 1}\r\n[2]\r\n')
    assert read_json_lines(jl) == [(1, {"a": 1}), (2, [2])]


def test_read_csv_rows_names_line_and_cause(tmp_path):
    from saferclip.core import read_csv_rows
    p = tmp_path / "t.csv"
    p.write_text('id,"text, quoted"\n1,"multi\nline"\n2,b\n')
    assert read_csv_rows(p) == (["id", "text, quoted"], [(2, {"id": "1", "text, quoted": "multi\nline"}),
                                                          (4, {"id": "2", "text, quoted": "b"})])
    p.write_text("id,text,tag\n1,a,x\n2,b")
    with pytest.raises(ValueError, match=r"t\.csv: line 3 has 2 fields, fewer than the header's 3 .*it is the last "
                                         r"line, so the file looks truncated"):
        read_csv_rows(p)
    p.write_text("id,text,tag\n1,a\n2,b,x\n")
    with pytest.raises(ValueError, match=r"t\.csv: line 2 has 2 fields, fewer than the header's 3 .*missing delimiter"):
        read_csv_rows(p)
    p.write_text('id,text\n1,a\n2,"an open quote\nrunning on')
    with pytest.raises(ValueError, match=r"t\.csv: line 3: unexpected end of data \(a quoted field runs to the end of "
                                         r"the file, so the file looks truncated"):
        read_csv_rows(p)
    p.write_text("")
    with pytest.raises(ValueError, match=r"t\.csv is empty \(expected a CSV header line\)"):
        read_csv_rows(p)
