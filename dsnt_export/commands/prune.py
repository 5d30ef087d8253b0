"""``dsnt-export prune``: sparsify a Hugging Face causal LM and write a loadable HF checkpoint.

    dsnt-export prune --model ID_OR_DIR --pattern 2:4 --init sparsegpt --refine dsnot \\
        --calib stdlib-docs:32x256 --device cpu --out DIR [--recipe R.yaml] [--dtype] [--seed]
        [--out-of-core] [--device-map balanced|MAP.json]

``--out-of-core`` streams the checkpoint block by block instead of loading it (models larger than
host memory; :func:`dsnt_export.workflow.prune_streamed`). ``--device-map`` spreads the blocks over
several devices (:mod:`dsnt_export.sparsify.devices`), in memory or streamed.

Flags override the recipe (a preset name or a YAML file; default: the "default" preset). The output
directory is written atomically: on any error nothing is left behind.
"""

from __future__ import annotations

import argparse
import functools
import sys

from dsnt_export.errors import UserInputError
from dsnt_export.precision import MATMUL_PRECISIONS
from dsnt_export.recipe import (
    DTYPES,
    SAVE_DTYPES,
    Recipe,
    init_choices,
    method_label,
    refine_choices,
)


@functools.cache
def _default_recipe() -> Recipe:
    """The ``default`` preset, built once per process for the ``--help`` lines."""
    return Recipe.preset("default")


