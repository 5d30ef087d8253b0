"""vLLM's contract for a checkpoint's config.json, as of vLLM 0.33 (see docs/runtimes.md).

- ``architectures[0]`` must be a model class vLLM implements (a small table of the common
  decoder-only ones is kept here; an unknown one is reported, not guessed).
- No ``quantization_config.sparsity_config``: current vLLM refuses to load a checkpoint that has
  one with non-empty targets (even ``format: "dense"``), since its 2:4 kernels were removed.
- The legacy ``sparse-24-bitmask`` layout loads only on vLLM <= 0.18 on Hopper (sm90).
"""

from __future__ import annotations

# HF architecture names with a vLLM implementation (text decoder-only families).
KNOWN_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "OPTForCausalLM",
        "GPT2LMHeadModel",
        "GPTNeoXForCausalLM",
        "GPTJForCausalLM",
        "GPTBigCodeForCausalLM",
        "BloomForCausalLM",
        "FalconForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "StableLmForCausalLM",
        "Starcoder2ForCausalLM",
        "OlmoForCausalLM",
        "Olmo2ForCausalLM",
        "InternLM2ForCausalLM",
        "GraniteForCausalLM",
        "CohereForCausalLM",
        "DeepseekForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
        "BaichuanForCausalLM",
        "MiniCPMForCausalLM",
        "SmolLM3ForCausalLM",
        "ExaoneForCausalLM",
    }
)

LEGACY_CAVEAT = (
    "sparse-24-bitmask checkpoints load ONLY on vLLM <= 0.18.x on Hopper (sm90) GPUs; current "
    "vLLM (>= 0.19, 2:4 kernels removed) refuses a config with a sparsity_config, and "
    "transformers >= 5.10 no longer decompresses it. Export the default plain layout for "
    "current vLLM."
)


def strip_sparsity_config(config: dict) -> tuple[dict, list[str]]:
    """A copy of ``config`` without any sparsity_config, and what was removed (for a warning).

    A quantization_config left empty (or holding only ``quant_method`` and bookkeeping) is dropped.
    """
    out = dict(config)
    removed: list[str] = []
    for key in ("quantization_config", "compression_config"):
        q = out.get(key)
        if not isinstance(q, dict) or "sparsity_config" not in q:
            continue
        q = {k: v for k, v in q.items() if k != "sparsity_config"}
        removed.append(f"{key}.sparsity_config")
        rest = {
            k: v
            for k, v in q.items()
            if k
            not in (
                "quant_method",
                "version",
                "format",
                "quantization_status",
                "global_compression_ratio",
            )
            and v not in (None, {}, [])
        }
        if rest:
            out[key] = q
        else:
            del out[key]
            removed.append(f"{key} (empty without it)")
    return out, removed


def config_problems(config: dict, *, legacy_layout: bool = False) -> list[str]:
    """Why current vLLM would not load a checkpoint with this config.json ([] = none found).

    ``legacy_layout``: the checkpoint is a deliberate sparse-24-bitmask export; its
    sparsity_config is then expected and not reported (the version caveat applies instead).
    """
    problems: list[str] = []
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs:
        problems.append(
            "config.json has no 'architectures' list; vLLM picks the model class from it"
        )
    else:
        unknown = [a for a in archs if a not in KNOWN_ARCHITECTURES]
        if unknown:
            problems.append(
                f"architecture(s) {unknown} not in the table of vLLM-supported "
                "causal LMs this tool knows"
            )
    for key in ("quantization_config", "compression_config"):
        q = config.get(key)
        if isinstance(q, dict) and q.get("sparsity_config") is not None and not legacy_layout:
            sc = q["sparsity_config"]
            problems.append(
                f"config.json carries {key}.sparsity_config (format "
                f"{sc.get('format') if isinstance(sc, dict) else sc!r}); current vLLM refuses to "
                "load it. Remove it (dsnt-export export hf does) and keep sparsity metadata in "
                "the sidecar manifest"
            )
    return problems
