"""LoRA (Hu et al. 2021) as a transform of a model's params: W' = W + s * A B.

A target is one `Linear` kernel of the Flax tree, [*in, *out] (with a leading layers axis when
the blocks are scanned). Its adapter is {"a": [(L,) in, r], "b": [(L,) r, out]} over the
flattened input and output axes, float32; `merge` adds s * (a @ b) reshaped to the kernel, for
every target at once, inside jit. The scale s is alpha / rank times a user's multiplier. The
kernel's input/output split comes from its bias (`Linear`'s bias has the output shape), so the
transform needs no model code. Torch's convention (`lora_A.weight` [r, in], `lora_B.weight`
[out, r], delta W [out, in] = B A) is the transpose: a = A.T, b = B.T (vdit/io/wan_lora.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

Path = tuple[str, ...]

# The default targets: attention q/k/v/o and both FFN linears (musubi-tuner's and finetrainers'
# choice), as regexes over module paths joined by "/".
DEFAULT_TARGETS = {
    "wan": r"(^|/)attn[12]/to_(q|k|v|out)$|(^|/)ffn_(in|out)$",
    "dit": r"(^|/)(self_attn|cross_attn)/(qkv|q|kv|out)$|(^|/)mlp/fc[12]$",
}


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
        core = self.shape[1:] if self.stacked else self.shape
        return math.prod(core[:self.n_in]), math.prod(core[self.n_in:])


def module_paths(params: dict) -> list[str]:
    """Every module path that holds a kernel and a bias, "/"-joined (what `targets` match)."""
    flat = traverse_util.flatten_dict(params)
    return sorted("/".join(p[:-1]) for p in flat if p[-1] == "kernel" and
                  (*p[:-1], "bias") in flat)


def find_targets(params: dict, pattern: str, stacked_prefixes: Iterable[str] = ("blocks",)
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


def init_adapters(key: jax.Array, targets: list[Target], rank: int) -> dict[str, dict]:
    """{target name: {"a": [(L,) in, r] ~ Kaiming-uniform like PEFT, "b": zeros [(L,) r, out]}}:
    the adapted model equals the base at the start."""
    out = {}
    for i, t in enumerate(targets):
        n_in, n_out = t.dims()
        lead = (t.shape[0],) if t.stacked else ()
        bound = 1.0 / math.sqrt(n_in)  # PEFT: kaiming_uniform(a=sqrt(5)) on [r, in]
        a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, n_in, rank), jnp.float32,
                               -bound, bound)
        out[t.name] = {"a": a, "b": jnp.zeros((*lead, rank, n_out), jnp.float32)}
    return out


def delta(target: Target, adapter: dict, scale) -> jax.Array:
    """s * a @ b in the kernel's shape (float32)."""
    d = jnp.matmul(adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32))
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


def targets_of(adapters: dict[str, Any], params: dict) -> list[Target]:
    """The Target of each adapter name of `adapters`, read off `params` (for loaded files)."""
    flat = traverse_util.flatten_dict(params)
    out = []
    for name in adapters:
        path = tuple(name.split("/"))
        kernel, bias = flat[(*path, "kernel")], flat[(*path, "bias")]
        out.append(Target(path, tuple(kernel.shape), kernel.ndim - bias.ndim,
                          adapters[name]["a"].ndim == 3))
    return out
