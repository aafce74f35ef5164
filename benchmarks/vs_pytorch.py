"""ddpm-jax against PyTorch (diffusers `UNet2DModel`) on the same machine, same network.

The DDPM CIFAR-10 net (`configs/cifar10.py`, 35.7 M parameters; `--net=cifar10`) or EDM's
DDPM++ CIFAR-10 net with the options UNet2DModel has (`--net=ddpmpp`, see `ddpmpp_config`)
on both sides, random weights, float32, dropout in training, the DDPM CIFAR-10 training
(eps-prediction MSE, AdamW, clipping, EMA) around either:

* train step: noise, loss, backward, clip, AdamW, EMA; ddpm-jax's jitted step against the
  same five operations in eager PyTorch (fused/foreach AdamW, `_foreach_lerp_` EMA). Each
  call runs as many steps as ddpm-jax's training runs per compiled call
  (`train.steps_per_dispatch`: 4 for this config on CPU), on both sides, and the times are
  per step (`--steps_per_call` sets another number);
* forward: one denoiser call (no dropout, no gradient);
* DDIM: a 100-step deterministic sampling run (ddpm-jax's one-program sampler against
  diffusers' `DDIMScheduler` loop, as `DDIMPipeline` runs it).

Each side lives in its own worker process (PyTorch is never imported into the JAX one, nor
JAX into the PyTorch one), and the parent asks them for one call at a time, so the two never
run at once and neither inherits the other's allocator or thread-pool state (in one shared
process, the first JAX train step after a PyTorch step ran much slower). Each case is
warmed up on both sides, then timed `--repeats` times alternating sides; medians are
reported with speed-up = PyTorch time / ddpm-jax time (> 1: ddpm-jax faster).

Each turn makes `--block` calls: the first call after a switch pays for memory the other
process used meanwhile (XLA:CPU maps its per-call buffers fresh, 2.4 GB for a train step at
batch 32, and re-faulting them costs more while another process churns memory), so it is
reported apart (`*_after_switch_s`) and the medians are over the steady calls, the rate a
training run sees.
Needs the `bench` extra (`pip install -e ".[bench]"`; on a CPU-only machine install the
CPU wheel of torch first, e.g. `pip install torch==2.13.0`).

    python -m benchmarks.vs_pytorch --output=vs_pytorch.json [--cases=train8,forward64]
        [--net=ddpmpp]

`--huge_pages` starts both workers with glibc's malloc asking for transparent huge pages
(the same environment on both sides; not ddpm-jax's default, see `docs/performance-notes.md`).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import statistics
import time

import numpy as np

from benchmarks.common import report
from configs import cifar10, ddpmpp_cifar10
from ddpm_jax.models.architecture import BLOCK_OPTION_DEFAULTS

# glibc's malloc asks for transparent huge pages (madvise) on what it maps: fewer TLB misses
# in XLA:CPU's memory passes over its large per-call buffers (`docs/performance-notes.md`).
HUGE_PAGES_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
SETTLE_S = 1.0  # idle time before each timed call, so the other side's threads are asleep
CASES = {  # name: (kind, batch)
    "train8": ("train", 8), "train32": ("train", 32), "forward64": ("forward", 64),
    "ddim16": ("ddim", 16),
}

# DDPM++'s options that UNet2DModel has no field for (`diffusers_format.check_exportable`)
UNET2DMODEL_LACKS = ("resample_projection", "skip_scale", "decoder_attention")


def ddpmpp_config():
    """The DDPM CIFAR-10 training around EDM's DDPM++ net as UNet2DModel can build it.

    As `configs/ddpmpp_cifar10.py` (128 x (2, 2, 2) channels, 4 blocks a level, one-head
    attention at 16x16, residual resampling blocks, dropout 0.13) but without the options
    UNet2DModel lacks: the resampling blocks' 1x1 skip projection, the 1/sqrt(2) skip
    scaling and attention after only the last block of an up level. UNet2DModel's input
    conv and time embedding are as wide as its first level, so the input conv gives 256
    channels (DDPM++'s 128) and the embedding is 1024 wide (DDPM++'s 512).
    """
    config = cifar10.get_config()
    ddpmpp_cifar10.ddpmpp_net(config.model)
    m, first = config.model, config.model.channel_mults[0]
    m.base_channels, m.channel_mults = m.base_channels * first, tuple(
        mult // first for mult in m.channel_mults)
    for field in UNET2DMODEL_LACKS:
        config.model[field] = BLOCK_OPTION_DEFAULTS[field]
    return config


NETS = {"cifar10": cifar10.get_config, "ddpmpp": ddpmpp_config}


def diffusers_unet(config):
    """diffusers' UNet2DModel of the same net (for the CIFAR-10 config: google/ddpm-cifar10-32's)."""
    from diffusers import UNet2DModel

    from ddpm_jax import diffusers_format

    fields = diffusers_format.unet_config(config)
    return UNet2DModel(**{key: value for key, value in fields.items() if not key.startswith("_")})


class TorchSide:
    """The PyTorch user's train step, forward and DDIM loop.

    On a GPU (`device="cuda"`): the batch copied from pinned host memory as a data loader
    does, autocast to bfloat16 where the config computes in it (AMP: float32 weights, as
    Accelerate's `mixed_precision="bf16"`), fused AdamW, cuDNN's autotuner on, and with
    `compile_mode` the net under `torch.compile`.
    """

    def __init__(self, config, seed: int, steps_per_call: int, device: str = "cpu",
                 compile_mode: str | None = None):
        import torch

        torch.manual_seed(seed)
        self.config = config
        self.steps_per_call = steps_per_call
        self.device = torch.device(device)
        self.autocast = config.model.dtype == "bfloat16"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            # float32 convolutions and products in TF32, as XLA's default precision on a GPU
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.unet = diffusers_unet(config).to(self.device)
        self.model = torch.compile(self.unet, mode=compile_mode) if compile_mode else self.unet
        self.ema = [p.detach().clone() for p in self.unet.parameters()]
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay,
                                           fused=self.device.type == "cuda")
        d = config.diffusion  # linear betas, as configs/cifar10.py
        alphas_cumprod = np.cumprod(1 - np.linspace(d.beta_start, d.beta_end, d.num_timesteps))
        self.sqrt_ab, self.sqrt_1m_ab = (
            torch.from_numpy(table.astype(np.float32)).to(self.device)
            for table in (np.sqrt(alphas_cumprod), np.sqrt(1 - alphas_cumprod)))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def inputs(self, kind: str, batch: int):
        """The case's inputs, the same arrays as the JAX side's (NCHW)."""
        import torch

        arrays = case_inputs(kind, batch, self.config.data.image_size)
        tensors = [torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, 3, 1))) if a.ndim == 4
                   else torch.from_numpy(a) for a in arrays]
        if self.device.type == "cuda":  # train batches come from host memory every step
            return [t.pin_memory() if kind == "train" else t.to(self.device) for t in tensors]
        return tensors

    def train_step(self, images) -> float:
        """`steps_per_call` train steps on the same images (new noise and timesteps each);
        waits for the device once, at the end, as a loop that logs the last loss does."""
        losses = [self._train_step(images) for _ in range(self.steps_per_call)]
        return float(losses[-1])

    def _train_step(self, images):
        import torch
        import torch.nn.functional as F

        self.unet.train()
        x0 = images.to(self.device, non_blocking=True).float() / 127.5 - 1
        t = torch.randint(0, len(self.sqrt_ab), (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        x_t = self.sqrt_ab[t, None, None, None] * x0 + self.sqrt_1m_ab[t, None, None, None] * noise
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            prediction = self.model(x_t, t).sample
        loss = F.mse_loss(prediction.float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.config.grad_clip_norm)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, list(self.unet.parameters()), 1 - self.config.ema_decay)
        return loss.detach()

    def forward(self, x, t):
        import torch

        self.unet.eval()
        with torch.inference_mode():
            return self.model(x, t).sample

    def ddim(self, batch: int, num_steps: int):
        import torch
        from diffusers import DDIMScheduler

        self.unet.eval()
        with torch.inference_mode():
            return self._ddim(batch, num_steps, DDIMScheduler)

    def _ddim(self, batch: int, num_steps: int, scheduler_class):
        import torch

        d = self.config.diffusion
        scheduler = scheduler_class(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start,
                                    beta_end=d.beta_end, beta_schedule="linear", clip_sample=True)
        scheduler.set_timesteps(num_steps)
        size = self.config.data.image_size
        x = torch.randn(batch, 3, size, size)
        for t in scheduler.timesteps:
            x = scheduler.step(self.unet(x, t).sample, t, x, eta=0.0).prev_sample
        return x


class JaxSide:
    """ddpm-jax's own train step, forward and sampler, as training and sampling run them."""

    def __init__(self, config, seed: int, steps_per_call: int, pipelined_calls: int = 1):
        import jax

        from ddpm_jax import ops, train
        from ddpm_jax.runtime import network

        config.seed = seed
        self.config = config
        self.steps_per_call = steps_per_call or train.steps_per_dispatch(config)
        self.pipelined_calls = pipelined_calls
        self.mesh = train.create_mesh(config)
        self.state = train.create_train_state(config, self.mesh)
        self.step_fns = {}
        graphdef = network.graphdef(config)
        self.forward_fn = jax.jit(lambda p, x, t: network.apply(graphdef, p, x, t),
                                  compiler_options=ops.compiler_options(config))
        self.samplers = {}

    def parameter_count(self) -> int:
        import jax

        return sum(x.size for x in jax.tree.leaves(self.state.params))

    def inputs(self, kind: str, batch: int):
        import jax.numpy as jnp

        arrays = case_inputs(kind, batch, self.config.data.image_size)
        return [a if kind == "train" else jnp.asarray(a) for a in arrays]

    def step_functions(self, batch: int):
        """The train step as training compiles it for this batch size."""
        from ddpm_jax import train

        if batch not in self.step_fns:
            config = self.config.copy_and_resolve_references()
            config.batch_size, config.steps_per_dispatch = batch, self.steps_per_call
            self.step_fns[batch] = train.step_functions(config, self.mesh)
        return self.step_fns[batch]

    def train_step(self, images: np.ndarray) -> float:
        """`pipelined_calls` calls of `steps_per_call` train steps on the same images, each
        call as training runs them; waits once, at the end (the loop keeps calls in flight)."""
        step_fns = self.step_functions(images.shape[0])
        for _ in range(self.pipelined_calls):
            self.state, metrics = step_fns(self.state, [images] * self.steps_per_call)
        return float(np.asarray(metrics["loss"]).ravel()[-1])

    def forward(self, x, t):
        return self.forward_fn(self.state.params, x, t).block_until_ready()

    def ddim(self, batch: int, num_steps: int):
        import jax

        from ddpm_jax.runtime import compiled_sampler
        from ddpm_jax.samplers import SamplerSettings

        if batch not in self.samplers:
            self.samplers[batch] = compiled_sampler.make_sample_fn(
                self.config, self.mesh, SamplerSettings("ddim", num_steps, {"eta": 0.0}),
                num_images=batch)
        return self.samplers[batch](self.state.params, jax.random.PRNGKey(0)).block_until_ready()


def case_inputs(kind: str, batch: int, size: int) -> list[np.ndarray]:
    """Inputs of a case, identical for both sides: uint8 images, or noisy inputs and steps."""
    rng = np.random.default_rng(0)
    if kind == "train":
        return [rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)]
    if kind == "forward":
        return [rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                rng.integers(0, 1000, batch)]
    return []


