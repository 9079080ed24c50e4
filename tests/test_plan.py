"""`vdit plan`: the train step compiled ahead of time for TPU slices described by libtpu (nothing
runs on them), the GPU estimate, target names, and the not-fitting verdict with its fixes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import tiny_dict

from vdit.config import ConfigError, from_dict
from vdit.parallel.topologies import parse_target


def _tiny(**sections):
    d = tiny_dict("runs/plan")
    d["mesh"] = {"data": 1, "fsdp": -1}
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return from_dict(d)


@pytest.mark.parametrize("name,chips,hosts,topology,accel", [
    ("v5p-8", 4, 1, "v5p:2x2x1", "v5p-8"),
    ("v5p-64", 32, 8, "v5p:2x4x4", "v5p-64"),
    ("v4-128", 64, 16, "v4:4x4x4", "v4-128"),
    ("v5e-256", 256, 64, "v5e:16x16", "v5litepod-256"),
    ("v5litepod-8", 8, 1, "v5e:2x4", "v5litepod-8"),
    ("v6e-256", 256, 64, "v6e:16x16", "v6e-256"),
    ("2xv5p-64", 64, 16, "v5p:2x4x4", "v5p-64"),
])
def test_tpu_names_count_cores_or_chips(name, chips, hosts, topology, accel):
    """v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips; Kx is K slices."""
    t = parse_target(name)
    assert (t.chips, t.hosts, t.topology, t.accelerator_type) == (chips, hosts, topology, accel)


def test_gpu_node_names():
    t = parse_target("2x8xH100")
    assert (t.platform, t.chips, t.hosts, t.accelerator_type) == ("gpu", 16, 2, "8xH100")


@pytest.mark.parametrize("bad", ["v5p-6", "v7-8", "tpu", "v5e-512", "9xH100", "v4-7"])
def test_bad_topology_names_list_the_allowed_ones(bad):
    with pytest.raises(ConfigError) as e:
        parse_target(bad)
    assert bad in str(e.value) and "v5p-64" in str(e.value) and "8xH100" in str(e.value)


def test_compile_oom_reads_both_compiler_messages():
    from vdit.train.plan import compile_oom

    new = RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, "
                       "the total memory required for HLO temporaries (42.88G) exceeds "
                       "available HBM (15.75G). HLO module: jit_train_step.")
    old = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 98.50G "
                       "of 95.74G hbm. Exceeded hbm capacity by 2.76G.")
    assert compile_oom(new) == (42.88 * 2**30, 15.75 * 2**30, "temporaries")
    assert compile_oom(old) == (98.5 * 2**30, 95.74 * 2**30, "total")
    assert compile_oom(RuntimeError("INTERNAL: something else")) is None


@pytest.fixture(scope="module")
def v5p8_plan():
    pytest.importorskip("libtpu")
    from vdit.train.plan import plan

    return plan(_tiny(), "v5p-8")


def test_tpu_plan_bytes_agree_with_memory_analysis(v5p8_plan):
    """The state's per-chip bytes, counted from its sharded shapes in the compiled tile
    layouts, are exactly the compiled program's argument bytes; params are sharded 4 ways."""
    from vdit.train.plan_report import format_plan

    r = v5p8_plan
    assert r["compiled"] and r["source"].startswith("TPU compiler")
    assert r["args_agree"] and r["tiled_args"] == r["compiled_args"]
    counted = r["param_bytes"] + r["opt_bytes"] + r["other_state_bytes"] + r["batch_bytes"]
    assert counted <= r["compiled_args"]  # TPU tiles pad thin shards (this tiny model: 3x)
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "context": 1}
    assert r["opt_bytes"] == pytest.approx(r["param_bytes"], rel=0.01)  # mu + nu = params + EMA
    assert r["fits"] and r["fixes"] == []
    assert r["xla_flops"] > 0 and r["flops_per_step"] > 0 and r["step_s"] > 0
    table = format_plan(r)
    assert "AGREE" in table and "DISAGREE" not in table and "FITS" in table


