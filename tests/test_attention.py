import jax
import jax.numpy as jnp
import numpy as np

from vdit.ops.attention import attention, resolve_impl


def _reference(q, k, v, mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_xla_attention_matches_float64_reference_with_key_mask():
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 7, 3, 16))
    k = jax.random.normal(keys[1], (2, 5, 3, 16))
    v = jax.random.normal(keys[2], (2, 5, 3, 16))
    mask = np.array([[True] * 5, [True, False, True, False, False]])
    out = attention(q, k, v, kv_mask=jnp.asarray(mask), impl="xla")
    np.testing.assert_allclose(out, _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert resolve_impl("auto", jnp.float32) == "xla"  # CPU


def test_fully_masked_rows_give_no_nan():
    q = jnp.ones((1, 2, 1, 8))
    out = attention(q, q, q, kv_mask=jnp.zeros((1, 2), bool), impl="xla")
    assert bool(jnp.all(out == 0))  # a row that sees no key returns 0, like the flash kernels
