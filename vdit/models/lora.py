"""LoRA (Hu et al. 2021): W' = W + s * A B on chosen `Linear` kernels, two ways.

A target is one `Linear` kernel of the Flax tree, [*in, *out] (with a leading layers axis when
the blocks are scanned). Its adapter is {"a": [(L,) *in, r], "b": [(L,) r, *out]}, float32:
in the kernel's own axes when trained (so each axis keeps its logical name and shards by the
rule table), or over the flattened axes, [(L,) in, r] and [(L,) r, out], as LoRA files hold
them (vdit/io/wan_lora.py); every function here takes either. The scale s is alpha / rank times
a user's multiplier. The kernel's input/output split comes from its bias (`Linear`'s bias has
the output shape), so neither way needs model code beyond `Linear`.

- `merge` folds s * (a @ b) into the kernels (sampling, exports, files of other tools).
- Training runs the branch instead (`branch`, called by `Linear` when the variables hold a
  "lora" collection): y = x W + s (drop(x) a) b, so no merged copy of the weights nor a
  full-size weight gradient is ever made, and the adapter's input can be dropped out (rng
  stream "lora_dropout", rate set by `dropout`). docs/architecture.md says why.

Torch's convention (`lora_A.weight` [r, in], `lora_B.weight` [out, r], delta W [out, in] = B A)
is the transpose: a = A.T, b = B.T (vdit/io/wan_lora.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from flax import traverse_util

Path = tuple[str, ...]

# The default targets: attention q/k/v/o and both FFN linears (musubi-tuner's and finetrainers'
# choice), as regexes over module paths joined by "/".
# (The own DiT's: its blocks only, not the jointly trained text encoder's `text/block*`.)
DEFAULT_TARGETS = {
    "wan": r"(^|/)attn[12]/to_(q|k|v|out)$|(^|/)ffn_(in|out)$",
    "dit": r"^(blocks|block\d+)/((self_attn|cross_attn)/(qkv|q|kv|out)|mlp/fc[12])$",
}
COLLECTION = "lora"  # the variable collection `Linear` reads its adapter from
RNG = "lora_dropout"  # the rng stream of the adapters' input dropout
STACKED = ("blocks",)  # module paths under these hold a leading layers axis (nn.scan)
DROPOUT_STREAM = 0x4C6F5241  # fold_in(step key, this) draws a LoRA run's dropout masks
_DROPOUT: contextvars.ContextVar[float] = contextvars.ContextVar("vdit_lora_dropout",
                                                                 default=0.0)


@dataclass(frozen=True)
class Target:
    """A kernel LoRA adapts: its module path, kernel shape, and input-axis count."""

    path: Path  # the module's path (the kernel is path + ("kernel",))
    shape: tuple[int, ...]
    n_in: int
    stacked: bool  # a leading layers axis (scanned blocks)

    @property
    def name(self) -> str:
        return "/".join(self.path)

    def dims(self) -> tuple[int, int]:
        """(in, out) of the flattened kernel (one layer)."""
        in_shape, out_shape = self.axes()
        return math.prod(in_shape), math.prod(out_shape)

    def axes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(in axes, out axes) of the kernel (one layer)."""
        core = self.shape[1:] if self.stacked else self.shape
        return tuple(core[:self.n_in]), tuple(core[self.n_in:])

    @property
    def lead(self) -> tuple[int, ...]:
        return self.shape[:1] if self.stacked else ()


def module_paths(params: dict) -> list[str]:
    """Every module path that holds a kernel and a bias, "/"-joined (what `targets` match)."""
    flat = traverse_util.flatten_dict(params)
    return sorted("/".join(p[:-1]) for p in flat if p[-1] == "kernel" and
                  (*p[:-1], "bias") in flat)


def find_targets(params: dict, pattern: str, stacked_prefixes: Iterable[str] = STACKED
                 ) -> list[Target]:
    """The Linear kernels whose module path matches `pattern` (re.search). A pattern that
    matches nothing raises ValueError listing the paths there are."""
    flat = traverse_util.flatten_dict(params)
    regex = re.compile(pattern)
    found = []
    for name in module_paths(params):
        if not regex.search(name):
            continue
        path = tuple(name.split("/"))
        kernel, bias = flat[(*path, "kernel")], flat[(*path, "bias")]
        found.append(Target(path, tuple(kernel.shape), kernel.ndim - bias.ndim,
                            path[0] in tuple(stacked_prefixes)))
    if not found:
        raise ValueError(f"LoRA targets {pattern!r} match no module; the modules are: "
                         + ", ".join(module_paths(params)))
    return found


def init_adapters(key: jax.Array, targets: list[Target], rank: int,
                  names: dict[str, tuple] | None = None) -> dict:
    """The trained adapters as a tree of module paths (the "lora" collection `Linear` reads):
    {"a": [(L,) *in, r] ~ Kaiming-uniform like PEFT, "b": zeros [(L,) r, *out]}, float32, so
    the adapted model equals the base at the start. With `names` (target name -> the kernel's
    logical axis names) each leaf is boxed with its own: a takes the kernel's input axes, b
    its output axes, the rank axis is replicated."""
    out = {}
    for i, t in enumerate(targets):
        n_in, _ = t.dims()
        in_shape, out_shape = t.axes()
        bound = 1.0 / math.sqrt(n_in)  # PEFT: kaiming_uniform(a=sqrt(5)) on [r, in]
        a = jax.random.uniform(jax.random.fold_in(key, i), (*t.lead, *in_shape, rank),
                               jnp.float32, -bound, bound)
        b = jnp.zeros((*t.lead, rank, *out_shape), jnp.float32)
        if names is not None:
            kernel, k = names[t.name], len(t.lead) + t.n_in
            a = nn.LogicallyPartitioned(a, (*kernel[:k], None))
            b = nn.LogicallyPartitioned(b, (*kernel[:len(t.lead)], None, *kernel[k:]))
        out[t.path] = {"a": a, "b": b}
    return traverse_util.unflatten_dict({(*p, n): v for p, ab in out.items()
                                         for n, v in ab.items()})


