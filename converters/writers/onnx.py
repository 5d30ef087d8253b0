"""Export a sparse checkpoint to ONNX through maintained exporters (torch.onnx's dynamo exporter and
transformers 5's ``transformers.exporters``; optimum-onnx does not run with transformers 5).

Graphs, per dtype directory (``float32/`` for ONNX Runtime on CPU, ``float16/`` FP16-typed for
TensorRT 11, which has no FP16 builder flag):

- ``model.onnx``: ``input_ids [batch, seq] -> logits [batch, seq, vocab]``, no cache (perplexity,
  prefill latency, TensorRT engines); ``torch.onnx.export(dynamo=True)`` by default, or
  ``OnnxExporter`` with ``exporter="transformers"``;
- ``prefill.onnx`` + ``decode.onnx`` (``OnnxExporter.export_for_generation``): prompt -> logits +
  KV cache, and one token + cache -> logits + grown cache (decode latency).

Weights go to external data (``<graph>.onnx.data``) when a graph's initializers exceed
``external_data_threshold`` (default 1.5 GiB, under the 2 GB protobuf limit). After writing, each
targeted linear is located in the *written* graph by value, must be a constant MatMul/Gemm weight
with its 2:4 groups along the reduction axis, and the mapping is recorded in the manifest.

``opset``: every graph is written at the requested default-domain opset or not at all. torch's
exporter writes opset 18 and keeps it when its own down-conversion fails, so each folded graph is
converted with ``onnx.version_converter`` (:func:`convert_opset`) and re-read; an opset that
cannot be reached (e.g. 14: no ``Shape`` adapter below 15) raises :class:`OpsetError`. The
requested and written opset and dtypes are recorded under ``extra.export.options``. A tied
embedding / lm_head table is stored once per graph (:func:`store_tied_tables_once`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from converters import Converter, ExportResult, Tolerance, register
from converters.common import vllm_compat
from converters.common.onnx_graph import (
    fingerprint,
    io_signature,
    linear_weights,
    load_model,
    map_params,
    param_fingerprints,
    where_is,
)
from converters.common.options import record_option, verify_options
from converters.common.source import SparseSource, carried_files, read_source
from converters.parity import ParityCheck, parity_ids
from converters.reference import compute_reference, save_reference
from dsnt_export.artifacts import new_manifest
from dsnt_export.errors import ArtifactError, UserInputError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16}
GRAPH_FILES = {"logits": "model.onnx", "prefill": "prefill.onnx", "decode": "decode.onnx"}
EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)
EXPORTERS = ("torch", "transformers")
# ONNX TensorProto element type names (io_signature) -> the dtype names of DTYPES
_TENSOR_DTYPES = {"float": "float32", "float16": "float16"}


def optimize_graph(model) -> None:
    """Fold constants and clean up an exported graph in place, without pattern rewrites.

    ``torch.onnx.export(optimize=True)`` also runs onnxscript's rewrite rules and fusions, whose
    matcher walks the graph once per candidate node: on the 30-block embedded model that step took
    103 s of a 190 s export (1.4 s for 2 blocks), and more per block the deeper the model. What
    the artifact needs from optimization is constant folding (a linear's weight must reach its
    MatMul as a plain initializer, not behind a Transpose) and dead-node removal; ONNX Runtime
    and TensorRT apply their own fusions when they load the graph. This pass list is onnxscript's
    ``optimize_ir`` minus the rewriter: 7 s on the embedded model, same weights and outputs.
    """
    import onnx_ir
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants_ir

    passes.InlinePass()(model)
    for _ in range(2):
        changed = fold_constants_ir(model, onnx_shape_inference=True).modified
        changed |= passes.RemoveUnusedNodesPass()(model).modified
        if not changed:
            break
    onnx_ir.passes.Sequential(
        passes.RemoveUnusedFunctionsPass(),
        passes.RemoveUnusedOpsetsPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.LiftSubgraphInitializersToMainGraphPass(),
        passes.DeduplicateInitializersPass(),
        passes.CommonSubexpressionEliminationPass(),
        passes.OutputFixPass(),
        passes.NameFixPass(),
    )(model)


def _logits_dtype(graph: dict) -> str:
    """The element type of a described graph's ``logits`` output (its first output if unnamed)."""
    outs = graph["outputs"]
    out = next((o for o in outs if o["name"] == "logits"), outs[0])
    return _TENSOR_DTYPES.get(out["dtype"], out["dtype"])