def worker(side: str, net: str, seed: int, steps_per_call: int, connection) -> None:
    """Builds one side, then runs (case -> seconds of one call) requests until told to stop."""
    config = NETS[net]()
    runner = (JaxSide if side == "jax" else TorchSide)(config, seed, steps_per_call)
    connection.send((runner.parameter_count(), runner.steps_per_call))
    calls = {}
    while (case := connection.recv()) is not None:
        if case not in calls:
            kind, batch = CASES[case]
            inputs = runner.inputs(kind, batch)
            calls[case] = {
                "train": functools.partial(runner.train_step, *inputs),
                "forward": functools.partial(runner.forward, *inputs),
                "ddim": functools.partial(runner.ddim, batch, 100),
            }[kind]
        start = time.perf_counter()
        calls[case]()
        connection.send(time.perf_counter() - start)


class Side:
    """Parent-side handle of a worker process, started with `environ` updates.

    The worker, `target(*args, connection)`, first sends (parameter count, steps per call);
    with `handshake` the constructor waits for that, else the caller receives it.
    """

    def __init__(self, *args, environ: dict[str, str] | None = None, target=None,
                 handshake: bool = True):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=target or worker, args=(*args, child),
                                       daemon=True)
        saved = dict(os.environ)
        os.environ.update(environ or {})
        try:  # a spawned child starts with the parent's environment of this moment
            self.process.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.parameter_count = self.steps_per_call = None
        if handshake:
            self.parameter_count, self.steps_per_call = self.connection.recv()

    def request(self, message, settle_s: float = 0.0):
        """Sends one request after `settle_s` idle seconds; returns the worker's answer."""
        time.sleep(settle_s)
        self.connection.send(message)
        return self.connection.recv()

    def call(self, case: str, settle_s: float = 0.0) -> float:
        return self.request(case, settle_s)

    def close(self) -> None:
        try:
            self.connection.send(None)
        except OSError:  # the worker has already gone
            pass
        self.process.join(timeout=60)


