"""Configuration shared by the token-reduction methods, validated when it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.errors import TokenBenchError


def check_keep_rate(keep_rate: float) -> None:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
        raise TokenBenchError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")


def check_locations(locations: tuple[int, ...]) -> None:
    if not isinstance(locations, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in locations):
        raise TokenBenchError(f"locations must be a tuple of block indices (ints), got {locations!r}")
    if any(i < 0 for i in locations) or list(locations) != sorted(set(locations)):
        raise TokenBenchError(f"locations must be distinct, non-negative and increasing, got {locations!r}")


@dataclass(frozen=True)
class ReductionConfig:
    """Options every method takes.

    keep_rate: the fraction of tokens kept at each reduction location, in (0, 1].
    locations: 0-based indices of the blocks where tokens are reduced.
    """

    keep_rate: float = 0.7
    locations: tuple[int, ...] = (3, 6, 9)

    # Options that, given, set how much the method reduces in place of keep_rate (ToMe's r): a sweep then
    # runs it once per group instead of at each of its keep rates.
    replaces_keep_rate: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.locations, list):
            object.__setattr__(self, "locations", tuple(self.locations))
        check_keep_rate(self.keep_rate)
        check_locations(self.locations)

    def check_depth(self, depth: int) -> None:
        """Raise if a location lies beyond a model of `depth` blocks."""
        beyond = [i for i in self.locations if i >= depth]
        if beyond:
            raise TokenBenchError(
                f"locations {beyond} lie beyond the model's depth: blocks are numbered 0..{depth - 1}"
            )
