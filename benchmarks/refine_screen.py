"""Screen refinements of SparseGPT's mask by their layer loss on held-out text (issue 16, cheap proxy).

    python benchmarks/refine_screen.py                      # -> benchmarks/results/refine_screen.json
    python benchmarks/refine_screen.py --blocks 3,21 --linears mlp.down_proj

For a handful of linears of the DENSE embedded SmolLM2-135M it captures three input Hessians
(``2/n X^T X``, float64 accumulation, ``--nsamples`` x ``--seqlen`` tokens each):

``cal``   the calibration windows (stdlib-docs, seed 0: the default recipe's windows)
``held``  held-out docstrings (stdlib-docs evaluation part): in-domain, not calibrated on
``off``   held-out source code (stdlib-code evaluation part): another domain, not calibrated on

then prunes each linear to ``--pattern`` with SparseGPT on ``cal`` and applies every candidate
(hessian-swap at several dampenings, the least-squares re-fit of :mod:`dsnt_export.refine.refit`
with several ridges, and their combinations, all driven by ``cal`` only), and reports each
candidate's loss ``tr(dW H dW^T)`` (``dW`` = dense - candidate) on each Hessian relative to
SparseGPT's: the geometric mean over the linears and per linear kind. Lower than 1 = better than
SparseGPT alone. The third evaluation text (stdlib-topics) is deliberately NOT used, so that a
choice made here leaves it an honest test.

A proxy, not the model's perplexity: inputs are the dense model's (in the real prune each block
sees the already-pruned blocks before it), and the loss is per layer. Candidates that win here are
then checked with whole-model prunes (benchmarks/quality_table.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from dsnt_export.methods.sparsegpt import sparsegpt_prune
from dsnt_export.refine.hessian_swap import hessian_refine
from dsnt_export.refine.loss import quadratic_loss
from dsnt_export.refine.refit import refit_cg, refit_exact

SWAP_DAMPS = (0.03, 0.3)
REFIT_DAMPS = (0.03, 0.1, 0.3, 1.0)
CG_STEPS = (5,)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def capture_hessians(model, names: list[str], ids: torch.Tensor, batch: int = 8) -> dict:
    """``{name: 2/n X^T X}`` (float32 [in, in]) of the inputs of the named linears, float64 sums."""
    sums, counts, hooks = {}, {}, []
    for name in names:
        mod = model.get_submodule(name)

        def hook(_m, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(mod.register_forward_pre_hook(hook))
    # stop each forward after the last block that holds a named linear
    last = max(int(n.split(".")[2]) for n in names)

    def stop(*_):
        raise _Stop

    hooks.append(model.model.layers[last].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for s in range(0, ids.shape[0], batch):
                try:
                    model(ids[s : s + batch])
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {n: (2.0 / counts[n] * sums[n]).float() for n in names}


def candidates(W0: torch.Tensor, Hc: torch.Tensor, pattern: str) -> dict[str, torch.Tensor]:
    """Every candidate's pruned weight [out, in] for one linear, all chosen on ``Hc`` only."""
    w_sg, keep = sparsegpt_prune(W0, Hc, pattern)
    base = torch.where(keep, w_sg, W0)  # what a swap may regrow (as the driver does)
    out = {"sparsegpt": w_sg}
    for lam in REFIT_DAMPS:
        out[f"sparsegpt+refit({lam})"] = refit_exact(w_sg, keep, W0, Hc, percdamp=lam)[0]
    for d in SWAP_DAMPS:
        w_sw, k_sw, _ = hessian_refine(base, keep, W0, Hc, pattern, percdamp=d)
        out[f"swap({d})"] = w_sw
        for lam in REFIT_DAMPS:
            out[f"swap({d})+refit({lam})"] = refit_exact(w_sw, k_sw, W0, Hc, percdamp=lam)[0]
        for k in CG_STEPS:
            out[f"swap({d})+cg{k}(0.01)"] = refit_cg(w_sw, k_sw, W0, Hc, percdamp=0.01, steps=k)[0]
    return out


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out)