def test_adam_moments_shard_like_their_params():
    """mu and nu take their params' shardings (set explicitly, in `create_state` too: zeros
    depend on nothing sharded, so propagation alone would replicate them on every chip)."""
    import jax
    import optax

    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.parallel.rules import get_rules
    from vdit.train.plan import abstract_state
    from vdit.train.state import make_optimizer

    cfg = _tiny()
    mesh = jax.sharding.AbstractMesh((1, 4, 1, 1), ("data", "fsdp", "tensor", "context"))
    tx = make_optimizer(cfg.train)
    state = abstract_state(TextToVideo(cfg), tx, mesh, get_rules("default"))
    adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState))
    params = [p.sharding.spec for p in jax.tree.leaves(state.params)]
    assert any("fsdp" in str(spec) for spec in params)
    for moment in (adam.mu, adam.nu):
        assert [m.sharding.spec for m in jax.tree.leaves(moment)] == params


def test_oversized_tpu_plan_is_flagged_with_fixes():
    """A 3 B-parameter model data-parallel on a v5e-4: the state alone (16 bytes a parameter on
    every chip) is over the 16 GB of HBM; the TPU compiler refuses, the plan says so and
    suggests sharding the parameters."""
    pytest.importorskip("libtpu")
    from vdit.train.plan import plan
    from vdit.train.plan_report import format_plan

    cfg = _tiny(model={"width": 2048, "depth": 40, "heads": 16}, mesh={"data": -1, "fsdp": 1})
    r = plan(cfg, "v5e-4")
    assert not r["fits"]
    assert r["param_bytes"] + r["opt_bytes"] > r["hbm_bytes"]
    assert any("mesh.fsdp=-1" in fix for fix in r["fixes"])
    table = format_plan(r)
    assert "DOES NOT FIT" in table and "mesh.data=1 mesh.fsdp=-1" in table


def test_gpu_plan_is_a_labelled_estimate():
    """No GPU compiler here: params/optimizer bytes from the sharded abstract state, the rest
    estimated, and the output says so."""
    from vdit.train.plan import plan
    from vdit.train.plan_report import format_plan

    r = plan(_tiny(train={"batch_size": 8}), "8xH100")
    one = plan(_tiny(mesh={"data": -1, "fsdp": 1}, train={"batch_size": 8}), "8xH100")
    assert r["source"].startswith("analytic estimate") and r["compiled_args"] is None
    assert r["mesh"]["fsdp"] == 8
    # fsdp shards params, EMA and moments 8 ways (up to dims that do not split evenly).
    assert one["param_bytes"] / 8 <= r["param_bytes"] < one["param_bytes"] / 2
    assert r["fits"] and "ESTIMATE" in format_plan(r)
    huge = plan(_tiny(train={"batch_size": 8192}, data={"world": {
        "frames": 16, "height": 256, "width": 256}}), "8xH100")
    assert not huge["fits"] and any("microbatches" in f or "batch_size" in f
                                    for f in huge["fixes"])


def _rows(table: str) -> dict[str, float]:
    """{row label: bytes} of the per-chip rows `format_plan` prints ("  label   1.23 MiB")."""
    scale = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    rows = {}
    for m in re.finditer(r"^  (\S.*?)\s+(-?[\d.]+) (KiB|MiB|GiB)", table, re.MULTILINE):
        rows[m.group(1).strip()] = float(m.group(2)) * scale[m.group(3)]
    return rows


