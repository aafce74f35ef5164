"""Samples from a trained run: `python -m ddpm_jax.sample --workdir=DIR --num_samples=N --output=PATH`.

Reads the config saved with the checkpoint, restores the newest step (or `--step`), and
samples from the EMA weights (the raw weights when the run kept no EMA) with the run's
diffusion settings. Samples are drawn in batches sharded over every device, so N can be
far larger than what fits in device memory. `.png` writes one grid, `.npz` writes uint8
images under the key `arr_0` (what the ADM evaluator reads); `--snapshots=K` also writes
`<output>_denoising.png` (each sample at K points along the reverse chain). The same seed
gives the same images.
"""

from __future__ import annotations

import io

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import cli, console, image_utils, runs
from ddpm_jax import progress as progress_bars
from ddpm_jax.core.errors import UserError
from ddpm_jax.runtime import compiled_sampler
from ddpm_jax.samplers import SamplerSettings

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a command, so importing defines none."""
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
    flags.DEFINE_integer("num_samples", 16, "Number of images.", lower_bound=1)
    flags.DEFINE_string("output", None, "Where to write: a .png grid or a .npz of uint8 images.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("sampler", None, "ddpm, ddim or dpm_solver++ (default: the run's "
                        "config.sample.sampler).")
    flags.DEFINE_integer("num_steps", None, "Network calls (default: the run's; 0: the sampler's "
                         "default).")
    flags.DEFINE_string("spacing", None, "Timesteps visited: linspace, leading, trailing, logsnr "
                        "or auto (default: the run's config.sample.spacing).")
    flags.DEFINE_float("eta", None, "DDIM noise scale (default: the run's).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("batch_size", 64, "Images per sampling run (rounded up to the devices).",
                         lower_bound=1)
    flags.DEFINE_integer("snapshots", 0, "Also write the denoising strip with this many points.",
                         lower_bound=0)
    flags.mark_flags_as_required(["workdir", "output"])


def generate(
    workdir: str, num_samples: int, *, step: int | None = None, sampler: str | None = None,
    num_steps: int | None = None, eta: float | None = None, spacing: str | None = None,
    seed: int = 0, batch_size: int = 64, snapshots: int = 0, progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 samples [N, S, S, 3] (and [N, K, S, S, 3] snapshots when `snapshots` > 0).

    `sampler`, `num_steps`, `spacing` and `eta` default to the run's `config.sample`.
    """
    config, params, step, mesh = runs.load_run(workdir, step)
    settings = SamplerSettings.from_config(config.sample, sampler=sampler, num_steps=num_steps,
                                           eta=eta, spacing=spacing)
    batch_size = min(batch_size, num_samples)
    sample_fn = compiled_sampler.make_sample_fn(config, mesh, settings, num_images=batch_size,
                                        num_snapshots=snapshots)
    logging.info("sampling %d images from step %d with %s", num_samples, step, settings.summary())
    images, strips = [], []
    num_batches = -(-num_samples // batch_size)
    # One batch: the bar counts the sampler's steps; several: the images done.
    total, unit = ((sample_fn.num_steps, "step") if num_batches == 1 else (num_samples, "image"))
    with progress_bars.bar(total, "sampling", unit, progress) as bar:
        on_steps = bar.update if num_batches == 1 else None
        for index in range(num_batches):
            outputs = sample_fn(params, jax.random.fold_in(jax.random.PRNGKey(seed), index),
                                on_steps=on_steps)
            final = outputs[0] if snapshots else outputs
            images.append(image_utils.to_uint8(multihost_utils.process_allgather(final,
                                                                                 tiled=True)))
            if snapshots:
                strip = multihost_utils.process_allgather(outputs[1], tiled=True)  # [K, B, ...]
                strips.append(image_utils.to_uint8(np.swapaxes(strip, 0, 1)))
            if num_batches > 1:
                bar.update(min(batch_size, num_samples - index * batch_size))
    samples = np.concatenate(images)[:num_samples]
    return samples, (np.concatenate(strips)[:num_samples] if snapshots else None)


def write(samples: np.ndarray, strips: np.ndarray | None, output: str) -> None:
    """Writes a grid (.png) or an array file (.npz), plus the denoising strip if given."""
    path = epath.Path(output)
    if path.suffix == ".png":
        image_utils.save_png(image_utils.make_grid(samples), output)
    elif path.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, arr_0=samples)  # the key the ADM evaluator reads
        image_utils.write_atomically(path, buffer.getvalue())
    else:
        raise UserError(f"--output must end in .png or .npz, got {output!r}")
    if strips is not None:
        rows = strips.reshape((-1,) + strips.shape[2:])
        image_utils.save_png(image_utils.make_grid(rows, num_columns=strips.shape[1]),
                             str(path.parent / f"{path.stem}_denoising.png"))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with console.exit_on_user_error("ddpm_jax.sample"):
        if not FLAGS.output.endswith((".png", ".npz")):
            raise UserError(f"--output must end in .png or .npz, got {FLAGS.output!r}")
        cli.check_output("output", FLAGS.output)
        samples, strips = generate(
            FLAGS.workdir, FLAGS.num_samples, step=FLAGS.step, sampler=FLAGS.sampler,
            num_steps=FLAGS.num_steps, eta=FLAGS.eta, spacing=FLAGS.spacing, seed=FLAGS.seed,
            batch_size=FLAGS.batch_size, snapshots=FLAGS.snapshots, progress=True,
        )
        if jax.process_index() == 0:
            write(samples, strips, FLAGS.output)
            logging.info("wrote %s", FLAGS.output)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser("ddpm_jax.sample"))
