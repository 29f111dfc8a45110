"""The installed SmolLM2 GGUF for the real-model tier, and an evaluator independent of achilles.

``load()`` is what the session fixture ``smollm2`` (conftest.py) returns; the other helpers
are plain torch: weights zeroed by hand, next-token NLL by hand. Tests of other features on
the real model (a GGUF export that must reload to the masked logits, say) reuse them:
``masked_copy(smollm2.model, units)`` is the masked model, ``logits(model, ids)`` its output.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from achilles.config import ModelSpec
from achilles.model.loading import LoadedModel, load_model
from achilles.model.named_models import named_model_path, named_model_problem

NAME = "smollm2"
DEMO_TEXT = Path(__file__).resolve().parents[1] / "data" / "demo.txt"


def gguf_path() -> Path:
    """The installed GGUF file; a loud failure (never a skip) naming the fix when it is missing."""
    problem = named_model_problem(NAME)
    if problem is not None:
        pytest.fail(f"the real-model tier needs SmolLM2 installed ({problem})", pytrace=False)
    return named_model_path(NAME)


def load() -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 on the CPU, through achilles' GGUF path (the first
    load ever dequantizes into the user's cache, later ones read it)."""
    gguf_path()
    return load_model(ModelSpec(model=NAME, dtype="float32", device="cpu"))


def masked_copy(model: torch.nn.Module, units: Iterable[dict]) -> torch.nn.Module:
    """A copy of ``model`` with each unit (``{"module", "channel"}``) zeroed in its weights.

    Written from the meaning of a unit (an output channel of a module, or with ``:input`` an
    input channel), not from achilles' masking code: a Linear's output channel is its weight
    row (and bias entry), a norm's is its gain (and bias), an input channel is the weight
    column, and an activation's output is the input column of the down projection after it.
    """
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for u in units:
            path, c = u["module"], int(u["channel"])
            if path.endswith(":input"):
                modules[path.removesuffix(":input")].weight[:, c] = 0
                continue
            m = modules[path]
            if isinstance(m, torch.nn.Linear):
                m.weight[c, :] = 0
            elif getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight[c] = 0
            elif path.endswith(".act_fn"):
                modules[path.removesuffix("act_fn") + "down_proj"].weight[:, c] = 0
                continue
            else:
                raise AssertionError(f"the oracle cannot zero {path}")
            if getattr(m, "bias", None) is not None:
                m.bias[c] = 0
    return out


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood (nats), summed in float64 by hand."""
    lp = torch.log_softmax(logits(model, ids)[0, :-1].double(), dim=-1)
    return float(-lp.gather(1, ids[0, 1:, None]).mean())


def delta(clean: float, masked: float) -> float:
    """Δ = log10(PPL_masked / PPL_clean) from two mean NLLs."""
    return (masked - clean) / math.log(10)
