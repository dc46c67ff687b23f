"""Shared by the harness tests: a small word corpus."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """3000 lines of twelve words drawn from a small vocabulary (the same text in every module)."""
    rng = random.Random(0)
    words = ["the", "king", "queen", "sword", "crown", "night", "day", "love", "death", "and", "of"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000))
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(text)
    return path
