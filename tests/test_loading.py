"""Loading checks that turn a broken tokenizer or config into one line (issue 21, item 10)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

from achilles.errors import AchillesError
from achilles.model.loading import check_tokenizer, encode, resolve_device


def _word_tokenizer(model_cls: type, vocab: dict[str, int], unk: str) -> T.PreTrainedTokenizerFast:
    tok = Tokenizer(model_cls(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("model_cls", [models.WordLevel, models.WordPiece])
def test_vocabulary_without_its_unknown_token_is_refused(model_cls: type) -> None:
    broken = _word_tokenizer(model_cls, {"the": 0, "river": 1}, "[UNK]")
    with pytest.raises(Exception, match="Missing \\[UNK\\] token"):  # the oracle: tokenizers' own failure
        broken("the sea")
    with pytest.raises(AchillesError, match=f"a {model_cls.__name__} vocabulary without its unknown token"):
        check_tokenizer(broken, "m")
    with pytest.raises(AchillesError, match="cannot encode the text: .*Missing \\[UNK\\] token"):
        encode(broken, "the sea")
    assert encode(broken, "the river") == [0, 1]  # known words still encode
    fine = _word_tokenizer(model_cls, {"the": 0, "river": 1, "[UNK]": 2}, "[UNK]")
    check_tokenizer(fine, "m")
    assert encode(fine, "the sea") == [0, 2]


def test_mps_without_mps_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(AchillesError, match="--device mps was asked for but .* no MPS"):
        resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")
