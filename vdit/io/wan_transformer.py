"""The Wan DiT's weights in the layouts others publish: diffusers `transformer/` folders and the
original Wan / ComfyUI single files, read into vdit's Flax tree and written back.

A diffusers folder holds `config.json` (`_class_name: WanTransformer3DModel`) and
`diffusion_pytorch_model.safetensors`, or shards listed by its `.index.json`. The original
naming (Wan's own checkpoints; ComfyUI repackages them under `model.diffusion_model.`) is first
renamed to diffusers names (`ORIGINAL_TO_DIFFUSERS`; note diffusers' `norm2` is the
cross-attention norm that Wan calls `norm3`).

Each Flax leaf is one diffusers tensor (or one per layer, stacked, for the scanned blocks) in
another layout: Linear weights [out, in] -> kernels [in, *out] (q/k/v [D, H, Dh]; to_out
[H, Dh, D]; time_proj [D, 6, D]), the Conv3d patch weight [D, C, pt, ph, pw] -> [pt*ph*pw*C, D]
(the order of vdit's `patchify`), tables [1, k, D] -> [k, D]. Only transposes and reshapes: an
export and its re-import are bit-identical. With target shardings, each leaf is built by
`jax.make_array_from_callback`, reading per device only the rows and columns its shard needs
(`safe_open(...).get_slice`), so host memory holds one slice at a time, never the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vdit.config import ModelConfig
from vdit.io.hf_folder import CheckpointFormatError, open_safetensors, read_config, weight_files

WEIGHTS = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "WanTransformer3DModel"
FLOAT_DTYPES = ("F32", "BF16", "F16")

# Original Wan / ComfyUI names -> diffusers names (regex, replacement), applied in order.
ORIGINAL_TO_DIFFUSERS: tuple[tuple[str, str], ...] = (
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"\.self_attn\.o\.", ".attn1.to_out.0."),
    (r"\.self_attn\.(q|k|v)\.", r".attn1.to_\1."),
    (r"\.self_attn\.norm_(q|k)\.", r".attn1.norm_\1."),
    (r"\.cross_attn\.o\.", ".attn2.to_out.0."),
    (r"\.cross_attn\.(q|k|v)\.", r".attn2.to_\1."),
    (r"\.cross_attn\.norm_(q|k)\.", r".attn2.norm_\1."),
    (r"\.norm3\.", ".norm2."),  # Wan's cross-attention norm is norm3; diffusers calls it norm2
    (r"\.ffn\.0\.", ".ffn.net.0.proj."),
    (r"\.ffn\.2\.", ".ffn.net.2."),
    (r"\.modulation$", ".scale_shift_table"),
)
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class WanTransformerSpec:
    """What a Wan transformer config.json describes: the model section and the text width."""

    model: ModelConfig
    text_dim: int
    in_channels: int
    out_channels: int
    config: dict[str, Any]  # the diffusers config.json, as read (written back on export)


def spec_from_config(config: dict[str, Any], where: str | Path) -> WanTransformerSpec:
    """Refuses another architecture or options vdit does not build, naming the key."""
    name = config.get("_class_name")
    if name != CLASS_NAME:
        raise CheckpointFormatError(f"{where}: config.json describes {name!r}, not a "
                                    f"{CLASS_NAME} (the Wan DiT)")
    unsupported = {"image_dim": "image conditioning (Wan I2V / FLF2V)",
                   "added_kv_proj_dim": "image key/value projections (Wan I2V)",
                   "pos_embed_seq_len": "image position embeddings (Wan FLF2V)"}
    bad = [f"{k}={config[k]!r} ({what})" for k, what in unsupported.items()
           if config.get(k) is not None]
    # qk_norm is not read: diffusers 0.42 RMS-norms q and k across heads whatever it says.
    if bad:
        raise CheckpointFormatError(f"{where}: not supported by vdit's Wan DiT: "
                                    + "; ".join(bad))
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    model = ModelConfig(kind="wan", width=heads * head_dim, depth=int(config["num_layers"]),
                        heads=heads, ffn_dim=int(config["ffn_dim"]),
                        freq_dim=int(config.get("freq_dim", 256)),
                        patch=tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),
                        cross_attn_norm=bool(config.get("cross_attn_norm", True)))
    if abs(float(config.get("eps", 1e-6)) - 1e-6) > 1e-12:
        raise CheckpointFormatError(f"{where}: eps={config['eps']} (vdit's Wan DiT uses 1e-6)")
    in_ch = int(config.get("in_channels", 16))
    return WanTransformerSpec(model=model, text_dim=int(config.get("text_dim", 4096)),
                              in_channels=in_ch,
                              out_channels=int(config.get("out_channels") or in_ch),
                              config=dict(config))


def read_spec(folder: str | Path) -> WanTransformerSpec:
    """The spec of a diffusers transformer folder."""
    return spec_from_config(read_config(folder), folder)


# --- the layout map ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """One Flax leaf: its diffusers tensor name (`{i}` for the layer), the Flax shape per
    layer, the torch shape, and how many leading axes of the Flax shape form the torch
    weight's input ("in") side (None: no transpose, a plain reshape)."""

    name: str
    shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    n_in: int | None
    stacked: bool = False
    conv: bool = False


