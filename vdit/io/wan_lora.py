"""LoRA files for the Wan DiT in the namings other tools write and read, <-> vdit's adapters
(vdit/models/lora.py: {Flax module path: {"a": [(L,) in, r], "b": [(L,) r, out]}}).

    diffusers / PEFT   transformer.blocks.0.attn1.to_q.lora_A.weight [r, in], .lora_B.weight
                       [out, r] (`WanPipeline.load_lora_weights`, `save_lora_weights`)
    ComfyUI / musubi   diffusion_model.blocks.0.self_attn.q.lora_down.weight, .lora_up.weight,
                       .alpha (a scalar); also `lora_unet_blocks_0_self_attn_q.*` and the
                       `model.diffusion_model.` prefix

Module names go through vdit/io/wan_transformer.py's map (original Wan names -> diffusers names
-> Flax paths), so a LoRA follows the same naming rules as the weights it adapts. The scale of
each module is alpha / rank where the file stores alpha, else 1 (PEFT's files keep alpha in
their adapter config, not in the tensors; diffusers then uses alpha = rank).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdit.io.hf_folder import CheckpointFormatError, open_safetensors
from vdit.io.wan_transformer import WanTransformerSpec, diffusers_name, is_original_naming, leaves

_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down",
             ".lora_up.weight": "up", ".alpha": "alpha"}
_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
_UNET = re.compile(r"^lora_unet_blocks_(\d+)_(self_attn|cross_attn)_([qkvo])$|"
                   r"^lora_unet_blocks_(\d+)_ffn_([02])$")


@dataclass
class LoadedLora:
    """Adapters keyed by Flax module path (each module's alpha / rank folded into "b"), that
    scale per module (for the record), the rank, and the tensors that matched nothing."""

    adapters: dict[str, dict[str, np.ndarray]]
    scales: dict[str, float]
    rank: int
    unmatched: list[str] = field(default_factory=list)
    naming: str = "diffusers"


def _module_table(spec: WanTransformerSpec) -> dict[str, tuple[str, int | None, tuple, int]]:
    """diffusers module name (blocks.N.attn1.to_q) -> (Flax module path, layer or None,
    (in, out) flat dims)."""
    table = {}
    for key, leaf in leaves(spec).items():
        if key[-1] != "kernel" or leaf.n_in is None or leaf.conv:
            continue
        in_flat = int(np.prod(leaf.shape[:leaf.n_in]))
        out_flat = int(np.prod(leaf.shape[leaf.n_in:]))
        module = leaf.name.removesuffix(".weight")
        path = "/".join(key[:-1])
        if leaf.stacked:
            for i in range(spec.model.depth):
                table[module.format(i=i)] = (path, i, (in_flat, out_flat))
        else:
            table[module] = (path, None, (in_flat, out_flat))
    return table


def _metadata_alpha(metadata: dict[str, str], path: Path) -> float | None:
    """diffusers' `save_lora_weights(..., transformer_lora_adapter_metadata=...)` keeps PEFT's
    LoraConfig in the header as JSON (`"transformer.lora_alpha"`); without it diffusers takes
    alpha = rank."""
    import json

    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: lora_adapter_metadata is not JSON ({e})") from None
    if config.get("transformer.alpha_pattern") or config.get("transformer.rank_pattern"):
        raise CheckpointFormatError(f"{path}: per-module alpha_pattern / rank_pattern are not "
                                    "read by vdit")
    alpha = config.get("transformer.lora_alpha", config.get("lora_alpha"))
    return None if alpha is None else float(alpha)


def _split(name: str) -> tuple[str, str] | None:
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return None


def _module_name(stem: str, original: bool) -> str:
    m = _UNET.match(stem)
    if m:
        if m.group(1) is not None:
            return diffusers_name(f"blocks.{m.group(1)}.{m.group(2)}.{m.group(3)}.x", True)[:-2]
        return diffusers_name(f"blocks.{m.group(4)}.ffn.{m.group(5)}.x", True)[:-2]
    for prefix in _PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    # the name rules act on tensor names: give the module a dummy leaf and take it off again
    return diffusers_name(stem + ".x", original)[:-2]


def read_lora(path: str | Path, spec: WanTransformerSpec) -> LoadedLora:
    """A LoRA file in either naming -> adapters for `WanDiT(spec.model)`'s params. Tensors
    that match no module, or that belong to no LoRA pair, are listed in `unmatched` (never
    dropped silently); a file where nothing matches, or a pair of the wrong shape, is refused
    naming the file and the tensor."""
    path = Path(path)
    with open_safetensors(path) as f:
        names = list(f.keys())
        tensors = {n: np.asarray(f.get_tensor(n), np.float32) for n in names}
        header_alpha = _metadata_alpha(f.metadata() or {}, path)
    original = is_original_naming([n.split(".lora_")[0] for n in names]) or any(
        n.startswith("lora_unet_") for n in names)
    table = _module_table(spec)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    unmatched = []
    for name, value in tensors.items():
        split = _split(name)
        module = _module_name(split[0], original) if split else None
        if split is None or module not in table:
            unmatched.append(name)
            continue
        pairs.setdefault(module, {})[split[1]] = value
    adapters: dict[str, dict[str, list]] = {}
    scales: dict[str, float] = {}
    ranks = set()
    for module, parts in sorted(pairs.items()):
        if "down" not in parts or "up" not in parts:
            unmatched += [f"{module} ({'/'.join(sorted(parts))} without its pair)"]
            continue
        flax_path, layer, (n_in, n_out) = table[module]
        down, up = parts["down"], parts["up"]
        r = down.shape[0]
        if down.shape != (r, n_in) or up.shape != (n_out, r):
            raise CheckpointFormatError(
                f"{path}: the LoRA of {module} has down {down.shape} and up {up.shape}; the "
                f"model's {module} needs [{r}, {n_in}] and [{n_out}, {r}]")
        ranks.add(r)
        alpha = float(parts["alpha"].reshape(())) if "alpha" in parts else header_alpha
        scale = 1.0 if alpha is None else alpha / r
        if flax_path in scales and abs(scales[flax_path] - scale) > 1e-6:
            raise CheckpointFormatError(f"{path}: {module} has alpha/rank {scale}, other layers "
                                        f"of {flax_path} {scales[flax_path]}: vdit keeps one "
                                        "scale per module")
        scales[flax_path] = scale
        entry = adapters.setdefault(flax_path, {"a": {}, "b": {}})
        entry["a"][layer], entry["b"][layer] = down.T, up.T * scale  # alpha / r folded into b
    if not adapters:
        raise CheckpointFormatError(
            f"{path}: no tensor matches a module of this Wan transformer (first names: "
            + ", ".join(names[:4]) + ")")
    if len(ranks) > 1:
        raise CheckpointFormatError(f"{path}: several ranks {sorted(ranks)} in one file")
    rank = ranks.pop()
    out: dict[str, dict[str, np.ndarray]] = {}
    for flax_path, entry in adapters.items():
        layers = list(entry["a"])
        if layers == [None]:
            out[flax_path] = {"a": entry["a"][None], "b": entry["b"][None]}
            continue
        # a stacked module: layers without an adapter get zeros (no change)
        n_in, n_out = entry["a"][layers[0]].shape[0], entry["b"][layers[0]].shape[1]
        a = np.zeros((spec.model.depth, n_in, rank), np.float32)
        b = np.zeros((spec.model.depth, rank, n_out), np.float32)
        for i in layers:
            a[i], b[i] = entry["a"][i], entry["b"][i]
        out[flax_path] = {"a": a, "b": b}
    return LoadedLora(out, scales, rank, sorted(unmatched),
                      "original" if original else "diffusers")


def lora_tensors(adapters: dict[str, dict[str, np.ndarray]], spec: WanTransformerSpec,
                 naming: str, alpha: float | None = None) -> dict[str, np.ndarray]:
    """vdit adapters (scale already in "b", as `read_lora` gives them and training stores
    them with its alpha / rank folded in) -> the tensors of a LoRA file in `naming`:
    "diffusers" (PEFT names, no alpha tensor: diffusers then uses alpha = rank, scale 1) or
    "comfyui" (original Wan names under `diffusion_model.`, with `.alpha` = rank, scale 1)."""
    if naming not in ("diffusers", "comfyui"):
        raise ValueError(f"LoRA naming {naming!r}; allowed: diffusers, comfyui")
    by_path = {}
    for module, (path, layer, _) in _module_table(spec).items():
        by_path.setdefault(path, []).append((layer, module))
    out = {}
    for path, adapter in adapters.items():
        if path not in by_path:
            raise ValueError(f"adapter {path!r} is no Linear of this Wan transformer")
        a, b = np.asarray(adapter["a"], np.float32), np.asarray(adapter["b"], np.float32)
        rank = a.shape[-1]
        for layer, module in by_path[path]:
            down = (a if layer is None else a[layer]).T
            up = (b if layer is None else b[layer]).T
            if not up.any() and not down.any():
                continue
            if naming == "diffusers":
                out[f"transformer.{module}.lora_A.weight"] = np.ascontiguousarray(down)
                out[f"transformer.{module}.lora_B.weight"] = np.ascontiguousarray(up)
            else:
                name = _original_module(module)
                out[f"diffusion_model.{name}.lora_down.weight"] = np.ascontiguousarray(down)
                out[f"diffusion_model.{name}.lora_up.weight"] = np.ascontiguousarray(up)
                out[f"diffusion_model.{name}.alpha"] = np.asarray(
                    float(rank) if alpha is None else alpha, np.float32)
    return out


_TO_ORIGINAL = ((r"\.attn1\.to_out\.0$", ".self_attn.o"),
                (r"\.attn1\.to_(q|k|v)$", r".self_attn.\1"),
                (r"\.attn2\.to_out\.0$", ".cross_attn.o"),
                (r"\.attn2\.to_(q|k|v)$", r".cross_attn.\1"),
                (r"\.ffn\.net\.0\.proj$", ".ffn.0"), (r"\.ffn\.net\.2$", ".ffn.2"))


def _original_module(module: str) -> str:
    """A diffusers module name -> Wan's original one (the inverse of the renames, checked
    against the forward map)."""
    for pattern, repl in _TO_ORIGINAL:
        new = re.sub(pattern, repl, module)
        if new != module:
            if diffusers_name(new + ".x", True)[:-2] != module:
                raise AssertionError(f"original name of {module}: {new} maps back elsewhere")
            return new
    raise ValueError(f"{module} has no original Wan name in vdit's table")
