"""The run report of ``dsnt-export run``: summary JSON + Markdown, and re-validation of a checkpoint.

:func:`validate_checkpoint` re-reads the saved safetensors (not the model in memory) and checks the
pattern of every tensor the manifest lists. :func:`write_report` writes ``summary.json``,
``summary.md`` and a ``report`` manifest into a directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsnt_export.artifacts import new_manifest, read_manifest, write_manifest
from dsnt_export.masks import validate_mask


def validate_checkpoint(hf_dir: str | Path) -> dict:
    """Re-validate every pruned tensor of a saved checkpoint from its safetensors files."""
    from safetensors import safe_open

    d = Path(hf_dir)
    m = read_manifest(d)
    pattern = m["pattern"]["string"]
    wanted = set(m["tensors"])
    found: dict[str, dict] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key in wanted:
                    rep = validate_mask(sf.get_tensor(key), pattern, name=key)
                    found[key] = {"ok": rep.ok, "sparsity": rep.sparsity, "message": rep.message}
    missing = sorted(wanted - set(found))
    return {
        "pattern": pattern,
        "n_tensors": len(found),
        "missing": missing,
        "ok": not missing and all(v["ok"] for v in found.values()),
        "violations": {k: v["message"] for k, v in found.items() if not v["ok"]},
        "sparsity": sum(v["sparsity"] for v in found.values()) / max(1, len(found)),
    }


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(summary: dict) -> str:
    r, s, ev = summary["recipe"], summary["sparsify"], summary.get("perplexity") or {}
    lines = [
        f"# dsnt-export run: {summary['source_model']['id']} at {r['pattern']}",
        "",
        f"- recipe: `{r['name']}` (hash `{summary['recipe_hash'][:12]}`), init `{r['init']}`, "
        f"refine `{r['refine']}` (DSnoT preset `{r['dsnot']['preset']}`), "
        f"refine excluded: {r['refine_exclude'] or 'none'}, excluded: {r['exclude'] or 'none'}",
        f"- calibration: {summary['calibration'].get('source')} "
        f"{summary['calibration'].get('nsamples')} x {summary['calibration'].get('seqlen')} tokens, "
        f"seed {summary['calibration'].get('seed')}",
        f"- linears pruned: {s['n_linears']} ({s['n_refined']} refined by DSnoT, "
        f"{s['n_skipped']} skipped), sparsity {s['sparsity']:.4f}",
        f"- mask check of the saved checkpoint: {'OK' if summary['validation']['ok'] else 'FAILED'}"
        f" ({summary['validation']['n_tensors']} tensors)",
    ]
    if s.get("mean_abs_err_before") is not None:
        lines.append(
            f"- DSnoT mean |reconstruction error| per row: {s['mean_abs_err_before']:.4g} -> "
            f"{s['mean_abs_err_after']:.4g} ({s['swaps']} swaps)"
        )
    if ev:
        lines += [
            "",
            f"## Perplexity ({ev['dataset']}, {ev['seqlen']}-token windows, "
            f"{ev['n_tokens_scored']} tokens scored)",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| dense | {_fmt(ev['dense'])} |",
            f"| sparse ({r['pattern']}, saved checkpoint) | {_fmt(ev['sparse'])} |",
        ]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["timings"].items()]
    return "\n".join(lines) + "\n"


def write_report(report_dir: str | Path, summary: dict) -> None:
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (d / "summary.md").write_text(markdown(summary))
    write_manifest(
        d,
        new_manifest(
            "report",
            source_model=summary["source_model"],
            recipe=summary["recipe"],
            pattern=summary["pattern"],
            calibration=summary["calibration"],
            timings=summary["timings"],
        ),
    )
