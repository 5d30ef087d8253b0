"""The prune pipeline side by side with its floor and its peer, on the same calibration ids.

    python benchmarks/bench_pipeline.py                      # embedded SmolLM2-135M, default recipe
    python benchmarks/bench_pipeline.py --configs floor,sparsegpt --no-ppl
    python benchmarks/bench_pipeline.py --peer-python .venv-peer/bin/python

One invocation draws the calibration ids once (the recipe's ``calib``, default the default
recipe's 64 x 256 stdlib-docs windows) and measures, each configuration in its own subprocess (so
its peak host memory is its own):

floor      two plain passes of every decoder block over those ids (block-0 inputs caught with
           :func:`dsnt_export.sparsify.capture.capture_block_inputs`, then each block run twice, no
           hooks: what any block-by-block prune needs at least: dense statistics, pruned re-run);
           median of ``--floor-repeats`` after one warm-up pass of block 0;
sparsegpt  our prune with the recipe's pattern, SparseGPT alone (``refine: none``), split by stage
           (``capture_s``, ``stats_s``, ``init_s``, ``refine_s``, ``rerun_s`` from the run
           report's timings; where a report lacks a stage key, init/refine are summed from the
           per-layer records and the rest is ``forwards_s``), plus ``save_s`` (the checkpoint
           written as ``dsnt-export prune`` writes it); one run, or with ``--prune-repeats K``
           the run of median time among K fresh processes (``repeat_seconds``: all K);
recipe     the same for the whole recipe (default: SparseGPT + refit);
peer       llm-compressor's ``oneshot`` with its ``SparseGPTModifier`` (same N:M pattern, block
           size and dampening as ours) on the same ids (a tokenised ``datasets.Dataset``: nothing
           downloaded or re-tokenised; sequential pipeline, no shuffling, batch 1), in the
           interpreter ``--peer-python`` (default: this one); skipped with the reason when
           llm-compressor does not import there.

Rows (schema :mod:`dsnt_export.bench.schema`, ``bench: "pipeline"``; one per configuration,
``config`` = floor / sparsegpt / recipe / peer) are appended to
``benchmarks/results/pipeline_<machine>.jsonl`` (``--out``); a table is printed. Fields beyond the
common ones: ``seconds`` (floor: the median two-pass time; prunes: calibration through re-run,
the save excluded; peer: the ``oneshot`` call), ``stages`` (seconds per stage), ``ratio_to_floor``
and ``ratio_to_peer`` (``seconds`` over the floor's / the peer's, same run), ``peak_host_bytes``
(``VmHWM`` of the configuration's process at the end of its timed work: interpreter, libraries and
model included; ``host_after_load_bytes`` is its RSS once the model was loaded),
``peak_device_bytes`` (``torch.cuda.max_memory_allocated``; null on CPU), ``ppl`` (held-out
perplexity of the model that configuration produced, ``--ppl-windows`` windows of the recipe's
``eval_seqlen``; the floor row carries the dense model's), ``mask_ok``, ``threads``, ``model``,
``calibration`` (its description and token hash), ``load_s``, and for our prunes
``sparsegpt_sweep`` ("numba": SparseGPT's compiled CPU sweep, compiled or loaded from its disk
cache before the timed prune; "torch ops": CUDA, or Numba unavailable).

Timings taken while other jobs share the cores are only comparable within one invocation: read
the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: configurations in the order they run (the floor and the peer first: the prunes' ratios need them)
CONFIGS = ("floor", "peer", "sparsegpt", "recipe")
#: stage keys a run report's ``timings`` carries (``total_s``: capture through the last re-run)
STAGE_KEYS = ("capture_s", "stats_s", "init_s", "refine_s", "rerun_s", "total_s")
BENCH = "pipeline"


# ------------------------------------------------------------------------- pure helpers


def stage_seconds(timings: dict, layer_times: list[dict]) -> dict:
    """Seconds per stage of one prune from its run report.

    ``timings``: ``SparsifyReport.timings`` (seconds; stage totals :data:`STAGE_KEYS` where the
    driver records them); ``layer_times``: each ``LayerRecord.time_s`` (``{"init", "refine", ...}``
    seconds). Returns ``{capture_s, stats_s, init_s, refine_s, rerun_s, total_s, other_s,
    source}``: ``source`` is ``"report"`` when the report has every stage key; otherwise
    ``"layer records"``: ``init_s``/``refine_s`` summed over the layers, ``stats_s``/``rerun_s``
    None and ``forwards_s`` = total - capture - init - refine (statistics + re-run + bookkeeping).
    ``other_s`` = total minus the known stages (never below 0). Missing ``total_s`` raises
    ``KeyError``.
    """
    total = float(timings["total_s"])
    out: dict = {k: timings.get(k) for k in STAGE_KEYS}
    if all(out[k] is not None for k in STAGE_KEYS):
        out["source"] = "report"
    else:
        out["source"] = "layer records"
        if out["init_s"] is None:
            out["init_s"] = sum(float(t.get("init", 0.0)) for t in layer_times)
        if out["refine_s"] is None:
            out["refine_s"] = sum(float(t.get("refine", 0.0)) for t in layer_times)
        known = (out["capture_s"] or 0.0) + out["init_s"] + out["refine_s"]
        out["forwards_s"] = max(0.0, total - known - (out["stats_s"] or 0) - (out["rerun_s"] or 0))
    known = sum(float(out[k] or 0.0) for k in STAGE_KEYS if k != "total_s")
    known += out.get("forwards_s") or 0.0
    out["other_s"] = max(0.0, total - known)
    return out


def add_ratios(rows: list[dict]) -> list[dict]:
    """Fill ``ratio_to_floor`` / ``ratio_to_peer`` of every ok prune row, in place; returns rows.

    A prune row is an ok row whose ``config`` is neither "floor" nor "peer"; its ratio is its
    ``seconds`` over the ok floor's / peer's ``seconds`` (None where that row is absent or not ok).
    The peer row gets ``ratio_to_floor`` too.
    """

    def ref(config: str) -> float | None:
        for r in rows:
            if r.get("config") == config and r.get("status") == "ok" and r.get("seconds"):
                return float(r["seconds"])
        return None

    floor, peer = ref("floor"), ref("peer")
    for r in rows:
        if r.get("status") != "ok" or r.get("config") == "floor":
            continue
        s = float(r["seconds"])
        r["ratio_to_floor"] = s / floor if floor else None
        if r.get("config") != "peer":
            r["ratio_to_peer"] = s / peer if peer else None
    return rows


def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if b else "-"


def _f(x, fmt: str = "{:.1f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table: seconds, ratios, stages, peak memory (GiB), perplexity."""
    head = (
        "| config | method | s | x floor | x peer | capture | stats | init | refine | rerun "
        "| fwd* | save | peak host GiB | peak dev GiB | ppl |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r.get('config')} | {r['status']}: {r.get('reason', '')[:80]} |")
            continue
        st = r.get("stages") or {}
        ppl = (r.get("ppl") or {}).get("ppl")
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r.get("config")),
                    str(r.get("method") or "-"),
                    _f(r.get("seconds")),
                    _f(r.get("ratio_to_floor"), "{:.2f}x"),
                    _f(r.get("ratio_to_peer"), "{:.2f}x"),
                    *(
                        _f(st.get(k))
                        for k in ("capture_s", "stats_s", "init_s", "refine_s", "rerun_s")
                    ),
                    _f(st.get("forwards_s")),
                    _f(st.get("save_s")),
                    _gib(r.get("peak_host_bytes")),
                    _gib(r.get("peak_device_bytes")),
                    _f(ppl, "{:.3f}"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def code_version() -> str | None:
    """``git describe --always --dirty`` of the checkout this script runs from; None outside git."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def default_machine(device: str) -> str:
    """Label of the rows file: ``dev_cpu`` on the CPU, the GPU's name (``nvidia_h200``) on CUDA."""
    if not device.startswith("cuda"):
        return "dev_cpu"
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "cuda"


# ---------------------------------------------------------------------- memory (stdlib only)


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_peak_bytes() -> int | None:
    """This process's peak resident set (``VmHWM``; ``getrusage`` where /proc is absent), bytes."""
    b = _status_bytes("VmHWM")
    if b is None:
        try:
            import resource

            b = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except (ImportError, OSError):
            return None
    return b


def host_now_bytes() -> int | None:
    """This process's current resident set (``VmRSS``), bytes; None where /proc is absent."""
    return _status_bytes("VmRSS")


# ------------------------------------------------------------------ measurements (torch)


def floor_passes(
    model,
    ids,
    *,
    device,
    batch_size: int = 8,
    repeats: int = 3,
    warmup: bool = True,
    progress: bool = False,
) -> dict:
    """Time two plain passes of every decoder block of ``model`` over ``ids`` ``[N, T]`` int64.

    Block-0 inputs are caught once (``capture_s``); then, ``repeats`` times, each block (moved to
    ``device`` and back, as the prune does) runs over all inputs twice, batches of ``batch_size``
    windows, no hooks, the second pass's outputs feeding the next block. Before that, one
    untimed pass of block 0 (``warmup``). Returns ``{seconds (median of the repeats), timing
    (Timing JSON), capture_s, one_pass_s (seconds / 2), batch_size, passes: 2}``. Raises what
    ``capture_block_inputs`` raises for an unsupported model.
    """
    import torch

    from dsnt_export.adapters import get_adapter
    from dsnt_export.bench.timing import Timing, sync
    from dsnt_export.sparsify.capture import (
        batches,
        capture_block_inputs,
        normalize_samples,
        run_block,
    )

    dev = torch.device(device)
    adapter = get_adapter(model)
    blocks = adapter.get_blocks(model)
    samples = normalize_samples(ids)
    t0 = time.perf_counter()
    cap = capture_block_inputs(model, adapter, samples, device=dev)
    sync(dev)
    capture_s = time.perf_counter() - t0
    groups = batches(cap.inputs, batch_size)

    def two_passes(n_blocks: int, timed: bool) -> float:
        inputs = cap.inputs
        sync(dev)
        t = time.perf_counter()
        for i, block in enumerate(list(blocks)[:n_blocks]):
            home = next(block.parameters()).device
            block.to(dev)
            kw = cap.block_kwargs[i]
            with torch.no_grad():
                run_block(block, inputs, kw, groups, device=dev, collect_outputs=False)
                if timed or i + 1 < n_blocks:
                    inputs = run_block(block, inputs, kw, groups, device=dev, collect_outputs=True)
            block.to(home)
        sync(dev)
        return time.perf_counter() - t

    if warmup:
        two_passes(1, timed=False)
    samples_s = []
    from tqdm.auto import tqdm

    for _ in tqdm(range(repeats), desc="floor (2 passes)", disable=not progress):
        samples_s.append(two_passes(len(blocks), timed=True))
    timing = Timing(tuple(samples_s), 1 if warmup else 0)
    return {
        "seconds": timing.median_s,
        "timing": timing.to_json(),
        "capture_s": capture_s,
        "one_pass_s": timing.median_s / 2,
        "batch_size": int(batch_size),
        "passes": 2,
    }


def prune_stages(model, ids, config, *, device, plan=None, progress: bool = False):
    """Prune ``model`` in place with :func:`dsnt_export.sparsify.driver.sparsify`; time its stages.

    ``ids``: ``[N, T]`` int64 calibration ids; ``config``: a ``SparsifyConfig``. Returns
    ``(report, stages)``: the ``SparsifyReport`` and :func:`stage_seconds` of it (``save_s`` is
    added by the caller that saves). Raises what ``sparsify`` raises.
    """
    from dsnt_export.sparsify.driver import sparsify

    report = sparsify(model, ids, config, device=device, progress=progress, plan=plan)
    stages = stage_seconds(report.timings, [dict(r.time_s or {}) for r in report.layers])
    return report, stages


def _device_peak_reset(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _device_peak(device) -> int | None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None


# ------------------------------------------------------------------------------ children
# Each configuration runs in a child process of this script (``--child JOB.json``); the child
# writes its result as JSON to job["result"]. The peer child imports nothing of dsnt_export (it
# may run in another interpreter).


def _ppl(model, job: dict) -> dict | None:
    import torch

    if not job.get("eval"):
        return None
    from dsnt_export.evaluation.perplexity import perplexity

    blob = torch.load(job["eval"], weights_only=False)
    dev = torch.device(job["device"])
    home = next(model.parameters()).device
    model.to(dev)
    try:
        r = perplexity(
            model,
            blob["tokens"],
            int(job["eval_seqlen"]),
            device=dev,
            max_windows=job["ppl_windows"],
            batch_size=max(1, 2048 // int(job["eval_seqlen"])),
            progress=job["progress"],
            dataset=blob["desc"],
        )
    finally:
        model.to(home)
    return {
        "ppl": r.ppl,
        "nll": r.nll,
        "n_windows": r.n_windows,
        "seqlen": r.seqlen,
        "dataset_hash": (r.dataset or {}).get("hash"),
        "seconds": r.seconds,
    }


def _load(job: dict):
    from dsnt_export.recipe import Recipe
    from dsnt_export.workflow import load_model_for

    recipe = Recipe.from_dict(job["recipe"])
    lm = load_model_for(recipe)
    return recipe, lm


def _child_floor(job: dict) -> dict:
    import torch

    _, lm = _load(job)
    after_load = host_now_bytes()
    ids = torch.load(job["ids"])
    _device_peak_reset(lm.device)
    res = floor_passes(
        lm.model,
        ids,
        device=lm.device,
        batch_size=job["floor_batch"],
        repeats=job["floor_repeats"],
        progress=job["progress"],
    )
    res.update(
        peak_host_bytes=host_peak_bytes(),
        host_after_load_bytes=after_load,
        peak_device_bytes=_device_peak(lm.device),
        load_s=lm.timings["load_s"],
        method="dense (no pruning)",
        stages={"capture_s": res["capture_s"], "total_s": res["seconds"]},
    )
    res["ppl"] = _ppl(lm.model, job)
    return res


def _child_prune(job: dict) -> dict:
    import torch

    from dsnt_export.hf_io import source_dtype
    from dsnt_export.methods.nm_sweep_cpu import kernel_available
    from dsnt_export.recipe import method_label
    from dsnt_export.sparsify.plan import plan_targets
    from dsnt_export.workflow import PruneResult, write_checkpoint

    recipe, lm = _load(job)
    after_load = host_now_bytes()
    ids = torch.load(job["ids"])
    cfg = recipe.sparsify_config()
    plan = plan_targets(
        lm.model, cfg.pattern, exclude=cfg.exclude, refine_exclude=cfg.refine_exclude
    )
    _device_peak_reset(lm.device)
    # SparseGPT's compiled CPU sweep: JIT-compiled (or loaded from Numba's disk cache) here, before
    # the timed prune, like any warm-up; `dsnt-export prune` pays it (~0.5 s cached, ~3 s the
    # first time on a machine) inside its SparseGPT stage
    sweep = "numba" if lm.device.type == "cpu" and kernel_available() else "torch ops"
    torch.manual_seed(recipe.seed)
    report, stages = prune_stages(
        lm.model, ids, cfg, device=lm.device, plan=plan, progress=job["progress"]
    )
    result = PruneResult(
        recipe=recipe,
        source=lm.source,
        model=lm.model,
        tokenizer=lm.tokenizer,
        report=report,
        calibration=job["calib"],
        source_dtype=source_dtype(lm.config),
        timings={"load_s": lm.timings["load_s"], "sparsify_s": report.timings["total_s"]},
    )
    out = Path(job["save_dir"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = write_checkpoint(result, out)
    stages["save_s"] = time.perf_counter() - t0
    res = {
        "seconds": stages["total_s"],
        "stages": stages,
        "peak_host_bytes": host_peak_bytes(),
        "host_after_load_bytes": after_load,
        "peak_device_bytes": _device_peak(lm.device),
        "load_s": lm.timings["load_s"],
        "method": method_label(recipe.init, recipe.refine),
        "mask_ok": bool(manifest["mask_check_ok"]) and report.summary().get("all_checks_ok", True),
        "n_linears": len(report.layers),
        "sparsify_config": cfg.to_json(),
        "sparsegpt_sweep": sweep,
    }
    res["ppl"] = _ppl(lm.model, job)
    return res


#: our initial method -> llm-compressor's pruning modifier class (``llmcompressor.modifiers.pruning``)
PEER_MODIFIERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}


def _child_peer(job: dict) -> dict:
    """llm-compressor's oneshot SparseGPT or Wanda (``job["method"]``, default sparsegpt) on the
    job's ids; imports no dsnt_export module."""
    import importlib.metadata as md

    import torch

    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers import pruning
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        return {"status": "skipped", "reason": f"llm-compressor not importable here: {e}"}
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        job["model_path"], dtype=getattr(torch, job["dtype"])
    )
    tok = AutoTokenizer.from_pretrained(job["model_path"])
    load_s = time.perf_counter() - t0
    after_load = host_now_bytes()
    ids = torch.load(job["ids"])
    n, t = ids.shape
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    method = job.get("method", "sparsegpt")
    kind = PEER_MODIFIERS[method]
    opts = dict(
        sparsity=job["sparsity"],
        mask_structure=job["nm"] or "0:0",
        targets=["Linear"],
        ignore=["re:.*lm_head"],
    )
    if method == "sparsegpt":
        opts.update(block_size=job["blocksize"], dampening_frac=job["percdamp"])
    modifier = getattr(pruning, kind)(**opts)
    dev = job["device"]
    if dev != "cpu":
        model.to(dev)
    _device_peak_reset(dev)
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=modifier,
        num_calibration_samples=int(n),
        max_seq_length=int(t),
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline="sequential",
    )
    seconds = time.perf_counter() - t0
    res = {
        "seconds": seconds,
        "stages": {"total_s": seconds},
        "peak_host_bytes": host_peak_bytes(),
        "host_after_load_bytes": after_load,
        "peak_device_bytes": _device_peak(dev),
        "load_s": load_s,
        "method": f"llm-compressor oneshot {kind}",
        "peer": {
            "name": "llmcompressor",
            "version": md.version("llmcompressor"),
            "transformers": md.version("transformers"),
            "torch": torch.__version__,
            "python": sys.executable,
            "pipeline": "sequential",
            "threads": torch.get_num_threads(),
        },
    }
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    torch.save(state, job["state_out"])
    return res


def _child_peer_ppl(job: dict) -> dict:
    """Perplexity and mask check of the peer's pruned weights (in this project's interpreter)."""
    import torch

    from dsnt_export.masks import validate_mask
    from dsnt_export.sparsify.plan import plan_targets

    recipe, lm = _load(job)
    state = torch.load(job["state_out"], weights_only=True)
    missing, unexpected = lm.model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lm_head" not in k]
    if missing:
        raise RuntimeError(f"the peer's state dict lacks {missing[:5]}")
    plan = plan_targets(lm.model, recipe.pattern)
    oks = [
        validate_mask(lm.model.get_submodule(t.name).weight.data, recipe.pattern).ok
        for t in plan.targets
    ]
    return {"mask_ok": all(oks), "n_linears": len(oks), "ppl": _ppl(lm.model, job)}


CHILDREN = {
    "floor": _child_floor,
    "prune": _child_prune,
    "peer": _child_peer,
    "peer_ppl": _child_peer_ppl,
}


def child_main(job_path: str) -> int:
    """Run the child job described in ``job_path`` (JSON) and write its result JSON."""
    job = json.loads(Path(job_path).read_text())
    if job.get("threads") and job["kind"] != "peer":
        import torch

        torch.set_num_threads(int(job["threads"]))
    res = CHILDREN[job["kind"]](job)
    Path(job["result"]).write_text(json.dumps(res, default=str))
    return 0


def run_child(python: str, job: dict, tmp: Path, *, verbose: bool, timeout: float | None) -> dict:
    """Run one child job in a fresh ``python`` process; return its result dict.

    On a non-zero exit or a missing result, returns ``{"status": "failed", "reason": ...}`` with
    the tail of its stderr; a timeout likewise.
    """
    name = f"{job['kind']}-{job.get('config', '')}-{len(list(tmp.iterdir()))}"
    job = {**job, "result": str(tmp / f"{name}.result.json")}
    jp = tmp / f"{name}.job.json"
    jp.write_text(json.dumps(job))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log = tmp / f"{name}.log"
    with open(log, "wb") as lf:
        try:
            p = subprocess.run(
                [python, str(Path(__file__).resolve()), "--child", str(jp)],
                stdout=lf,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout,
                cwd=str(ROOT),
            )
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = None
    text = log.read_text(errors="replace")
    if verbose:
        sys.stderr.write(text[-4000:])
    res_path = Path(job["result"])
    if rc == 0 and res_path.exists():
        return json.loads(res_path.read_text())
    why = "timed out" if rc is None else f"exit {rc}"
    tail = text.strip().splitlines()[-6:]
    return {"status": "failed", "reason": f"{job['kind']} child {why}: " + " | ".join(tail)[-1500:]}


# ---------------------------------------------------------------------------------- driver


def prepare(args, tmp: Path):
    """Recipe, calibration ids (saved), eval tokens (saved) and the model's description."""
    import torch

    from dsnt_export.data import get_eval_tokens
    from dsnt_export.hf_io import load_config, load_tokenizer, resolve_model_source
    from dsnt_export.recipe import Recipe
    from dsnt_export.workflow import EMBEDDED_ID, calibration_ids

    recipe = Recipe.load(args.recipe).replace(
        model=args.model,
        calib=args.calib,
        eval=args.eval,
        eval_seqlen=args.eval_seqlen,
        device=args.device,
        dtype=args.dtype,
    )
    source = resolve_model_source(recipe.model)
    config = load_config(source)
    tok = load_tokenizer(source)
    torch.manual_seed(recipe.seed)
    ids, calib = calibration_ids(recipe, tok)
    torch.save(ids, tmp / "ids.pt")
    eval_path = None
    ppl = args.ppl if args.ppl is not None else recipe.model is None
    if ppl:
        tokens, desc = get_eval_tokens(recipe.eval, tok)
        eval_path = tmp / "eval.pt"
        torch.save({"tokens": tokens, "desc": desc}, eval_path)
    model = {
        "id": recipe.model or EMBEDDED_ID,
        "path": source,
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
    return recipe, ids, calib, eval_path, model


def run(args) -> list[dict]:
    """Run every configuration of ``args.configs``; append and return the rows."""
    from dsnt_export.bench.schema import new_run_id

    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in wanted if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown configs {bad}; known: {list(CONFIGS)}")
    run_id = new_run_id()
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        return _run(args, wanted, run_id, tmp)
    finally:
        if args.keep_tmp:
            print(
                f"[bench_pipeline] children's jobs, logs and checkpoints kept in {tmp}",
                file=sys.stderr,
            )
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args, wanted: list[str], run_id: str, tmp: Path) -> list[dict]:
    import torch

    from dsnt_export.bench.env import environment
    from dsnt_export.bench.schema import make_row
    from dsnt_export.bench.timing import append_rows
    from dsnt_export.hf_io import load_config, resolve_device, resolve_dtype, source_dtype
    from dsnt_export.patterns import parse_pattern

    recipe, ids, calib, eval_path, model = prepare(args, tmp)
    dev = resolve_device(recipe.device)
    dtype = resolve_dtype(recipe.dtype, dev, source_dtype(load_config(model["path"])))
    model["dtype"] = str(dtype).removeprefix("torch.")
    env = environment(dev)
    out = Path(
        args.out or HERE / "results" / f"pipeline_{args.machine or default_machine(str(dev))}.jsonl"
    )
    pattern = parse_pattern(recipe.pattern)
    threads = args.threads or torch.get_num_threads()
    base_job = {
        "ids": str(tmp / "ids.pt"),
        "calib": calib,
        "eval": str(eval_path) if eval_path else None,
        "eval_seqlen": recipe.eval_seqlen,
        "ppl_windows": args.ppl_windows,
        "device": str(dev),
        "progress": args.progress,
        "threads": args.threads,
        "floor_batch": args.floor_batch,
        "floor_repeats": args.floor_repeats,
    }
    common = {
        "device": str(dev),
        "env": env,
        "model": model,
        "pattern": str(pattern),
        "recipe": recipe.name,
        "calibration": {
            k: calib.get(k) for k in ("source", "nsamples", "seqlen", "n_tokens", "hash", "seed")
        },
        "threads": threads,
        "code": args.code or code_version(),
        "note": args.note,
    }
    rows: list[dict] = []
    order = [c for c in CONFIGS if c in wanted]
    for config in order:
        print(f"[bench_pipeline] {config} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = median_run(
            lambda c=config: _one(c, args, recipe, base_job, tmp, pattern, dtype, model),
            1 if config == "floor" else args.prune_repeats,
        )
        status = res.pop("status", "ok")
        reason = res.pop("reason", None)
        row = make_row(BENCH, run_id, status=status, reason=reason, config=config, **common, **res)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        add_ratios(rows)
        append_rows(out, [row])
        print(
            f"[bench_pipeline] {config}: {status} {res.get('seconds', '')}",
            file=sys.stderr,
            flush=True,
        )
    print(f"rows -> {out}")
    return rows


def median_run(run, repeats: int) -> dict:
    """``run()`` ``repeats`` times (each a fresh child process); the result of the run with the
    median ``seconds`` (the lower one of the two middle runs for an even count), its stage split
    included, plus ``repeat_seconds`` (every run's seconds, sorted) when ``repeats`` > 1. The
    first run that is not ok is returned as is (nothing to take a median of)."""
    runs = []
    for _ in range(repeats):
        res = run()
        if res.get("status", "ok") != "ok":
            return res
        runs.append(res)
    runs.sort(key=lambda r: r["seconds"])
    res = runs[(len(runs) - 1) // 2]
    if repeats > 1:
        res["repeat_seconds"] = [r["seconds"] for r in runs]
    return res


def peer_pattern(pattern) -> tuple[str | None, float]:
    """``(mask_structure, sparsity)`` of llm-compressor's SparseGPTModifier for our ``pattern``.

    Its ``"N:M"`` names the PRUNED weights per group of M (ours: the kept ones), so our N:M
    (keep N) is its ``f"{M - N}:{M}"`` at sparsity (M - N) / M; unstructured: ``(None, ratio)``.
    """
    from dsnt_export.patterns import NM

    if isinstance(pattern, NM):
        return f"{pattern.m - pattern.n_keep}:{pattern.m}", (pattern.m - pattern.n_keep) / pattern.m
    return None, float(pattern.ratio)


def peer_job(
    *,
    ids: str,
    model_path: str,
    pattern,
    dtype: str = "float32",
    blocksize: int = 128,
    percdamp: float = 0.01,
    state_out: str,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = False,
    method: str = "sparsegpt",
) -> dict:
    """The job of the peer child (:func:`run_child` runs it in the peer's interpreter).

    ``method``: "sparsegpt" or "wanda" (:data:`PEER_MODIFIERS`; ``blocksize``/``percdamp`` are
    SparseGPT's). Raises ``ValueError`` for another method.

    ``ids``: a ``torch.save``d ``[N, T]`` int64 tensor; ``model_path``: an HF checkpoint dir;
    ``pattern``: ours (a ``Pattern``); ``state_out``: where the child saves the pruned state dict.
    The result has ``seconds`` (the ``oneshot`` call), ``peak_host_bytes``, ``method``, ``peer``
    (versions); ``{"status": "skipped", "reason"}`` when llm-compressor does not import there.
    """
    if method not in PEER_MODIFIERS:
        raise ValueError(f"no llm-compressor peer for {method!r}; known: {sorted(PEER_MODIFIERS)}")
    nm, sparsity = peer_pattern(pattern)
    return {
        "kind": "peer",
        "method": method,
        "config": "peer",
        "ids": ids,
        "model_path": model_path,
        "dtype": dtype,
        "nm": nm,
        "sparsity": sparsity,
        "blocksize": int(blocksize),
        "percdamp": float(percdamp),
        "state_out": state_out,
        "device": device,
        "threads": threads,
        "progress": progress,
    }


def _one(config, args, recipe, base_job, tmp, pattern, dtype, model) -> dict:
    py = sys.executable
    verbose = args.verbose
    if config == "floor":
        return run_child(
            py,
            {**base_job, "kind": "floor", "config": config, "recipe": recipe.to_dict()},
            tmp,
            verbose=verbose,
            timeout=args.child_timeout,
        )
    if config in ("sparsegpt", "recipe"):
        r = recipe if config == "recipe" else recipe.replace(init="sparsegpt", refine="none")
        return run_child(
            py,
            {
                **base_job,
                "kind": "prune",
                "config": config,
                "recipe": r.to_dict(),
                "save_dir": str(tmp / f"hf-{config}"),
            },
            tmp,
            verbose=verbose,
            timeout=args.child_timeout,
        )
    job = peer_job(
        ids=base_job["ids"],
        model_path=model["path"],
        pattern=pattern,
        dtype=str(dtype).removeprefix("torch."),
        blocksize=recipe.sparsegpt["blocksize"],
        percdamp=recipe.sparsegpt["percdamp"],
        state_out=str(tmp / "peer_state.pt"),
        device=base_job["device"],
        threads=base_job["threads"],
        progress=base_job["progress"],
    )
    res = run_child(args.peer_python or py, job, tmp, verbose=verbose, timeout=args.child_timeout)
    if res.get("status", "ok") != "ok":
        return res
    check = run_child(
        py,
        {
            **base_job,
            "kind": "peer_ppl",
            "config": config,
            "recipe": recipe.to_dict(),
            "state_out": job["state_out"],
        },
        tmp,
        verbose=verbose,
        timeout=args.child_timeout,
    )
    if check.get("status", "ok") != "ok":
        res["ppl_error"] = check["reason"]
    else:
        res.update(check)
    return res


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default=None,
        help="checkpoint dir or hub id (default: the recipe's; embedded SmolLM2-135M)",
    )
    ap.add_argument(
        "--recipe", default="default", help="preset name or recipe YAML (default: default)"
    )
    ap.add_argument(
        "--calib",
        default=None,
        help="calibration SOURCE:NxT (default: the recipe's, stdlib-docs:64x256)",
    )
    ap.add_argument(
        "--eval", default=None, help="held-out text of the perplexity (default: the recipe's)"
    )
    ap.add_argument(
        "--eval-seqlen", type=int, default=None, help="perplexity window (default: the recipe's)"
    )
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    ap.add_argument(
        "--dtype", default=None, help="compute dtype (default: the recipe's auto: float32 on CPU)"
    )
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {CONFIGS}")
    ap.add_argument(
        "--floor-repeats", type=int, default=3, help="timed two-pass repeats of the floor (median)"
    )
    ap.add_argument(
        "--prune-repeats",
        type=int,
        default=1,
        help="runs of each prune and of the peer, each in a fresh process; the row is the run "
        "with the median time (all times in repeat_seconds)",
    )
    ap.add_argument(
        "--floor-batch", type=int, default=8, help="windows per block forward in the floor"
    )
    ap.add_argument(
        "--peer-python", default=None, help="interpreter with llmcompressor (default: this one)"
    )
    ap.add_argument(
        "--ppl",
        dest="ppl",
        action="store_true",
        default=None,
        help="held-out perplexity of every model (default: on for the embedded model)",
    )
    ap.add_argument("--no-ppl", dest="ppl", action="store_false")
    ap.add_argument("--ppl-windows", type=int, default=64, help="evaluation windows (README: 64)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads in every child (default: torch's)"
    )
    ap.add_argument(
        "--machine", default=None, help="label of the rows file (default dev_cpu / the GPU's name)"
    )
    ap.add_argument(
        "--out",
        default=None,
        help="rows file (default benchmarks/results/pipeline_<machine>.jsonl)",
    )
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds per configuration")
    ap.add_argument("--progress", action="store_true", help="progress bars in the children's logs")
    ap.add_argument("--verbose", action="store_true", help="echo each child's log tail")
    ap.add_argument(
        "--code", default=None, help="code version in the rows (default: git describe of ROOT)"
    )
    ap.add_argument("--note", default=None, help="free text stored in every row")
    ap.add_argument(
        "--keep-tmp", action="store_true", help="keep the children's jobs, logs and checkpoints"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    """Entry point: run the configurations, print the table; exit 1 if any row failed."""
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args.child)
    rows = run(args)
    print(format_table(rows))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
