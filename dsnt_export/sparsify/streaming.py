"""Out-of-core sparsification: blocks streamed from the checkpoint's safetensors, pruned, written.

The in-memory path (:func:`dsnt_export.sparsify.driver.sparsify`) needs the whole model in host
memory. This one never holds more than the modules before the blocks (embeddings, rotary tables),
one decoder block and the calibration activations:

    skeleton    the causal LM built from its config with every parameter on the meta device
                (accelerate's ``init_empty_weights``; non-persistent buffers such as RoPE tables
                stay real)
    capture     the pre-block modules' tensors read from the checkpoint, block 0's inputs caught
                (:func:`~dsnt_export.sparsify.capture.capture_block_inputs`), those tensors
                released again
    per block   its tensors read (one at a time, explicit reads, no memory map), checked finite,
                :func:`~dsnt_export.sparsify.driver.sparsify_block`, its tensors written to the
                block's output shard in the save dtype, released (back to meta)
    the rest    embeddings, final norm, an untied lm_head: copied tensor by tensor into the first
                shard, cast as the in-memory path casts them (compute dtype, then save dtype)

Output: ``model-0000K-of-0000N.safetensors`` shards (the non-block tensors, then one shard per
block) and ``model.safetensors.index.json``; :func:`dsnt_export.workflow.prune_to_dir` adds
config, tokenizer and manifest with the same helpers as the in-memory save
(:mod:`dsnt_export.hf_io`). Tensors are bit-identical to the in-memory path's for the same recipe
and calibration (tested).

Checkpoint keys map to the skeleton's parameter names exactly, or with the base model's prefix
(``model.``) removed or added; tied weights (``model.all_tied_weights_keys``) are neither read
nor written, as ``save_pretrained`` drops them. Safetensors files are read and written with plain
file I/O (:mod:`dsnt_export.shards`), so a touched tensor never stays mapped into the process's
resident memory.

Devices: every block runs on ``device``, or, with a ``device_map``
(:mod:`~dsnt_export.sparsify.devices`), on its mapped device; its tensors are read straight onto
that device and the activations follow the blocks from device to device. While block ``i`` is
calibrated and pruned, a background thread reads block ``i + 1`` onto its accelerator (file reads
and host-to-device copies overlap the computation; two blocks are held in device memory, host
memory holds one tensor in flight). Blocks that run on the CPU are not read ahead by default: that
would hold a second block in host memory, the resource this path exists to save (measured on the
2-core CPU, 3.5 GiB Llama: 10 % faster, peak RSS 30 % -> 35 % of the weights); ``prefetch=True``
asks for it.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnt_export.adapters import resolve
from dsnt_export.errors import ArtifactError, NonFiniteError, UnsupportedModelError
from dsnt_export.shards import SafetensorsCheckpoint, ShardWriter
from dsnt_export.sparsify.capture import capture_block_inputs
from dsnt_export.sparsify.devices import DeviceMap, KwargsByDevice, resolve_block_devices
from dsnt_export.sparsify.driver import (
    SparsifyConfig,
    calibration_samples,
    new_report,
    sparsify_block,
    start_stage_timings,
)
from dsnt_export.sparsify.heap import pin_mmap_threshold, trim_heap
from dsnt_export.sparsify.plan import Plan, plan_targets
from dsnt_export.sparsify.record import SparsifyReport

logger = logging.getLogger(__name__)

__all__ = [
    "StreamedResult",
    "empty_model",
    "output_keys",
    "sparsify_streamed",
]


# ------------------------------------------------------------------------------------ the skeleton


def empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (no memory, no init).

    Non-persistent buffers (RoPE tables) are real CPU tensors computed from the config, as in a
    loaded model. Parameters are declared in ``dtype``. Raises
    :class:`~dsnt_export.errors.UnsupportedModelError` when transformers converts this model's
    checkpoint keys on load (the streamed path reads tensors under their stored names only).
    ``config`` itself is not modified (the model gets a copy).
    """
    import transformers as T
    from accelerate import init_empty_weights

    config = copy.deepcopy(config)  # from_config records ``dtype`` in the config it is given
    with init_empty_weights(include_buffers=False):
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model

        conversions = extract_weight_conversions_for_model(model)
    except ImportError:  # an older transformers without conversion mappings
        conversions = None
    if conversions:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r}: transformers converts this family's checkpoint "
            "tensors on load (renamed or fused weights), so they cannot be streamed one by one; "
            "prune it in memory (without --out-of-core)"
        )
    return model.eval()


