"""Requested vs written: every option that shapes an artifact is read back from the written files.

A writer records each such option with :func:`record_option` (what the user asked for, ``None``
for the default, and what the written files hold, read back from them, not from the arguments)
and calls :func:`verify_options` before the artifact appears. The record is stored in the
manifest under ``extra.export.options`` as ``{option: {"requested": ..., "written": ...}}``.
"""

from __future__ import annotations

from typing import Any

from dsnt_export.errors import DsntError

__all__ = ["OptionMismatchError", "record_option", "verify_options"]


class OptionMismatchError(DsntError):
    """A written artifact does not hold what an export option asked for (exit 1, nothing kept).

    ``mismatches``: ``{option: {"requested": ..., "written": ...}}`` of the options that differ.
    """

    def __init__(self, message: str, mismatches: dict[str, dict]):
        super().__init__(message)
        self.mismatches = mismatches


def record_option(options: dict[str, dict], name: str, requested: Any, written: Any) -> None:
    """Record option ``name`` into ``options``: ``requested`` (None: the default was asked for)
    and ``written`` (the value read back from the written files). JSON-able values only."""
    options[name] = {"requested": requested, "written": written}


def verify_options(options: dict[str, dict], what: str, *, ok=None) -> None:
    """Raise when a requested option is not what was written.

    ``ok``: optional ``{option: predicate(requested, written) -> bool}`` for options whose written
    value is not simply equal to the request (e.g. a size limit); the default is equality. An
    option requested as None (the default) always holds.

    Raises:
        OptionMismatchError: one or more options differ; the message lists each with both values.
    """
    ok = ok or {}
    bad = {}
    for name, rec in options.items():
        req, got = rec["requested"], rec["written"]
        if req is None:
            continue
        holds = ok[name](req, got) if name in ok else req == got
        if not holds:
            bad[name] = rec
    if bad:
        lines = "; ".join(
            f"{k}: requested {v['requested']!r}, written {v['written']!r}" for k, v in bad.items()
        )
        raise OptionMismatchError(
            f"{what}: the written artifact does not hold the requested options ({lines}); "
            "nothing was written. Export with the defaults or report this",
            bad,
        )
