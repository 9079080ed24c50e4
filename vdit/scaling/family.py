"""A model family for scaling sweeps: one base shape, scaled by a size multiplier `s`.

The rules (`s` > 0, relative to the base config's model and train sections):

- width  = head_dim * max(1, round(s * base_width / head_dim)): a multiple of the head dim.
- depth  = max(1, round(s * base_depth)): depth grows with width, so the aspect ratio
  width / depth stays at base_width / base_depth (up to rounding) and the per-token
  parameters grow about as s^3.
- heads  = width / head_dim: the head dim is fixed (default: the base's width / heads; it must
  be a multiple of 8 because 3D RoPE splits it across t, h and w).
- lr     = base_lr * (base_width / width) ** lr_exponent. With the default exponent 1 this is
  µP's rule for Adam on hidden matrices (the update size of a width-d matrix must shrink as 1/d
  for activations to change by O(1)); the optimizer has one learning rate, so the rule is
  applied to every parameter. Exponent 0 keeps the base lr.
- batch  = batch_multiple * max(1, round(base_batch * s ** batch_exponent / batch_multiple)).
  The default exponent 0 keeps the tokens per step equal across sizes, so a point's tokens
  processed D is proportional to its steps; `batch_multiple` keeps the batch divisible by the
  data-parallel devices of a mesh.

mlp_ratio, patch, text encoder, data, diffusion and the schedule's shape are the base's. Rounding
is half-up (2.5 -> 3), not Python's banker's rounding, so the rules are easy to do by hand.

Sizes may be given as a float multiplier, a numeric string ("1.5", "x1.5") or a name from
`NAMED_SIZES` ("m" is the base itself).
"""

from __future__ import annotations

import math
from typing import Any

from vdit.config import Config, ConfigError, from_dict, to_dict

NAMED_SIZES: dict[str, float] = {
    "xxs": 0.25, "xs": 0.5, "s": 0.75, "m": 1.0, "l": 1.5, "xl": 2.0, "xxl": 3.0, "xxxl": 4.0,
}


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def size_multiplier(size: str | float) -> float:
    """A size as given in a grid file -> its multiplier s > 0; ConfigError if it is not one."""
    if isinstance(size, bool):
        raise ConfigError(f"size: expected a number or one of {', '.join(NAMED_SIZES)}, "
                          f"got {size!r}")
    if isinstance(size, int | float):
        value = float(size)
    elif isinstance(size, str) and size.lower() in NAMED_SIZES:
        value = NAMED_SIZES[size.lower()]
    elif isinstance(size, str):
        try:
            value = float(size[1:] if size[:1] in "xX" else size)
        except ValueError:
            raise ConfigError(
                f"size: {size!r} is neither a number (e.g. 1.5 or 'x1.5') nor one of "
                f"{', '.join(NAMED_SIZES)}") from None
    else:
        raise ConfigError(f"size: expected a number or a name, got {size!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"size: the multiplier must be a finite number > 0, got {size!r}")
    return value


def size_label(size: str | float) -> str:
    """A short, path-safe label for a size: 'x0.5', 'x2', or the name ('m')."""
    if isinstance(size, str) and size.lower() in NAMED_SIZES:
        return size.lower()
    return f"x{size_multiplier(size):g}"


def family_overrides(base: Config, size: str | float, *, head_dim: int | None = None,
                     lr_exponent: float = 1.0, batch_exponent: float = 0.0,
                     batch_multiple: int = 1) -> dict[str, Any]:
    """The dotted keys the family rules set for `size` (see the module docstring).

    Returns {"model.width": int, "model.depth": int, "model.heads": int, "train.lr": float,
    "train.batch_size": int}; applying them to `base` gives `family_config(base, size, ...)`.
    """
    s = size_multiplier(size)
    m, t = base.model, base.train
    hd = head_dim if head_dim is not None else m.width // m.heads
    if hd <= 0 or hd % 8:
        raise ConfigError(f"family.head_dim: must be a positive multiple of 8 (3D RoPE), got {hd}")
    if batch_multiple < 1:
        raise ConfigError(f"family.batch_multiple: must be >= 1, got {batch_multiple}")
    width = hd * max(1, _round_half_up(s * m.width / hd))
    depth = max(1, _round_half_up(s * m.depth))
    batch = batch_multiple * max(1, _round_half_up(t.batch_size * s**batch_exponent
                                                   / batch_multiple))
    return {
        "model.width": width,
        "model.depth": depth,
        "model.heads": width // hd,
        "train.lr": float(t.lr * (m.width / width) ** lr_exponent),
        "train.batch_size": batch,
    }


def apply_overrides(base: Config, overrides: dict[str, Any]) -> Config:
    """`base` with dotted keys replaced, validated like any config (ConfigError names keys)."""
    tree = to_dict(base)
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return from_dict(tree)


def family_config(base: Config, size: str | float, *, head_dim: int | None = None,
                  lr_exponent: float = 1.0, batch_exponent: float = 0.0,
                  batch_multiple: int = 1) -> Config:
    """The family member of `size` built from `base` (rules in the module docstring)."""
    overrides = family_overrides(base, size, head_dim=head_dim, lr_exponent=lr_exponent,
                                 batch_exponent=batch_exponent, batch_multiple=batch_multiple)
    return apply_overrides(base, overrides)


def describe(cfg: Config) -> str:
    """'width 96, depth 3, 3 heads, lr 0.00133, batch 8' for logs."""
    m = cfg.model
    return (f"width {m.width}, depth {m.depth}, {m.heads} heads, lr {cfg.train.lr:.3g}, "
            f"batch {cfg.train.batch_size}")


__all__ = [
    "NAMED_SIZES", "apply_overrides", "describe", "family_config", "family_overrides",
    "size_label", "size_multiplier",
]