def output_keys(model: nn.Module) -> list[str]:
    """The tensor names a saved checkpoint of ``model`` holds: its state-dict keys (parameters and
    persistent buffers) without the tied ones ``save_pretrained`` drops (e.g. a tied
    ``lm_head.weight``), in state-dict order."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:  # older transformers: the config's word-embedding tie
        tied = (
            {"lm_head.weight": None} if getattr(model.config, "tie_word_embeddings", False) else {}
        )
    return [k for k in model.state_dict(keep_vars=True) if k not in tied]


def _tensor_slots(
    module: nn.Module, prefix: str, wanted: set[str]
) -> list[tuple[str, nn.Module, str, bool]]:
    """``(full name, owner module, attribute, is_parameter)`` of each of ``module``'s tensors
    whose full name (``prefix`` + local name) is in ``wanted``."""
    out = []
    for mname, mod in module.named_modules():
        for attr, p in mod._parameters.items():
            full = f"{prefix}{mname + '.' if mname else ''}{attr}"
            if p is not None and full in wanted:
                out.append((full, mod, attr, True))
        for attr, b in mod._buffers.items():
            full = f"{prefix}{mname + '.' if mname else ''}{attr}"
            if b is not None and full in wanted and attr not in mod._non_persistent_buffers_set:
                out.append((full, mod, attr, False))
    return out


def _set(mod: nn.Module, attr: str, value: torch.Tensor, is_param: bool) -> None:
    if is_param:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` when both are floating point (integer tensors keep their dtype)."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


# ------------------------------------------------------------------------------------ the driver


@dataclass
class StreamedResult:
    """What :func:`sparsify_streamed` did: the driver's ``report`` (same records as the in-memory
    path), ``tensors`` (the manifest entries of every saved pruned weight, as
    :func:`dsnt_export.hf_io.pruned_tensor_entry` makes them), the ``files`` written (shards and
    index, names relative to the output directory) and ``save_dtype`` (the floating-point dtype
    written)."""

    report: SparsifyReport
    tensors: dict[str, dict]
    files: list[str]
    save_dtype: torch.dtype


class _Streamer:
    """Moves tensors between the checkpoint, the skeleton and the output shards."""

    def __init__(self, model, ckpt, device, dtype, save_dtype):
        self.model, self.ckpt = model, ckpt
        self.device, self.dtype, self.save_dtype = device, dtype, save_dtype
        self.base_prefix = getattr(model, "base_model_prefix", "") or ""
        self.keys = output_keys(model)
        shapes = model.state_dict(keep_vars=True)
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.source: dict[str, str] = {}
        missing, bad = [], []
        for k in self.keys:
            src = ckpt.key_for(k, self.base_prefix)
            if src is None:
                missing.append(k)
                continue
            info = ckpt.infos[src]
            if info.shape != tuple(shapes[k].shape):
                bad.append(f"{k} {info.shape} != {tuple(shapes[k].shape)}")
            self.source[k] = src
            self.specs[k] = (self._out_dtype(info.dtype), info.shape)
        if missing or bad:
            raise ArtifactError(
                f"checkpoint {ckpt.directory} does not match its config.json: missing "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, shape-mismatched "
                f"{bad[:5]}; these would be randomly initialised. Use a complete checkpoint"
            )

    def _out_dtype(self, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored
        return self.save_dtype if self.save_dtype is not None else self.dtype

    def load(self, t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """A stored tensor as the in-memory path holds it: the compute dtype, on ``device``
        (default: the streamer's device)."""
        return _cast(t, self.dtype).to(self.device if device is None else device)

    def slots(self, module: nn.Module, prefix: str) -> list[tuple[str, nn.Module, str, bool]]:
        """``module``'s tensor slots that the checkpoint holds (see :func:`_tensor_slots`)."""
        return _tensor_slots(module, prefix, set(self.source))

    def read(self, names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The stored tensors ``names`` (full names) read onto ``device`` in the compute dtype;
        safe to call from one background thread while the main thread computes (it touches no
        module)."""
        return {full: self.load(self.ckpt.read(self.source[full]), device) for full in names}

    @staticmethod
    def fill(slots, tensors: dict[str, torch.Tensor]) -> None:
        """Put :meth:`read`'s ``tensors`` into their ``slots``."""
        for full, mod, attr, is_param in slots:
            _set(mod, attr, tensors[full], is_param)

    def materialize(self, module: nn.Module, prefix: str) -> list[tuple[str, nn.Module, str, bool]]:
        """Read ``module``'s tensors from the checkpoint onto the device; returns the slots."""
        slots = self.slots(module, prefix)
        self.fill(slots, self.read([full for full, *_ in slots], self.device))
        return slots

    @staticmethod
    def release(slots) -> None:
        """Put every slot back on the meta device (frees its memory)."""
        for _, mod, attr, is_param in slots:
            t = mod._parameters[attr] if is_param else mod._buffers[attr]
            _set(mod, attr, torch.empty(t.shape, dtype=t.dtype, device="meta"), is_param)

    def saved(self, t: torch.Tensor) -> torch.Tensor:
        """A compute-dtype tensor as the in-memory path saves it (cast to the save dtype)."""
        return _cast(t, self.save_dtype)


@torch.no_grad()
def sparsify_streamed(
    model: nn.Module,
    checkpoint: str | Path | SafetensorsCheckpoint,
    calibration: torch.Tensor | Sequence[torch.Tensor],
    config: SparsifyConfig,
    out_dir: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    save_dtype: torch.dtype | None,
    plan: Plan | None = None,
    progress: bool = True,
    device_map: DeviceMap = None,
    prefetch: bool | None = None,
) -> StreamedResult:
    """Prune the checkpoint behind the meta skeleton ``model`` block by block into ``out_dir``.

    ``model``: :func:`empty_model` of the checkpoint's config; ``checkpoint``: its directory (or
    a :class:`SafetensorsCheckpoint`); ``calibration``: token ids ``[N, T]`` int64 (or a list of
    ``[T]`` tensors); ``config``: the driver's config, as for
    :func:`~dsnt_export.sparsify.driver.sparsify`; ``out_dir``: an existing directory receiving
    the shards and the index (config, tokenizer and manifest are the caller's). ``device``: where
    the pre-block modules run, and every block when ``device_map`` is None; ``device_map``: each
    block's device (:func:`~dsnt_export.sparsify.devices.resolve_block_devices`; the report's
    config lists them as ``block_devices``); ``dtype``: the compute dtype (what the in-memory path
    loads in); ``save_dtype``: the written dtype (None: ``dtype``). ``progress``: a tqdm bar over
    blocks. ``prefetch``: read block ``i + 1`` onto its device in a background thread while block
    ``i`` is pruned (None: when that device is an accelerator; True: also onto the CPU).

    Peak memory: the pre-block modules (during the capture only), one block (two when read
    ahead, on their devices), the calibration activations (on the CPU with
    ``config.offload_activations``) and one non-block tensor at a time while copying. Raises
    :class:`~dsnt_export.errors.ArtifactError` (checkpoint and config disagree: missing or
    mis-shaped tensors), ``NonFiniteError`` naming a NaN/Inf parameter, and what
    ``sparsify_block`` raises. On an error the caller removes ``out_dir``.
    """
    t_start = time.perf_counter()
    ckpt = (
        checkpoint
        if isinstance(checkpoint, SafetensorsCheckpoint)
        else SafetensorsCheckpoint(checkpoint)
    )
    plan = plan or plan_targets(
        model, config.pattern, exclude=config.exclude, refine_exclude=config.refine_exclude
    )
    adapter = plan.adapter
    blocks = adapter.get_blocks(model)
    block_devs = resolve_block_devices(device_map, adapter.blocks, len(blocks), device)
    st = _Streamer(model, ckpt, device, dtype, save_dtype)
    pin_mmap_threshold()
    prefixes = [f"{adapter.blocks}.{i}." for i in range(len(blocks))]
    block_keys = [[k for k in st.keys if k.startswith(p)] for p in prefixes]
    in_blocks = {k for ks in block_keys for k in ks}
    rest = [k for k in st.keys if k not in in_blocks]
    writer = ShardWriter(out_dir, len(blocks) + (1 if rest else 0))

    # the tensors outside the blocks, copied one at a time (the in-memory path's casts)
    try:
        if rest:
            writer.open_shard({k: st.specs[k] for k in rest})
            for k in rest:
                writer.put(k, st.saved(st.load(ckpt.read(st.source[k]))).to("cpu"))
            writer.close_shard()
    except BaseException:
        writer.abort()
        raise

    samples = calibration_samples(calibration, config)
    store = torch.device("cpu") if config.offload_activations else None
    t0 = time.perf_counter()
    pre = []
    try:
        for path in adapter.pre_block:
            mod = resolve(model, path, optional=True)
            if mod is not None:
                pre += st.materialize(mod, path + ".")
                _check_finite(mod, path + ".")
        cap = capture_block_inputs(model, adapter, samples, device=device, store_device=store)
    finally:
        st.release(pre)
        trim_heap()
    report = new_report(
        plan, config, samples, device, block_devs if device_map is not None else None
    )
    report.timings["capture_s"] = time.perf_counter() - t0
    start_stage_timings(report.timings)
    inputs = cap.inputs
    kwargs = KwargsByDevice(device)
    tensors: dict[str, dict] = {}
    bar = _progress(len(blocks), progress)
    slots_of = [st.slots(b, p) for b, p in zip(blocks, prefixes, strict=True)]
    reader = _BlockReader(st, slots_of, block_devs, prefetch)
    try:
        for i, block in enumerate(blocks):
            tb = time.perf_counter()
            prefix, slots = prefixes[i], slots_of[i]
            st.fill(slots, reader.take(i))
            try:
                _check_finite(block, prefix)
                targets = plan.for_block(i)
                records, inputs = sparsify_block(
                    block,
                    inputs,
                    kwargs.on(cap.block_kwargs[i], block_devs[i]),
                    plan,
                    targets,
                    config,
                    device=block_devs[i],
                    store=store,
                    timings=report.timings,
                    outputs=i + 1 < len(blocks),
                )
                _write_block(writer, st, slots, block_keys[i], records, config, tensors)
            finally:
                st.release(slots)
                trim_heap()
            report.layers.extend(records)
            report.timings[f"block_{i}_s"] = time.perf_counter() - tb
            logger.info(
                "block %d streamed: %d linears, %.1f s",
                i,
                len(records),
                report.timings[f"block_{i}_s"],
            )
            bar.update(1)
            bar.set_postfix_str(f"block {i}: {len(records)} linears")
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
        bar.close()
    index = writer.finish()
    report.timings["total_s"] = time.perf_counter() - t_start
    files = sorted(set(writer.weight_map.values())) + [index.name]
    out_dtype = save_dtype if save_dtype is not None else dtype
    return StreamedResult(report=report, tensors=tensors, files=files, save_dtype=out_dtype)


class _BlockReader:
    """Reads each block's tensors onto its device, block ``i + 1`` in a background thread while
    block ``i`` is pruned (``prefetch`` True; None: only onto an accelerator), else each when it
    is taken. Blocks are taken in order.

    The thread only reads files and copies tensors (:meth:`_Streamer.read`), the modules are
    filled by the caller; an error in it is raised by :meth:`take`."""

    def __init__(self, st: _Streamer, slots_of, devices, prefetch: bool | None):
        from concurrent.futures import ThreadPoolExecutor

        self.st, self.devices = st, devices
        self.names = [[full for full, *_ in slots] for slots in slots_of]
        self.ahead = [
            bool(prefetch) if prefetch is not None else d is not None and d.type != "cpu"
            for d in devices
        ]
        self.pool = (
            ThreadPoolExecutor(1, thread_name_prefix="dsnt-prefetch") if any(self.ahead) else None
        )
        self.pending: dict[int, Any] = {}

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        return self.st.read(self.names[i], self.devices[i])

    def take(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s tensors (waiting for its read), with block ``i + 1``'s read started."""
        fut = self.pending.pop(i, None)
        out = fut.result() if fut is not None else self._read(i)
        if i + 1 < len(self.names) and self.ahead[i + 1]:  # then there is a pool
            self.pending[i + 1] = self.pool.submit(self._read, i + 1)
        return out

    def close(self) -> None:
        """Drop any read in flight (waits for it to end, its tensors are released)."""
        if self.pool is None:
            return
        for fut in self.pending.values():
            fut.cancel()
        self.pool.shutdown(wait=True)
        self.pending.clear()


#: elements checked at once by :func:`_check_finite` (bounds its temporaries to ~5 bytes each)
_FINITE_CHUNK = 1 << 22


def _check_finite(module: nn.Module, prefix: str) -> None:
    """NonFiniteError naming (by its full name: ``prefix`` + its name in ``module``) the first
    materialised floating parameter holding NaN/Inf, as
    :func:`~dsnt_export.sparsify.plan.check_finite_parameters` does for a loaded model; checked in
    chunks of :data:`_FINITE_CHUNK` elements, so an embedding table needs no full-size temporary."""
    for name, p in module.named_parameters():
        if not p.is_floating_point() or p.device.type == "meta":
            continue
        flat = p.detach().reshape(-1)
        chunks = range(0, flat.numel(), _FINITE_CHUNK)
        if all(bool(torch.isfinite(flat[i : i + _FINITE_CHUNK]).all()) for i in chunks):
            continue
        bad = sum(int((~torch.isfinite(flat[i : i + _FINITE_CHUNK])).sum()) for i in chunks)
        raise NonFiniteError(
            f"parameter {prefix}{name} {tuple(p.shape)} holds {bad} NaN/Inf value(s); the "
            "checkpoint is corrupt or was saved after a diverged run. Use an intact checkpoint."
        )


def _write_block(writer, st: _Streamer, slots, keys, records, config, tensors) -> None:
    """Write one block's tensors (its shard) and the manifest entries of its pruned weights."""
    from dsnt_export.hf_io import pruned_tensor_entry

    by_name = {full: (mod, attr, is_param) for full, mod, attr, is_param in slots}
    pruned = {r.name + ".weight": r.method for r in records}
    entries = {}
    writer.open_shard({k: st.specs[k] for k in keys})
    for k in keys:
        mod, attr, is_param = by_name[k]
        t = st.saved(mod._parameters[attr] if is_param else mod._buffers[attr]).to("cpu")
        if k in pruned:
            entries[k] = pruned_tensor_entry(k, t, pruned[k], config.pattern)
        writer.put(k, t)
    for k in pruned:  # in the records' order, as the in-memory save lists them
        tensors[k] = entries[k]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="stream blocks", unit="block", disable=not enabled)
