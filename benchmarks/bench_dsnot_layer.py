"""Time initial mask + DSnoT on one layer (default: LLaMA-7B's 4096x4096 attention projection).

    python benchmarks/bench_dsnot_layer.py --threads 2 --out benchmarks/results/dsnot_layer.jsonl

Rows (one JSON object per line): bench, impl ("dsnt-export" | "baseline"), shape, pattern, dtype,
device, threads, init_s / refine_s / total_s (median, plus min/max/stdev of total), swaps,
masks_equal (ours vs baseline on the same inputs), environment. Warm-up excluded, median of
--repeats runs; the device is synchronised around every timed call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_dsnot import baseline_initial_mask, baseline_refine  # noqa: E402

from dsnt_export.bench.env import environment  # noqa: E402
from dsnt_export.bench.timing import append_rows, time_fn  # noqa: E402
from dsnt_export.methods import initial_metric, keep_from_metric  # noqa: E402
from dsnt_export.patterns import NM, parse_pattern  # noqa: E402
from dsnt_export.refine.dsnot import DSnoTConfig, refine_with_info  # noqa: E402
from dsnt_export.stats import ActivationStats  # noqa: E402


def synthetic_layer(out_f: int, in_f: int, *, device, dtype, seed=0):
    """A layer with LLM-like statistics: a few heavy outlier channels, non-zero channel means."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype)
    scale = torch.exp(torch.randn(in_f, generator=g))
    scale[torch.randperm(in_f, generator=g)[: max(1, in_f // 200)]] *= 20
    mean = torch.randn(in_f, generator=g) * 0.3 * scale
    T = 2048
    var = scale**2
    sq_sum = T * (var + mean**2)
    s = T * mean
    st = ActivationStats.from_tensors(sq_sum, s, var)
    st = ActivationStats.from_tensors(st.sq_sum.to(device), st.sum.to(device), st.var.to(device))
    return w.to(device), st


def run_ours(w, st, pattern, cfg):
    def go():
        metric = initial_metric("wanda", w, st)
        keep = keep_from_metric(metric, pattern)
        return refine_with_info(w, keep, st, pattern, cfg, initial_metric=metric)

    return go


def run_baseline(w, st, pattern, cfg):
    """The straightforward implementation on the same inputs (CPU only)."""
    nm = isinstance(pattern, NM)

    def go():
        metric = initial_metric("wanda", w, st)
        k0 = baseline_initial_mask(
            metric,
            pattern.n_prune if nm else 0,
            pattern.m if nm else None,
            None if nm else pattern.ratio,
        )
        return baseline_refine(
            w,
            k0,
            st.sum,
            st.sq_sum,
            st.var,
            pattern.m if nm else None,
            sign_check=cfg.sign_check_for(pattern),
            metric=metric,
        )

    return go


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", default="4096x4096", help="comma list of OUTxIN")
    ap.add_argument("--patterns", default="2:4,unstructured:0.5")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--baseline-repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/dsnot_layer.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    env = environment(device)
    cfg = DSnoTConfig.official()
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        w, st = synthetic_layer(out_f, in_f, device=device, dtype=dtype)
        for ptxt in args.patterns.split(","):
            pattern = parse_pattern(ptxt)
            go = run_ours(w, st, pattern, cfg)
            keep, info = go()
            t_total = time_fn(go, device=device, repeats=args.repeats)
            metric = initial_metric("wanda", w, st)
            t_init = time_fn(
                lambda m=metric, p=pattern: keep_from_metric(m, p),
                device=device,
                repeats=args.repeats,
            )
            base = dict(
                bench="dsnot_layer",
                shape=[out_f, in_f],
                pattern=str(pattern),
                dtype=args.dtype,
                device=str(device),
                threads=args.threads,
                max_cycles=cfg.max_cycles,
                time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                env=env,
            )
            row = dict(
                base,
                impl="dsnt-export",
                total_s=t_total["median_s"],
                timing=t_total,
                init_s=t_init["median_s"],
                refine_s=t_total["median_s"] - t_init["median_s"],
                swaps=info.n_swaps,
                cycles=info.cycles,
            )
            if args.baseline and device.type == "cpu":
                go_base = run_baseline(w, st, pattern, cfg)
                kb = go_base()
                tb = time_fn(go_base, device=device, warmup=0, repeats=args.baseline_repeats)
                row["masks_equal_baseline"] = bool(torch.equal(kb, keep))
                rows.append(dict(base, impl="baseline", total_s=tb["median_s"], timing=tb))
                row["speedup_vs_baseline"] = tb["median_s"] / t_total["median_s"]
            rows.append(row)
            print(
                f"{shape} {pattern}: ours {t_total['median_s']:.3f}s (init {t_init['median_s']:.3f}s)"
                + (
                    f", baseline {rows[-2]['total_s']:.3f}s, x{row['speedup_vs_baseline']:.1f}, "
                    f"masks equal: {row['masks_equal_baseline']}"
                    if "speedup_vs_baseline" in row
                    else ""
                )
            )
    append_rows(args.out, rows)
    print(f"rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
