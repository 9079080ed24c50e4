"""The fine-tuning part of the train section: `train.lora` (docs/fine-tuning.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the DiT's Linear kernels (vdit/models/lora.py): W x + s B A x with
    s = alpha / rank. Only the adapters train (float32, B zero at the start); the frozen base
    travels in TrainState.stats in bfloat16, sharded like the params. rank 0: off (every
    parameter trains)."""

    rank: int = 0
    alpha: float | None = None  # None: = rank (scale 1)
    # A regex (re.search) over the "/"-joined module paths of the DiT's Linear layers; "" the
    # default of model.kind (attention q/k/v/o and both FFN linears, models/lora.py)
    targets: str = ""
    dropout: float = 0.0  # on each adapter's input, during training only

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def scale(self) -> float:
        """alpha / rank (the factor on B A)."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def validate(self) -> list[str]:
        problems = []
        if self.rank < 0:
            problems.append(f"rank: must be >= 0 (0: off), got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            problems.append(f"alpha: must be > 0 (or null: = rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as e:
            problems.append(f"targets: {self.targets!r} is not a regular expression ({e})")
        return problems