class OpsetError(UserInputError):
    """The requested ONNX opset cannot be written for this model (exit 2, nothing written)."""


def default_opset(program) -> int | None:
    """The default-domain (``ai.onnx``) opset an ``onnx_ir.Model`` declares, or None."""
    imports = program.opset_imports
    return imports.get("", imports.get("ai.onnx"))


def convert_opset(program, opset: int | None, what: str = "graph"):
    """``program`` (an ``onnx_ir.Model``) at the default-domain ``opset``; the model itself when it
    already declares it or when ``opset`` is None.

    torch's exporter writes its own opset (18 with torch 2.x) and down-converts it only on a
    best-effort basis: when its conversion fails it keeps the opset-18 model and only logs
    (pytorch/pytorch#150592). Here the conversion is done again after constant folding (axes and
    shapes then are initializers, which onnx's adapters need) with ``onnx.version_converter``, and
    the result is verified. The converted graph is then checked for its pattern and its parity
    like any other (:meth:`Converter.export`).

    Raises:
        OpsetError: onnx's version converter cannot take the graph to ``opset`` (an op without an
            adapter, e.g. ``Shape`` below opset 15, ``LayerNormalization`` below 17), or the
            converted graph does not declare ``opset``; the message names both opsets and the cause.
    """
    have = default_opset(program)
    if opset is None or have == opset:
        return program
    import onnx
    import onnx_ir
    from onnx import version_converter

    weights = _large_initializers(program)
    try:
        with _weights_as_placeholders(program, weights):
            proto = onnx_ir.serde.serialize_model(program)
        proto = version_converter.convert_version(proto, opset)
        _drop_default_attributes(proto, opset, have)
        _check_without(proto, set(weights))
        converted = onnx_ir.serde.deserialize_model(proto)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as e:
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise OpsetError(
            f"ONNX opset {opset} was requested, but the exporter wrote the {what} at opset {have} "
            f"and onnx's version converter cannot take it to opset {opset}: {cause}. Export "
            f"without --opset (opset {have}) or with an opset this model's ops exist in "
            f"(--opset {have} or a version that converts)"
        ) from e
    for name, tensor in weights.items():  # the real weights back, under the same names
        if name in converted.graph.initializers:
            converted.graph.initializers[name].const_value = tensor
    got = default_opset(converted)
    if got != opset:
        raise OpsetError(
            f"ONNX opset {opset} was requested, but the {what} still declares opset {got} after "
            f"onnx's version conversion. Export without --opset (opset {have})"
        )
    return converted


#: initializers above this many bytes skip the round trip through onnx's version converter
_PLACEHOLDER_BYTES = 1 << 16


def _large_initializers(program) -> dict:
    """``{name: tensor}`` of the initializers above :data:`_PLACEHOLDER_BYTES` (the weights)."""
    return {
        name: v.const_value
        for name, v in program.graph.initializers.items()
        if v.const_value is not None and v.const_value.nbytes > _PLACEHOLDER_BYTES
    }


@contextlib.contextmanager
def _weights_as_placeholders(program, weights: dict):
    """Serialize ``program`` without its weights' bytes: each tensor of ``weights`` is replaced,
    for the duration, by an external-data reference that is never read (onnx's version converter
    and checker need names, dtypes and shapes only; small constants such as Reshape shapes and
    Reduce axes stay inline, where the adapters read them). Keeps the round trip under protobuf's
    2 GB limit and the memory of one copy of the weights."""
    import onnx_ir

    values = program.graph.initializers
    try:
        for name, t in weights.items():
            values[name].const_value = onnx_ir.ExternalTensor(
                "dsnt-placeholder.data",
                offset=0,
                length=t.nbytes,
                dtype=t.dtype,
                shape=t.shape,
                name=name,
            )
        yield
    finally:
        for name, t in weights.items():
            values[name].const_value = t


