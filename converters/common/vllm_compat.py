"""vLLM's contract for a checkpoint's config.json, as of vLLM 0.33 (see docs/runtimes.md).

- ``architectures`` must name model classes vLLM implements (the table below lists vLLM's
  text-generation architectures; an unknown one is reported, not guessed).
- No ``quantization_config.sparsity_config`` with targets: current vLLM refuses to load a
  checkpoint that has one with non-empty targets (even ``format: "dense"``), since its 2:4
  kernels were removed. One without targets loads but is stale: a warning.
- The legacy ``sparse-24-bitmask`` layout loads only on vLLM <= 0.18 on Hopper (sm90).
"""

from __future__ import annotations

# one cleaner for every loader (prune, eval, export, bench): re-exported for the writers
from dsnt_export.config_metadata import strip_sparsity_config  # noqa: F401

# HF ``architectures`` names with a vLLM implementation (text generation, decoder-only).
KNOWN_ARCHITECTURES = frozenset(
    """
    AquilaForCausalLM AquilaModel ArceeForCausalLM ArcticForCausalLM BaiChuanForCausalLM
    BaichuanForCausalLM BailingMoeForCausalLM BambaForCausalLM BloomForCausalLM
    ChatGLMForConditionalGeneration ChatGLMModel Cohere2ForCausalLM CohereForCausalLM
    DbrxForCausalLM DeciLMForCausalLM DeepseekForCausalLM DeepseekV2ForCausalLM
    DeepseekV3ForCausalLM Dots1ForCausalLM Ernie4_5_MoeForCausalLM Ernie4_5ForCausalLM
    Exaone4ForCausalLM ExaoneForCausalLM FalconForCausalLM FalconH1ForCausalLM
    FalconMambaForCausalLM Gemma2ForCausalLM Gemma3ForCausalLM GemmaForCausalLM Glm4ForCausalLM
    Glm4MoeForCausalLM GlmForCausalLM GPT2LMHeadModel GPTBigCodeForCausalLM GPTJForCausalLM
    GPTNeoXForCausalLM GptOssForCausalLM GraniteForCausalLM GraniteMoeForCausalLM
    GraniteMoeHybridForCausalLM GraniteMoeSharedForCausalLM Grok1ModelForCausalLM
    HunYuanDenseV1ForCausalLM HunYuanMoEV1ForCausalLM InternLM2ForCausalLM
    InternLM2VEForCausalLM InternLM3ForCausalLM InternLMForCausalLM JAISLMHeadModel
    JambaForCausalLM Llama4ForCausalLM LlamaForCausalLM LLaMAForCausalLM Mamba2ForCausalLM
    MambaForCausalLM MiMoForCausalLM MiniCPM3ForCausalLM MiniCPMForCausalLM MiniMaxForCausalLM
    MiniMaxM1ForCausalLM MiniMaxText01ForCausalLM MistralForCausalLM MixtralForCausalLM
    MptForCausalLM MPTForCausalLM NemotronForCausalLM NemotronHForCausalLM Olmo2ForCausalLM
    Olmo3ForCausalLM OlmoeForCausalLM OlmoForCausalLM OPTForCausalLM OrionForCausalLM
    PersimmonForCausalLM Phi3ForCausalLM Phi3SmallForCausalLM PhiForCausalLM PhiMoEForCausalLM
    Plamo2ForCausalLM Qwen2ForCausalLM Qwen2MoeForCausalLM Qwen3ForCausalLM Qwen3MoeForCausalLM
    Qwen3NextForCausalLM QWenLMHeadModel RWForCausalLM SeedOssForCausalLM SmolLM3ForCausalLM
    SolarForCausalLM StableLMEpochForCausalLM StableLmForCausalLM Starcoder2ForCausalLM
    TeleChat2ForCausalLM TeleFLMForCausalLM XverseForCausalLM Zamba2ForCausalLM
    """.split()
)

LEGACY_CAVEAT = (
    "sparse-24-bitmask checkpoints load ONLY on vLLM <= 0.18.x on Hopper (sm90) GPUs; current "
    "vLLM (>= 0.19, 2:4 kernels removed) refuses a config with a sparsity_config, and "
    "transformers >= 5.10 no longer decompresses it. Export the default plain layout for "
    "current vLLM."
)


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
    for key, sc in _sparsity_configs(config):
        if not legacy_layout and _targets(sc):
            fmt = sc.get("format") if isinstance(sc, dict) else sc
            problems.append(
                f"config.json carries {key}.sparsity_config (format {fmt!r}, "
                f"{len(_targets(sc))} targets); current vLLM refuses to load it. Remove it "
                "(dsnt-export export hf does) and keep sparsity metadata in the sidecar manifest"
            )
    return problems


def config_warnings(config: dict, *, legacy_layout: bool = False) -> list[str]:
    """Config details current vLLM tolerates but that should go (a target-less sparsity_config)."""
    return [
        f"config.json carries {key}.sparsity_config without targets: current vLLM ignores it, "
        "but it is stale metadata; remove it"
        for key, sc in _sparsity_configs(config)
        if not legacy_layout and not _targets(sc)
    ]


def _sparsity_configs(config: dict) -> list[tuple[str, object]]:
    out = []
    for key in ("quantization_config", "compression_config"):
        q = config.get(key)
        if isinstance(q, dict) and q.get("sparsity_config") is not None:
            out.append((key, q["sparsity_config"]))
    return out


def _targets(sc) -> list:
    """The targets of a sparsity_config (a malformed one counts as targeting something)."""
    if not isinstance(sc, dict):
        return [sc]
    t = sc.get("targets")
    return list(t) if isinstance(t, (list, tuple)) else ([t] if t else [])
