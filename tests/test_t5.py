"""The T5-family text encoder against transformers' outputs (tests/fixtures/t5, written by
tools/fixtures/t5.py), and the loader's refusals of malformed folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vdit.io.hf_folder import CheckpointFormatError
from vdit.io.hf_t5 import T5Tokenizer, checkpoint_sha256, load_t5
from vdit.models.t5 import T5Spec, param_axes
from vdit.parallel.rules import RULE_TABLES

FIXTURES = Path(__file__).parent / "fixtures" / "t5"
MODELS = ("t5_v11", "umt5", "t5_relu")
CAPTIONS = json.loads((FIXTURES / "captions.json").read_text())
MAX_LENGTH = CAPTIONS["max_length"]
F32_TOL = 1e-5
# bf16 params and compute against the f32 reference, outputs of magnitude up to ~5: measured
# max abs error 0.124 (t5_v11), 0.118 (umt5), 0.080 (t5_relu); the bound leaves > 2x margin.
BF16_TOL = 0.3


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    reference = load_file(str(FIXTURES / request.param / "reference.safetensors"))
    return request.param, load_t5(FIXTURES / request.param), reference


def test_tokens_match_transformers(case):
    name, encoder, reference = case
    ids, mask, truncated = encoder.tokenize(CAPTIONS["captions"], MAX_LENGTH)
    assert ids.dtype == np.int32 and ids.shape == (len(CAPTIONS["captions"]), MAX_LENGTH)
    np.testing.assert_array_equal(ids, reference["input_ids"], err_msg=name)
    np.testing.assert_array_equal(mask, reference["attention_mask"], err_msg=name)
    assert truncated >= 1  # the long caption at least


def test_hidden_state_matches_transformers_f32(case):
    name, encoder, reference = case
    hidden = encoder.encode(reference["input_ids"], reference["attention_mask"])
    assert hidden.shape == (*reference["input_ids"].shape, encoder.spec.d_model)
    assert hidden.dtype == jnp.float32
    error = float(np.abs(np.asarray(hidden) - reference["last_hidden_state"]).max())
    assert error <= F32_TOL, f"{name}: max abs error {error:.2e}"


def test_hidden_state_bf16_within_bound(case):
    name, _, reference = case
    encoder = load_t5(FIXTURES / name, jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in _leaves(encoder.params))
    hidden = encoder.encode(reference["input_ids"], reference["attention_mask"])
    assert hidden.dtype == jnp.bfloat16
    error = float(np.abs(np.asarray(hidden, np.float32) - reference["last_hidden_state"]).max())
    assert error <= BF16_TOL, f"{name}: bf16 max abs error {error:.3f}"


def _leaves(tree):
    return [x for v in tree.values() for x in (_leaves(v) if isinstance(v, dict) else [v])]


@pytest.mark.parametrize("name", ["t5_v11", "t5_relu"])  # tokenizers and sentencepiece
def test_truncation_keeps_eos_and_counts(name):
    tokenizer = T5Tokenizer(FIXTURES / name)
    full, full_mask, none_cut = tokenizer.tokenize(CAPTIONS["captions"], 200)
    assert none_cut == 0
    lengths = full_mask.sum(1)
    ids, mask, truncated = tokenizer.tokenize(CAPTIONS["captions"], MAX_LENGTH)
    assert truncated == int((lengths > MAX_LENGTH).sum()) >= 1
    for row, n in enumerate(lengths):
        if n > MAX_LENGTH:  # the first max_length - 1 tokens, then </s>, as HF's truncation=True
            np.testing.assert_array_equal(ids[row, :-1], full[row, : MAX_LENGTH - 1])
            assert ids[row, -1] == tokenizer.eos_id and mask[row].all()
        else:
            np.testing.assert_array_equal(ids[row], full[row, :MAX_LENGTH])
    empty_ids, empty_mask, _ = tokenizer.tokenize([""], 4)
    assert empty_ids.tolist() == [[tokenizer.eos_id] + [tokenizer.pad_id] * 3]
    assert empty_mask.tolist() == [[1, 0, 0, 0]]


# --- refusals ---------------------------------------------------------------------------------

def _copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _refused(folder: Path, *needles: str) -> None:
    with pytest.raises(CheckpointFormatError) as info:
        load_t5(folder)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in: {info.value}"


def test_refuses_missing_config(tmp_path):
    folder = _copy(tmp_path, "t5_relu")
    (folder / "config.json").unlink()
    _refused(folder, "config.json")


def test_refuses_missing_weights_and_shards(tmp_path):
    folder = _copy(tmp_path, "t5_relu")
    (folder / "model.safetensors").unlink()
    _refused(folder, "model.safetensors")
    folder = _copy(tmp_path, "umt5")
    (folder / "model-00002-of-00003.safetensors").unlink()
    _refused(folder, "model-00002-of-00003.safetensors", "model.safetensors.index.json")


def test_refuses_missing_tokenizer(tmp_path):
    folder = _copy(tmp_path, "t5_relu")
    (folder / "spiece.model").unlink()
    _refused(folder, "tokenizer.json", "spiece.model")


def test_refuses_other_architecture(tmp_path):
    folder = _copy(tmp_path, "t5_relu")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    _refused(folder, "config.json", "model_type", "bert")
    (folder / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-tanh"}))
    _refused(folder, "config.json", "feed_forward_proj")
    # A UMT5 config over T5 weights: layer 1's relative bias is missing.
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "umt5"}))
    _refused(folder, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")


def _rewrite(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_refuses_wrong_shape_and_missing_tensor(tmp_path):
    folder = _copy(tmp_path, "t5_relu")
    name = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    _rewrite(folder, lambda t: t.update({name: t[name][:, :-1].copy()}))
    _refused(folder, "model.safetensors", name, "expected shape (32, 48)", "(32, 47)")
    folder = _copy(tmp_path / "b", "t5_relu")
    name = "encoder.block.0.layer.0.SelfAttention.k.weight"
    _rewrite(folder, lambda t: t.pop(name))
    _refused(folder, "model.safetensors", f"missing tensor {name}")
    folder = _copy(tmp_path / "c", "t5_relu")
    _rewrite(folder, lambda t: t.pop("shared.weight"))
    _refused(folder, "model.safetensors", "encoder.embed_tokens.weight", "shared.weight")


def test_explicit_encoder_embedding_and_sibling_tokenizer(tmp_path):
    """`encoder.embed_tokens.weight` instead of the tied `shared.weight`, and the diffusers
    layout (text_encoder/ next to tokenizer/) load to the same encoder."""
    folder = _copy(tmp_path, "t5_relu").rename(tmp_path / "text_encoder")
    (tmp_path / "tokenizer").mkdir()
    (folder / "spiece.model").rename(tmp_path / "tokenizer" / "spiece.model")
    _rewrite(folder, lambda t: t.update({"encoder.embed_tokens.weight": t.pop("shared.weight")}))
    encoder, reference = load_t5(folder), load_file(str(folder / "reference.safetensors"))
    ids, mask, _ = encoder.tokenize(CAPTIONS["captions"], MAX_LENGTH)
    np.testing.assert_array_equal(ids, reference["input_ids"])
    hidden = np.asarray(encoder.encode(ids, mask))
    assert np.abs(hidden - reference["last_hidden_state"]).max() <= F32_TOL


# --- config parsing, digests, sharding names --------------------------------------------------

def test_spec_from_hf_config():
    base = {"vocab_size": 8, "d_model": 4, "d_kv": 2, "d_ff": 8, "num_layers": 1, "num_heads": 2}
    v11 = T5Spec.from_hf_config({**base, "model_type": "t5", "feed_forward_proj": "gated-gelu"})
    assert (v11.gated, v11.activation, v11.bias_per_layer) == (True, "gelu_new", False)
    relu = T5Spec.from_hf_config({**base, "model_type": "t5"})  # T5Config's default: relu
    assert (relu.gated, relu.activation) == (False, "relu")
    umt5 = T5Spec.from_hf_config({**base, "model_type": "umt5"})  # UMT5Config's: gated-gelu
    assert (umt5.gated, umt5.activation, umt5.bias_per_layer) == (True, "gelu_new", True)
    bad = [({"model_type": "bert"}, "model_type"),
           ({"model_type": "t5", "feed_forward_proj": "gated-gelu-x"}, "feed_forward_proj"),
           ({"model_type": "t5", "feed_forward_proj": "gated-tanh"}, "feed_forward_proj"),
           ({"model_type": "t5", "feed_forward_proj": "relu", "is_gated_act": True},
            "is_gated_act"),
           ({"model_type": "t5", "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"},
            "dense_act_fn"),
           ({"model_type": "t5", "d_model": None}, "d_model")]
    for change, field in bad:
        with pytest.raises(ValueError, match=field):
            T5Spec.from_hf_config({**base, **change})


def test_checkpoint_sha256_is_stable_and_sensitive(tmp_path):
    for name in MODELS:
        assert checkpoint_sha256(FIXTURES / name) == checkpoint_sha256(_copy(tmp_path, name))
    folder = tmp_path / "umt5"
    digest = checkpoint_sha256(folder)
    (folder / "tokenizer.json").unlink()  # not part of the digest: weights and config only
    assert checkpoint_sha256(folder) == digest
    shard = folder / "model-00003-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert checkpoint_sha256(folder) != digest


def test_param_axes_use_the_rule_table():
    spec = T5Spec.from_hf_config(json.loads((FIXTURES / "umt5" / "config.json").read_text()))
    known = {name for name, _ in RULE_TABLES["default"]}
    used = {a for p in _leaves(param_axes(spec)) for a in p if a is not None}
    assert used <= known and {"vocab", "embed", "heads", "kv", "mlp"} <= used


@pytest.mark.parametrize("name", ["t5_relu", "t5_v11", "umt5"])
def test_in_step_t5_flops_are_its_matmuls_by_xla_count(name):
    """A `text.encoder: t5` step runs the frozen T5 on every caption: its forward matmuls
    count in the step's work (as the frozen VAE's do). At the fixtures' d_model 32 the matmuls
    are 89-95 % of XLA's count of the whole encoder (the rest: softmax, norms)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from vdit.config import load_config
    from vdit.io.hf_t5 import load_t5
    from vdit.scaling.flops import step_flops, text_encoder_flops_per_caption

    path = FIXTURES / name
    encoder = load_t5(path)
    base = load_config(None, [])
    for length in (16, 64):
        ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
        cost = encoder._apply.lower(encoder.params, ids, ids).cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        cfg = dataclasses.replace(base, text=dataclasses.replace(
            base.text, encoder="t5", checkpoint=str(path), max_length=length))
        ours = text_encoder_flops_per_caption(cfg)
        assert 0.85 <= ours / cost["flops"] <= 1.0, (length, ours, cost["flops"])
        dit, frozen = step_flops(cfg, encodes_pixels=False)
        assert frozen == cfg.train.batch_size * ours and dit > 0
    assert text_encoder_flops_per_caption(base) == 0.0  # the jointly trained transformer