def _check_without(proto, placeholders: set[str]) -> None:
    """``onnx.checker.check_model`` on a copy of ``proto`` whose placeholder initializers are
    graph inputs of the same type and shape (their bytes are not there to check).

    Raises:
        onnx.checker.ValidationError: a node the target opset does not define as written.
    """
    import onnx
    from onnx import helper

    chk = onnx.ModelProto()
    chk.CopyFrom(proto)
    inits = list(chk.graph.initializer)
    del chk.graph.initializer[:]
    chk.graph.initializer.extend(t for t in inits if t.name not in placeholders)
    chk.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in inits
        if t.name in placeholders
    )
    onnx.checker.check_model(chk)


def _drop_default_attributes(proto, opset: int, source_opset: int | None) -> int:
    """Remove, in place, node attributes that ``opset``'s schema lacks but that hold their default
    at ``source_opset`` (e.g. ``ReduceMean``'s ``noop_with_empty_axes=0``, which opset 18 added
    and onnx's 18 -> 17 adapter leaves behind): the default is the older opset's behaviour, so the
    node means the same without it. Any other unknown attribute is kept, and the checker then
    refuses the graph. Returns how many attributes were removed."""
    from onnx import defs, helper

    removed = 0
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = defs.get_schema(node.op_type, opset, "")
            newer = defs.get_schema(node.op_type, source_opset or defs.onnx_opset_version(), "")
        except defs.SchemaError:
            continue
        for attr in list(node.attribute):
            if attr.name in schema.attributes or attr.name not in newer.attributes:
                continue
            default = newer.attributes[attr.name].default_value
            if default.type and helper.get_attribute_value(default) == (
                helper.get_attribute_value(attr)
            ):
                node.attribute.remove(attr)
                removed += 1
    return removed


def store_tied_tables_once(program) -> int:
    """Make a MatMul/Gemm read a tied embedding table through a ``Transpose`` node instead of a
    stored transposed copy, in place; returns how many copies were dropped.

    With ``tie_word_embeddings`` the logits projection is ``hidden @ E^T`` with ``E [vocab,
    hidden]`` the embedding table ``Gather`` reads. A constant-folding pass may store ``E^T``
    as a second initializer (``vocab x hidden`` values more per graph: 113 MB for a 49k x 576 fp32
    table). Each 2-D MatMul initializer ``[hidden, vocab]`` whose values equal the transpose of a
    ``Gather`` table (compared by shape, then value) is replaced by ``Transpose(E, perm=[1, 0])``,
    which runtimes fold when they load the graph; the copy is dropped when nothing else reads it.
    The lm_head is not a pruning target, so no sparse weight is put behind the Transpose.
    """
    import onnx_ir

    graph = program.graph
    tables = {}
    for node in graph:
        if node.op_type != "Gather" or not node.inputs or node.inputs[0] is None:
            continue
        axis = node.attributes.get("axis")
        table = node.inputs[0]
        if (axis is None or axis.value == 0) and table.is_initializer() and table.const_value:
            if len(table.const_value.shape) == 2:
                tables.setdefault(tuple(table.const_value.shape), []).append(table)
    if not tables:
        return 0
    dropped = 0
    for node in list(graph):
        if node.op_type != "MatMul" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        b = node.inputs[1]
        if not b.is_initializer() or b.const_value is None or len(b.const_value.shape) != 2:
            continue
        rows, cols = b.const_value.shape
        for table in tables.get((cols, rows), []):
            if table is b or b.const_value.dtype != table.const_value.dtype:
                continue
            if not np.array_equal(b.const_value.numpy(), table.const_value.numpy().T):
                continue
            t = onnx_ir.node(
                "Transpose", [table], {"perm": [1, 0]}, name=f"{table.name}_transposed"
            )
            t.outputs[0].name = f"{table.name}.T"
            t.outputs[0].dtype = table.dtype
            t.outputs[0].shape = onnx_ir.Shape([cols, rows])
            graph.insert_before(node, t)
            node.replace_input_with(1, t.outputs[0])
            if not b.uses() and not b.is_graph_output():
                graph.initializers.pop(b.name, None)
                dropped += 1
            break
    return dropped


