"""One error hierarchy for everything a user can get wrong.

Every message says what was received, what was expected and how to fix it.
``assert`` is kept for internal invariants only.

Exit codes the CLI maps them to (:data:`EXIT_OK` ... :data:`EXIT_INTERNAL`): a
:class:`UserInputError` is 2, any other :class:`DsntError` (a mask/parity violation) is 1, an
exception raised by no dsnt-export code path on purpose is 3 (internal error, "please report").
"""

from __future__ import annotations

#: success
EXIT_OK = 0
#: a check failed: a mask violates its pattern, an artifact's parity is out of tolerance
EXIT_VIOLATION = 1
#: bad input: arguments, files, configs, data past a model limit, wrong artifact kind
EXIT_BAD_INPUT = 2
#: internal error (a bug or an untranslated library failure): please report, with the log
EXIT_INTERNAL = 3


class DsntError(Exception):
    """Base class of every error raised on purpose by dsnt-export."""


class UserInputError(DsntError, ValueError):
    """Bad input from the user (arguments, files, configs)."""


class PatternError(UserInputError):
    """A sparsity pattern string or object that cannot be used."""


class ShapeError(UserInputError):
    """A tensor whose shape does not fit the operation (e.g. in_features not divisible by M)."""


class NonFiniteError(UserInputError):
    """NaN or Inf found in weights, activations or statistics."""


class EmptyStatisticsError(UserInputError):
    """Statistics were requested before any calibration data was seen."""


class MaskViolationError(DsntError):
    """A keep-mask or weight does not satisfy the sparsity pattern. Carries the report."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ArtifactError(UserInputError):
    """An artifact directory or file that is missing, truncated or inconsistent."""


class WrongArtifactKindError(ArtifactError):
    """A valid artifact of another kind than the command reads (e.g. an ONNX export given to eval)."""


class QuantizedCheckpointError(UserInputError):
    """A checkpoint whose config declares real quantization; only float weights are read."""


class LimitError(UserInputError):
    """Data or options past a limit of the model (context length, vocabulary, ...)."""


class UnsupportedModelError(UserInputError):
    """A model whose ``config.model_type`` has no adapter."""


class DataSourceError(UserInputError):
    """A calibration/evaluation data source that cannot be read."""


class MissingDependencyError(DsntError, ImportError):
    """An optional runtime (tensorrt, vllm, onnxruntime-gpu, ...) is not installed."""

    def __init__(self, package: str, extra: str | None = None, purpose: str = ""):
        how = f"pip install 'dsnt-export[{extra}]'" if extra else f"pip install {package}"
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"the optional package '{package}' is not installed{what}; install it with: {how}"
        )
        self.package = package


class ParityError(DsntError):
    """An exported artifact's outputs differ from eager PyTorch beyond the tolerance."""

    def __init__(self, message: str, max_abs_diff: dict[str, float] | None = None):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff or {}


def require(package: str, extra: str | None = None, purpose: str = ""):
    """Import an optional package lazily; a missing one raises MissingDependencyError."""
    import importlib

    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == package.split(".")[0]:
            raise MissingDependencyError(package, extra, purpose) from e
        raise
