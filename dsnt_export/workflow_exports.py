"""Stages of ``dsnt-export run`` after the checkpoint is saved: export and re-check the artifacts.

Registered in :data:`dsnt_export.commands.run.EXTRA_STAGES` (imported by the run command):

* ``export_onnx``: the saved OUT/hf checkpoint through the ONNX converter into OUT/onnx, with its
  own mask re-validation and ONNX Runtime parity against eager torch. ``--onnx fp32`` (the default):
  the float32 logits graph (perplexity on ONNX Runtime; ~2 min for the embedded model on 2 CPU
  cores); ``--onnx full`` (or ``--export-onnx``): also the fp16-typed logits graph for TensorRT and
  the float32 prefill/decode graphs with a KV cache (~7 min); ``--onnx none`` (``--no-export``);
* ``check``: ``dsnt-export check`` of every artifact written (the CI gate, run on the files).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# --onnx level -> the ONNX converter's dtypes / generation_dtypes
ONNX_LEVELS = {
    "none": None,
    "fp32": {"dtypes": ("float32",), "generation_dtypes": ()},
    "full": {"dtypes": ("float32", "float16"), "generation_dtypes": ("float32",)},
}


def onnx_level(args) -> str:
    if getattr(args, "no_export", False):
        return "none"
    if getattr(args, "export_onnx", False):
        return "full"
    return getattr(args, "onnx", None) or "fp32"


def stage_export_onnx(ctx) -> None:
    level = onnx_level(ctx.args)
    if level == "none":
        ctx.summary.setdefault("exports", {})["onnx"] = {
            "skipped": "not requested (--onnx none); later: dsnt-export export onnx OUT/hf"
        }
        return
    from converters import get_converter
    from dsnt_export.errors import DsntError

    try:
        res = get_converter("onnx").export(
            ctx.tmp / "hf",
            ctx.tmp / "onnx",
            progress=not getattr(ctx.args, "no_progress", False),
            source_label="../hf",  # OUT/hf: ctx.tmp is renamed to OUT at the end
            **ONNX_LEVELS[level],
        )
    except DsntError as e:  # the checkpoint stays valid; the failed export leaves nothing behind
        log.warning("ONNX export failed: %s", e)
        print(f"warning: ONNX export failed (no onnx/ written): {e}")
        ctx.summary.setdefault("exports", {})["onnx"] = {"error": f"{type(e).__name__}: {e}"}
        return
    s = res.summary()
    s["out_dir"] = "onnx"
    s["level"] = level
    ctx.summary.setdefault("exports", {})["onnx"] = s


def stage_check(ctx) -> None:
    from converters.checkers.common import check_path

    checks = {}
    for name in ("hf", "onnx"):
        path = ctx.tmp / name
        if path.exists():
            rep = check_path(path)
            checks[name] = {
                "ok": rep.ok,
                "exit_code": rep.exit_code,
                "n_tensors": len(rep.tensors),
                "findings": [f.to_json() for f in rep.findings],
            }
    ctx.summary.setdefault("exports", {})["check"] = checks


def register(stages: list) -> None:
    names = {n for n, _ in stages}
    for name, fn in (("export_onnx", stage_export_onnx), ("check", stage_check)):
        if name not in names:
            stages.append((name, fn))
