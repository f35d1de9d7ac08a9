"""What the benchmark scripts share: an acceptance target and its verdict."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Target:
    """One acceptance target: ``value`` (measured) against ``threshold``."""

    name: str
    value: float | None
    threshold: float
    higher_is_better: bool = True

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "N/A"
        ok = self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold
        return "PASS" if ok else "MISS"
