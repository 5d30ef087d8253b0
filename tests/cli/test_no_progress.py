"""``--no-progress`` hides the libraries' progress bars too, not only ours."""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import sys
from dsnt_export.cli import quiet_progress_bars
import huggingface_hub.utils
import transformers                       # imported before: switched off directly
quiet_progress_bars()
from tqdm.auto import tqdm                # imported before (by the hub): disabled by default
bar = tqdm(total=3, file=sys.stderr)
assert bar.disable, "tqdm bar still enabled"
import io
assert not tqdm(total=3, disable=False, file=io.StringIO()).disable  # an explicit choice stays
assert not transformers.utils.logging.is_progress_bar_enabled(), "transformers bars enabled"
assert huggingface_hub.utils.are_progress_bars_disabled(), "hub bars enabled"
print("quiet")
"""


def test_no_progress_silences_tqdm_and_transformers():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "quiet" and "it/s" not in out.stderr


def test_main_applies_it_for_commands_with_the_flag(monkeypatch):
    import dsnt_export.cli as cli

    called = []
    monkeypatch.setattr(cli, "quiet_progress_bars", lambda: called.append(True))
    # a bench of a missing path: fails fast (exit 2) after the flag has been applied
    rc = cli.main(["bench", "/nonexistent/dir", "--runtime", "torch", "--no-progress"])
    assert rc == 2 and called == [True]
