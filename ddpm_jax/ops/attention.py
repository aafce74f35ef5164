"""Ho et al.'s single-head attention block with its four projections folded into two.

The scores ``(h Wq + bq)(h Wk + bk)^T / sqrt(C)`` are, up to terms that are the same for
every key of a query (which the softmax over keys cancels), ``(h M + u) h^T`` with
``M = Wq Wk^T / sqrt(C)`` and ``u = Wk bq / sqrt(C)``; and since each query's weights sum
to 1, ``softmax(s) (h Wv + bv) Wo + bo = softmax(s) h (Wv Wo) + (bv Wo + bo)``. So attention
runs with queries ``h M + u``, keys ``h`` and values ``h (Wv Wo)``: two products per
position with a [C, C] matrix instead of four. The same parameters and, up to float
rounding, the same function as `blocks.DDPMAttention` (`tests/test_unet.py`).
"""

from __future__ import annotations

import math

import jax

from ddpm_jax.models.blocks import DDPMAttention, attend, scaled


class FoldedAttention(DDPMAttention):
    """`DDPMAttention`, computed folded when it has one head (as written otherwise)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.num_heads != 1:
            return super().__call__(x)
        b, height, width, channels = x.shape
        h = self.norm(x).reshape(b, height * width, channels)
        (w_q, b_q), (w_k, _), (w_v, b_v), (w_o, b_o) = (
            (layer.kernel[...], layer.bias[...])
            for layer in (self.q, self.k, self.v, self.proj_out))
        h, w_q, b_q, w_k, w_v, b_v, w_o, b_o = self.q.promote_dtype(
            (h, w_q, b_q, w_k, w_v, b_v, w_o, b_o), dtype=self.q.dtype)
        scale = 1.0 / math.sqrt(channels)
        queries = h @ (w_q @ w_k.T * scale) + w_k @ b_q * scale
        values = h @ (w_v @ w_o)
        out = attend(queries, h, values, num_heads=1, scale=1.0) + (b_v @ w_o + b_o)
        return scaled(x + out.reshape(x.shape), self.skip_scale)
