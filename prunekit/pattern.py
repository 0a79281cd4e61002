"""The sparsity pattern, parsed once: structured (whole channels), unstructured, or N:M.

Every other module takes a ``Pattern``; the text form is canonical ("02:04" becomes "2:4"), so a
warning or a check that compares patterns never sees two spellings of one pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prunekit.errors import UserInputError

KINDS = ("structured", "unstructured")


@dataclass(frozen=True)
class Pattern:
    kind: str  # "structured" | "unstructured" | "n:m"
    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        text = (text or "").strip()
        if text in KINDS:
            return cls(text)
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise UserInputError(f"pattern '{text}' is not valid: use unstructured, structured or N:M "
                                 f"with N < M (e.g. 2:4, 4:8)")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise UserInputError(f"pattern '{text}' is not valid: N:M needs 0 < N < M (e.g. 2:4, 4:8)")
        return cls("n:m", n, m)

    @property
    def structured(self) -> bool:
        return self.kind == "structured"

    @property
    def n_m(self) -> tuple[int, int] | None:
        return (self.n, self.m) if self.kind == "n:m" else None

    @property
    def implied_sparsity(self) -> float | None:
        """N:M fixes the fraction of zeros at 1 − N/M; the other kinds leave it free."""
        return 1 - self.n / self.m if self.kind == "n:m" else None

    def resolve_sparsity(self, requested: float | None, default: float) -> float:
        """N:M fixes the sparsity (a different --sparsity is an error); otherwise the request or the default."""
        implied = self.implied_sparsity
        if implied is None:
            return check_sparsity(default if requested is None else requested)
        if requested is not None and abs(requested - implied) > 1e-9:
            raise UserInputError(f"pattern {self} fixes the sparsity at {implied:g}: drop --sparsity "
                                 f"or pass --sparsity {implied:g}")
        return implied

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind


def check_sparsity(sparsity: float) -> float:
    if not 0 <= sparsity < 1:  # also false for NaN
        raise UserInputError(f"sparsity {sparsity} is out of range: use a fraction in [0, 1), e.g. 0.5")
    return sparsity
