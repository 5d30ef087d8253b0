"""The runtime-independent benchmark loop: variants x (perplexity, prefill, decode) -> rows.

It drives every runtime through the engine interface of :mod:`dsnt_export.runtimes.base` and
scores perplexity with the one protocol of :mod:`dsnt_export.evaluation.perplexity`. Latency
rules: each timed repeat (and warm-up) of a prefill point runs on a fresh random prompt, since a
repeated prompt may hit caches (prefix caching, allocator reuse); decode is timed on a fresh
prompt's KV cache (the prefill untimed) with fixed step tokens.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

from dsnt_export.bench import BenchOptions
from dsnt_export.bench.env import environment
from dsnt_export.bench.schema import make_row, new_run_id
from dsnt_export.bench.target import Target, resolve_target
from dsnt_export.bench.timing import measure
from dsnt_export.errors import DsntError
from dsnt_export.preflight import check_bench
from dsnt_export.runtimes import runtime_module
from dsnt_export.runtimes.base import Engine

log = logging.getLogger(__name__)

# what a benchmark records as a failed row instead of aborting the whole run
RECOVERABLE = (DsntError, RuntimeError, NotImplementedError, OSError, ValueError)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class _Rows:
    def __init__(self, base: dict, run_id: str, sink: Callable[[dict], Any] | None):
        self.base, self.run_id, self.sink, self.rows = base, run_id, sink, []

    def emit(self, bench: str, **fields: Any) -> dict:
        row = make_row(bench, self.run_id, **{**self.base, **fields})
        self.rows.append(row)
        if self.sink is not None:
            self.sink(row)
        return row


def run(path, options: BenchOptions, *, sink=None) -> list[dict]:
    """Benchmark the artifact at ``path`` as ``options`` say; the rows (also passed to ``sink``
    one by one). A variant that cannot load or measure gives a failed row, never an abort."""
    dev = torch.device(options.device)
    mod = runtime_module(options.runtime)
    reason = mod.unavailable(options)
    env_dev = dev if reason is None else torch.device("cpu")
    out = _Rows(
        {
            "runtime": options.runtime,
            "device": str(dev),
            "env": environment(env_dev),
            "options": options.to_json(),
        },
        new_run_id(),
        sink,
    )
    if options.threads:
        torch.set_num_threads(options.threads)
    if reason is not None:
        out.emit("skip", status="skipped", reason=reason, model={"path": str(path)})
        return out.rows
    target = resolve_target(path, options.runtime, dense=options.dense)
    tokens, dataset = _eval_tokens(target, options) if options.ppl else (None, None)
    check_bench(target, options, tokens)  # --seqlen and token ids vs the model's limits
    try:  # factories are lazy: listing the variants loads no model
        pairs = list(mod.variants(target, options))
    except RECOVERABLE as e:
        out.emit("skip", status="failed", reason=_why(e), model={"path": str(target.path)})
        return out.rows
    _announce(options, sum(not isinstance(f, str) for _, f in pairs), tokens)
    for variant, factory in pairs:
        model = dict(target.info, path=str(target.dense if variant == "dense" else target.path))
        if variant == "dense":
            model.update(pattern=None, method=None)
        if isinstance(factory, str):
            out.emit("skip", status="skipped", reason=factory, variant=variant, model=model)
            continue
        try:
            engine = factory()
        except (MemoryError, *RECOVERABLE) as e:
            log.warning("%s/%s could not be loaded: %s", options.runtime, variant, e)
            out.emit(
                "skip",
                status="failed",
                reason=f"loading failed: {_why(e)}",
                variant=variant,
                model=model,
            )
            continue
        try:
            _bench_engine(engine, target, options, out, model, tokens, dataset)
        finally:
            engine.close()
    return out.rows


def _announce(options: BenchOptions, n_variants: int, tokens) -> dict:
    """Print (stderr) and log the work the bench is about to do, before anything is timed."""
    from dsnt_export.bench import work_plan

    n_windows = None
    if tokens is not None:
        n_windows = int(tokens.shape[-1]) // int(options.seqlen)
        if options.max_windows is not None:
            n_windows = min(n_windows, int(options.max_windows))
    plan = work_plan(options, n_variants, n_windows)
    print(plan["text"], file=sys.stderr, flush=True)
    log.info("%s", plan["text"])
    return plan


def _eval_tokens(target: Target, options: BenchOptions):
    from transformers import AutoTokenizer

    from dsnt_export.data import get_eval_tokens

    tok_dir = target.hf_dir or target.path
    tok = AutoTokenizer.from_pretrained(tok_dir)
    return get_eval_tokens(options.ppl_data, tok)


def _bench_engine(
    eng: Engine, target: Target, options: BenchOptions, out: _Rows, model: dict, tokens, dataset
) -> None:
    base = {
        "variant": eng.variant,
        "backend": eng.backend,
        "model": dict(model, dtype=eng.dtype_name),
    }
    for extra in eng.rows:
        out.emit(extra.pop("bench"), **base, **extra)
    if options.ppl:
        try:
            res = _perplexity(eng, tokens, dataset, options)
            out.emit("perplexity", **base, **res.to_json())
        except RECOVERABLE as e:
            out.emit("perplexity", status="failed", reason=_why(e), **base)
    if options.latency:
        _latency(eng, target, options, out, base)


def _perplexity(eng: Engine, tokens, dataset, options: BenchOptions):
    from dsnt_export.evaluation.perplexity import perplexity

    return perplexity(
        eng,
        tokens,
        options.seqlen,
        batch_size=options.ppl_batch_size,
        max_windows=options.max_windows,
        progress=options.progress,
        dataset=dataset,
    )


def _latency(eng: Engine, target: Target, options: BenchOptions, out: _Rows, base: dict) -> None:
    vocab = int(target.info.get("vocab_size") or 32000)
    for fields in latency_rows(eng, options, vocab, target.info.get("max_position_embeddings")):
        out.emit("latency", **base, **fields)


def latency_rows(eng: Engine, options: BenchOptions, vocab: int, max_pos: int | None = None):
    """Yield the fields of one ``latency`` row per (batch, prompt length, phase) of ``options``.

    Token ids are drawn from ``[4, vocab)`` with ``options.seed`` (the same sequence for every
    variant); every timed repeat and warm-up gets a fresh prompt. A configuration that fails
    (e.g. out of memory) yields a failed row and the loop goes on."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(options.seed)
    cfgs = [(b, n) for b in options.batch_sizes for n in options.prompt_lengths]
    _engine_warmup(eng, vocab, options)
    bar = tqdm(
        cfgs,
        desc=f"{options.runtime}/{eng.variant} latency",
        unit="cfg",
        disable=not options.progress,
    )
    for b, n in bar:
        cfg = {"batch_size": b, "prompt_len": n}
        if max_pos and n + options.decode_tokens > int(max_pos):
            yield {
                "status": "skipped",
                **cfg,
                "reason": (
                    f"prompt {n} + {options.decode_tokens} decode tokens exceed the model's "
                    f"max_position_embeddings {max_pos}"
                ),
            }
            continue

        def prompt(b=b, n=n):
            return eng.to_input(torch.randint(4, vocab, (b, n), generator=g))

        steps = torch.randint(4, vocab, (options.decode_tokens, b, 1), generator=g)
        try:
            yield from _one_config(eng, options, cfg, prompt, steps)
        except (MemoryError, *RECOVERABLE) as e:
            yield {"status": "failed", "reason": _why(e), **cfg}
    bar.close()


