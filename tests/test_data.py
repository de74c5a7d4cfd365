"""saferclip.data: the quadruplet schema."""
import pytest
import torch

from saferclip.data import Captioned, Quadruplets, image_batch
from conftest import make_quadruplets


def test_subset_and_fingerprint(quads):
    sub = quads.subset([3, 1])
    assert sub.ids == ["r3", "r1"] and sub.safe_captions[0] == quads.safe_captions[3]
    assert torch.equal(sub.unsafe_images[1], quads.unsafe_images[1])
    assert quads.fingerprint() == make_quadruplets().fingerprint()
    other = make_quadruplets(seed=1)  # same captions, other pixels
    assert other.fingerprint() != quads.fingerprint()
    with pytest.raises(IndexError):
        quads.subset([len(quads)])


@pytest.mark.parametrize("field,value,msg", [
    ("ids", ["r0"] * 12, "duplicate id 'r0'"),
    ("safe_captions", ["x"] * 11 + [""], "row 11 .*empty safe_caption"),
    ("tags", ["weapon"] * 3, "tags has 3 entries"),
])
def test_validation_names_the_record(quads, field, value, msg):
    kw = dict(ids=quads.ids, safe_captions=quads.safe_captions, unsafe_captions=quads.unsafe_captions,
              safe_images=quads.safe_images, unsafe_images=quads.unsafe_images, tags=quads.tags, name="toy")
    kw[field] = value
    with pytest.raises(ValueError, match=msg):
        Quadruplets(**kw)


def test_image_validation(quads):
    with pytest.raises(ValueError, match="uint8"):
        Quadruplets(quads.ids, quads.safe_captions, quads.unsafe_captions, quads.safe_images.float(),
                    quads.unsafe_images, quads.tags)
    with pytest.raises(ValueError, match="safe_images has 5 entries"):
        Quadruplets(quads.ids, quads.safe_captions, quads.unsafe_captions, quads.safe_images[:5],
                    quads.unsafe_images, quads.tags)


def test_captioned_and_image_batch(quads, tiny_clip):
    model, pre, _ = tiny_clip
    c = Captioned(quads.safe_images, quads.safe_captions, torch.zeros(12, dtype=torch.bool))
    assert len(c.subset([0, 2])) == 2
    x = image_batch(quads.safe_images, [0, 5], model=model)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="unsafe must have shape"):
        Captioned(quads.safe_images, quads.safe_captions, torch.zeros(3, dtype=torch.bool))


def test_image_batch_scales_16bit_greyscale_files(tmp_path, tiny_clip):
    import numpy as np
    from PIL import Image
    _, pre, _ = tiny_clip
    grey8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))
    Image.fromarray((grey8.astype(np.uint32) * 257).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    x = image_batch([tmp_path / "g16.png", tmp_path / "g8.png"], [0, 1], preprocess=pre)
    assert x.shape == (2, 3, 64, 64)
    assert torch.equal(x[0], x[1])  # PIL's convert("RGB") would have made the 16-bit one a white square
    assert x[0].std() > 0.1
