"""Seconds per sampling step of a diffusers WanPipeline folder: vdit (`vdit sample --pipeline`'s
denoising loop) against diffusers' own `WanPipeline`, alternating, one session.

Both sides load the same folder and run the same prompt, negative prompt, size and number of
UniPC steps with CFG; a step is two transformer forwards plus the scheduler update. Each side
times its whole denoising loop (text encoding and VAE decode excluded, compile excluded on
vdit's side by a warm-up call) and reports seconds per step; rounds alternate so drift of a
shared machine hits both, and the rounds diffusers wins are listed. FLOPs per step are printed
for both: vdit's analytic count (vdit.scaling.flops; XLA's cost analysis counts a scan's body
once) and torch's FlopCounterMode of diffusers' two transformer calls, plus the attention
matmuls it does not count on CPU. The ratio uses diffusers' time inside the transformer only
(its scheduler and text encoding left out): conservative for vdit.

    python tools/bench_pipeline.py --make runs/bench/wan-small      # a random small pipeline
    python tools/bench_pipeline.py runs/bench/wan-small --rounds 3 --steps 4 \
        --frames 9 --height 64 --width 96

`--make` writes the folder with the peer environment (torch + diffusers, as tools/bench_peer.py
builds it; `--peer-python` names an existing one): UMT5 (d_model 256), the Wan 2.1 VAE
architecture at a small width, and a transformer of `--width/--heads/--depth`.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peer import last_json_line, peer_python

MAKE = r'''
import json, sys, torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
s = json.loads(sys.argv[1]); torch.manual_seed(0)
tok = Tokenizer(models.Unigram()); tok.pre_tokenizer = pre_tokenizers.Metaspace()
tok.train_from_iterator(["a red ball bounces on a grey floor", "a cat walks on a wall"] * 50,
    trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"],
                            unk_token="<unk>"))
tokenizer = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>", extra_ids=0)
text = UMT5EncoderModel(UMT5Config(vocab_size=200, d_model=256, d_kv=32, num_heads=8, d_ff=512,
                                   num_layers=2, feed_forward_proj="gated-gelu",
                                   pad_token_id=0, eos_token_id=1))
vae = AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                       temperal_downsample=[False, True, True])
dit = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=s["heads"],
                            attention_head_dim=s["width"] // s["heads"], in_channels=16,
                            out_channels=16, text_dim=256, freq_dim=256,
                            ffn_dim=4 * s["width"], num_layers=s["depth"])
sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                num_train_timesteps=1000, flow_shift=3.0)
WanPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae, transformer=dit,
            scheduler=sched).save_pretrained(s["out"], safe_serialization=True)
print(json.dumps({"params": sum(p.numel() for p in dit.parameters())}))
'''

PEER = r'''
import json, statistics, sys, time, torch
from diffusers import WanPipeline
from torch.utils.flop_counter import FlopCounterMode
s = json.loads(sys.argv[1]); torch.set_num_threads(s["threads"])
pipe = WanPipeline.from_pretrained(s["folder"], torch_dtype=torch.float32)
z = pipe.vae.config.z_dim
latents = torch.randn(1, z, 1 + (s["frames"] - 1) // 4, s["height"] // 8, s["width"] // 8,
                      generator=torch.Generator().manual_seed(0))
kw = dict(prompt=s["prompt"], negative_prompt=s["negative"], height=s["height"],
          width=s["width"], num_frames=s["frames"], num_inference_steps=s["steps"],
          guidance_scale=5.0, max_sequence_length=s["text_length"], output_type="latent")
calls = []
orig = pipe.transformer.forward
def timed(*a, **k):
    t0 = time.perf_counter(); out = orig(*a, **k); calls.append(time.perf_counter() - t0)
    return out
pipe.transformer.forward = timed
pipe(latents=latents.clone(), **kw)  # warm-up
calls.clear(); t0 = time.perf_counter()
with torch.no_grad():
    pipe(latents=latents.clone(), **kw)
total = time.perf_counter() - t0
counter = FlopCounterMode(display=False)
x = latents.clone(); emb = torch.zeros(1, s["text_length"], pipe.transformer.config.text_dim)
with torch.no_grad(), counter:
    orig(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=emb)
print(json.dumps({"loop_s_per_step": sum(calls) / s["steps"], "call_s": statistics.median(calls),
                  "pipeline_s_per_step": total / s["steps"],
                  "flops_per_step": 2 * counter.get_total_flops()}))
'''

VDIT = r'''
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from functools import partial
from vdit.io.wan_pipeline import resolve_pipeline
from vdit.diffusion.schedulers import schedule_from_config
from vdit.sample import pipeline as wp
s = json.loads(sys.argv[1])
spec = resolve_pipeline(s["folder"])
settings = wp.PipelineSettings(frames=s["frames"], height=s["height"], width=s["width"],
                               steps=s["steps"], text_length=s["text_length"])
loaded = wp.load_pipeline(spec, settings)
schedule = schedule_from_config(spec.scheduler, s["steps"])
text = jnp.asarray(wp.embed_prompts(loaded, [s["prompt"]], "float32"))
neg = jnp.asarray(wp.embed_prompts(loaded, [s["negative"]], "float32"))
noise = jax.random.normal(jax.random.key(0), (1, *wp.latent_shape(spec, settings)))
run = jax.jit(partial(wp.denoise, [m for m, _ in loaded.experts], schedule=schedule,
                      guidance=5.0, guidance_2=5.0, boundary=None))
compiled = run.lower(loaded.params(), noise, text, neg).compile()
from vdit.config import AutoencoderConfig, Config, DataConfig, TextConfig
from vdit.config.world import WorldConfig
from vdit.scaling.flops import forward_breakdown
t = spec.transformer
cfg = Config(model=t.model, text=TextConfig(encoder="precomputed", width=t.text_dim,
                                            max_length=s["text_length"]),
             autoencoder=AutoencoderConfig(kind="wan", checkpoint=str(spec.vae),
                                           factors=(4, 8, 8), latent_channels=t.in_channels),
             data=DataConfig(source="shards", shards="-", world=WorldConfig(
                 frames=s["frames"], height=s["height"], width=s["width"])))
flops = 2 * forward_breakdown(cfg).forward * s["steps"]  # CFG: two forwards per step
attention = 2 * (forward_breakdown(cfg).self_attention + forward_breakdown(cfg).cross_attention
                 - t.model.depth * 2.0 * s["text_length"] * t.model.width * 2 * t.model.width)
compiled(loaded.params(), noise, text, neg).block_until_ready()  # warm-up
t0 = time.perf_counter()
compiled(loaded.params(), noise, text, neg).block_until_ready()
total = time.perf_counter() - t0
print(json.dumps({"loop_s_per_step": total / s["steps"], "flops_per_step": flops / s["steps"],
                  "attention_flops_per_step": attention}))
'''


def run_script(python: str | Path, script: str, payload: dict, env: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run([str(python), f.name, json.dumps(payload)], capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    finally:
        os.unlink(f.name)
    if out.returncode:
        raise RuntimeError(f"{python} failed:\n{out.stderr[-3000:]}")
    return last_json_line(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", help="a WanPipeline folder")
    parser.add_argument("--make", metavar="DIR", help="write a random small pipeline to DIR")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width-px", type=int, default=96, dest="width_px")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peer-python", default=None)
    args = parser.parse_args()
    python = peer_python(args.peer_python)
    if args.make:
        info = run_script(python, MAKE, {"out": args.make, "width": args.width,
                                         "heads": args.heads, "depth": args.depth})
        print(f"wrote {args.make}: transformer {info['params'] / 1e6:.2f} M params")
        return
    if not args.folder:
        parser.error("give a pipeline folder, or --make DIR")
    shape = {"folder": str(Path(args.folder).resolve()), "frames": args.frames,
             "height": args.height, "width": args.width_px, "steps": args.steps,
             "text_length": args.text_length, "prompt": "a red ball bounces on a grey floor",
             "negative": "a cat", "threads": os.cpu_count() or 1}
    print(f"{args.folder}: {args.frames} x {args.height} x {args.width_px}, {args.steps} UniPC "
          f"steps, CFG, text {args.text_length} tokens, {shape['threads']} threads")
    ratios, peer_wins = [], []
    for r in range(1, args.rounds + 1):
        mine = run_script(sys.executable, VDIT, shape, {"JAX_PLATFORMS": "cpu"})
        peer = run_script(python, PEER, shape)
        ratio = peer["loop_s_per_step"] / mine["loop_s_per_step"]
        ratios.append(ratio)
        peer_wins += [r] * (ratio < 1)
        if r == 1:
            attn = mine["attention_flops_per_step"]
            print(f"FLOPs/step: vdit {mine['flops_per_step'] / 1e9:.3f} G (analytic, "
                  f"vdit.scaling.flops; two forwards), diffusers "
                  f"{(peer['flops_per_step'] + attn) / 1e9:.3f} G = "
                  f"{peer['flops_per_step'] / 1e9:.3f} G by FlopCounterMode + {attn / 1e9:.3f} "
                  "G of attention matmuls it does not count on CPU")
        print(f"round {r}: vdit {mine['loop_s_per_step']:.3f} s/step, diffusers "
              f"{peer['loop_s_per_step']:.3f} s/step in the transformer "
              f"({peer['pipeline_s_per_step']:.3f} s/step whole loop): vdit {ratio:.2f}x")
    print(f"median vdit/diffusers speed {statistics.median(ratios):.2f}x over {len(ratios)} "
          f"rounds; rounds diffusers won: {peer_wins or 'none'}")


if __name__ == "__main__":
    main()