def time_pair(name: str, side: Side, baseline: Side, repeats: int, warmup: int, block: int = 1):
    """Medians, spreads and first-call times of one case, the two sides alternating.

    Each turn makes `block` calls; with block > 1 the first call of every turn (the one
    after a switch) is kept apart, and the medians are over the steady calls that follow.
    """
    first_call = side.call(name)  # compiles
    baseline.call(name)
    for _ in range(warmup):
        side.call(name)
        baseline.call(name)
    steady: tuple[list[float], list[float]] = ([], [])
    after_switch: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for runner, times, switch in ((side, steady[0], after_switch[0]),
                                      (baseline, steady[1], after_switch[1])):
            calls = [runner.call(name, settle_s=SETTLE_S if i == 0 else 0.0) for i in range(block)]
            switch.append(calls[0])
            times.extend(calls[1:] if block > 1 else calls)
    medians = tuple(statistics.median(t) for t in steady)
    spreads = tuple((max(t) - min(t)) / m for t, m in zip(steady, medians, strict=True))
    switches = tuple(statistics.median(t) for t in after_switch)
    return medians, spreads, first_call, switches


def run_case(name: str, jax_side: Side, torch_side: Side, repeats: int, warmup: int,
             block: int) -> dict:
    (jax_s, torch_s), (jax_spread, torch_spread), first_call, (jax_switch, torch_switch) = (
        time_pair(name, jax_side, torch_side, repeats, warmup, block))
    steps = jax_side.steps_per_call if CASES[name][0] == "train" else 1
    jax_s, torch_s, jax_switch, torch_switch = (
        value / steps for value in (jax_s, torch_s, jax_switch, torch_switch))
    return {"case": name, "batch": CASES[name][1], "steps_per_call": steps,
            "pytorch_s": torch_s, "ddpm_jax_s": jax_s,
            "speedup": torch_s / jax_s, "jax_compile_call_s": first_call,
            "jax_after_switch_s": jax_switch, "torch_after_switch_s": torch_switch,
            "jax_spread": jax_spread, "torch_spread": torch_spread}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--net", default="cifar10", choices=sorted(NETS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--block", type=int, default=3,
                        help="calls per turn; the first after a switch is reported apart")
    parser.add_argument("--ddim_repeats", type=int, default=3)
    parser.add_argument("--output", default="vs_pytorch.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps_per_call", type=int, default=0,
                        help="train steps per call on both sides; 0: as ddpm-jax trains")
    parser.add_argument("--huge_pages", action="store_true",
                        help="both sides' large allocations in transparent huge pages "
                             "(GLIBC_TUNABLES=glibc.malloc.hugetlb=1; glibc 2.35 or later)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [name for name in cases if name not in CASES]
    if unknown:
        parser.error(f"unknown --cases {unknown}; choose from {','.join(CASES)}")

    environ = HUGE_PAGES_ENV if args.huge_pages else {}
    jax_side = Side("jax", args.net, args.seed, args.steps_per_call, environ=environ)
    torch_side = Side("torch", args.net, args.seed, jax_side.steps_per_call, environ=environ)
    assert jax_side.parameter_count == torch_side.parameter_count, (
        jax_side.parameter_count, torch_side.parameter_count)
    print(f"parameters: {jax_side.parameter_count:,} on both sides", flush=True)
    rows = []
    for name in cases:
        sampling = CASES[name][0] == "ddim"  # one long call: switching costs are negligible
        rows.append(run_case(name, jax_side, torch_side,
                             args.ddim_repeats if sampling else args.repeats, args.warmup,
                             1 if sampling else args.block)
                    | {"huge_pages": args.huge_pages, "net": args.net,
                       "parameters": jax_side.parameter_count})
        print(rows[-1], flush=True)
    jax_side.close()
    torch_side.close()
    report(f"ddpm-jax vs PyTorch (diffusers UNet2DModel), {args.net} net, float32", rows,
           args.output)


if __name__ == "__main__":
    main()
