"""A 3D patch discriminator for adversarial autoencoder training (PatchGAN over spacetime).

video [B, T, H, W, 3] -> logits [B, T', H/8, W/8, 1]: each logit judges one spacetime patch,
so the generator is pushed toward locally sharp detail rather than a global statistic.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class PatchDiscriminator(nn.Module):
    width: int = 32
    layers: int = 3

    @nn.compact
    def __call__(self, video: jax.Array) -> jax.Array:
        x = video
        for i in range(self.layers):
            x = nn.Conv(self.width * 2**i, (3, 4, 4), strides=(1, 2, 2), name=f"conv{i}")(x)
            if i:
                x = nn.LayerNorm(name=f"norm{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        return nn.Conv(1, (3, 3, 3), name="logits")(x)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Discriminator hinge loss: push real logits above +1 and fake ones below -1."""
    return 0.5 * (jnp.mean(nn.relu(1.0 - real_logits)) + jnp.mean(nn.relu(1.0 + fake_logits)))