def by_name(tree: dict) -> dict[str, dict]:
    """A tree of adapters (`init_adapters`) -> {target name: {"a", "b"}}."""
    flat = traverse_util.flatten_dict(tree)
    out: dict[str, dict] = {}
    for path, value in flat.items():
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = value
    return out


def flat_layout(adapters: dict[str, dict], targets: list[Target]) -> dict[str, dict]:
    """Adapters by name in the flattened layout of LoRA files: a [(L,) in, r], b [(L,) r, out]."""
    out = {}
    for t in targets:
        n_in, n_out = t.dims()
        a, b = adapters[t.name]["a"], adapters[t.name]["b"]
        out[t.name] = {"a": a.reshape(*t.lead, n_in, a.shape[-1]),
                       "b": b.reshape(*t.lead, b.shape[len(t.lead)], n_out)}
    return out


def scaled(tree: dict, scale) -> dict:
    """Adapters (a tree or by name) with s folded into every b: what `branch` and LoRA files
    take."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: v * scale if k[-1] == "b" else v
                                         for k, v in flat.items()})


@flax.struct.dataclass
class Adapted:
    """A frozen base's params and adapters (s already in b) to run together: `apply` gives
    the module {"params": base, "lora": adapters}; with `key` and `rate` > 0 the adapters'
    inputs are dropped out."""

    base: Any
    adapters: Any
    key: jax.Array | None = None
    rate: float = flax.struct.field(pytree_node=False, default=0.0)

    def apply(self, module: nn.Module, *args, **kw) -> Any:
        rngs = {RNG: self.key} if self.key is not None and self.rate > 0 else None
        with dropout(self.rate):
            return module.apply({"params": self.base, COLLECTION: self.adapters}, *args,
                                rngs=rngs, **kw)


def fold(base: dict, tree: dict, scale: float) -> dict:
    """Base params (any float dtype) with a trained adapter tree (`init_adapters`' layout)
    folded in at `scale`: every leaf float32."""
    base32 = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), base)
    adapters = by_name(tree)
    return merge(base32, adapters, targets_of(adapters, base32), scale)


@contextlib.contextmanager
def dropout(rate: float) -> Iterator[None]:
    """Within: every adapter's input is dropped out at `rate` where an rng "lora_dropout" is
    given to `apply` (training); without one (eval, sampling) the branch is deterministic."""
    token = _DROPOUT.set(float(rate))
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def branch(module: nn.Module, x: jax.Array, n_in: int, dtype) -> jax.Array:
    """(drop(x) a) b for the `Linear` `module` whose "lora" variables hold a [*in, r] and
    b [r, *out] (s already in b): x [..., *in] -> [..., *out], in `dtype`."""
    a = module.get_variable(COLLECTION, "a")
    b = module.get_variable(COLLECTION, "b")
    rate = _DROPOUT.get()
    if rate > 0.0 and module.has_rng(RNG):
        keep = jax.random.bernoulli(module.make_rng(RNG), 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    h = jax.lax.dot_general(x.astype(dtype), a.astype(dtype), (contract, ((), ())))
    return jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))


def delta(target: Target, adapter: dict, scale) -> jax.Array:
    """s * a @ b in the kernel's shape (float32); either adapter layout."""
    flat = flat_layout({target.name: adapter}, [target])[target.name]
    d = jnp.matmul(flat["a"].astype(jnp.float32), flat["b"].astype(jnp.float32))
    return (scale * d).reshape(target.shape)


def merge(params: dict, adapters: dict[str, dict], targets: list[Target], scale) -> dict:
    """params with every target's kernel replaced by W + s a b (in W's dtype); the rest shared.
    `scale`: alpha / rank x multiplier (a number, or a traced scalar)."""
    flat = dict(traverse_util.flatten_dict(params))
    for t in targets:
        key = (*t.path, "kernel")
        w = flat[key]
        flat[key] = (w.astype(jnp.float32) + delta(t, adapters[t.name], scale)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def merge_many(params: dict, loras: list[tuple[dict, list[Target], float]]) -> dict:
    """Several LoRAs folded in one after another (each (adapters, targets, scale))."""
    for adapters, targets, scale in loras:
        params = merge(params, adapters, targets, scale)
    return params


def targets_of(adapters: dict[str, Any], params: dict,
               stacked_prefixes: Iterable[str] = STACKED) -> list[Target]:
    """The Target of each adapter name of `adapters`, read off `params` (for loaded files)."""
    flat = traverse_util.flatten_dict(params)
    out = []
    for name in adapters:
        path = tuple(name.split("/"))
        kernel, bias = flat[(*path, "kernel")], flat[(*path, "bias")]
        out.append(Target(path, tuple(kernel.shape), kernel.ndim - bias.ndim,
                          path[0] in tuple(stacked_prefixes)))
    return out