def leaves(spec: WanTransformerSpec) -> dict[tuple[str, ...], Leaf]:
    """Flax path -> Leaf for every parameter of `WanDiT(spec.model)` (scanned blocks)."""
    m = spec.model
    d, h, f = m.width, m.heads, m.hidden_dim()
    hd = d // h
    pt, ph, pw = m.patch
    p_in, p_out = pt * ph * pw * spec.in_channels, pt * ph * pw * spec.out_channels

    def linear(name, in_shape, out_shape, stacked=False):
        torch_shape = (math.prod(out_shape), math.prod(in_shape))
        return {("kernel",): Leaf(f"{name}.weight", (*in_shape, *out_shape), torch_shape,
                                  len(in_shape), stacked),
                ("bias",): Leaf(f"{name}.bias", tuple(out_shape), (math.prod(out_shape),),
                                None, stacked)}

    out: dict[tuple[str, ...], Leaf] = {
        ("patch_embedding", "kernel"): Leaf("patch_embedding.weight", (p_in, d),
                                            (d, spec.in_channels, pt, ph, pw), 1, conv=True),
        ("patch_embedding", "bias"): Leaf("patch_embedding.bias", (d,), (d,), None),
        ("scale_shift_table",): Leaf("scale_shift_table", (2, d), (1, 2, d), None),
    }
    top = {"time_linear_1": ("condition_embedder.time_embedder.linear_1", (m.freq_dim,), (d,)),
           "time_linear_2": ("condition_embedder.time_embedder.linear_2", (d,), (d,)),
           "time_proj": ("condition_embedder.time_proj", (d,), (6, d)),
           "text_linear_1": ("condition_embedder.text_embedder.linear_1", (spec.text_dim,), (d,)),
           "text_linear_2": ("condition_embedder.text_embedder.linear_2", (d,), (d,)),
           "proj_out": ("proj_out", (d,), (p_out,))}
    for flax_name, (name, i, o) in top.items():
        out.update({(flax_name, *k): v for k, v in linear(name, i, o).items()})
    blk = "blocks.{i}."
    per_block: dict[tuple[str, ...], Leaf] = {
        ("scale_shift_table",): Leaf(blk + "scale_shift_table", (6, d), (1, 6, d), None, True)}
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v"):
            per_block.update({(attn, proj, *k): v for k, v in
                              linear(f"{blk}{attn}.{proj}", (d,), (h, hd), True).items()})
        per_block.update({(attn, "to_out", *k): v for k, v in
                          linear(f"{blk}{attn}.to_out.0", (h, hd), (d,), True).items()})
        for norm in ("norm_q", "norm_k"):
            per_block[(attn, norm, "scale")] = Leaf(f"{blk}{attn}.{norm}.weight", (h, hd),
                                                    (h * hd,), None, True)
    if m.cross_attn_norm:
        per_block[("norm2_scale",)] = Leaf(blk + "norm2.weight", (d,), (d,), None, True)
        per_block[("norm2_bias",)] = Leaf(blk + "norm2.bias", (d,), (d,), None, True)
    per_block.update({("ffn_in", *k): v for k, v in
                      linear(blk + "ffn.net.0.proj", (d,), (f,), True).items()})
    per_block.update({("ffn_out", *k): v for k, v in
                      linear(blk + "ffn.net.2", (f,), (d,), True).items()})
    out.update({("blocks", *k): v for k, v in per_block.items()})
    return out


