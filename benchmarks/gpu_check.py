"""One GPU check: DSnoT/Wanda/SparseGPT per layer, the block-by-block pipeline, 2:4 GEMMs and
end-to-end latency at LLaMA-7B shapes. Needs only torch (+CUDA, cuSPARSELt) and transformers.

    python benchmarks/gpu_check.py                 # on a CUDA GPU, < 8 min on an H200
    python benchmarks/gpu_check.py --smoke         # tiny shapes, runs on CPU in seconds

Sections (each one's failure is recorded as a row and the next one runs):

gemm      F.linear fp16 at LLaMA-7B shapes [out, in] = 4096x4096, 11008x4096, 4096x11008 for
          1, 16, 128, 2048 tokens: dense vs 2:4 SparseSemiStructuredTensor (cuSPARSELt and
          CUTLASS), with the sparse result's max error vs dense.
layers    per layer at the same shapes, 2:4 and unstructured 0.5, on synthetic LLM-like
          activations (2048 tokens): Wanda initial mask, DSnoT (official preset; default preset
          with its loss guard), SparseGPT; plus the whole-model projection (x 32 blocks) next to
          the published numbers (DSnoT ~5 s, Wanda ~3.4 s, SparseGPT ~145 s for LLaMA-7B).
pipeline  benchmarks/bench_pipeline.py's side by side on a randomly initialised LLaMA-7B-shaped
          model (hidden 4096, MLP 11008, 32 heads, vocab 32000, --blocks blocks, default 2: the
          32-block time is projected) with 128 x 2048 random calibration tokens: the floor (two
          plain block passes, median of 3) and the prune split by stage (capture, statistics,
          initial mask, refinement, re-run) for SparseGPT alone, wanda+dsnot (official) and the
          default sparsegpt+refit; ratio to the floor, peak host RSS and device memory
          (in this process, reset before each). Skipped on a CPU unless --smoke.
devices   blocks spread over devices (dsnt_export/sparsify/devices.py): a small Llama pruned with
          blocks alternating between cuda:0 and the CPU, in memory and streamed from its
          safetensors (prefetch on), against the same prune all on one device: the streamed and
          in-memory mixed runs bit-identical, masks within 2 % of the one-device run, every mask
          2:4. On a CPU (--smoke) the map is all-CPU (the same code path, nothing moves).
e2e       that model's latency: dense (before pruning), sparse (2:4 zeros, dense kernels) and
          sparse-kernels (2:4 linears as semi-structured tensors), prefill and decode.

Rows go to ONE JSON-lines file (``--out``, default ``$OUT/gpu_check.jsonl``), flushed after
every row; the schema is dsnt_export.bench.schema's (bench = gemm, dsnot_layer, init_layer,
sparsegpt_layer, projection, pipeline, devices, latency, conversion, section). A summary is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dsnt_export.bench.env import environment  # noqa: E402
from dsnt_export.bench.schema import make_row, new_run_id  # noqa: E402
from dsnt_export.bench.timing import PeakMemory, append_rows, measure  # noqa: E402

LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
# linears of one LLaMA-7B block by shape: q, k, v, o | gate, up | down
BLOCK_COUNTS = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}
PUBLISHED_S = {"dsnot": 5.0, "wanda": 3.4, "sparsegpt": 145.0}  # LLaMA-7B, one GPU (issue 5)


@dataclass
class Ctx:
    out: Path
    device: torch.device
    smoke: bool
    budget_s: float
    run_id: str = field(default_factory=new_run_id)
    t0: float = field(default_factory=time.perf_counter)
    env: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    model: object = None  # the few-block model, shared by pipeline and e2e

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """Layer dtype: fp16 on the GPU (LLaMA-7B's) and in --smoke (the same code path on CPU)."""
        return torch.float16 if self.cuda or self.smoke else torch.float32

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def emit(self, bench: str, **fields) -> dict:
        row = make_row(bench, self.run_id, device=str(self.device), env=self.env, **fields)
        append_rows(self.out, [row])
        self.rows.append(row)
        return row

    def skip(self, bench: str, reason: str, **fields) -> None:
        self.emit(bench, status="skipped", reason=reason, **fields)


def shapes(ctx: Ctx) -> list[tuple[int, int]]:
    return [(64, 64), (128, 64), (64, 128)] if ctx.smoke else LLAMA7B_SHAPES


# ------------------------------------------------------------------------------------ gemm


def semi_backends(ctx: Ctx) -> dict[str, object]:
    """Available 2:4 tensor classes on this device, or {} with rows saying why."""
    from dsnt_export.runtimes.torch_semi import semi_structured_backend

    _, why = semi_structured_backend(ctx.device)
    if why:
        return {}
    out = {"cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS}
    if semi_structured_backend(ctx.device, "cusparselt")[0]:
        out["cusparselt"] = torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    return out


def two_four_weight(out_f: int, in_f: int, device, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    grp = w.reshape(out_f, in_f // 4, 4)
    idx = grp.abs().topk(2, dim=-1).indices
    keep = torch.zeros_like(grp, dtype=torch.bool).scatter_(-1, idx, True)
    return (grp * keep).reshape(out_f, in_f).to(device=device, dtype=dtype).contiguous()


def _gemm_loop(x: torch.Tensor, w, n: int) -> None:
    """``n`` back-to-back GEMMs (one timing covers them: a single small GEMM is ~10 us)."""
    for _ in range(n):
        F.linear(x, w)


def section_gemm(ctx: Ctx) -> None:
    dtype = ctx.dtype
    backends = semi_backends(ctx)
    if not backends:
        from dsnt_export.runtimes.torch_semi import semi_structured_backend

        ctx.skip("gemm", semi_structured_backend(ctx.device)[1], variant="sparse-kernels")
    inner = 1 if ctx.smoke else 20
    for out_f, in_f in shapes(ctx):
        w = two_four_weight(out_f, in_f, ctx.device, dtype)
        impls = {"dense": w}
        for name, cls in backends.items():
            try:
                impls[name] = cls.from_dense(w)
            except RuntimeError as e:
                ctx.skip("gemm", f"{name} conversion: {e}", shape=[out_f, in_f], backend=name)
        for tokens in (1, 16, 128, 2048):
            if ctx.left() < 30:
                return ctx.skip("gemm", "time budget exhausted", shape=[out_f, in_f])
            x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1)).to(
                ctx.device, dtype
            )
            ref = F.linear(x, w)
            dense_s = None
            for name, wt in impls.items():
                try:
                    y = F.linear(x, wt)
                    err = float((y.float() - ref.float()).abs().max())
                    t = measure(
                        lambda wt=wt, x=x: _gemm_loop(x, wt, inner),
                        device=ctx.device,
                        warmup=2,
                        repeats=5,
                    )
                except RuntimeError as e:
                    ctx.emit(
                        "gemm",
                        status="failed",
                        reason=f"{type(e).__name__}: {e}",
                        shape=[out_f, in_f],
                        tokens=tokens,
                        backend=name,
                    )
                    continue
                per = t.median_s / inner
                dense_s = per if name == "dense" else dense_s
                ctx.emit(
                    "gemm",
                    shape=[out_f, in_f],
                    tokens=tokens,
                    backend=name,
                    dtype=str(dtype).removeprefix("torch."),
                    latency_us=per * 1e6,
                    tflops=2 * tokens * out_f * in_f / per / 1e12,
                    speedup_vs_dense=(dense_s / per) if dense_s and name != "dense" else None,
                    max_abs_err_vs_dense=err,
                    inner_loops=inner,
                    timing=t.to_json(),
                )


# ---------------------------------------------------------------------------------- layers


def synthetic_stats(in_f: int, tokens: int, device, seed: int = 0, hessian: bool = True):
    """ActivationStats (with H) of LLM-like activations: heavy outlier channels, channel means."""
    from dsnt_export.stats import ActivationStats

    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(in_f, generator=g))
    scale[torch.randperm(in_f, generator=g)[: max(1, in_f // 200)]] *= 20
    mean = torch.randn(in_f, generator=g) * 0.3 * scale
    x = (torch.randn(tokens, in_f, generator=g) * scale + mean).to(device)
    st = ActivationStats(in_f, device, hessian=hessian)
    st.update(x)
    return st


def section_layers(ctx: Ctx) -> None:
    from dsnt_export.patterns import parse_pattern

    tokens = 64 if ctx.smoke else 2048
    for out_f, in_f in shapes(ctx):
        g = torch.Generator().manual_seed(out_f + in_f)
        w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(ctx.device, ctx.dtype)
        st = synthetic_stats(in_f, tokens, ctx.device)
        for ptxt in ("2:4", "unstructured:0.5"):
            if ctx.left() < 60:
                return ctx.skip("dsnot_layer", "time budget exhausted", shape=[out_f, in_f])
            p = parse_pattern(ptxt)
            base = dict(
                shape=[out_f, in_f], pattern=str(p), dtype=str(ctx.dtype)[6:], calib_tokens=tokens
            )
            layer_point(ctx, w, st, p, base)
    project(ctx)


def layer_point(ctx: Ctx, w: torch.Tensor, st, p, base: dict) -> None:
    """Wanda mask, DSnoT (official preset, our mean-criterion and default hessian-criterion
    configs) and SparseGPT times for one layer."""
    from dsnt_export.masks import validate_mask
    from dsnt_export.methods import initial_metric, keep_from_metric, prune_initial
    from dsnt_export.refine.dsnot import DSnoTConfig, refine_with_info
    from dsnt_export.refine.hessian_swap import hessian_refine

    reps = 2 if ctx.smoke else 3
    t = measure(
        lambda: keep_from_metric(initial_metric("wanda", w, st), p), device=ctx.device, repeats=reps
    )
    ctx.emit("init_layer", **base, method="wanda", seconds=t.median_s, timing=t.to_json())
    metric = initial_metric("wanda", w, st)
    keep0 = keep_from_metric(metric, p)
    for preset in ("official", "mean", "default"):
        if preset == "default":  # criterion "hessian": weights change too, hessian_refine

            def go(w=w, keep0=keep0):
                new_w, keep, info = hessian_refine(w, keep0, w, st.hessian, p, max_cycles=50)
                return keep, info
        else:
            cfg = DSnoTConfig.official() if preset == "official" else DSnoTConfig.guarded()

            def go(cfg=cfg):
                return refine_with_info(w, keep0, st, p, cfg, initial_metric=metric)

        keep, info = go()  # warm-up
        t = measure(go, device=ctx.device, warmup=0, repeats=reps)
        extra = (
            dict(loss_before=info.loss_before, loss_after=info.loss_after)
            if preset == "default"
            else dict(
                err_before=float(info.err_before.abs().mean()),
                err_after=float(info.err_after.abs().mean()),
            )
        )
        ctx.emit(
            "dsnot_layer",
            **base,
            preset=preset,
            seconds=t.median_s,
            swaps=info.n_swaps,
            cycles=info.cycles,
            mask_ok=validate_mask(keep, p).ok,
            timing=t.to_json(),
            **extra,
        )
    t = measure(
        lambda: prune_initial("sparsegpt", w, st, p), device=ctx.device, warmup=1, repeats=1
    )
    ctx.emit("sparsegpt_layer", **base, method="sparsegpt", seconds=t.median_s, timing=t.to_json())


def project(ctx: Ctx) -> None:
    """LLaMA-7B whole-model time = sum over a block's 7 linears x 32 blocks, per method."""
    if ctx.smoke:
        return ctx.skip("projection", "smoke shapes are not LLaMA-7B's")
    for ptxt in ("2:4", "unstructured:0.5"):
        got = {}
        for bench, key in (
            ("init_layer", "wanda"),
            ("dsnot_layer", "dsnot"),
            ("sparsegpt_layer", "sparsegpt"),
        ):
            for preset in ("official", "mean", "default") if key == "dsnot" else (None,):
                rows = {
                    tuple(r["shape"]): r["seconds"]
                    for r in ctx.rows
                    if r["bench"] == bench
                    and r["status"] == "ok"
                    and r["pattern"] == ptxt
                    and r.get("preset") == preset
                }
                if set(rows) >= set(BLOCK_COUNTS):
                    name = key if preset in (None, "official") else f"{key}_{preset}"
                    got[name] = 32 * sum(n * rows[s] for s, n in BLOCK_COUNTS.items())
        ctx.emit(
            "projection",
            pattern=ptxt,
            model="LLaMA-7B (32 blocks x 7 linears)",
            projected_s=got,
            published_s=PUBLISHED_S,
            note="per-layer medians x layer counts; excludes calibration forwards",
        )


# -------------------------------------------------------------------------- several devices


def section_devices(ctx: Ctx) -> None:
    """A small Llama pruned (default recipe's SparseGPT + refit) with its blocks alternating
    between ``ctx.device`` and the CPU, in memory and streamed (prefetch on), against the same
    prune on ``ctx.device`` alone; see the module docstring."""
    import copy
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from dsnt_export.masks import validate_mask
    from dsnt_export.recipe import Recipe
    from dsnt_export.shards import SafetensorsCheckpoint
    from dsnt_export.sparsify.driver import SparsifyConfig, sparsify
    from dsnt_export.sparsify.streaming import empty_model, sparsify_streamed

    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    source = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    dev = ctx.device
    other = "cpu" if ctx.cuda else str(dev)
    dmap = {"model.layers": str(dev), "model.layers.1": other, "model.layers.3": other}
    scfg = SparsifyConfig(
        pattern="2:4",
        init="sparsegpt",
        refine=Recipe.preset("default").refiner_config(),
        batch_size=8,
    )

    one, mixed = copy.deepcopy(source), copy.deepcopy(source)
    t0 = time.perf_counter()
    sparsify(one, ids, scfg, device=dev, progress=False)
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = sparsify(mixed, ids, scfg, device=dev, progress=False, device_map=dmap)
    t_mixed = time.perf_counter() - t0
    names = [f"{r.name}.weight" for r in rep.layers]
    pm, po = dict(mixed.named_parameters()), dict(one.named_parameters())
    agree = min(float(((pm[n] == 0) == (po[n] == 0)).float().mean()) for n in names)
    masks_ok = all(validate_mask(pm[n], "2:4").ok for n in names)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        source.save_pretrained(src)
        out.mkdir()
        t0 = time.perf_counter()
        res = sparsify_streamed(
            empty_model(cfg, torch.float32),
            src,
            ids,
            scfg,
            out,
            device=dev,
            dtype=torch.float32,
            save_dtype=None,
            progress=False,
            device_map=dmap,
            prefetch=True,
        )
        t_streamed = time.perf_counter() - t0
        saved = SafetensorsCheckpoint(out)
        identical = all(torch.equal(saved.read(n), pm[n].detach().cpu()) for n in names)
    ctx.emit(
        "devices",
        status="ok" if identical and masks_ok and agree >= 0.98 else "failed",
        reason=None
        if identical and masks_ok and agree >= 0.98
        else (
            f"streamed == in-memory: {identical}, masks 2:4: {masks_ok}, "
            f"min mask agreement with one device {agree:.4f} (want >= 0.98)"
        ),
        device_map=dmap,
        block_devices=rep.config["block_devices"],
        streamed_block_devices=res.report.config["block_devices"],
        streamed_equals_in_memory=identical,
        masks_ok=masks_ok,
        min_mask_agreement_vs_one_device=agree,
        seconds={"one_device": t_one, "mixed": t_mixed, "streamed_mixed": t_streamed},
    )


# -------------------------------------------------------------------------- pipeline + e2e


def build_model(ctx: Ctx, blocks: int):
    """A randomly initialised LLaMA-7B-shaped causal LM with ``blocks`` blocks on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if ctx.smoke:
        kw = dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=256,
            max_position_embeddings=256,
        )
    else:
        kw = dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
        )
    cfg = LlamaConfig(num_hidden_layers=blocks, tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = LlamaForCausalLM(cfg)
    # fp32 on CPU: fp16 CPU kernels are emulated and would make --smoke slow for nothing
    return model.to(torch.float16 if ctx.cuda else torch.float32).eval()


def section_pipeline(ctx: Ctx, blocks: int) -> None:
    """The prune side by side with its floor (benchmarks/bench_pipeline.py's measurements, in this
    process): two plain block passes, then SparseGPT alone, Wanda + DSnoT (official) and the
    default recipe's SparseGPT + refit, each split by stage, with peak host (RSS) and device memory
    and the ratio to the floor. LLaMA-7B-shaped (``blocks`` blocks) on a GPU; tiny in --smoke;
    skipped on a CPU without --smoke (a 7B-shaped block on 2 cores would not fit the budget)."""
    import bench_pipeline as bp

    from dsnt_export.recipe import Recipe
    from dsnt_export.refine import DSnoTConfig
    from dsnt_export.sparsify.driver import SparsifyConfig

    if not ctx.cuda and not ctx.smoke:
        return ctx.skip(
            "pipeline",
            f"LLaMA-7B-shaped blocks on {ctx.device} would not fit the time budget; "
            "run on a CUDA GPU (or --smoke for tiny shapes)",
            config="all",
        )
    n, t = (2, 32) if ctx.smoke else (128, 2048)
    ids = torch.randint(
        0, 256 if ctx.smoke else 32000, (n, t), generator=torch.Generator().manual_seed(0)
    )
    common = dict(
        blocks=blocks,
        calib=[n, t],
        model="random LLaMA-7B-shaped" if not ctx.smoke else "tiny llama",
    )
    model = build_model(ctx, blocks)
    e2e(ctx, model, "dense")
    with PeakMemory("cpu") as host, PeakMemory(ctx.device) as dev:
        fl = bp.floor_passes(
            model, ids, device=ctx.device, batch_size=8, repeats=1 if ctx.smoke else 3
        )
    floor_s = fl["seconds"]
    ctx.emit(
        "pipeline",
        config="floor",
        method="dense (no pruning)",
        **common,
        **fl,
        stages={"capture_s": fl["capture_s"], "total_s": fl["seconds"]},
        peak_host_bytes=host.peak_bytes,
        peak_host_kind=host.kind,
        peak_device_bytes=dev.peak_bytes if ctx.cuda else None,
    )
    runs = [
        ("sparsegpt", "sparsegpt", "none"),
        ("wanda+dsnot", "wanda", DSnoTConfig.official()),
        ("default", "sparsegpt", Recipe.preset("default").refiner_config()),
    ]
    for i, (config, init, refine) in enumerate(runs):
        if ctx.left() < 90:
            return ctx.skip("pipeline", "time budget exhausted", config=config, init=init)
        if i:
            model = build_model(ctx, blocks)
        cfg = SparsifyConfig(pattern="2:4", init=init, refine=refine)
        with PeakMemory("cpu") as host, PeakMemory(ctx.device) as dev:
            rep, stages = bp.prune_stages(model, ids, cfg, device=ctx.device)
        s = rep.summary()
        per_block = [
            v for k, v in rep.timings.items() if k.startswith("block_") and k.endswith("_s")
        ]
        ctx.emit(
            "pipeline",
            config=config,
            method=init if cfg.refine == "none" else f"{init}+{cfg.refine}",
            init=init,
            refine=cfg.refine,
            dsnot_preset=getattr(cfg.refine_config, "preset", None),
            **common,
            seconds=stages["total_s"],
            stages=stages,
            ratio_to_floor=stages["total_s"] / floor_s if floor_s else None,
            capture_s=rep.timings["capture_s"],
            block_s=per_block,
            projected_32_blocks_s=32 * sum(per_block) / max(1, len(per_block)),
            linears=s["n_linears"],
            sparsity=s["sparsity"],
            all_checks_ok=s["all_checks_ok"],
            swaps=s["swaps"],
            err_before=s["mean_abs_err_before"],
            err_after=s["mean_abs_err_after"],
            peak_host_bytes=host.peak_bytes,
            peak_host_kind=host.kind,
            peak_device_bytes=dev.peak_bytes if ctx.cuda else None,
            **dev.to_json(),
        )
        if init == "wanda":
            e2e(ctx, model, "sparse")
            e2e(ctx, model, "sparse-kernels", [f"{r.name}.weight" for r in rep.layers])
        del model
        if ctx.cuda:
            torch.cuda.empty_cache()


def e2e(ctx: Ctx, model, variant: str, names: list[str] = ()) -> None:
    """Prefill/decode latency of the few-block model (rows in the ``latency`` schema);
    ``names``: the pruned weights, converted to semi-structured for "sparse-kernels"."""
    from dsnt_export.bench import BenchOptions
    from dsnt_export.bench.runner import latency_rows
    from dsnt_export.runtimes.torch_eager import TorchEngine
    from dsnt_export.runtimes.torch_semi import SemiStructuredEngine

    if variant == "sparse-kernels":
        backends = semi_backends(ctx)
        if not backends:
            from dsnt_export.runtimes.torch_semi import semi_structured_backend

            return ctx.skip(
                "latency", semi_structured_backend(ctx.device)[1], variant=variant, runtime="torch"
            )
        name = "cusparselt" if "cusparselt" in backends else "cutlass"
        eng = SemiStructuredEngine(model, list(names), name)
        for row in eng.rows:
            ctx.emit(row.pop("bench"), runtime="torch", variant=variant, **row)
    else:
        eng = TorchEngine(model, variant)
    backend = eng.backend
    opts = BenchOptions(
        runtime="torch",
        device=str(ctx.device),
        prompt_lengths=(16,) if ctx.smoke else (128, 2048),
        batch_sizes=(1,) if ctx.smoke else (1, 8),
        decode_tokens=2 if ctx.smoke else 32,
        repeats=1 if ctx.smoke else 5,
        progress=False,
    )
    mcfg = model.config
    info = {
        "id": f"random LLaMA-7B-shaped, {mcfg.num_hidden_layers} blocks",
        "model_type": "llama",
        "pattern": None if variant == "dense" else "2:4",
        "method": None if variant == "dense" else "wanda+dsnot",
        "dtype": eng.dtype_name,
    }
    for fields in latency_rows(eng, opts, mcfg.vocab_size, mcfg.max_position_embeddings):
        ctx.emit("latency", runtime="torch", variant=variant, backend=backend, model=info, **fields)


# ------------------------------------------------------------------------------------ main


def run_section(ctx: Ctx, name: str, fn, *args) -> None:
    """Run one section; any failure becomes a row and the script goes on with the next one."""
    t0 = time.perf_counter()
    if ctx.left() < 20:
        return ctx.skip("section", "time budget exhausted before the section", section=name)
    try:
        fn(ctx, *args)
    except Exception as e:  # noqa: BLE001 - a benchmark section must not lose the others' rows
        ctx.emit(
            "section",
            status="failed",
            section=name,
            seconds=time.perf_counter() - t0,
            reason=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc()[-3000:],
        )
        if ctx.cuda:
            torch.cuda.empty_cache()
        return None
    ctx.emit("section", section=name, seconds=time.perf_counter() - t0)


def summary(ctx: Ctx) -> str:
    lines = [
        f"gpu_check {ctx.run_id} on {ctx.env.get('gpu') or ctx.env.get('cpu')}: "
        f"{len(ctx.rows)} rows -> {ctx.out} ({time.perf_counter() - ctx.t0:.0f} s)"
    ]
    for r in ctx.rows:
        b, st = r["bench"], r["status"]
        if st != "ok" and b != "section":
            lines.append(f"  {b:<15} {st}: {r.get('reason', '')[:150]}")
        elif b == "section":
            lines.append(
                f"  section {r['section']:<9} {st} {r.get('seconds', 0):.1f} s"
                + (f": {r['reason'][:200]}" if st != "ok" else "")
            )
        elif b == "gemm":
            sp = r.get("speedup_vs_dense")
            lines.append(
                f"  gemm {r['shape']} x{r['tokens']:<5} {r['backend']:<10} "
                f"{r['latency_us']:9.1f} us" + (f"  {sp:.2f}x vs dense" if sp else "")
            )
        elif b in ("dsnot_layer", "init_layer", "sparsegpt_layer"):
            lines.append(
                f"  {b:<15} {r['shape']} {r['pattern']:<16} "
                f"{r.get('preset') or r.get('method')}: {r['seconds']:.3f} s"
            )
        elif b == "projection":
            keys = ("pattern", "projected_s", "published_s")
            lines.append(f"  {b}: " + ", ".join(f"{k}={r.get(k)}" for k in keys))
        elif b == "pipeline":
            st = r.get("stages") or {}
            parts = ", ".join(
                f"{k[:-2]} {v:.1f}" for k, v in st.items() if k.endswith("_s") and v is not None
            )
            ratio = r.get("ratio_to_floor")
            lines.append(
                f"  pipeline {r['config']:<12} {r['seconds']:.1f} s"
                + (f" ({ratio:.2f}x floor)" if ratio else "")
                + f" [{parts}] host {(r.get('peak_host_bytes') or 0) / 2**30:.1f} GiB"
                + f", device {(r.get('peak_device_bytes') or 0) / 2**30:.1f} GiB"
                + (
                    f", projected 32 blocks {r['projected_32_blocks_s']:.0f} s"
                    if "projected_32_blocks_s" in r
                    else ""
                )
            )
        elif b == "latency":
            lines.append(
                f"  e2e {r['variant']:<14} b={r['batch_size']} L={r['prompt_len']} "
                f"{r['phase']:<7} {r['latency_ms']:.2f} ms"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=None, help="rows file (default $OUT/gpu_check.jsonl)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU test of the script)")
    ap.add_argument("--blocks", type=int, default=2, help="blocks of the pipeline model (2-4)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="stop starting new measurements after this many seconds",
    )
    ap.add_argument(
        "--sections",
        default="gemm,pipeline,devices,layers",
        help="comma list of sections to run, in order (default all: gemm,pipeline,devices,layers)",
    )
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out or Path(os.environ.get("OUT", HERE / "results")) / "gpu_check.jsonl")
    ctx = Ctx(out=out, device=dev, smoke=args.smoke, budget_s=args.budget_s)
    ctx.env = environment(dev)
    want = [s.strip() for s in args.sections.split(",") if s.strip()]
    table = {
        "gemm": (section_gemm,),
        "layers": (section_layers,),
        "pipeline": (section_pipeline, args.blocks),
        "devices": (section_devices,),
    }
    if not 1 <= args.blocks <= 8:
        ap.error(f"--blocks must be between 1 and 8 (2-4 fit the time budget), got {args.blocks}")
    unknown = [s for s in want if s not in table]
    if unknown:
        ap.error(f"unknown sections {unknown}; known: {list(table)}")
    if not ctx.cuda:
        ctx.skip("section", f"no CUDA device ({dev}): CUDA-only parts are skipped", section="cuda")
    for name in want:
        fn, *extra = table[name]
        run_section(ctx, name, fn, *extra)
    print(summary(ctx), flush=True)
    return 1 if any(r["status"] == "failed" for r in ctx.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
