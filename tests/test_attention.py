import jax
import jax.numpy as jnp
import numpy as np

from vdit.ops.attention import attention, is_fused_attention, resolve_impl


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


def _autodiff_reference(q, k, v, visible):
    """Plain softmax attention differentiated by JAX itself: (o, lse), visible [B, Lq, Lk]."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = visible[:, None]
    weights = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1) * mask
    lse = jax.nn.logsumexp(jnp.where(mask, logits, -1e30), axis=-1)
    return (jnp.einsum("bhqk,bkhd->bqhd", weights, v),
            jnp.where(jnp.any(mask, axis=-1), lse, -1e30))


def test_xla_attention_gradients_match_autodiff_with_segments_masks_and_lse():
    """The custom backward pass (flash-style, delta = rowsum(dO * O)) against JAX's autodiff of
    the plain formula, with packed segments, padded keys, a fully masked query row and a
    cotangent on the log-sum-exp (ring attention differentiates through it)."""
    from vdit.ops.attention import attention_with_lse

    keys = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(keys[0], (2, 6, 2, 8))
    k = jax.random.normal(keys[1], (2, 6, 2, 8))
    v = jax.random.normal(keys[2], (2, 6, 2, 8))
    ids = jnp.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 2]])
    kv_mask = jnp.array([[True] * 6, [True, True, True, True, False, False]])  # row 1's id 2:
    visible = (ids[:, :, None] == ids[:, None, :]) & kv_mask[:, None, :]  # ... sees no key
    assert not bool(visible[1, 5].any())
    w_o = jax.random.normal(keys[3], q.shape)
    w_lse = jax.random.normal(keys[4], (2, 2, 6))

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v)
            return jnp.sum(o * w_o) + jnp.sum(jnp.where(lse > -1e29, lse, 0.0) * w_lse)
        return f

    ours = loss(lambda q, k, v: attention_with_lse(q, k, v, kv_mask=kv_mask, segment_ids=ids,
                                                   impl="xla"))
    theirs = loss(lambda q, k, v: _autodiff_reference(q, k, v, visible))
    np.testing.assert_allclose(ours(q, k, v), theirs(q, k, v), rtol=1e-5)
    for g_ours, g_ref in zip(jax.grad(ours, (0, 1, 2))(q, k, v),
                             jax.grad(theirs, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(jax.grad(ours)(q, k, v)).max()) > 0


def _count_primitive(jaxpr, name: str) -> int:
    """Equations named `name` in a jaxpr and every jaxpr nested in its equations' params."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _count_primitive(inner, name)
    return count


def test_remat_policy_keeps_the_fused_attention_forward():
    """Under jax.checkpoint the dots policy alone reruns the flash forward kernel in the
    backward pass; with is_fused_attention its outputs are saved, so one kernel fewer runs."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 64, 2, 64)) for i in range(3))
    loss = lambda q, k, v: attention(q, k, v, impl="pallas_gpu", interpret=True).sum()
    dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    kept = jax.checkpoint_policies.save_from_both_policies(dots, is_fused_attention)
    counts = {}
    for name, policy in (("dots", dots), ("kept", kept)):
        grad = jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1, 2))
        counts[name] = _count_primitive(jax.make_jaxpr(grad)(q, k, v).jaxpr, "pallas_call")
        np.testing.assert_allclose(grad(q, k, v)[0], jax.grad(loss)(q, k, v), atol=1e-5)
    assert counts["kept"] == counts["dots"] - 1 >= 2, counts  # forward (+ rerun), dkv, dq