class _Logits(torch.nn.Module):
    """``input_ids -> logits`` of a causal LM, cache off (the only output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        """``input_ids`` int64 ``[batch, seq]`` -> logits ``[batch, seq, vocab]``."""
        return self.model(input_ids=input_ids, use_cache=False).logits


@contextlib.contextmanager
def _quiet_exporters():
    """Silence the exporters' chatter (missing torchvision ops, per-step banners) for one trace;
    the converter reports progress itself and errors still raise."""
    names = ("torch.onnx", "torch.export", "onnxscript", "transformers.exporters")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def export_logits_graph(model, opset: int | None = None, exporter: str = "torch"):
    """The full-sequence logits graph (``onnx_ir.Model``), batch and sequence dynamic.

    ``exporter``: ``"torch"`` (``torch.onnx.export(dynamo=True)``, the default: about twice as
    fast) or ``"transformers"`` (``transformers.exporters.OnnxExporter``).
    """
    from torch.export import Dim

    if exporter not in EXPORTERS:
        raise UserInputError(f"unknown ONNX exporter {exporter!r}; choose one of {EXPORTERS}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (2, 16), generator=gen)
    dims = {0: Dim("batch"), 1: Dim("sequence")}
    with _quiet_exporters():
        if exporter == "torch":
            prog = torch.onnx.export(
                _Logits(model).eval(),
                (ids,),
                dynamo=True,
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes=(dims,),
                opset_version=opset,
                optimize=False,
                verbose=False,
            )
            program = prog.model
        else:
            from transformers.exporters import OnnxConfig, OnnxExporter

            cfg = OnnxConfig(
                dynamic=True,
                opset_version=opset,
                dynamic_shapes={"input_ids": dims},
                optimize=False,
            )
            inputs = {"input_ids": ids, "use_cache": False}
            program = OnnxExporter().export(model, inputs, cfg).program
    optimize_graph(program)
    program = convert_opset(program, opset, "logits graph")
    store_tied_tables_once(program)
    return program


def generation_cache(config):
    """The KV cache to export prefill/decode against, or ``None`` for the one ``generate()`` builds.

    ``generate()`` builds ``DynamicCache(config=<text config>)``, which gives every layer that
    ``config.layer_types`` (or, without it, a set ``sliding_window`` / ``attention_chunk_size``)
    marks as sliding or chunked a ``DynamicSlidingWindowLayer``. That layer carries a scalar
    ``_sliding_window_tensor``, and the exporter flattens every tensor of the cache into the graph:
    prefill and decode would take (and pass straight through) one ``input.cache.layers.N.
    _sliding_window_tensor`` per layer, state no runner can feed from the KV cache alone. The
    exporter already traces those layers as a full ``DynamicLayer`` (its cut to the window does not
    survive a trace), and the graph's attention mask, built from the config, applies the window. So
    the same cache with those layers as plain ``DynamicLayer``s exports the same graph without the
    extra inputs: the decode cache keeps every position, and the mask keeps the model's window.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config.get_text_config(decoder=True))
    if not any(type(layer) is DynamicSlidingWindowLayer for layer in cache.layers):
        return None
    cache.layers = [
        DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer
        for layer in cache.layers
    ]
    return cache


