"""Tiny random causal LMs of every supported architecture, built in-process (no downloads).

For structural tests only: random weights say nothing about sparsification quality.
"""

from __future__ import annotations

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt")
VOCAB = 128


def tiny_config(model_type: str, *, hidden: int = 64, inter: int = 128, layers: int = 2, **kw):
    import transformers as T

    if model_type == "opt":
        cfg = dict(
            vocab_size=VOCAB,
            hidden_size=hidden,
            ffn_dim=inter,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=hidden,
            dropout=0.0,
        )
        cfg.update(kw)
        return T.OPTConfig(**cfg)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    cfg.update(kw)
    return T.AutoConfig.for_model(model_type, **cfg)


def tiny_model(model_type: str, *, seed: int = 0, **kw):
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(model_type, **kw))
    # larger-than-init weights so activations and statistics are not all tiny
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def calib_ids(n: int = 4, t: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)
