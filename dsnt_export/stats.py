"""Per-input-channel activation statistics of one linear layer (docs/dsnot-spec.md section 1).

Accumulated exactly as the reference code does (float32, same update order, one ``update`` per
calibration sample or batch), so that masks computed from them match the reference bit for bit:

    b = number of samples in the update, n = samples seen so far
    sq_sum *= n / (n + b); sum *= n / (n + b); n += b
    sq_sum += ||x_j||^2 / n                 (Wanda's squared column norm, mean over samples)
    sum    += sum_t x_j / n                 (T * E[x_j], mean over samples)
    var     = (var * ntok + var_b * ntok_b) / (ntok + ntok_b)   (token-weighted mean of per-call
                                                                 population variances)

Optionally also the SparseGPT Hessian ``H = 2/n * sum X^T X`` (same running-mean update).
Non-finite values are detected when the statistics are read (no host sync per update).
"""

from __future__ import annotations

import math

import torch

from dsnt_export.errors import EmptyStatisticsError, NonFiniteError, ShapeError


class ActivationStats:
    """Running statistics of the inputs ``x[..., in_features]`` of one linear layer."""

    def __init__(
        self,
        in_features: int,
        device: torch.device | str | None = None,
        *,
        hessian: bool = False,
        name: str | None = None,
    ):
        if not isinstance(in_features, int) or in_features <= 0:
            raise ShapeError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.name = name
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

    # ------------------------------------------------------------------ read access
    def _where(self) -> str:
        return f"layer {self.name!r}: " if self.name else ""

    def _checked(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if self.nsamples == 0:
            raise EmptyStatisticsError(
                f"{self._where()}no calibration data was seen, so '{what}' is undefined; "
                "run the layer on at least one calibration sample (check that the forward hook fired)"
            )
        if not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).nonzero()
            raise NonFiniteError(
                f"{self._where()}statistic '{what}' has {bad.shape[0]} non-finite entries (first at "
                f"channel {bad[0].tolist()}); the layer's inputs contain NaN/Inf or overflow float32. "
                "Check the model weights and the calibration text, or run the model in float32."
            )
        return t

    @property
    def sq_sum(self) -> torch.Tensor:
        """a_j: mean over samples of sum_t x_j^2 (Wanda's squared column norm)."""
        return self._checked(self._sq_sum, "sq_sum")

    @property
    def sum(self) -> torch.Tensor:
        """s_j: mean over samples of sum_t x_j (T * E[x_j])."""
        return self._checked(self._sum, "sum")

    @property
    def var(self) -> torch.Tensor:
        """v_j: token-weighted mean of per-update population variances."""
        return self._checked(self._var, "var")

    @property
    def mean(self) -> torch.Tensor:
        """Token-weighted mean of per-update channel means (float32 [in])."""
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
        return self._checked(self._H, "hessian")

    def free_hessian(self) -> None:
        """Drop the Hessian (the driver frees it once a stage's linears are pruned)."""
        self._H = None

    def __repr__(self) -> str:
        return (
            f"ActivationStats(in_features={self.in_features}, nsamples={self.nsamples}, "
            f"ntokens={self.ntokens}, hessian={self._H is not None}, name={self.name!r})"
        )