def test_lora_plan_prints_the_split_of_the_trainers_lora_state(capsys):
    """A LoRA plan (compile-free: a GPU target) holds the trainer's LoRA state: the frozen DiT
    in bf16 (2 bytes a DiT param), the adapters and their EMA in f32 (8 bytes an adapter
    param), AdamW's two f32 moments of the adapters only; those and the rest add up to the
    state's bytes, which are those of the trainer's own abstract state (`restore_target`). The
    table prints every part, and its rows add up too."""
    import flax.linen as nn
    import jax

    from vdit.diffusion.lora_system import make_system
    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.models import lora
    from vdit.train.plan import per_chip_bytes, plan
    from vdit.train.plan_report import format_plan
    from vdit.train.trainer import restore_target

    cfg = _tiny(train={"batch_size": 2, "lora": {"rank": 4}})
    r = plan(cfg, "1xH100")
    dit = nn.unbox(jax.eval_shape(TextToVideo(cfg).init, jax.random.key(0)))["params"]
    n_dit = sum(math.prod(x.shape) for x in jax.tree.leaves(dit))
    targets = lora.find_targets(dit, lora.DEFAULT_TARGETS["dit"])
    n_adapters = sum((t.shape[0] if t.stacked else 1) * 4 * sum(t.dims()) for t in targets)
    assert r["params"] == n_dit and r["trainable_params"] == n_adapters
    assert r["lora"] == {"rank": 4, "targets": len(targets)}
    assert r["frozen_base_bytes"] == 2 * n_dit
    assert r["param_bytes"] == 8 * n_adapters
    assert 8 * n_adapters <= r["opt_bytes"] <= 8 * n_adapters + 64  # + Adam's step counters
    parts = ("frozen_base_bytes", "frozen_encoder_bytes", "param_bytes", "opt_bytes",
             "other_state_bytes")
    assert sum(r[k] for k in parts) == r["state_bytes"]
    assert r["state_bytes"] == per_chip_bytes(restore_target(cfg, make_system(cfg)))
    assert r["remat"] == "none" and "every activation" in r["remat_keeps"]
    assert r["offload"].startswith("none")

    rows = _rows(format_plan(r))
    split = ("frozen DiT base (bf16)", "frozen VAE / text enc", "adapters + EMA (f32)",
             "optimizer state", "other state + batch")
    assert set(split) <= set(rows) and "params + EMA (f32)" not in rows
    assert rows["frozen DiT base (bf16)"] == pytest.approx(2 * n_dit, rel=0.01)
    assert rows["adapters + EMA (f32)"] == pytest.approx(8 * n_adapters, rel=0.01)
    assert sum(rows[k] for k in split) == pytest.approx(rows["= state + batch"], rel=0.01)
    assert rows["= state + batch"] == pytest.approx(r["state_bytes"] + r["batch_bytes"],
                                                    rel=0.01)

    full = plan(_tiny(train={"batch_size": 2}), "1xH100")  # the same DiT, every weight trained
    assert full["frozen_base_bytes"] == 0 and full["param_bytes"] == 8 * n_dit
    assert "params + EMA (f32)" in _rows(format_plan(full))


def test_gpu_plan_says_how_many_nodes_a_context_group_spans():
    """Context groups of 16 GPUs on two 8-GPU nodes cross the nodes; with mesh.dcn_data=2 each
    node holds its own (compile-free: GPU targets)."""
    from vdit.train.plan import plan
    from vdit.train.plan_report import format_plan

    across = plan(_tiny(mesh={"context": 16, "fsdp": 1}, train={"batch_size": 1}), "2x8xH100")
    inside = plan(_tiny(mesh={"context": 8, "fsdp": 1, "dcn_data": 2},
                        train={"batch_size": 2}), "2x8xH100")
    assert across["context_hosts"] == 2 and inside["context_hosts"] == 1
    assert "each context group spans 2 hosts" in format_plan(across)
    assert plan(_tiny(), "1xH100")["context_hosts"] is None


