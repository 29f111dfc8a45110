"""Shared fixtures: tiny models, a tiny tokenizer, and a saved tiny model folder."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny import TEXT, make_model, make_tokenizer  # noqa: E402

from achilles.config import ModelSpec  # noqa: E402
from achilles.model.loading import LoadedModel  # noqa: E402

# Tiny models: thread start-up costs more than the arithmetic it would split.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():  # noqa: ANN201
    return make_tokenizer()


@pytest.fixture
def text() -> str:
    return TEXT


@pytest.fixture
def tiny_lm(tokenizer) -> LoadedModel:  # noqa: ANN001
    return LoadedModel(make_model("llama"), tokenizer, ModelSpec(model="tiny-llama"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):  # noqa: ANN001, ANN201
    """A tiny Llama saved as an ordinary model folder (safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):  # noqa: ANN001, ANN201
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_model("gpt2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real model: SmolLM2-135M-Instruct from the installed GGUF, float32 (tests/smollm2.py)."""
    from smollm2 import load

    return load()
