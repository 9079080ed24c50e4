"""The one logical-axis table: logical array dimension names -> mesh axes.

Model code names every parameter and activation dimension with a logical name (`embed`, `heads`,
`act_length`, ...). A parallel layout is a rule table here (chosen by `mesh.rules`, adjusted by
`mesh.rule_overrides`), never a change to model code.
Mesh axes: `data` (replicas), `fsdp` (parameter sharding), `tensor` (heads / MLP), `context`
(token sequence).
"""

from __future__ import annotations

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Every table shards the batch over data x fsdp (FSDP is data parallel with sharded parameters).
_BATCH: Rules = (("batch", ("data", "fsdp")), ("act_batch", ("data", "fsdp")))
_REPLICATED: Rules = tuple((name, None) for name in (
    "act_embed", "act_kv", "act_text_length", "kv", "vocab", "patch_in", "cond", "layers", "norm"))


def _table(*, fsdp: bool, tensor: bool, context: bool) -> Rules:
    return _BATCH + _REPLICATED + (
        ("embed", "fsdp" if fsdp else None),
        ("heads", "tensor" if tensor else None),
        ("mlp", "tensor" if tensor else None),
        ("act_heads", "tensor" if tensor else None),
        ("act_mlp", "tensor" if tensor else None),
        ("act_length", "context" if context else None),
    )


# Which mesh axes each table uses: a mesh axis > 1 that its table never uses holds copies.
RULE_TABLES: dict[str, Rules] = {
    "dp": _table(fsdp=False, tensor=False, context=False),  # parameters replicated
    "fsdp": _table(fsdp=True, tensor=False, context=False),  # parameters sharded on embed
    "fsdp_tp": _table(fsdp=True, tensor=True, context=False),  # + heads / MLP over tensor
    "context": _table(fsdp=True, tensor=True, context=True),  # + tokens over context
}
RULE_TABLES["default"] = RULE_TABLES["context"]  # every axis in use; size-1 axes cost nothing


def get_rules(name: str, overrides: tuple[tuple[str, ...], ...] = ()) -> Rules:
    """The table `name` with `overrides` applied: each override is (logical, *mesh_axes); a
    logical name alone means replicated."""
    if name not in RULE_TABLES:
        raise KeyError(f"mesh.rules: unknown table {name!r}; allowed: {', '.join(RULE_TABLES)}")
    table = dict(RULE_TABLES[name])
    for logical, *axes in overrides:
        table[logical] = None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
    return tuple(table.items())


def axes_used(rules: Rules) -> set[str]:
    """The mesh axes a rule table shards anything over."""
    used: set[str] = set()
    for _, axes in rules:
        if axes is not None:
            used.update((axes,) if isinstance(axes, str) else axes)
    return used