def test_cli_plan_json_and_exit_code(tmp_path, capsys):
    """`vdit plan --json` prints one JSON line; exit 0 when it fits, 1 when it does not."""
    import yaml

    from vdit.cli import main

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path / "run")))
    assert main(["plan", str(path), "mesh.fsdp=-1", "mesh.data=1", "train.batch_size=8",
                 "--topology", "8xH200", "--json"]) == 0
    line = capsys.readouterr().out.strip()
    assert json.loads(line)["target"] == "8xH200"
    assert main(["plan", str(path), "train.batch_size=65536", "data.world.height=256",
                 "data.world.width=256", "--topology", "8xH200"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", str(path), "--topology", "v9-8"]) == 2
    assert "allowed" in capsys.readouterr().err


def test_a_mesh_too_wide_for_the_model_is_a_clear_error():
    """fsdp over 64 GPUs cannot split a width-32 model: a ConfigError naming the fix."""
    from vdit.train.plan import plan

    with pytest.raises(ConfigError, match="smaller fsdp"):
        plan(_tiny(train={"batch_size": 64}), "8x8xH100")


def _tiny_wan(**sections):
    """A tiny model.kind wan on precomputed captions read from shards (never opened: a plan
    only needs their shapes)."""
    wan = {"model": {"kind": "wan", "width": 32, "heads": 2, "ffn_dim": 64, "freq_dim": 16,
                     "dtype": "bfloat16", "remat": "dots"},
           "text": {"encoder": "precomputed", "width": 24, "max_length": 8},
           "data": {"source": "shards", "shards": "shards/absent"}}
    for section, values in sections.items():
        wan.setdefault(section, {}).update(values)
    return _tiny(**wan)


def test_wan_tpu_plan_compiles_with_caption_embeddings():
    """model.kind wan plans like the own DiT: the batch carries the stored caption embeddings
    and their mask, the state the empty caption; inputs the step never reads (the caption ids)
    are dropped from the compiled program and from the tiled count alike, so the bytes still
    agree; FLOPs are Wan's."""
    pytest.importorskip("libtpu")
    from vdit.scaling.flops import wan_forward_flops
    from vdit.train.plan import plan

    cfg = _tiny_wan()
    r = plan(cfg, "v5p-8")
    assert r["compiled"] and r["args_agree"] and r["fits"]
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "context": 1}
    assert r["flops_per_step"] == 3 * cfg.train.batch_size * wan_forward_flops(cfg).forward
    # One clip per chip: its bf16 latent, int32 ids, bf16 embeddings [8, 24], int32 mask.
    latent = math.prod(cfg.latent_shape()) * 2
    assert r["batch_bytes"] == latent + 8 * 4 + 8 * 24 * 2 + 8 * 4


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("config,overrides,topology,message", [
    # Wan 2.1 1.3B: 12 heads, FFN 8960 (= 2^8 x 35): tensor 2 and 4 only.
    ("bench_gpu_wan.yaml", ["mesh.tensor=8"], "8xH100",
     "mesh.tensor: 8 does not divide model.heads=12"),
    ("bench_gpu_wan.yaml", ["mesh.tensor=3"], "8xH100",
     "mesh.tensor: 3 does not divide the MLP hidden width 8960"),
    ("bench_gpu_wan.yaml", ["mesh.context=8", "model.context_parallel=ulysses"], "8xH100",
     "ulysses splits the 12 heads over mesh.context 8"),
    ("bench_gpu_wan.yaml", ["mesh.context=4", "mesh.tensor=2", "model.context_parallel=ulysses"],
     "8xH100", "ulysses splits the 12 heads over mesh.context 4 x mesh.tensor 2"),
    # Wan 2.1 14B: 40 heads, FFN 13824 (= 2^9 x 27): tensor 2, 4 and 8 only.
    ("plan_wan14b.yaml", ["mesh.tensor=16"], "v5p-128",
     "mesh.tensor: 16 does not divide model.heads=40"),
    ("plan_wan14b.yaml", ["mesh.context=16", "model.context_parallel=ulysses"], "v5p-64",
     "ulysses splits the 40 heads over mesh.context 16"),
])
def test_wan_layouts_the_heads_rule_out_fail_before_compiling(capsys, config, overrides,
                                                               topology, message):
    """Layouts that do not split Wan's heads (1.3B: 12, 14B: 40) are refused by the config
    check, before `vdit plan` builds or compiles anything: exit 2 and one line naming the key."""
    from vdit.cli import main

    assert main(["plan", str(EXPERIMENTS / config), *overrides, "--topology", topology]) == 2
    err = capsys.readouterr().err
    assert "vdit plan: error:" in err and message in err and "Traceback" not in err


def test_wan_layouts_the_config_cannot_see_fail_before_compiling():
    """What only the resolved mesh shows: 32,760 tokens (480p) do not split 16 ways (ring or
    not), and context -1 resolved to 16 chips is no Ulysses split of 40 heads."""
    from vdit.config import load_config
    from vdit.train.plan import plan

    cfg = load_config(EXPERIMENTS / "plan_wan14b.yaml", ["mesh.context=16", "train.batch_size=2"])
    with pytest.raises(ConfigError, match=r"32760 tokens per clip do not split 16 ways"):
        plan(cfg, "v5p-64")
    cfg = load_config(EXPERIMENTS / "plan_wan14b.yaml", [
        "mesh.fsdp=2", "mesh.context=-1", "model.context_parallel=ulysses",
        "data.world.height=720", "data.world.width=1280", "train.batch_size=2"])
    with pytest.raises(ConfigError, match=r"ulysses splits the 40 heads over mesh\.context 16"):
        plan(cfg, "v5p-64")
