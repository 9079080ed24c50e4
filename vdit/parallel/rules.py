"""The one logical-axis table: logical array dimension names -> mesh axes.

Model code names every parameter and activation dimension with a logical name (`embed`, `heads`,
`act_length`, ...). A parallel layout is a rule table here, never a change to model code.
Mesh axes: `data` (replicas), `fsdp` (parameter sharding), `tensor` (heads / MLP), `context`
(token sequence).
"""

from __future__ import annotations

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Parameters shard over fsdp (their embed dim) and tensor (heads, MLP hidden); activations shard
# their batch over data x fsdp and their token sequence over context.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_kv", None),
    ("act_text_length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", None),
    ("patch_in", None),
    ("cond", None),
    ("layers", None),
    ("norm", None),
)

RULE_TABLES: dict[str, Rules] = {"default": DEFAULT_RULES}


def get_rules(name: str) -> Rules:
    if name not in RULE_TABLES:
        raise KeyError(f"mesh.rules: unknown table {name!r}; allowed: {', '.join(RULE_TABLES)}")
    return RULE_TABLES[name]