def geomean(xs: list[float]) -> float:
    """Geometric mean of positive floats."""
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main(argv=None) -> int:
    """Capture, prune, score; write the JSON (temp file + rename) and print the summary."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--blocks", default="3,12")
    ap.add_argument(
        "--linears", default="self_attn.q_proj,self_attn.o_proj,mlp.up_proj,mlp.down_proj"
    )
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/refine_screen.json")
    ap.add_argument("--hessians", default=None, help="cache file of the captured Hessians (.pt)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsnt_export.data import get_calibration, get_eval_tokens
    from dsnt_export.embedded import embedded_model_dir

    d = embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    n, t = args.nsamples, args.seqlen
    cal, cdesc = get_calibration("stdlib-docs", tok, n, t, seed=0)
    sets = {"cal": cal}
    descs = {"cal": cdesc}
    for key, src in (("held", "stdlib-docs"), ("off", "stdlib-code")):
        ids, desc = get_eval_tokens(src, tok, max_tokens=n * t)
        sets[key] = ids[0, : n * t].reshape(n, t)
        descs[key] = desc
    names = [
        f"model.layers.{b}.{lin}" for lin in args.linears.split(",") for b in args.blocks.split(",")
    ]
    t0 = time.perf_counter()
    cache = Path(args.hessians) if args.hessians else None
    if cache is not None and cache.is_file():
        H = torch.load(cache)
        print(f"loaded Hessians from {cache}", flush=True)
    else:
        H = {k: capture_hessians(model, names, ids) for k, ids in sets.items()}
        print(f"captured {len(names)} x 3 Hessians in {time.perf_counter() - t0:.0f} s", flush=True)
        if cache is not None:
            torch.save(H, cache)
    per_layer = {}
    for name in names:
        t1 = time.perf_counter()
        print(f"{name} ...", flush=True)
        W0 = model.get_submodule(name).weight.data.float()
        cands = candidates(W0, H["cal"][name], args.pattern)
        losses = {c: {k: quadratic_loss(W0 - w, H[k][name]) for k in H} for c, w in cands.items()}
        base = losses["sparsegpt"]
        per_layer[name] = {
            c: {k: v[k] / base[k] for k in H} | {"loss": v} for c, v in losses.items()
        }
        print(
            f"{name}: {time.perf_counter() - t1:.0f} s (cal / held / off vs SparseGPT)", flush=True
        )
        for c in sorted(per_layer[name], key=lambda c: per_layer[name][c]["off"]):
            v = per_layer[name][c]
            print(f"  {c:32s} {v['cal']:.4f} {v['held']:.4f} {v['off']:.4f}", flush=True)
        _write(Path(args.out), {"bench": "refine_screen", "partial": True, "per_layer": per_layer})
    cand_names = list(next(iter(per_layer.values())))
    kinds = sorted({n.rsplit(".", 1)[1] for n in names})
    summary = {}
    for c in cand_names:
        summary[c] = {k: geomean([per_layer[n][c][k] for n in names]) for k in H}
        for kind in kinds:
            sel = [n for n in names if n.endswith(kind)]
            summary[c][f"off:{kind}"] = geomean([per_layer[n][c]["off"] for n in sel])
    result = {
        "bench": "refine_screen",
        "pattern": args.pattern,
        "linears": names,
        "data": descs,
        "ratio_to": "sparsegpt (same Hessian); geometric mean over the linears",
        "summary": summary,
        "per_layer": per_layer,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    _write(out, result)
    print(f"{'candidate':34s} {'cal':>7s} {'held':>7s} {'off':>7s}")
    for c in sorted(summary, key=lambda c: summary[c]["off"]):
        s = summary[c]
        print(f"{c:34s} {s['cal']:7.4f} {s['held']:7.4f} {s['off']:7.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