def tensor_names(spec: WanTransformerSpec) -> dict[str, tuple[int, ...]]:
    """Every diffusers tensor name of the spec -> its shape."""
    names = {}
    for leaf in leaves(spec).values():
        for i in range(spec.model.depth if leaf.stacked else 1):
            names[leaf.name.format(i=i)] = leaf.torch_shape
    return names


def to_flax(leaf: Leaf, tensor: np.ndarray) -> np.ndarray:
    """One torch-layout tensor (one layer) -> the Flax layout, float32 unless already."""
    t = np.asarray(tensor)
    if leaf.conv:  # [D, C, pt, ph, pw] -> [pt, ph, pw, C, D] -> [(pt ph pw C), D]
        return np.ascontiguousarray(t.transpose(2, 3, 4, 1, 0)).reshape(leaf.shape)
    if leaf.n_in is not None:  # Linear [out, in] -> [in..., out...]
        return np.ascontiguousarray(t.T).reshape(leaf.shape)
    return t.reshape(leaf.shape)


def to_torch(leaf: Leaf, array: np.ndarray) -> np.ndarray:
    """The inverse of `to_flax` for one layer."""
    a = np.asarray(array)
    if leaf.conv:
        pt_, ph_, pw_, c, d = *leaf.torch_shape[2:], leaf.torch_shape[1], leaf.torch_shape[0]
        return np.ascontiguousarray(a.reshape(pt_, ph_, pw_, c, d).transpose(4, 3, 0, 1, 2))
    if leaf.n_in is not None:
        n_in = math.prod(leaf.shape[:leaf.n_in])
        return np.ascontiguousarray(a.reshape(n_in, -1).T)
    return a.reshape(leaf.torch_shape)


# --- reading ------------------------------------------------------------------------------------

def _strip_prefix(name: str) -> str:
    for prefix in ORIGINAL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def is_original_naming(names) -> bool:
    """Whether tensor names are Wan's own (ComfyUI's): `head.head`, `blocks.N.self_attn`."""
    stripped = [_strip_prefix(n) for n in names]
    return any(n.startswith("head.") or ".self_attn." in n for n in stripped)


def diffusers_name(name: str, original: bool = True) -> str:
    """A tensor name -> its diffusers name; `original`: the file uses Wan's naming (decided
    for a whole checkpoint by `is_original_naming`, since `norm2` means different norms)."""
    name = _strip_prefix(name)
    if original:
        for pattern, repl in ORIGINAL_TO_DIFFUSERS:
            name = re.sub(pattern, repl, name)
    return name