def recipe_default(key: str) -> str:
    """`` [default recipe: VALUE]`` for a ``--help`` line: the ``default`` preset's value of the
    recipe field ``key`` (what the flag is when neither it nor ``--recipe`` is given)."""
    value = getattr(_default_recipe(), key)
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    elif isinstance(value, (tuple, list)):
        text = ", ".join(map(str, value)) or "none"
    else:
        text = "none" if value is None else str(value)
    return f" [default recipe: {text}]"


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``prune`` and ``run``; every one defaults to the recipe's value (shown in
    ``--help`` as the ``default`` preset's, :func:`recipe_default`)."""
    d = recipe_default
    p.add_argument(
        "--model",
        help="HF checkpoint directory or hub id; 'embedded:smollm2-135m' or omitted = embedded model",
    )
    p.add_argument(
        "--recipe", help="recipe preset name (default, official) or YAML file; flags override it"
    )
    p.add_argument(
        "--pattern",
        help="sparsity pattern: N:M (N kept of M, e.g. 2:4) or a ratio 0.6" + d("pattern"),
    )
    p.add_argument("--init", choices=init_choices(), help="initial mask" + d("init"))
    p.add_argument(
        "--refine",
        choices=refine_choices(),
        help="refinement of the initial mask: refit = least-squares re-fit of the kept weights, "
        "hessian-swap = swaps chosen by the exact layer loss, dsnot = DSnoT "
        "(official recipe), none = no refinement" + d("refine"),
    )
    p.add_argument(
        "--refine-option",
        action="append",
        metavar="KEY=VALUE",
        help="a field of the refiner's config (repeatable; YAML value), e.g. percdamp=0.05, "
        "steps=16, max_cycles=20, preset=official" + d("refine_options"),
    )
    legacy = "deprecated, read as the old recipe key 'dsnot:'"
    p.add_argument(
        "--dsnot-preset", choices=("default", "official"), help=f"old DSnoT preset ({legacy})"
    )
    p.add_argument(
        "--dsnot-criterion",
        choices=("hessian", "mean"),
        help=f"hessian = --refine hessian-swap, mean = --refine dsnot ({legacy})",
    )
    p.add_argument("--dsnot-percdamp", type=float, help=f"= --refine-option percdamp=X ({legacy})")
    p.add_argument(
        "--calib", help="calibration data, e.g. stdlib-docs:32x256, c4:128x2048" + d("calib")
    )
    p.add_argument(
        "--device",
        help="auto, cpu, cuda, cuda:N (every block runs there unless --device-map)" + d("device"),
    )
    p.add_argument(
        "--device-map",
        type=_device_map_arg,
        help="spread the blocks over several devices: 'balanced' (every accelerator, contiguous "
        "runs of blocks), or accelerate's device_map as JSON text or a .json file, e.g. "
        '\'{"model.layers": 0, "model.layers.16": 1}\' (--device then runs the embeddings)',
    )
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (auto: fp32 on CPU)" + d("dtype"))
    p.add_argument(
        "--save-dtype",
        choices=SAVE_DTYPES,
        help="checkpoint dtype (source: as loaded)" + d("save_dtype"),
    )
    p.add_argument("--seed", type=int, help="random seed of the calibration sampling" + d("seed"))
    p.add_argument(
        "--exclude",
        action="append",
        metavar="SEL",
        help="never prune these linears (repeatable): attention, mlp, mlp.down_proj, 0-3:mlp, ..."
        + d("exclude"),
    )
    p.add_argument(
        "--refine-exclude",
        action="append",
        metavar="SEL",
        help="prune but do not refine these linears (repeatable), e.g. mlp" + d("refine_exclude"),
    )
    p.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="statistics of later linears of a block from the already pruned earlier ones"
        + d("sequential"),
    )
    p.add_argument(
        "--batch-size", type=int, help="calibration samples per block forward" + d("batch_size")
    )
    p.add_argument(
        "--offload-activations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep calibration activations on the CPU between blocks" + d("offload_activations"),
    )
    p.add_argument(
        "--out-of-core",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="never load the whole model: read one block at a time from the checkpoint's "
        "safetensors, prune it, write it (peak host memory ~ embeddings + one block; same weights)"
        + d("out_of_core"),
    )
    p.add_argument(
        "--matmul-precision",
        choices=MATMUL_PRECISIONS,
        help="internal precision of the float32 Hessian and solver products (torch's "
        "set_float32_matmul_precision): highest = IEEE float32; high = TF32 or two bfloat16s "
        "where a kernel has them; medium = bfloat16-based; auto = medium only where a "
        "probe finds it as accurate as float32 on this device (e.g. oneDNN on AVX512-BF16 CPUs), "
        "else highest. The model's own forwards are never affected" + d("matmul_precision"),
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``prune``'s flags: the recipe flags plus ``--out`` and ``--overwrite``."""
    add_recipe_arguments(p)
    p.add_argument("--out", required=True, help="output directory (a new HF checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _refine_options(args: argparse.Namespace) -> dict | None:
    """``--refine-option KEY=VALUE`` flags as a mapping (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for item in getattr(args, "refine_option", None) or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(
                f"--refine-option {item!r}: expected KEY=VALUE, e.g. percdamp=0.05"
            )
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserInputError(f"--refine-option {item!r}: value is not valid YAML ({e})") from e
    return out or None


def _device_map_arg(text: str) -> str | dict:
    """``--device-map``: "balanced", a JSON object, or the path of a JSON file holding one."""
    import json
    from pathlib import Path

    if text == "balanced":
        return text
    source = text
    if not text.lstrip().startswith(("{", "[")):
        path = Path(text)
        if not path.is_file():
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither 'balanced', a JSON object nor an existing .json file"
            )
        source = path.read_text()
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {source[:200]!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object of module -> device, got {value!r}"
        )
    return value


def _dsnot_overrides(args: argparse.Namespace) -> dict | None:
    """The deprecated ``--dsnot-*`` flags as the old ``dsnot:`` mapping (None when unset)."""
    d = {}
    if args.dsnot_preset:
        d["preset"] = args.dsnot_preset
    if getattr(args, "dsnot_criterion", None):
        d["criterion"] = args.dsnot_criterion
    if getattr(args, "dsnot_percdamp", None) is not None:
        d["percdamp"] = args.dsnot_percdamp
    return d or None


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The ``--recipe`` (preset name or YAML file; default: the ``default`` preset) with every set
    flag applied on top."""
    recipe = Recipe.load(args.recipe) if args.recipe else Recipe.preset("default")
    return recipe.replace(
        model=args.model,
        pattern=args.pattern,
        init=args.init,
        refine=args.refine,
        refine_options=_refine_options(args),
        dsnot=_dsnot_overrides(args),
        calib=args.calib,
        device=args.device,
        device_map=getattr(args, "device_map", None),
        dtype=args.dtype,
        save_dtype=args.save_dtype,
        seed=args.seed,
        exclude=tuple(args.exclude) if args.exclude else None,
        refine_exclude=tuple(args.refine_exclude) if args.refine_exclude else None,
        sequential=args.sequential,
        batch_size=args.batch_size,
        offload_activations=args.offload_activations,
        out_of_core=getattr(args, "out_of_core", None),
        matmul_precision=getattr(args, "matmul_precision", None),
        eval=getattr(args, "eval", None),
        eval_seqlen=getattr(args, "eval_seqlen", None),
        eval_max_windows=getattr(args, "eval_max_windows", None),
    )


def run(args: argparse.Namespace) -> int:
    """``dsnt-export prune``: the recipe from the flags, :func:`~dsnt_export.workflow.prune_to_dir`,
    one printed line; exit code 1 when a saved weight violates the pattern."""
    from dsnt_export.workflow import prune_to_dir

    recipe = recipe_from_args(args)
    saved = prune_to_dir(recipe, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    s, manifest = saved.result.report.summary(), saved.manifest
    print(
        f"pruned {s['n_linears']} linears of {manifest['source_model']['id']} to {recipe.pattern} "
        f"({method_label(recipe.init, recipe.refine)}, {s['n_refined']} refined, "
        f"{s['n_skipped']} skipped), sparsity {s['sparsity']:.4f}, "
        f"mask check {'OK' if saved.ok else 'FAILED'}, "
        f"{s['seconds']:.1f} s -> {saved.out}"
    )
    if not saved.ok:
        print("error: a saved weight violates the pattern; see dsnt_manifest.json", file=sys.stderr)
        return 1
    return 0
