"""Tiny seeded random models of every supported architecture, and a tiny BPE tokenizer.

Configs are built from explicit constructor kwargs and each model's parameter count is
checked, so a typo in a config field cannot silently build a full-size model.
"""

from __future__ import annotations

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Critical neurons are the handful of units whose removal makes a model collapse.",
    "A language model predicts the next token from the tokens that came before it.",
    "Perplexity is the exponential of the mean negative log-likelihood per token.",
    "Bookends is a film about two sisters who return to their family home in the spring.",
    "Masking a channel sets its output to zero at every position of every sequence.",
] * 4

TEXT = (
    "The river ran past the old mill, and the children of the village played on its banks "
    "every summer until the long evenings grew cold and the first leaves began to fall."
)

VOCAB = 320
D, FF, LAYERS, HEADS, KV = 32, 48, 2, 4, 2


def make_tokenizer() -> T.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that puts BOS first, as Llama's does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS + [TEXT], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def _llama_like(cls, **extra):  # noqa: ANN001, ANN202
    return cls(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False, **extra,
    )


def configs() -> dict[str, T.PretrainedConfig]:
    return {
        "llama": _llama_like(T.LlamaConfig),
        "mistral": _llama_like(T.MistralConfig),
        "qwen2": _llama_like(T.Qwen2Config),
        "qwen3": _llama_like(T.Qwen3Config, head_dim=D // HEADS),
        "gemma": _llama_like(T.GemmaConfig, head_dim=D // HEADS),
        "gemma2": _llama_like(T.Gemma2Config, head_dim=D // HEADS),
        "gemma3_text": _llama_like(T.Gemma3TextConfig, head_dim=D // HEADS),
        "olmo2": _llama_like(T.Olmo2Config),
        "smollm3": _llama_like(T.SmolLM3Config),
        "granite": _llama_like(
            T.GraniteConfig, embedding_multiplier=2.0, attention_multiplier=0.5,
            residual_multiplier=1.5, logits_scaling=0.5,
        ),
        "phi": T.PhiConfig(
            vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=256, bos_token_id=0,
            eos_token_id=1, tie_word_embeddings=False,
        ),
        "starcoder2": _llama_like(T.Starcoder2Config),
        "phi3": T.Phi3Config(
            vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
            bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
        ),
        "gpt2": T.GPT2Config(
            vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_inner=FF, n_positions=256,
            bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ),
        "gpt_neox": T.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=256, bos_token_id=0,
            eos_token_id=1, tie_word_embeddings=False,
        ),
    }


ARCHS = tuple(configs())

MAX_PARAMS = 60_000


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random model of ``arch`` in float32 eval mode (parameter count checked)."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(configs()[arch], dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert 10_000 < n < MAX_PARAMS, f"{arch}: {n} parameters, the tiny config did not apply"
    return model.eval()


def llama_param_count() -> int:
    """Hand count for the tiny Llama: embeddings, head, and per layer q,k,v,o, MLP, 2 norms."""
    head_dim = D // HEADS
    attn = D * D + 2 * D * KV * head_dim + D * D
    mlp = 3 * D * FF
    return 2 * VOCAB * D + LAYERS * (attn + mlp + 2 * D) + D


def found_run(folder, model_name: str):  # noqa: ANN001, ANN201
    """A tiny Llama (``ModelSpec(model=model_name)``) ranked and identified on :data:`TEXT`
    into ``folder`` (``ranking.json``, ``identification.json``): the report tests' run.
    Returns the loaded model and the identification."""
    from achilles import IdentifyConfig, LoadedModel, ModelSpec, RankConfig, find

    lm = LoadedModel(make_model("llama"), make_tokenizer(), ModelSpec(model=model_name))
    ranking, ident = find(
        lm, TEXT, RankConfig(samples=4, keep=100, components=("mlp.down", "attn.o")),
        IdentifyConfig(epsilon=0.001, max_neurons=30),
    )
    ranking.save(folder / "ranking.json")
    ident.save(folder / "identification.json")
    return lm, ident