class TensorIndex:
    """Where each diffusers-named tensor lives, its shape and dtype checked against the spec;
    the files stay open (`handles`, an ExitStack the caller closes) while slices are read."""

    def __init__(self, files: list[Path], spec: WanTransformerSpec, where: str | Path,
                 handles: contextlib.ExitStack):
        self.spec = spec
        self.location: dict[str, tuple[Any, str, Path]] = {}
        found: dict[str, tuple[tuple[int, ...], str]] = {}
        opened = [(path, handles.enter_context(open_safetensors(path))) for path in files]
        original = is_original_naming([k for _, f in opened for k in f.keys()])  # noqa: SIM118
        for path, f in opened:
            for stored in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(stored)
                name = diffusers_name(stored, original)
                self.location[name] = (f, stored, path)
                found[name] = (tuple(sl.get_shape()), sl.get_dtype())
        expected = tensor_names(spec)
        common = sorted(set(expected) & set(found))
        file_of = {k: v[2].name for k, v in self.location.items()}
        problems = ([f"missing tensor {k}" for k in sorted(set(expected) - set(found))]
                    + [f"unexpected tensor {k} ({file_of[k]})"
                       for k in sorted(set(found) - set(expected))]
                    + [f"{k} ({file_of[k]}): expected shape {expected[k]}, found {found[k][0]}"
                       for k in common if found[k][0] != tuple(expected[k])]
                    + [f"{k} ({file_of[k]}): dtype {found[k][1]}, expected one of "
                       f"{', '.join(FLOAT_DTYPES)}" for k in common
                       if found[k][1] not in FLOAT_DTYPES])
        if problems:
            more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise CheckpointFormatError(
                f"{where}: the weights do not match the Wan transformer its config.json "
                "describes:\n  " + "\n  ".join(problems[:8]) + more)
        self.bytes = sum(math.prod(s) * (4 if dt == "F32" else 2) for s, dt in found.values())

    def read(self, name: str, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """rows x cols of a 2-D tensor (a Linear weight), or the whole tensor; float32."""
        f, stored, path = self.location[name]
        try:
            sl = f.get_slice(stored)
            part = sl[rows, cols] if len(sl.get_shape()) == 2 else sl[:]
        except Exception as e:  # the safetensors library's own error for bad data
            raise CheckpointFormatError(f"{path}: tensor {stored} could not be read; the file "
                                        f"looks truncated or damaged ({e})") from None
        return np.asarray(part, np.float32)


def _flat_range(shape: tuple[int, ...], idx: tuple[slice, ...]) -> tuple[slice, tuple[int, ...]]:
    """The range of the flattened axes `shape` that covers the block idx selects, and the
    block's per-axis offsets: exact when only the first axis is cut, else the whole range."""
    bounds = [s.indices(n)[:2] for s, n in zip(idx, shape, strict=True)]
    inner = math.prod(shape[1:])
    if all(b == (0, n) for b, n in zip(bounds[1:], shape[1:], strict=True)):
        first = bounds[0]
        return slice(first[0] * inner, first[1] * inner), (first[0], *[0] * (len(shape) - 1))
    return slice(0, math.prod(shape)), (0,) * len(shape)


def _read_block(index: TensorIndex, leaf: Leaf, idx: tuple[slice, ...]) -> np.ndarray:
    """The Flax-layout block `idx` of a leaf (layers first when stacked). For a Linear weight
    only the torch rows (output side) and columns (input side) that the block needs are read,
    so an FSDP or tensor shard reads its own slice."""
    layer_idx, idx = (idx[0], idx[1:]) if leaf.stacked else (slice(0, 1), idx)
    parts = []
    for i in range(index.spec.model.depth if leaf.stacked else 1)[layer_idx]:
        name = leaf.name.format(i=i)
        if leaf.n_in is None or leaf.conv:
            parts.append(to_flax(leaf, index.read(name))[idx])
            continue
        in_shape, out_shape = leaf.shape[:leaf.n_in], leaf.shape[leaf.n_in:]
        cols, in_off = _flat_range(in_shape, idx[:leaf.n_in])
        rows, out_off = _flat_range(out_shape, idx[leaf.n_in:])
        t = index.read(name, rows, cols).T  # [in part, out part]
        block = t.reshape(t.shape[0] // math.prod(in_shape[1:]), *in_shape[1:],
                          t.shape[1] // math.prod(out_shape[1:]), *out_shape[1:])
        parts.append(block[tuple(slice(s.indices(n)[0] - o, s.indices(n)[1] - o)
                                 for s, n, o in zip(idx, leaf.shape, (*in_off, *out_off),
                                                    strict=True))])
    return np.stack(parts) if leaf.stacked else parts[0]


def load_params(path: str | Path, target: Any | None = None, *, log: Callable = print
                ) -> tuple[WanTransformerSpec, dict[str, Any]]:
    """(spec, params) of a Wan transformer: a diffusers folder, or one safetensors file in
    either naming (its architecture from `config` beside it, or from a folder's config.json).

    target: the Flax tree of jax.ShapeDtypeStruct with `.sharding` (e.g. a trainer's state
    shardings): leaves become sharded jax.Arrays, each device's slice read on its own; None:
    float32 numpy arrays. Prints the loading time and the process's peak host memory."""
    start = time.perf_counter()
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    spec = read_spec(folder)
    files = weight_files(folder, WEIGHTS) if p.is_dir() else [p]
    with contextlib.ExitStack() as handles:
        index = TensorIndex(files, spec, p, handles)
        flat = _build(index, spec, target, p)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB (Linux)
    log(f"loaded Wan transformer {p} ({index.bytes / 2 ** 30:.2f} GiB in {len(files)} "
        f"file(s)) in {time.perf_counter() - start:.1f} s; peak host memory {peak:.2f} GiB",
        file=sys.stderr)
    from flax import traverse_util

    return spec, traverse_util.unflatten_dict(flat)


def _build(index: TensorIndex, spec: WanTransformerSpec, target: Any | None,
           where: Path) -> dict[tuple[str, ...], Any]:
    import jax

    flat: dict[tuple[str, ...], Any] = {}
    targets = {} if target is None else {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    for key, leaf in leaves(spec).items():
        shape = ((spec.model.depth,) if leaf.stacked else ()) + leaf.shape
        want = targets.get(key)
        if want is None:
            flat[key] = _read_block(index, leaf, tuple(slice(None) for _ in shape))
            continue
        if tuple(want.shape) != shape:
            raise CheckpointFormatError(f"{where}: {leaf.name} gives shape {shape}, the "
                                        f"model expects {tuple(want.shape)}")
        flat[key] = jax.make_array_from_callback(
            shape, want.sharding,
            lambda idx, leaf=leaf, want=want: _read_block(index, leaf, idx).astype(want.dtype))
    return flat


# --- writing ------------------------------------------------------------------------------------

def write_folder(out: str | Path, spec: WanTransformerSpec, params: dict[str, Any], *,
                 dtype: str = "float32", max_shard_bytes: int = 5 * 2 ** 30,
                 extra_config: dict[str, Any] | None = None) -> Path:
    """A diffusers transformer folder that `WanTransformer3DModel.from_pretrained` loads:
    config.json + safetensors shards named as diffusers names them (one file when it fits in
    max_shard_bytes) + the index. Written atomically file by file."""
    import ml_dtypes
    from flax import traverse_util
    from safetensors.numpy import save_file

    from vdit.io import atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    flat = traverse_util.flatten_dict(params)
    tensors: dict[str, np.ndarray] = {}
    for key, leaf in leaves(spec).items():
        value = np.asarray(flat[key])
        for i in range(spec.model.depth if leaf.stacked else 1):
            layer = value[i] if leaf.stacked else value
            # C order: safetensors writes an array's buffer as it lies in memory, so a
            # transposed or Fortran-ordered view would be stored scrambled, silently.
            tensors[leaf.name.format(i=i)] = np.ascontiguousarray(
                to_torch(leaf, layer).astype(np_dtype))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += n
    for old in out.glob("diffusion_pytorch_model*"):
        old.unlink()
    names = ([WEIGHTS] if len(shards) == 1 else
             [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
              for i in range(len(shards))])
    weight_map = {}
    for file, shard in zip(names, shards, strict=True):
        with atomic.atomic_path(out / file) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        atomic.write_text(out / f"{WEIGHTS}.index.json", json.dumps(index, indent=2))
    config = {**spec.config, **(extra_config or {})}
    config["_class_name"] = CLASS_NAME
    config.setdefault("_diffusers_version", "0.42.1")
    atomic.write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True))
    return out


def diffusers_config(spec_model: ModelConfig, text_dim: int, in_channels: int,
                     out_channels: int) -> dict[str, Any]:
    """The diffusers config.json of a vdit `model.kind: wan` section."""
    m = spec_model
    return {"_class_name": CLASS_NAME, "_diffusers_version": "0.42.1",
            "patch_size": list(m.patch), "num_attention_heads": m.heads,
            "attention_head_dim": m.width // m.heads, "in_channels": in_channels,
            "out_channels": out_channels, "text_dim": text_dim, "freq_dim": m.freq_dim,
            "ffn_dim": m.hidden_dim(), "num_layers": m.depth, "cross_attn_norm": m.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}