def export_generation_graphs(model, opset: int | None = None) -> dict:
    """``{"prefill": ..., "decode": ...}`` graphs with an explicit KV cache, batch dynamic.

    The graphs' only cache inputs/outputs are per-layer keys and values, sliding-window models
    included (see ``generation_cache``).
    """
    from transformers import GenerationConfig
    from transformers.exporters import OnnxConfig, OnnxExporter

    ids = torch.randint(
        4, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)
    )
    gen = GenerationConfig(do_sample=False, pad_token_id=0, eos_token_id=None)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cache = generation_cache(model.config)
    if cache is not None:
        inputs["cache"] = cache
    with _quiet_exporters():
        ex = OnnxExporter().export_for_generation(
            model,
            inputs,
            OnnxConfig(dynamic=True, opset_version=opset, optimize=False),
            generation_config=gen,
        )
    programs = {name: c.program for name, c in ex.components.items()}
    for name, program in programs.items():
        optimize_graph(program)
        programs[name] = convert_opset(program, opset, f"{name} graph")
        store_tied_tables_once(programs[name])
    return programs


def weight_names(fps: dict[str, tuple[str, str]]) -> dict[tuple[str, int], str]:
    """``{(fingerprint, reduction axis): initializer name}`` for :func:`name_weights`, from
    :func:`param_fingerprints`: a parameter ``W [out, in]`` is ``<param>.T`` stored as ``W^T``
    (axis 0, MatMul) and ``<param>`` stored as ``W`` (axis 1, Gemm ``transB=1``)."""
    names = {}
    for name, (fp_t, fp_w) in fps.items():
        names[(fp_t, 0)] = f"{name}.T"
        names[(fp_w, 1)] = name
    return names


def name_weights(program, names: dict[tuple[str, int], str]) -> int:
    """Give the linear weights of an exported graph their Hugging Face names, in place.

    Constant folding leaves them exporter-invented names (``val_5097``), which is what TensorRT's
    logs, Polygraphy and Netron then print. Each MatMul/Gemm constant that equals a parameter
    (matched by value, as ``graph_weights`` does; ``names`` from :func:`weight_names`) is renamed
    ``<param>.T`` under MatMul and ``<param>`` under Gemm ``transB=1``. A name already taken is
    left alone. Returns how many initializers were renamed.
    """
    graph = program.graph
    renamed = 0
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        b = node.inputs[1]
        if b is None or not b.is_initializer() or b.const_value is None:
            continue
        if len(b.const_value.shape) != 2:
            continue
        axis = 0
        if node.op_type == "Gemm":
            trans_b = node.attributes.get("transB")
            axis = 1 if trans_b is not None and trans_b.value == 1 else 0
        new = names.get((fingerprint(b.const_value.numpy()), axis))
        if new is None or b.name == new or new in graph.initializers:
            continue
        b.name = new
        renamed += 1
    return renamed


def save_graph(program, path: Path, threshold: int) -> list[str]:
    """Save one graph, its weights in ``<name>.data`` beside it above ``threshold`` bytes."""
    import onnx_ir

    size = sum(
        v.const_value.nbytes
        for v in program.graph.initializers.values()
        if v.const_value is not None
    )
    if size > threshold:
        onnx_ir.save(program, path, external_data=f"{path.name}.data")
        return [path.name, f"{path.name}.data"]
    onnx_ir.save(program, path)
    return [path.name]


def graph_weights(
    path: Path, params: dict[str, np.ndarray], fps: dict | None = None, model=None
) -> tuple[dict, list[str]]:
    """Map the written graph's MatMul/Gemm constants to the HF weights; explain missing ones.

    ``fps``: :func:`param_fingerprints` of ``params``; ``model``: the graph at ``path`` if loaded.
    """
    model = model if model is not None else load_model(path)
    found, _ = linear_weights(model)
    mapping, missing = map_params(found, params, fps)
    problems = [f"{path.name}: {name} {where_is(model, params[name])}" for name in missing]
    return {k: v.to_json() for k, v in mapping.items()}, problems


