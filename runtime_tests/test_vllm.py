"""vLLM: the HF checkpoint loads in the offline LLM API and its prompt log-probabilities match
the reference (needs vllm + a CUDA GPU; the legacy sparse-24-bitmask layout needs vLLM <= 0.18)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def llm(artifact, runtime_device):
    artifact.require("hf")
    vllm = pytest.importorskip(
        "vllm", reason="vllm not installed (pip install 'dsnt-export[vllm]')"
    )
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: vLLM needs one")
    if artifact.export.get("format") == "sparse-24-bitmask":
        major, minor = (int(x) for x in vllm.__version__.split(".")[:2])
        if (major, minor) > (0, 18):
            pytest.skip(
                f"legacy sparse-24-bitmask layout: vLLM {vllm.__version__} > 0.18 cannot "
                "load it (by design); test it on vLLM <= 0.18 on Hopper"
            )
    return vllm.LLM(
        model=str(artifact.path),
        dtype="float32" if artifact.export.get("dtype") == "float32" else "auto",
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=256,
        seed=0,
    )


def _ref_logprobs(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]


def test_vllm_prompt_logprobs_match_reference(llm, reference):
    from vllm import SamplingParams

    ids = reference["input_ids"]
    want = _ref_logprobs(reference["logits"], ids)
    outs = llm.generate(
        [{"prompt_token_ids": row.tolist()} for row in ids],
        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
    )
    got = np.array(
        [
            [lp[int(t)].logprob for lp, t in zip(o.prompt_logprobs[1:], row[1:], strict=True)]
            for o, row in zip(outs, ids, strict=True)
        ]
    )
    diff = np.abs(got - want)
    # vLLM runs fp32 checkpoints in reduced precision unless asked; bound the mean and the max
    assert diff.mean() < 0.05 and diff.max() < 0.5, f"mean {diff.mean():.3g} max {diff.max():.3g}"
