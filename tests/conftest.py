"""Shared pytest fixtures: quiet logging, a random tiny CLIP, small quadruplets."""
import logging

import pytest
import torch

import saferclip  # noqa: F401  (registers saferclip-tiny)
from saferclip.core import TINY_ARCH, load_clip, seed_everything
from saferclip.data import Quadruplets

logging.getLogger().setLevel(logging.ERROR)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_clip():
    """A randomly initialised saferclip-tiny (model, preprocess, tokenizer); do not mutate it."""
    seed_everything(0)
    return load_clip(TINY_ARCH)


def make_quadruplets(n: int = 12, size: int = 64, seed: int = 0, name: str = "toy") -> Quadruplets:
    """n random rows with distinct captions."""
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    colours = ["red", "blue", "green", "yellow", "purple", "white"]
    safe = [f"a {colours[i % 6]} shirt on a beach number {i}" for i in range(n)]
    unsafe = [f"a {colours[i % 6]} shirt on a beach next to a knife number {i}" for i in range(n)]
    return Quadruplets([f"r{i}" for i in range(n)], safe, unsafe, img(), img(), ["weapon"] * n, name=name)


@pytest.fixture
def quads():
    return make_quadruplets()