@register
class OnnxConverter(Converter):
    """``export onnx``: logits (and prefill/decode) graphs per dtype, see the module."""

    name = "onnx"
    extras = ()
    tolerance = {
        "float32": Tolerance(logits_atol=1e-4, ppl_rel=1e-3),
        "float16": Tolerance(logits_atol=2e-2, ppl_rel=2e-2),
    }
    description = "ONNX graphs (logits; prefill/decode with KV cache), fp32 for ORT, fp16 for TRT"

    def write(
        self,
        src_dir: Path,
        tmp: Path,
        result: ExportResult,
        *,
        dtypes=("float32", "float16"),
        generation_dtypes=("float32",),
        opset: int | None = None,
        exporter: str = "torch",
        external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
        progress: bool = True,
        **_: Any,
    ) -> dict:
        """Trace, fold, convert to ``opset`` (if given) and save each graph of each dtype into
        ``tmp/<dtype>/``; map every pruned weight in the written graphs; returns the manifest
        with the options read back from the graphs.

        Raises:
            UserInputError: unknown dtypes or exporter; generation dtypes not among ``dtypes``.
            OpsetError: ``opset`` cannot be written for this model.
            ArtifactError: a pruned weight does not reach a MatMul/Gemm as a constant.
            OptionMismatchError: a written graph's opset or dtype is not the requested one.
        """
        bad = [d for d in (*dtypes, *generation_dtypes) if d not in DTYPES]
        if bad or not dtypes:
            raise UserInputError(f"ONNX dtypes must be among {sorted(DTYPES)}, got {bad or dtypes}")
        if set(generation_dtypes) - set(dtypes):
            raise UserInputError(
                f"generation dtypes {generation_dtypes} must be among the exported dtypes {dtypes}"
            )
        src = read_source(src_dir)
        config, removed = vllm_compat.strip_sparsity_config(src.config)
        result.warnings += [f"dropped {r} from the ONNX export's config.json" for r in removed]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in carried_files(src.path):
            shutil.copy2(f, tmp / f.name)
        graphs: dict[str, dict] = {}
        reference = {} if "float32" in dtypes else compute_reference(src.load_model(torch.float32))
        steps = len(dtypes) + len(generation_dtypes)
        with tqdm(total=steps, desc="ONNX export", unit="trace", disable=not progress) as bar:
            for dt in dtypes:
                model = src.load_model(dtype=DTYPES[dt])
                bar.set_postfix_str(f"{dt} logits graph")
                programs = {"logits": export_logits_graph(model, opset, exporter)}
                bar.update()
                if dt in generation_dtypes:
                    bar.set_postfix_str(f"{dt} prefill + decode graphs")
                    programs.update(export_generation_graphs(model, opset))
                    bar.update()
                (tmp / dt).mkdir()
                params = {k: v.to(DTYPES[dt]).numpy() for k, v in src.target_weights().items()}
                fps = param_fingerprints(params)
                names = weight_names(fps)
                for kind, program in programs.items():
                    rel = f"{dt}/{GRAPH_FILES[kind]}"
                    name_weights(program, names)
                    files = save_graph(program, tmp / rel, external_data_threshold)
                    del program
                    graphs[rel] = self._describe(tmp / rel, kind, dt, files, params, fps)
                if dt == "float32":
                    reference = compute_reference(model)
                del model, programs
        save_reference(tmp, reference)
        options = self._verify_options(graphs, dtypes, generation_dtypes, opset, exporter)
        return self._manifest(src, graphs, removed, exporter, options)

    @staticmethod
    def _verify_options(graphs: dict, dtypes, generation_dtypes, opset, exporter) -> dict:
        """Requested vs written (read from the graphs on disk: ``_describe``) opset and dtypes.

        Raises:
            OptionMismatchError: a graph declares another opset, or its logits another dtype,
                than requested.
        """
        opsets = sorted({g["opset"] for g in graphs.values()}, key=str)
        logits_dtypes = sorted(_logits_dtype(g) for g in graphs.values() if g["kind"] == "logits")
        generation = sorted(_logits_dtype(g) for g in graphs.values() if g["kind"] == "prefill")
        options: dict[str, dict] = {}
        record_option(options, "opset", opset, opsets[0] if len(opsets) == 1 else opsets)
        record_option(options, "dtypes", sorted(dtypes), logits_dtypes)
        record_option(options, "generation_dtypes", sorted(generation_dtypes), generation)
        record_option(options, "exporter", exporter, exporter)
        verify_options(options, "ONNX export")
        return options

    @staticmethod
    def _describe(
        path: Path, kind: str, dt: str, files: list[str], params: dict, fps: dict
    ) -> dict:
        model = load_model(path)
        weights, problems = graph_weights(path, params, fps, model)
        if problems:
            raise ArtifactError(
                f"{len(problems)} targeted weight(s) do not reach the ONNX graph as constant "
                f"MatMul/Gemm weights, so their 2:4 pattern is hidden from TensorRT:\n  "
                + "\n  ".join(problems[:10])
            )
        return {
            "kind": kind,
            "dtype": dt,
            "files": [f"{dt}/{f}" for f in files],
            "opset": max(
                (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None
            ),
            **io_signature(model),
            "weights": weights,
        }

    def _manifest(
        self, src: SparseSource, graphs: dict, removed: list[str], exporter: str, options: dict
    ) -> dict:
        sm = src.manifest or {}
        import transformers

        return new_manifest(
            "onnx",
            **src.manifest_fields(),
            extra={
                "graphs": graphs,
                "export": {
                    "converter": self.name,
                    "exporter": {
                        "logits": "torch.onnx.export(dynamo=True)"
                        if exporter == "torch"
                        else "transformers.exporters.OnnxExporter",
                        "prefill/decode": "transformers.exporters.OnnxExporter"
                        ".export_for_generation",
                        "versions": {
                            "transformers": transformers.__version__,
                            "torch": torch.__version__,
                        },
                    },
                    "options": options,
                    "stripped_from_config": removed,
                    "source": {"path": str(src.path), "recipe_hash": sm.get("recipe_hash")},
                    "tolerance": {k: v.to_json() for k, v in self.tolerance.items()},
                    "runtimes": "fp32 graphs: ONNX Runtime (CPU/CUDA, dense kernels); fp16 graphs: "
                    "TensorRT (SPARSE_WEIGHTS) or ORT",
                },
            },
        )

    def check_masks(self, tmp: Path, manifest: dict) -> dict[str, dict]:
        """Check every mapped weight of every written graph against the pattern."""
        from converters.checkers.common import mask_checks_from_report
        from converters.checkers.onnx import check_onnx

        return mask_checks_from_report(check_onnx(tmp, manifest=manifest, hashes=False))

    def parity(
        self, src_dir: Path, tmp: Path, manifest: dict, check: ParityCheck, **_: Any
    ) -> None:
        """ONNX Runtime (CPU) against eager float32 torch: logits and perplexity of each logits
        graph, logits of prefill + decode steps for the generation graphs."""
        from converters.parity import compare_engine, compare_generation
        from converters.reference import load_reference
        from dsnt_export.runtimes.onnxruntime import OrtEngine

        src = read_source(src_dir)
        ref = load_reference(tmp)
        model = src.load_model(dtype=torch.float32)  # eager truth for every graph dtype
        vocab = src.config["vocab_size"]
        for rel, g in manifest["extra"]["graphs"].items():
            tol = self.tolerance[g["dtype"]]
            if g["kind"] == "logits":
                ids = parity_ids(vocab, batch=2, seqlen=32, seed=2)
                with torch.no_grad():
                    want = model(input_ids=ids).logits
                with OrtEngine({"logits": tmp / rel}, dtype=g["dtype"]) as eng:
                    compare_engine(
                        check,
                        rel,
                        eng,
                        tol,
                        ids=ids,
                        want_logits=want,
                        ppl_ids=ref["ppl_ids"],
                        want_ppl=float(ref["ppl"]),
                    )
            elif g["kind"] == "prefill":
                decode = rel.replace(GRAPH_FILES["prefill"], GRAPH_FILES["decode"])
                ids = parity_ids(vocab, batch=2, seqlen=12, seed=3)
                with torch.no_grad():
                    want = model(input_ids=ids).logits[:, 7:]
                graphs = {"prefill": tmp / rel, "decode": tmp / decode}
                with OrtEngine(graphs, dtype=g["dtype"]) as eng:
                    compare_generation(
                        check, f"{rel}+decode", eng, tol, ids=ids, want_logits=want, prompt_len=8
                    )