def _engine_warmup(eng: Engine, vocab: int, options: BenchOptions) -> None:
    """One untimed prefill + decode step before the first configuration (lazy initialisation,
    allocator growth, kernel selection), on top of each point's own warm-up runs."""
    if options.warmup == 0:
        return
    ids = torch.randint(4, vocab, (1, 8), generator=torch.Generator().manual_seed(99))
    try:
        state = eng.prefill(eng.to_input(ids))
        if eng.supports_decode and not eng.decode_by_generate:
            eng.decode_step(state, eng.to_input(ids[:, :1]))
    except RECOVERABLE as e:  # the measured points will record the failure themselves
        log.debug("engine warm-up failed: %s", e)


def _one_config(eng: Engine, options: BenchOptions, cfg: dict, prompt, steps):
    b, n = cfg["batch_size"], cfg["prompt_len"]
    opts = {"device": eng.device, "warmup": options.warmup, "repeats": options.repeats}
    with eng.peak_memory() as pm:
        t = measure(eng.prefill, setup=prompt, **opts)
    note = {"prefill_note": eng.prefill_note} if eng.prefill_note else {}
    yield {
        **cfg,
        "phase": "prefill",
        "decode_tokens": 0,
        "timing": t.to_json(),
        "latency_ms": t.median_s * 1e3,
        "tokens_per_s": b * n / t.median_s,
        "prompt": "fresh random ids per timed repeat",
        **note,
        **pm.to_json(),
    }
    k = options.decode_tokens
    if k == 0:
        return
    if not eng.supports_decode:
        yield {
            "status": "skipped",
            "reason": eng.decode_skip_reason,
            **cfg,
            "phase": "decode",
            "decode_tokens": k,
        }
        return
    total, extra, mem = _decode(eng, options, prompt, steps, t.median_s)
    yield {
        **cfg,
        "phase": "decode",
        "decode_tokens": k,
        **extra,
        "latency_ms": total / k * 1e3,
        "tokens_per_s": (b * k / total) if total > 0 else None,
        **mem,
    }


def _decode(eng: Engine, options: BenchOptions, prompt, steps, prefill_s: float):
    """(seconds for ``decode_tokens`` steps, extra row fields, peak memory fields)."""
    opts = {"device": eng.device, "warmup": options.warmup, "repeats": options.repeats}
    k = options.decode_tokens
    if eng.decode_by_generate:
        with eng.peak_memory() as pm:
            tg = measure(lambda x: eng.generate(x, k + 1), setup=prompt, **opts)
        extra = {"method": "generate(1+N) - generate(1), medians", "timing": tg.to_json()}
        return max(tg.median_s - prefill_s, 0.0), extra, pm.to_json()
    xs = [eng.to_input(s) for s in steps]

    def run_steps(state):
        for s in xs:
            state = eng.decode_step(state, s)
        return state

    with eng.peak_memory() as pm:
        td = measure(run_steps, setup=lambda: eng.prefill(prompt()), **opts)
    return td.median_s, {"timing": td.to_json()}, pm.to_json()
