"""Architecture knowledge in one table keyed by ``config.model_type``.

An :class:`Adapter` says where a causal LM keeps its decoder blocks, which modules run before the
first block (embeddings, rotary tables) and after the last (final norm), which linear layers a block
has (names relative to the block, in the order the block calls them, grouped into stages that see
the same input) and which keyword arguments a block needs when it is replayed on its own.

Generic code never looks at model, file or module *names* to decide anything: it asks the adapter of
``config.model_type`` (:func:`get_adapter`), and an unknown type fails before any work with
:class:`~dsnt_export.errors.UnsupportedModelError` listing the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsnt_export.errors import UnsupportedModelError

__all__ = [
    "Adapter",
    "LinearGroup",
    "ADAPTERS",
    "register_adapter",
    "get_adapter",
    "supported_model_types",
    "resolve",
]

ATTENTION = "attention"
MLP = "mlp"
KINDS = (ATTENTION, MLP)


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input (one stage of sequential calibration).

    ``name`` labels the stage (e.g. ``"attn_in"``, also a selector of the ``only``/``skip``
    recipe keys); ``kind`` is :data:`ATTENTION` or :data:`MLP`; ``linears`` are module paths
    relative to the block, in call order. A malformed group fails an ``assert`` at construction
    (the table is code, not user input).
    """

    name: str
    kind: str  # "attention" | "mlp"
    linears: tuple[str, ...]

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        assert self.linears, self.name


@dataclass(frozen=True)
class Adapter:
    """How to walk one family of decoder-only models block by block.

    Module paths are dotted attribute paths from the ``*ForCausalLM`` model (``blocks``,
    ``pre_block``, ``lm_head``) or from one block (the ``linears`` of ``groups``). The block-by-block
    driver (``dsnt_export/sparsify``) runs ``pre_block`` once to catch block 0's inputs, then
    replays each block alone with the captured keyword arguments ``block_kwargs`` plus
    ``fixed_kwargs``, as the reference code does (docs/dsnot-spec.md section 6). ``notes`` is
    free text for humans (which checkpoints the entry covers) and plays no part in equality.
    """

    model_type: str
    blocks: str  # module path of the nn.ModuleList of decoder blocks
    pre_block: tuple[str, ...]  # modules run before block 0 (moved to the device for the catch)
    lm_head: str
    groups: tuple[LinearGroup, ...]
    # keyword arguments of a block call that are replayed as captured; everything else is dropped
    block_kwargs: tuple[str, ...]
    # keyword arguments forced on every replayed block call (caches off)
    fixed_kwargs: tuple[tuple[str, Any], ...] = (("use_cache", False),)
    notes: str = field(default="", compare=False)

    @property
    def linear_names(self) -> tuple[str, ...]:
        """All linears of a block, relative to the block, in call order."""
        return tuple(n for g in self.groups for n in g.linears)

    def group_of(self, linear: str) -> LinearGroup:
        """The :class:`LinearGroup` holding ``linear`` (a path relative to the block).

        Raises ``KeyError`` if no group of this adapter lists it.
        """
        for g in self.groups:
            if linear in g.linears:
                return g
        raise KeyError(linear)

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of ``model`` (the ``nn.ModuleList`` at :attr:`blocks`).

        Raises :class:`~dsnt_export.errors.UnsupportedModelError` if the path is missing, is not
        a ``ModuleList`` or is empty (a checkpoint whose layout differs from its ``model_type``).
        """
        blocks = resolve(model, self.blocks)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r}: expected a non-empty nn.ModuleList of decoder "
                f"blocks at '{self.blocks}', found {type(blocks).__name__}; the checkpoint does not "
                "have the layout this adapter knows"
            )
        return blocks

    def get_modules(self, model: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
        """The modules at ``paths`` under ``model``, in order; missing or ``None`` ones are skipped.

        Used for optional pieces such as OPT's ``project_in`` (absent when the embedding width
        equals the hidden size). Never raises for a missing path.
        """
        out = []
        for p in paths:
            m = resolve(model, p, optional=True)
            if m is not None:
                out.append(m)
        return out

    def block_call_kwargs(self, captured: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments to replay a block from those the model passed to it.

        Keeps the keys in :attr:`block_kwargs` (masks, positions, rotary tables), drops every
        other one (caches, flags) and adds :attr:`fixed_kwargs` (``use_cache=False``).
        """
        kw = {k: v for k, v in captured.items() if k in self.block_kwargs}
        kw.update(dict(self.fixed_kwargs))
        return kw


