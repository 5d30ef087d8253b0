"""vLLM's contract for a checkpoint's config.json, as of vLLM 0.32 (see docs/runtimes.md).

- ``architectures`` must name model classes vLLM implements: the installed vLLM's own registry
  decides when vLLM is installed (:func:`supported_architectures`); elsewhere the table below,
  read from vLLM 0.32.0's registry (an unknown name is reported, not guessed).
- No ``quantization_config.sparsity_config`` with targets: current vLLM refuses to load a
  checkpoint that has one with non-empty targets (even ``format: "dense"``), since its 2:4
  kernels were removed. One without targets loads but is stale: a warning.
- The legacy ``sparse-24-bitmask`` layout loads only on vLLM <= 0.18 on Hopper (sm90).
"""

from __future__ import annotations

import functools
import importlib.util

# one cleaner for every loader (prune, eval, export, bench): re-exported for the writers
from dsnt_export.config_metadata import strip_sparsity_config  # noqa: F401

#: the vLLM release the fallback table below was read from
FALLBACK_VLLM_VERSION = "0.32.0"

# HF ``architectures`` names vLLM 0.32.0 implements for text generation: its registry's
# ``_TEXT_GENERATION_MODELS`` plus the decoder-only names of this table's earlier edition that its
# ``ModelRegistry.get_supported_archs()`` still lists. Used only where vLLM is not installed.
FALLBACK_ARCHITECTURES = frozenset(
    """
    AXK1ForCausalLM AfmoeForCausalLM ApertusForCausalLM ArceeForCausalLM BailingMoeForCausalLM
    BailingMoeV2ForCausalLM BailingMoeV2_5ForCausalLM BailingMoeV3ForCausalLM BloomForCausalLM
    ChatGLMForConditionalGeneration ChatGLMModel Cohere2ForCausalLM Cohere2MoeForCausalLM
    CohereForCausalLM DbrxForCausalLM DeciLMForCausalLM DeepseekForCausalLM
    DeepseekV2ForCausalLM DeepseekV32ForCausalLM DeepseekV3ForCausalLM DeepseekV4ForCausalLM
    Ernie4_5ForCausalLM Ernie4_5_MoeForCausalLM Exaone4ForCausalLM ExaoneForCausalLM
    ExaoneMoEForCausalLM ExaoneMoeForCausalLM FalconForCausalLM FalconH1ForCausalLM
    FalconMambaForCausalLM GPT2LMHeadModel GPTBigCodeForCausalLM GPTJForCausalLM
    GPTNeoXForCausalLM Gemma2ForCausalLM Gemma3ForCausalLM Gemma3nForCausalLM Gemma4ForCausalLM
    GemmaForCausalLM Glm4ForCausalLM Glm4MoeForCausalLM Glm4MoeLiteForCausalLM
    Glm5NextForCausalLM GlmForCausalLM GlmMoeDsaForCausalLM GptOssForCausalLM GraniteForCausalLM
    GraniteMoeForCausalLM GraniteMoeHybridForCausalLM GraniteMoeSWAForCausalLM
    GraniteMoeSharedForCausalLM GraniteSWAForCausalLM HCXVisionV2ForCausalLM HYV3ForCausalLM
    HYV4ForCausalLM HrmTextForCausalLM HunYuanDenseV1ForCausalLM HunYuanMoEV1ForCausalLM
    HyperCLOVAXForCausalLM IQuestCoderForCausalLM IQuestLoopCoderForCausalLM InklingForCausalLM
    InklingForConditionalGeneration InternLM2ForCausalLM InternLM3ForCausalLM JambaForCausalLM
    K2HorizonForCausalLM KimiLinearForCausalLM LLaMAForCausalLM LagunaForCausalLM
    Lfm2ForCausalLM Lfm2MoeForCausalLM Llama4ForCausalLM LlamaForCausalLM
    LongcatFlashForCausalLM LongcatFlashNgramForCausalLM Mamba2ForCausalLM MambaForCausalLM
    MiMoForCausalLM MiMoV2FlashForCausalLM MiMoV2ForCausalLM MiniCPM3ForCausalLM
    MiniCPMForCausalLM MiniMaxM2ForCausalLM MiniMaxM3SparseForCausalLM Ministral3ForCausalLM
    MistralForCausalLM MistralLarge3ForCausalLM MixtralForCausalLM MuseGlimmerForCausalLM
    NemotronForCausalLM NemotronHForCausalLM NemotronHPuzzleForCausalLM OPTForCausalLM
    Olmo2ForCausalLM Olmo3ForCausalLM OlmoForCausalLM OlmoHybridForCausalLM OlmoeForCausalLM
    OrionForCausalLM PanguEmbeddedForCausalLM PanguProMoEV2ForCausalLM PanguUltraMoEForCausalLM
    Param2MoEForCausalLM Phi3ForCausalLM PhiForCausalLM PhiMoEForCausalLM Plamo3ForCausalLM
    Qwen2ForCausalLM Qwen2MoeForCausalLM Qwen3ForCausalLM Qwen3MoeForCausalLM
    Qwen3NextForCausalLM Qwen3_5ForCausalLM Qwen3_5MoeForCausalLM Qwen4ExpForCausalLM
    Rnj1ForCausalLM SarvamMLAForCausalLM SarvamMoEForCausalLM SeedOssForCausalLM
    SmolLM3ForCausalLM SolarForCausalLM StableLmForCausalLM Starcoder2ForCausalLM
    Step1ForCausalLM Step3TextForCausalLM Step3p5ForCausalLM TeleChat2ForCausalLM
    TeleChat3ForCausalLM TeleFLMForCausalLM Zamba2ForCausalLM
    """.split()
)
#: the name earlier releases of this module exported
KNOWN_ARCHITECTURES = FALLBACK_ARCHITECTURES


@functools.lru_cache(maxsize=1)
def supported_architectures() -> tuple[frozenset[str], str]:
    """(architecture names vLLM loads, where the list comes from).

    From the installed vLLM's own registry (``vllm.ModelRegistry.get_supported_archs()``) when
    vLLM imports here; otherwise :data:`FALLBACK_ARCHITECTURES` and the reason. Importing vLLM
    takes seconds: the answer is cached for the process.
    """
    fallback = f"the table read from vLLM {FALLBACK_VLLM_VERSION}"
    if importlib.util.find_spec("vllm") is None:
        return FALLBACK_ARCHITECTURES, f"{fallback} (vLLM is not installed here)"
    try:
        import vllm
        from vllm import ModelRegistry

        archs = frozenset(ModelRegistry.get_supported_archs())
    except (ImportError, RuntimeError, AttributeError, OSError) as e:  # a broken vLLM install
        return FALLBACK_ARCHITECTURES, f"{fallback} (importing vLLM failed: {e})"
    return archs, f"vLLM {getattr(vllm, '__version__', '?')}'s ModelRegistry"


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
        known, source = supported_architectures()
        unknown = [a for a in archs if a not in known]
        if unknown:
            problems.append(
                f"architecture(s) {unknown} not supported by vLLM (per {source}); vLLM picks "
                "the model class from config.json's 'architectures'"
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
