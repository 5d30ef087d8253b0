"""Per-input-channel activation statistics of one linear layer (docs/dsnot-spec.md section 1).

Two accumulation modes, the same quantities up to float32 rounding:

``accumulate="reference"``: exactly as the reference code does (float32, same update order, one
``update`` per calibration sample or batch), so that masks computed from them match the reference
bit for bit (the DSnoT reference-parity path):

    b = number of samples in the update, n = samples seen so far
    sq_sum *= n / (n + b); sum *= n / (n + b); n += b
    sq_sum += ||x_j||^2 / n                 (Wanda's squared column norm, mean over samples)
    sum    += sum_t x_j / n                 (T * E[x_j], mean over samples)
    var     = (var * ntok + var_b * ntok_b) / (ntok + ntok_b)   (token-weighted mean of per-call
                                                                 population variances)
    H      *= n / (n + b); H += 2/n X^T X   (optional SparseGPT Hessian, same running mean)

``accumulate="sum"`` (the driver's fast path): plain sums over all tokens, scaled once when read.
One update takes a whole batch ``[B, T, in]``; the Hessian's ``X^T X`` is taken over ~2048 tokens
at a time (small updates are gathered in a buffer first; only the upper block triangle is
multiplied for wide inputs, :func:`add_xtx`, and the lower one mirrored when read), and nothing is
rescaled per sample:

    sq_sum = sum_tokens x_j^2 / n           sum = sum_tokens x_j / n        H = 2/n sum X^T X
    var    = sum_samples T_s var_s(x_j) / ntokens  (the same token-weighted mean of per-SAMPLE
                                                    population variances, whatever the batching)

Both keep the per-sample definitions (``n`` counts samples), so they agree to float32 rounding.
Non-finite values are detected when the statistics are read (no host sync per update).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch

from dsnt_export.errors import EmptyStatisticsError, NonFiniteError, ShapeError, UserInputError
from dsnt_export.precision import check_matmul_precision, matmul_precision

ACCUMULATE = ("reference", "sum")
#: "sum" mode: tokens per Hessian product, and the most bytes the token buffer may hold
XTX_TOKENS = 2048
XTX_BUFFER_BYTES = 16 * 2**20


def add_xtx(out: torch.Tensor, x: torch.Tensor, *, alpha: float = 1.0) -> None:
    """``out += alpha * x^T x`` on the UPPER block triangle of ``out`` only (in place).

    ``x``: ``[tokens, in]`` float32; ``out``: ``[in, in]`` float32, same device. For ``in >= 512``
    the columns are cut into 4 chunks and only the diagonal and upper off-diagonal blocks are
    multiplied (5/8 of the full product's work, BLAS ``syrk`` style); the blocks below the diagonal
    are left untouched, :func:`mirror_upper` fills them. Narrower inputs get one full product
    (chunk bounds: :func:`xtx_bounds`).
    """
    bounds = xtx_bounds(x.shape[1])
    if len(bounds) == 2:
        out.addmm_(x.t(), x, alpha=alpha)
        return
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
        out[lo:hi, lo:].addmm_(x[:, lo:hi].t(), x[:, lo:], alpha=alpha)


def xtx_bounds(n: int) -> list[int]:
    """Chunk bounds :func:`add_xtx` uses for ``n`` input channels (``[0, n]``: one product)."""
    k = 4 if n >= 512 else 1
    return [round(i * n / k) for i in range(k + 1)]


def mirror_upper(h: torch.Tensor) -> None:
    """Copy the upper off-diagonal blocks of ``h`` (filled by :func:`add_xtx`) below the diagonal."""
    bounds = xtx_bounds(h.shape[0])
    for i in range(1, len(bounds) - 1):
        lo, hi = bounds[i - 1], bounds[i]
        h[hi:, lo:hi] = h[lo:hi, hi:].t()


class ActivationStats:
    """Running statistics of the inputs ``x[..., in_features]`` of one linear layer.

    ``in_features``: positive int; ``device``: where the float32 statistics live (default CPU);
    ``hessian``: also accumulate ``H = 2/n X^T X`` [in, in]; ``name``: the layer, for messages;
    ``accumulate``: ``"reference"`` (the reference code's running means, bit for bit) or ``"sum"``
    (one product per batch, scaled when read; module docstring); ``variance``: also accumulate
    ``var`` (DSnoT's grow score reads it; ``"sum"`` mode only, the reference mode always does);
    ``matmul_precision``: torch's float32 matmul precision of the ``"sum"`` mode's Hessian product
    ("highest", "high", "medium"; :mod:`dsnt_export.precision`; the reference mode always uses
    the caller's setting, normally "highest").
    Raises ``ShapeError`` for a bad ``in_features``, ``UserInputError`` for a bad ``accumulate``
    or ``matmul_precision``.
    """

    def __init__(
        self,
        in_features: int,
        device: torch.device | str | None = None,
        *,
        hessian: bool = False,
        name: str | None = None,
        accumulate: str = "reference",
        variance: bool = True,
        matmul_precision: str = "highest",
    ):
        if not isinstance(in_features, int) or in_features <= 0:
            raise ShapeError(f"in_features must be a positive int, got {in_features!r}")
        check_matmul_precision(matmul_precision, concrete=True)
        if accumulate not in ACCUMULATE:
            raise UserInputError(
                f"accumulate must be one of {list(ACCUMULATE)}, got {accumulate!r}"
            )
        self.in_features = in_features
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.name = name
        self.accumulate = accumulate
        self.matmul_precision = matmul_precision
        self.variance = variance or accumulate == "reference"
        self.nsamples = 0
        self.ntokens = 0
        self._sq_sum = torch.zeros(in_features, dtype=torch.float32, device=self.device)
        self._sum = torch.zeros(in_features, dtype=torch.float32, device=self.device)
        self._mean = torch.zeros(in_features, dtype=torch.float32, device=self.device)
        self._var = torch.zeros(in_features, dtype=torch.float32, device=self.device)
        self._H = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
            if hessian
            else None
        )
        # "sum" mode: _sq_sum, _sum hold plain sums, _var sum_s T_s var_s; _H holds
        # _h_scale * sum X^T X, its blocks below the diagonal only valid right after a read
        self._h_scale = 1.0
        self._h_mirrored = True
        self._h_checked = False
        #: rows per Hessian product in "sum" mode (:meth:`_add_tokens`): 2048 tokens, fewer for
        #: wide inputs so that the buffer stays within 16 MiB
        self.xtx_tokens = max(1, min(XTX_TOKENS, XTX_BUFFER_BYTES // (4 * in_features)))
        self._xbuf: torch.Tensor | None = None
        self._xbuf_n = 0
        self._memo: dict = {}

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_tensors(
        cls,
        sq_sum: torch.Tensor,
        sum: torch.Tensor,  # noqa: A002 - the spec's name
        var: torch.Tensor,
        *,
        nsamples: int = 1,
        ntokens: int = 1,
        hessian: torch.Tensor | None = None,
        name: str | None = None,
    ) -> ActivationStats:
        """Wrap precomputed statistics (e.g. saved from another run or from the reference code)."""
        sq_sum, sum, var = (torch.as_tensor(t).reshape(-1).float() for t in (sq_sum, sum, var))
        if not (sq_sum.numel() == sum.numel() == var.numel()):
            raise ShapeError(
                f"statistics must all have in_features entries, got sq_sum {sq_sum.numel()}, "
                f"sum {sum.numel()}, var {var.numel()}"
            )
        st = cls(sq_sum.numel(), device=sq_sum.device, name=name)
        st._sq_sum, st._sum, st._var = sq_sum.clone(), sum.clone(), var.clone()
        st.nsamples, st.ntokens = int(nsamples), int(ntokens)
        if hessian is not None:
            st._H = torch.as_tensor(hessian).float().clone()
            st._h_checked = False
        return st

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add one calibration sample ``[T, in]`` or a batch ``[B, T, in]`` (any leading dims)."""
        if not isinstance(x, torch.Tensor):
            raise ShapeError(f"update() expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(
                f"{self._where()}input of shape {tuple(x.shape)} does not end in in_features="
                f"{self.in_features}; expected [..., {self.in_features}]"
            )
        if x.numel() == 0:
            raise ShapeError(f"{self._where()}empty input of shape {tuple(x.shape)}")
        if x.device != self.device:
            x = x.to(self.device)
        if x.dim() == 1:
            x = x.reshape(1, 1, -1)
        elif x.dim() == 2:
            x = x.unsqueeze(0)
        elif x.dim() > 3:
            x = x.reshape(-1, x.shape[-2], x.shape[-1])
        if self.accumulate == "sum":
            self._update_sum(x)
            return
        b = x.shape[0]
        # Same layout and op order as the reference: [in, tokens] view, then float32.
        inp = x.reshape(-1, x.shape[-1]).t().to(torch.float32)
        num = inp.shape[1]

        mean_b = torch.mean(inp, dim=1)
        var_b = torch.var(inp, dim=1, unbiased=False)
        if self.ntokens == 0:
            self._var, self._mean = var_b, mean_b
        else:
            self._var = (self._var * self.ntokens + var_b * num) / (self.ntokens + num)
            self._mean = (self._mean * self.ntokens + mean_b * num) / (self.ntokens + num)
        self.ntokens += num

        ratio = self.nsamples / (self.nsamples + b)
        self._sq_sum *= ratio
        self._sum *= ratio
        if self._H is not None:
            self._H *= ratio
        self.nsamples += b
        self._sq_sum += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples
        self._sum += torch.sum(inp, dim=1) / self.nsamples
        if self._H is not None:
            xs = math.sqrt(2 / self.nsamples) * inp
            self._H += xs.matmul(xs.t())
        self._h_checked = False
        self._memo.clear()

    def _update_sum(self, x: torch.Tensor) -> None:
        """``"sum"`` mode: plain sums of a batch ``[B, T, in]`` (module docstring)."""
        b, t = x.shape[0], x.shape[1]
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self._sum += flat.sum(dim=0)
        # square().sum(0): ~5x faster than vector_norm(dim=0) on [tokens, 1536] (strided norm)
        self._sq_sum += flat.square().sum(dim=0)
        if self.variance:  # per-sample population variances, weighted by their T tokens
            self._var += torch.var(flat.reshape(b, t, -1), dim=1, unbiased=False).sum(dim=0) * t
        if self._H is not None:  # the blocks below the diagonal are refreshed when read
            self._add_tokens(flat)
            self._h_mirrored = False
        self.nsamples += b
        self.ntokens += b * t
        self._h_checked = False
        self._memo.clear()

    def _add_tokens(self, flat: torch.Tensor) -> None:
        """Queue ``flat`` [tokens, in] (float32) for the Hessian: rows are gathered in a buffer of
        :attr:`xtx_tokens` rows and multiplied when it is full or the Hessian is read, so that each
        ``X^T X`` product sees many tokens (one 256-token sample per product leaves a [576, 576]
        product a third slower per token on CPU). The sum's value is the same; its rounding
        depends on how the tokens are grouped."""
        k = flat.shape[0]
        if k >= self.xtx_tokens:
            self._flush_tokens()
            self._xtx(flat)
            return
        if self._xbuf is None:
            self._xbuf = torch.empty(
                self.xtx_tokens, self.in_features, dtype=torch.float32, device=self.device
            )
        if self._xbuf_n + k > self.xtx_tokens:
            self._flush_tokens()
        self._xbuf[self._xbuf_n : self._xbuf_n + k].copy_(flat)
        self._xbuf_n += k

    def _flush_tokens(self) -> None:
        if self._xbuf_n:
            self._xtx(self._xbuf[: self._xbuf_n])
            self._xbuf_n = 0

    def _xtx(self, flat: torch.Tensor) -> None:
        with matmul_precision(self.matmul_precision):
            add_xtx(self._H, flat, alpha=self._h_scale)

    # ------------------------------------------------------------------ read access
    def _where(self) -> str:
        return f"layer {self.name!r}: " if self.name else ""

    def _checked(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if self.nsamples == 0:
            raise EmptyStatisticsError(
                f"{self._where()}no calibration data was seen, so '{what}' is undefined; "
                "run the layer on at least one calibration sample (check that the forward hook fired)"
            )
        # one reduction (a finite sum means finite entries), the elementwise check only otherwise
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).nonzero()
            raise NonFiniteError(
                f"{self._where()}statistic '{what}' has {bad.shape[0]} non-finite entries (first at "
                f"channel {bad[0].tolist()}); the layer's inputs contain NaN/Inf or overflow float32. "
                "Check the model weights and the calibration text, or run the model in float32."
            )
        return t

    def _per(self, t: torch.Tensor, count: int) -> torch.Tensor:
        """A "sum" mode plain sum divided by ``count`` (the stored tensor itself otherwise)."""
        if self.accumulate == "reference" or count == 0:
            return t
        return t / count

    @property
    def sq_sum(self) -> torch.Tensor:
        """a_j: mean over samples of sum_t x_j^2 (Wanda's squared column norm), float32 [in]."""
        return self._checked(self._per(self._sq_sum, self.nsamples), "sq_sum")

    @property
    def sum(self) -> torch.Tensor:
        """s_j: mean over samples of sum_t x_j (T * E[x_j]), float32 [in]."""
        return self._checked(self._per(self._sum, self.nsamples), "sum")

    @property
    def var(self) -> torch.Tensor:
        """v_j: token-weighted mean of per-update (``"sum"`` mode: per-sample) population
        variances, float32 [in]. Raises ``EmptyStatisticsError`` when not accumulated
        (``variance=False``)."""
        if not self.variance:
            raise EmptyStatisticsError(
                f"{self._where()}the variance was not accumulated; create "
                "ActivationStats(..., variance=True)"
            )
        return self._checked(self._per(self._var, self.ntokens), "var")

    @property
    def mean(self) -> torch.Tensor:
        """Token-weighted mean of per-update channel means (float32 [in])."""
        if self.accumulate == "sum":
            return self._checked(self._per(self._sum, self.ntokens), "mean")
        return self._checked(self._mean, "mean")

    @property
    def has_hessian(self) -> bool:
        """Whether the Hessian is accumulated (and not freed)."""
        return self._H is not None

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n * sum_samples X^T X (float32), for SparseGPT."""
        if self._H is None:
            raise EmptyStatisticsError(
                f"{self._where()}no Hessian was accumulated; create ActivationStats(..., hessian=True)"
            )
        if self.accumulate == "sum" and self.nsamples:
            self._flush_tokens()
            scale = 2 / self.nsamples
            if self._h_scale != scale:  # once per read after updates: 2/n times the sum
                self._H.mul_(scale / self._h_scale)
                self._h_scale = scale
            if not self._h_mirrored:
                mirror_upper(self._H)
                self._h_mirrored = True
        if not self._h_checked:  # checked once per accumulated state, not on every read
            self._checked(self._H, "hessian")
            self._h_checked = True
        return self._H

    def free_hessian(self) -> None:
        """Drop the Hessian and what :meth:`memo` derived from it (the driver frees it once a
        stage's linears are pruned)."""
        self._H = None
        self._h_scale = 1.0
        self._xbuf, self._xbuf_n = None, 0
        self._memo.clear()

    def memo(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per accumulated state and ``key`` (e.g. SparseGPT's factor of
        the Hessian, shared by the linears that read the same input); forgotten on ``update`` and
        :meth:`free_hessian`."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def __repr__(self) -> str:
        return (
            f"ActivationStats(in_features={self.in_features}, nsamples={self.nsamples}, "
            f"ntokens={self.ntokens}, hessian={self._H is not None}, "
            f"accumulate={self.accumulate!r}, name={self.name!r})"
        )
