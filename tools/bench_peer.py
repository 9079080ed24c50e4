"""vdit's train step against the PyTorch peer a user would otherwise pick, alternating, one session.

The peer is diffusers' `WanTransformer3DModel` (random weights from a config, float32, AdamW,
the rectified-flow loss) at vdit's shape. For `model.kind: wan` (experiments/bench_cpu_wan.yaml)
both sides run the same model; for vdit's own DiT the peer has its shape: layers, width, heads,
MLP width, patch, latent grid, text length and width, batch. Rounds alternate `vdit bench` and
the peer's step, so drift of a shared machine hits both; each round reports both step times,
tokens/s and the ratio, and the rounds the peer wins are listed, not hidden. FLOPs are printed
for both sides: vdit's analytic count (and XLA's), and the peer's as torch's FlopCounterMode
counts one forward + backward, plus the attention matmuls it does not count on CPU. `--profile`
then shows where each side's step goes, by op category (tools/profile_step.py for vdit,
torch.profiler for the peer).

The peer runs in its own environment, built once outside the repository (torch is never a
dependency of vdit or its tests):

    python tools/bench_peer.py experiments/bench_cpu.yaml --rounds 2 --steps 3
    python tools/bench_peer.py experiments/bench_cpu.yaml model.depth=4 --peer-python /path/python
    vdit tokenize runs/shards/demo-latents experiments/default.yaml --physics 64  # demo latents
    python tools/bench_peer.py experiments/default.yaml data.source=shards \
        data.shards=runs/shards/demo-latents --rounds 3 --steps 10 --profile   # the demo's DiT

The first run creates ~/.cache/vdit/peer-env (`pip install torch==2.13.0 diffusers`, about a
minute from the pip cache); `--peer-python` uses an existing interpreter instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_ENV = Path.home() / ".cache" / "vdit" / "peer-env"
PEER_PACKAGES = ("torch==2.13.0", "diffusers")

# Runs inside the peer environment; reads its shape as JSON from argv[1], prints one JSON line.
PEER_STEP = r'''
import json, re, statistics, sys, time
import torch
from diffusers import WanTransformer3DModel
from torch.utils.flop_counter import FlopCounterMode

s = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(s["threads"])
model = WanTransformer3DModel(
    patch_size=tuple(s["patch"]), num_attention_heads=s["heads"],
    attention_head_dim=s["width"] // s["heads"], in_channels=s["channels"],
    out_channels=s["channels"], text_dim=s["text_width"], freq_dim=s["freq_dim"],
    ffn_dim=s["mlp"], num_layers=s["depth"], cross_attn_norm=s["cross_attn_norm"],
    qk_norm="rms_norm_across_heads", eps=1e-6)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
b, (t, h, w), c = s["batch"], s["latent"], s["channels"]
x0 = torch.randn(b, c, t, h, w)
text = torch.randn(b, s["text_length"], s["text_width"])

def step():
    noise = torch.randn_like(x0)
    tt = torch.sigmoid(torch.randn(b))
    xt = (1 - tt.view(b, 1, 1, 1, 1)) * x0 + tt.view(b, 1, 1, 1, 1) * noise
    pred = model(hidden_states=xt, timestep=tt * 1000, encoder_hidden_states=text,
                 return_dict=False)[0]
    loss = torch.mean((pred - (noise - x0)) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)

counter = FlopCounterMode(display=False)
with counter:
    step()
for _ in range(s["warmup"]):
    step()
if s.get("profile"):
    # Self time per aten op (nested ops are not counted twice) of one step, by category.
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    cats = {}
    for e in prof.key_averages():
        name = e.key
        if re.search(r"scaled_dot_product|flash_attention", name):
            cat = "attention core (self and cross)"
        elif name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"):
            cat = "matmuls (linear layers)"
        elif name.startswith(("Optimizer.", "aten::_fused_adam", "aten::_foreach")):
            cat = "optimizer (AdamW)"
        elif name.startswith("aten::") or name.startswith("autograd::"):
            cat = "element-wise: " + name.split("::", 1)[1]
        else:
            continue  # record_function ranges: their ops are counted by name
        cats[cat] = cats.get(cat, 0.0) + e.self_cpu_time_total / 1e6
    t0 = time.perf_counter()
    for _ in range(3):
        opt.step()  # AdamW alone, on the last step's gradients
    print(json.dumps({"profile": cats, "wall_s": wall,
                      "optimizer_s": (time.perf_counter() - t0) / 3}))
    sys.exit(0)
times = []
for _ in range(s["steps"]):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": statistics.median(times), "step_s_min": min(times),
                  "flops_per_step": counter.get_total_flops(),
                  "params": sum(p.numel() for p in model.parameters()),
                  "torch": torch.__version__}))
'''


def peer_python(given: str | None) -> Path:
    """The peer environment's interpreter: `given`, or ~/.cache/vdit/peer-env (made once)."""
    if given:
        return Path(given)
    python = PEER_ENV / "bin" / "python"
    if not python.exists():
        print(f"building the peer environment in {PEER_ENV} ({', '.join(PEER_PACKAGES)})",
              file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def peer_shape(config: str | None, overrides: list[str], steps: int, warmup: int) -> dict:
    """vdit's config as the peer's shape. The text encoder's width feeds cross-attention, so
    it is the peer's text_dim; the peer gets embeddings of that width as input."""
    sys.path.insert(0, str(ROOT))
    from vdit.config import load_from_command_line

    cfg = load_from_command_line(config, overrides)
    t, h, w, c = cfg.latent_shape()
    wan = cfg.model.kind == "wan"
    return {"depth": cfg.model.depth, "width": cfg.model.width, "heads": cfg.model.heads,
            "mlp": cfg.model.hidden_dim(), "patch": list(cfg.model.patch), "kind": cfg.model.kind,
            "freq_dim": cfg.model.freq_dim if wan else 256,
            "cross_attn_norm": cfg.model.cross_attn_norm if wan else True,
            "channels": c, "latent": [t, h, w], "text_length": cfg.text.max_length,
            "text_width": cfg.text.width, "batch": cfg.train.batch_size,
            "tokens_per_step": cfg.train.batch_size * cfg.num_tokens(),
            "dtype": cfg.model.dtype, "threads": os.cpu_count() or 1, "steps": steps,
            "warmup": warmup}


def sdpa_flops(shape: dict) -> float:
    """The peer's attention matmuls per train step, counted as vdit counts them (3 x forward):
    torch's FlopCounterMode counts 0 for `scaled_dot_product_attention` on CPU (checked with
    torch 2.13: a [1, 2, 64, 32] call forward and backward counts 0 FLOPs)."""
    tokens = shape["tokens_per_step"] // shape["batch"]
    per_layer = 4 * shape["batch"] * tokens * (tokens + shape["text_length"]) * shape["width"]
    return 3.0 * per_layer * shape["depth"]


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in:\n{text[-2000:]}")


def run_vdit(config: str | None, overrides: list[str], steps: int, warmup: int) -> dict:
    vdit = Path(sys.executable).with_name("vdit")
    cmd = [str(vdit), "bench", *([config] if config else []), *overrides, "--json",
           "--steps", str(steps), "--warmup", str(warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return last_json_line(out.stdout)


def run_peer(python: Path, shape: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PEER_STEP)
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([str(python), f.name, json.dumps(shape)], capture_output=True,
                             text=True, check=True, env=env)
    finally:
        os.unlink(f.name)
    return last_json_line(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=None, help="vdit config (default: the demo)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--peer-python", default=None, help="an interpreter with torch and "
                        "diffusers (default: build ~/.cache/vdit/peer-env once)")
    parser.add_argument("--profile", action="store_true", help="after the rounds, where each "
                        "side's step time goes: tools/profile_step.py and torch.profiler")
    args = parser.parse_args()
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")
    shape = peer_shape(args.config, args.overrides, args.steps, args.warmup)
    if shape["dtype"] != "float32":
        parser.error(f"model.dtype is {shape['dtype']}; the peer comparison is float32")
    python = peer_python(args.peer_python)
    tokens = shape["tokens_per_step"]
    print(f"vdit model.kind {shape['kind']} against diffusers' WanTransformer3DModel")
    print(f"shape: L{shape['depth']} d{shape['width']} heads {shape['heads']} MLP {shape['mlp']} "
          f"patch {shape['patch']} latent {shape['latent']}x{shape['channels']} text "
          f"{shape['text_length']}x{shape['text_width']} batch {shape['batch']} "
          f"({tokens} tokens/step), {shape['threads']} threads")
    ratios, peer_wins = [], []
    for r in range(1, args.rounds + 1):
        mine = run_vdit(args.config, args.overrides, args.steps, args.warmup)
        peer = run_peer(python, shape)
        ratio = peer["step_s"] / mine["step_s"]  # vdit tokens/s over the peer's
        ratios.append(ratio)
        if ratio < 1:
            peer_wins.append(r)
        if r == 1:
            peer_flops = peer["flops_per_step"] + sdpa_flops(shape)
            print(f"FLOPs/step: vdit {mine['flops_per_step'] / 1e9:.2f} G analytic "
                  f"({mine['xla_flops_per_step'] / 1e9:.2f} G by XLA), peer "
                  f"{peer_flops / 1e9:.2f} G = {peer['flops_per_step'] / 1e9:.2f} G by torch's "
                  f"FlopCounterMode + {sdpa_flops(shape) / 1e9:.2f} G of CPU attention it does "
                  f"not count (ratio {peer_flops / mine['flops_per_step']:.3f}); params vdit "
                  f"{mine['params'] / 1e6:.2f} M, peer {peer['params'] / 1e6:.2f} M "
                  f"(torch {peer['torch']})")
        print(f"round {r}: vdit {mine['step_s']:.3f} s ({tokens / mine['step_s']:.0f} tok/s), "
              f"peer {peer['step_s']:.3f} s ({tokens / peer['step_s']:.0f} tok/s): "
              f"vdit/peer speed {ratio:.2f}x")
    print(f"median vdit/peer speed {statistics.median(ratios):.2f}x over {len(ratios)} rounds; "
          f"rounds the peer won: {peer_wins or 'none'}")
    if args.profile:
        profile_both(args.config, args.overrides, python, shape)


def profile_both(config: str | None, overrides: list[str], python: Path, shape: dict) -> None:
    """Each side's step by op category: vdit's from its XLA:CPU trace, the peer's as the self
    time of each aten op (torch.profiler) plus its AdamW step timed alone."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "tools" / "profile_step.py"),
           *([config] if config else []), *overrides, "--top", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    print("\nvdit, one traced step (tools/profile_step.py):\n" + out.strip())
    peer = run_peer(python, {**shape, "profile": True})
    total = sum(peer["profile"].values())
    print(f"\npeer, one profiled step: {peer['wall_s']:.2f} s wall, {total:.2f} s of op self "
          f"time; AdamW step alone {1e3 * peer['optimizer_s']:.1f} ms (inside element-wise)")
    for name, seconds in sorted(peer["profile"].items(), key=lambda kv: -kv[1]):
        if seconds >= 0.001 * total:
            print(f"  {1e3 * seconds:8.1f} ms  {100 * seconds / total:5.1f} %  {name}")


if __name__ == "__main__":
    main()
