"""ddpm-jax against PyTorch (diffusers `UNet2DModel`) on the same machine, same network.

The DDPM CIFAR-10 net (`configs/cifar10.py`, 35.7 M parameters) on both sides, random
weights, float32, dropout 0.1 in training:

* train step: noise, loss, backward, clip, AdamW, EMA; ddpm-jax's jitted step against the
  same five operations in eager PyTorch (fused/foreach AdamW, `_foreach_lerp_` EMA);
* forward: one denoiser call (no dropout, no gradient);
* DDIM: a 100-step deterministic sampling run (ddpm-jax's one-program sampler against
  diffusers' `DDIMScheduler` loop, as `DDIMPipeline` runs it).

Each case is warmed up on both sides, then timed `--repeats` times alternating sides;
medians are reported with speed-up = PyTorch time / ddpm-jax time (> 1: ddpm-jax faster).
Needs the `bench` extra (`pip install -e ".[bench]"`; on a CPU-only machine install the
CPU wheel of torch first, e.g. `pip install torch==2.13.0`).

    python -m benchmarks.vs_pytorch --output=vs_pytorch.json [--cases=train8,forward64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import report
from configs import cifar10
from ddpm_jax import train, xla

CASES = {  # name: (kind, batch)
    "train8": ("train", 8), "train32": ("train", 32), "forward64": ("forward", 64),
    "ddim16": ("ddim", 16),
}


def diffusers_unet(config) -> torch.nn.Module:
    """diffusers' UNet2DModel with the DDPM CIFAR-10 architecture (as google/ddpm-cifar10-32)."""
    from diffusers import UNet2DModel

    base, mults = config.model.base_channels, config.model.channel_mults
    resolutions = [config.data.image_size // 2 ** i for i in range(len(mults))]
    attention = [r in config.model.attention_resolutions for r in resolutions]
    return UNet2DModel(
        sample_size=config.data.image_size, in_channels=3, out_channels=3,
        layers_per_block=config.model.num_res_blocks,
        block_out_channels=tuple(base * m for m in mults),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        norm_num_groups=config.model.norm_groups, norm_eps=1e-6, act_fn="silu",
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
        downsample_padding=0, attention_head_dim=None, dropout=config.model.dropout,
    )


class TorchSide:
    """The PyTorch user's train step, forward and DDIM loop."""

    def __init__(self, config, seed: int):
        torch.manual_seed(seed)
        self.config = config
        self.unet = diffusers_unet(config)
        self.ema = [p.detach().clone() for p in self.unet.parameters()]
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        schedule = train.make_schedule(config)
        self.sqrt_ab = torch.from_numpy(np.sqrt(np.asarray(schedule.alphas_cumprod, np.float32)))
        self.sqrt_1m_ab = torch.from_numpy(
            np.sqrt(1 - np.asarray(schedule.alphas_cumprod, np.float32)))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def train_step(self, images: torch.Tensor) -> float:
        self.unet.train()
        x0 = images.float() / 127.5 - 1
        t = torch.randint(0, len(self.sqrt_ab), (x0.shape[0],))
        noise = torch.randn_like(x0)
        x_t = self.sqrt_ab[t, None, None, None] * x0 + self.sqrt_1m_ab[t, None, None, None] * noise
        loss = F.mse_loss(self.unet(x_t, t).sample, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.config.grad_clip_norm)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, list(self.unet.parameters()), 1 - self.config.ema_decay)
        return float(loss)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.unet.eval()
        return self.unet(x, t).sample

    @torch.inference_mode()
    def ddim(self, batch: int, num_steps: int) -> torch.Tensor:
        from diffusers import DDIMScheduler

        self.unet.eval()
        scheduler = DDIMScheduler(num_train_timesteps=self.config.diffusion.num_timesteps,
                                  beta_start=self.config.diffusion.beta_start,
                                  beta_end=self.config.diffusion.beta_end,
                                  beta_schedule="linear", clip_sample=True)
        scheduler.set_timesteps(num_steps)
        size = self.config.data.image_size
        x = torch.randn(batch, 3, size, size)
        for t in scheduler.timesteps:
            x = scheduler.step(self.unet(x, t).sample, t, x, eta=0.0).prev_sample
        return x


