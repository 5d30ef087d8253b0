"""Which device each decoder block is calibrated and pruned on (one device, or several).

A device map says, per block, where it runs; the drivers
(:func:`~dsnt_export.sparsify.driver.sparsify`,
:func:`~dsnt_export.sparsify.streaming.sparsify_streamed`) move the block there (or read it
straight onto it from disk), move the calibration activations from the previous block's device
to it, and use copies of the captured block kwargs (attention mask, rotary cos/sin) made on it
once per device. Blocks still run one after the other: block ``i + 1`` needs the outputs of the
PRUNED block ``i``, so several devices add capacity (each holds only its blocks' working set)
and let the streamed path read the next block onto its device while the current one is pruned,
but do not run blocks in parallel.

Accepted maps (:func:`resolve_block_devices`):

``None``
    every block on the driver's ``device``;
``"balanced"``
    every visible accelerator (``torch.accelerator``), blocks split into contiguous runs of
    (nearly) equal length in order, as accelerate's ``"balanced"`` map spreads equal blocks;
a mapping in accelerate's ``device_map`` format
    ``{module name: device}`` with ``""`` for the whole model; a block runs where the longest key
    that is its name or one of its ancestors' points (``"model.layers": 0`` puts every block on
    accelerator 0, ``"model.layers.7": "cpu"`` overrides block 7). Values: an accelerator index
    (int), ``"cpu"``, ``"cuda:1"``, a ``torch.device``; ``"disk"`` and ``"meta"`` are refused (a
    block must run somewhere). Keys naming modules outside the blocks (embeddings, ``lm_head``)
    are ignored: the pre-block modules run on the driver's ``device``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dsnt_export.errors import UserInputError
from dsnt_export.sparsify.capture import shared_move

__all__ = [
    "DeviceMap",
    "KwargsByDevice",
    "balanced_split",
    "resolve_block_devices",
]

#: what :func:`resolve_block_devices` accepts
DeviceMap = str | Mapping[str, Any] | None


def balanced_split(n_blocks: int, devices: Sequence[torch.device]) -> list[torch.device]:
    """``n_blocks`` blocks over ``devices`` in contiguous runs whose lengths differ by at most one
    (the first ``n_blocks % k`` devices take one more), in order: block ``i``'s device.

    Raises ``ValueError`` for no devices or a negative count."""
    if not devices:
        raise ValueError("balanced_split needs at least one device")
    if n_blocks < 0:
        raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
    k = len(devices)
    base, extra = divmod(n_blocks, k)
    out: list[torch.device] = []
    for j, dev in enumerate(devices):
        out += [dev] * (base + (1 if j < extra else 0))
    return out


def _visible_accelerators() -> list[torch.device]:
    if not torch.accelerator.is_available():
        return []
    acc = torch.accelerator.current_accelerator()
    return [torch.device(acc.type, i) for i in range(torch.accelerator.device_count())]


def _device_of(value: Any, key: str) -> torch.device:
    """One device-map value as a checked ``torch.device`` (UserInputError naming ``key``)."""
    from dsnt_export.hf_io import resolve_device

    if isinstance(value, bool) or not isinstance(value, (int, str, torch.device)):
        raise UserInputError(
            f"device_map[{key!r}] = {value!r}: expected an accelerator index, 'cpu', 'cuda:N' "
            "or a torch.device"
        )
    if isinstance(value, int):
        accs = _visible_accelerators()
        if not 0 <= value < len(accs):
            raise UserInputError(
                f"device_map[{key!r}] = {value}: this machine has {len(accs)} accelerator(s)"
                + (f", numbered 0..{len(accs) - 1}" if accs else "; use 'cpu'")
            )
        return accs[value]
    name = str(value)
    if name in ("disk", "meta"):
        raise UserInputError(
            f"device_map[{key!r}] = {name!r}: a block is calibrated and pruned on a device; "
            "'disk' and 'meta' hold no computation (the out-of-core path already keeps blocks "
            "on disk until they are needed: use a compute device here)"
        )
    if name == "auto":
        raise UserInputError(
            f"device_map[{key!r}] = 'auto': name a device ('cpu', 'cuda:0', or an index)"
        )
    return resolve_device(name)


def resolve_block_devices(
    device_map: DeviceMap, blocks_path: str, n_blocks: int, default: torch.device
) -> list[torch.device]:
    """Block ``i``'s compute device for ``i`` in ``range(n_blocks)``.

    ``device_map``: see the module docstring; ``blocks_path``: the blocks' module path in the
    model (the adapter's ``blocks``, e.g. ``"model.layers"``); ``default``: the device when
    ``device_map`` is None. Raises :class:`~dsnt_export.errors.UserInputError` for an unknown
    form, ``"balanced"`` without an accelerator, a block the map does not cover (named), and a
    bad value (see :func:`_device_of`)."""
    if device_map is None:
        return [default] * n_blocks
    if isinstance(device_map, str):
        if device_map != "balanced":
            raise UserInputError(
                f"device_map {device_map!r}: expected 'balanced' or a mapping of module names to "
                "devices (accelerate's device_map format, e.g. {'model.layers': 0})"
            )
        accs = _visible_accelerators()
        if not accs:
            raise UserInputError(
                "device_map 'balanced' spreads the blocks over the accelerators, and this torch "
                f"({torch.__version__}) sees none; leave device_map unset (--device cpu)"
            )
        return balanced_split(n_blocks, accs)
    if not isinstance(device_map, Mapping):
        raise UserInputError(
            f"device_map must be 'balanced' or a mapping of module names to devices, got "
            f"{type(device_map).__name__}"
        )
    for key in device_map:
        if not isinstance(key, str):
            raise UserInputError(f"device_map keys are module names (str), got {key!r}")
    resolved = {key: _device_of(v, key) for key, v in device_map.items()}
    out, uncovered = [], []
    for i in range(n_blocks):
        name = f"{blocks_path}.{i}"
        hits = [k for k in resolved if k == "" or k == name or name.startswith(k + ".")]
        if not hits:
            uncovered.append(name)
            continue
        out.append(resolved[max(hits, key=len)])
    if uncovered:
        shown = ", ".join(uncovered[:4]) + (" ..." if len(uncovered) > 4 else "")
        raise UserInputError(
            f"device_map places no device for {len(uncovered)} block(s): {shown}; map each block "
            f"(e.g. {blocks_path!r}: 0 for all of them, or '{blocks_path}.N' per block)"
        )
    return out


class KwargsByDevice:
    """The captured per-block kwargs (:class:`~dsnt_export.sparsify.capture.Captured`'s
    ``block_kwargs[i]``, ``{seq_len: kwargs}``) on the device each block runs on.

    Tensors shared between blocks (the rotary cos/sin, the attention mask are one object for all
    blocks) are moved once per device, not once per block. ``home``: the device they were
    captured on (returned as they are there)."""

    def __init__(self, home: torch.device | None):
        self.home = home
        self._memo: dict[torch.device, dict[int, Any]] = {}  # per device, as capture's moves

    def on(self, kwargs_by_len: dict[int, dict[str, Any]], device: torch.device | None):
        """``kwargs_by_len`` with every tensor on ``device`` (as it is when ``device`` is None or
        the capture device)."""
        if device is None or device == self.home:
            return kwargs_by_len
        memo = self._memo.setdefault(device, {})
        return {
            seq_len: {name: shared_move(v, device, memo) for name, v in kw.items()}
            for seq_len, kw in kwargs_by_len.items()
        }