#: ``config.model_type`` -> :class:`Adapter`; filled by :func:`register_adapter` below
ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter, *aliases: str) -> Adapter:
    """Add ``adapter`` to :data:`ADAPTERS` under its ``model_type`` and every alias; return it.

    The one place a new model family is added. A later registration for the same key replaces
    the earlier one.
    """
    for key in (adapter.model_type, *aliases):
        ADAPTERS[key] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` with an adapter, sorted (used in error messages)."""
    return sorted(ADAPTERS)


def _model_type(model_or_config: Any) -> str | None:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None)


def get_adapter(model_or_config: Any) -> Adapter:
    """The adapter of a model (or its config, or a ``model_type`` string).

    Raises :class:`~dsnt_export.errors.UnsupportedModelError` listing the supported types when
    ``config.model_type`` has no entry in :data:`ADAPTERS`.
    """
    mt = model_or_config if isinstance(model_or_config, str) else _model_type(model_or_config)
    if mt not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}. Use a checkpoint of one of these families "
            "(config.json 'model_type'), or add an entry to dsnt_export.adapters"
        )
    return ADAPTERS[mt]


def resolve(root: nn.Module, path: str, *, optional: bool = False) -> Any:
    """``root.a.b.c`` for ``path='a.b.c'``; ``None`` (optional) or UnsupportedModelError if absent."""
    obj: Any = root
    for part in path.split("."):
        if obj is None or not hasattr(obj, part):
            if optional:
                return None
            raise UnsupportedModelError(
                f"{type(root).__name__} has no module '{path}' (missing '{part}'); "
                "the checkpoint does not have the layout its model_type's adapter expects"
            )
        obj = getattr(obj, part)
    return obj


def move_to(obj: Any, device: torch.device | str) -> Any:
    """Move tensors nested in tuples/lists/dicts to ``device`` (other objects unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- the table

_LLAMA_GROUPS = (
    LinearGroup("attn_in", ATTENTION, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    LinearGroup("attn_out", ATTENTION, ("self_attn.o_proj",)),
    LinearGroup("mlp_in", MLP, ("mlp.gate_proj", "mlp.up_proj")),
    LinearGroup("mlp_out", MLP, ("mlp.down_proj",)),
)
_ROPE_KWARGS = ("attention_mask", "position_ids", "position_embeddings", "cache_position")


def _llama_like(model_type: str, notes: str = "") -> Adapter:
    return Adapter(
        model_type=model_type,
        blocks="model.layers",
        pre_block=("model.embed_tokens", "model.rotary_emb"),
        lm_head="lm_head",
        groups=_LLAMA_GROUPS,
        block_kwargs=_ROPE_KWARGS,
        notes=notes,
    )


register_adapter(_llama_like("llama", "LLaMA 1/2/3, Vicuna, SmolLM, TinyLlama"))
register_adapter(_llama_like("mistral", "Mistral (sliding-window mask captured per block)"))
register_adapter(_llama_like("qwen2", "Qwen2/2.5 (q/k/v biases; per-layer mask type)"))
register_adapter(_llama_like("qwen3", "Qwen3 (q/k norms are not linears)"))

register_adapter(
    Adapter(
        model_type="opt",
        blocks="model.decoder.layers",
        pre_block=(
            "model.decoder.embed_tokens",
            "model.decoder.embed_positions",
            "model.decoder.project_in",
        ),
        lm_head="lm_head",
        groups=(
            LinearGroup(
                "attn_in", ATTENTION, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            ),
            LinearGroup("attn_out", ATTENTION, ("self_attn.out_proj",)),
            LinearGroup("mlp_in", MLP, ("fc1",)),
            LinearGroup("mlp_out", MLP, ("fc2",)),
        ),
        block_kwargs=("attention_mask", "position_ids", "cache_position"),
        notes="OPT: learned positions added before block 0; fc1/fc2 see [B*T, H] inputs",
    )
)