class JaxSide:
    """ddpm-jax's own train step, forward and sampler, as training and sampling run them."""

    def __init__(self, config, seed: int):
        config.seed = seed
        self.config = config
        self.mesh = train.create_mesh(config)
        self.state = train.create_train_state(config, self.mesh)
        self.step_fn = train.make_train_step(config, self.mesh)
        graphdef = train.model_graphdef(config)
        self.forward_fn = jax.jit(lambda p, x, t: train.apply_model(graphdef, p, x, t),
                                  compiler_options=xla.compiler_options(config))
        self.samplers = {}

    def parameter_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.state.params))

    def train_step(self, images: np.ndarray) -> float:
        self.state, metrics = self.step_fn(self.state, train.global_batch(images, self.mesh))
        return float(metrics["loss"])

    def forward(self, x: jax.Array, t: jax.Array) -> jax.Array:
        return self.forward_fn(self.state.params, x, t).block_until_ready()

    def ddim(self, batch: int, num_steps: int) -> jax.Array:
        if batch not in self.samplers:
            self.samplers[batch] = train.make_sample_fn(
                self.config, self.mesh, num_images=batch, sampler="ddim", num_steps=num_steps,
                eta=0.0)
        return self.samplers[batch](self.state.params, jax.random.PRNGKey(0)).block_until_ready()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(name: str, jax_side: JaxSide, torch_side: TorchSide, repeats: int, warmup: int):
    kind, batch = CASES[name]
    size = jax_side.config.data.image_size
    rng = np.random.default_rng(0)
    if kind == "train":
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        images_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        jax_fn = lambda: jax_side.train_step(images)  # noqa: E731
        torch_fn = lambda: torch_side.train_step(images_torch)  # noqa: E731
    elif kind == "forward":
        x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
        t = rng.integers(0, 1000, batch)
        x_jax, t_jax = jnp.asarray(x), jnp.asarray(t)
        x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        t_torch = torch.from_numpy(t)
        jax_fn = lambda: jax_side.forward(x_jax, t_jax)  # noqa: E731
        torch_fn = lambda: torch_side.forward(x_torch, t_torch)  # noqa: E731
    else:
        jax_fn = lambda: jax_side.ddim(batch, 100)  # noqa: E731
        torch_fn = lambda: torch_side.ddim(batch, 100)  # noqa: E731
    compile_s = _timed(jax_fn)
    for _ in range(warmup):
        jax_fn()
        torch_fn()
    jax_times, torch_times = [], []
    for _ in range(repeats):
        jax_times.append(_timed(jax_fn))
        torch_times.append(_timed(torch_fn))
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    return {"case": name, "batch": batch, "pytorch_s": torch_s, "ddpm_jax_s": jax_s,
            "speedup": torch_s / jax_s, "jax_first_call_s": compile_s,
            "jax_spread": (max(jax_times) - min(jax_times)) / jax_s,
            "torch_spread": (max(torch_times) - min(torch_times)) / torch_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ddim_repeats", type=int, default=3)
    parser.add_argument("--output", default="vs_pytorch.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = cifar10.get_config()
    jax_side, torch_side = JaxSide(config, args.seed), TorchSide(config, args.seed)
    assert jax_side.parameter_count() == torch_side.parameter_count(), (
        jax_side.parameter_count(), torch_side.parameter_count())
    print(f"parameters: {jax_side.parameter_count():,} on both sides; torch threads "
          f"{torch.get_num_threads()}, jax devices {jax.devices()}")
    rows = []
    for name in args.cases.split(","):
        repeats = args.ddim_repeats if CASES[name][0] == "ddim" else args.repeats
        rows.append(run_case(name, jax_side, torch_side, repeats, args.warmup))
        print(rows[-1], flush=True)
    report("ddpm-jax vs PyTorch (diffusers UNet2DModel), DDPM CIFAR-10 net, float32", rows,
           args.output)


if __name__ == "__main__":
    main()
