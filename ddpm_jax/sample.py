"""Samples from a trained run: `python -m ddpm_jax.sample --workdir=DIR --num_samples=N --output=PATH`.

Reads the config saved with the checkpoint, restores the newest step (or `--step`), and
samples from the EMA weights (the raw weights when the run kept no EMA) with the run's
diffusion settings. Samples are drawn in batches sharded over every device, so N can be
far larger than what fits in device memory. `.png` writes one grid, `.npz` writes uint8
images under the key `arr_0` (what the ADM evaluator reads); `--snapshots=K` also writes
`<output>_denoising.png` (each sample at K points along the reverse chain). The same seed
gives the same images.

A class-conditional run samples the classes `--class_label=K` or `--class_labels=3,5,...`
(class numbers or the names in the run's classes.json; image i gets the i-th, cycling), or
with `--class_grid` a grid of one row of `--num_samples` images per class; unlabelled
images get the null label (the unconditional model). `--guidance_scale` (default: the
run's `sample.guidance_scale`) sets classifier-free guidance.
"""

from __future__ import annotations

import io

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import checkpointing, cli, console, image_utils, runs
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
    flags.DEFINE_string("sampler", None, "ddpm, ddim, dpm_solver++, heun or euler (default: the run's "
                        "config.sample.sampler).")
    flags.DEFINE_integer("num_steps", None, "Network calls (default: the run's; 0: the sampler's "
                         "default).")
    flags.DEFINE_string("spacing", None, "Noise levels visited: linspace, leading, trailing, "
                        "logsnr, karras or auto (default: the run's config.sample.spacing).")
    flags.DEFINE_float("eta", None, "DDIM noise scale (default: the run's).")
    flags.DEFINE_enum("variance", None, ["auto", "fixed_small", "fixed_large"],
                      "ddpm's variance rule (default: the run's sample.variance, 'auto': the "
                      "posterior's over fewer than T steps, else the run's own).")
    flags.DEFINE_list("options", None, "Other knobs of the sampler or spacing as KEY=VALUE "
                      "(default: the run's), e.g. s_churn=40,s_tmin=0.05,s_tmax=50,s_noise=1.003 "
                      "for heun's stochastic churn, or rho=5,sigma_max=80 for the karras spacing.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("batch_size", 64, "Images per sampling run (rounded up to the devices).",
                         lower_bound=1)
    flags.DEFINE_integer("snapshots", 0, "Also write the denoising strip with this many points.",
                         lower_bound=0)
    flags.DEFINE_integer("class_label", None, "Class of every image (class-conditional runs).")
    flags.DEFINE_list("class_labels", None, "Classes, by number or name; image i gets the i-th "
                      "(cycling).")
    flags.DEFINE_bool("class_grid", False, "One row of --num_samples images per class.")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale: 1 the "
                       "conditional model, 0 the unconditional one (default: the run's).")
    flags.mark_flags_as_required(["workdir", "output"])


def class_numbers(labels: list[str], names: list[str] | None, num_classes: int) -> list[int]:
    """Class numbers of `labels`, each a number or one of the run's class `names`."""
    if not num_classes:
        raise UserError("class labels were given, but the run is unconditional "
                        "(model.num_classes=0)")
    numbers = []
    for label in labels:
        label = str(label).strip()
        if names and label in names:
            numbers.append(names.index(label))
        elif label.lstrip("-").isdigit() and 0 <= int(label) < num_classes:
            numbers.append(int(label))
        else:
            raise UserError(f"unknown class {label!r}: use a number in [0, {num_classes - 1}]"
                            + (f" or one of {', '.join(names)}" if names else ""))
    return numbers


def generate(
    workdir: str, num_samples: int, *, step: int | None = None, sampler: str | None = None,
    num_steps: int | None = None, eta: float | None = None, spacing: str | None = None,
    seed: int = 0, batch_size: int = 64, snapshots: int = 0, progress: bool = False,
    variance: str | None = None,
    class_labels: list[str] | None = None, guidance_scale: float | None = None,
    options: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 samples [N, S, S, 3] (and [N, K, S, S, 3] snapshots when `snapshots` > 0).

    `sampler`, `num_steps`, `spacing`, `eta`, `variance`, `guidance_scale` and the sampler's and
    spacing's other knobs (`options`) default to the run's `config.sample`; image i of a
    class-conditional run has class `class_labels[i % len]` (numbers or names; None: the
    null label).
    """
    config, params, step, mesh = runs.load_run(workdir, step)
    return generate_from(config, params, mesh, num_samples, step=step, sampler=sampler,
                         num_steps=num_steps, eta=eta, spacing=spacing, seed=seed,
                         batch_size=batch_size, snapshots=snapshots, progress=progress,
                         variance=variance, class_labels=class_labels,
                         class_names=checkpointing.saved_classes(workdir),
                         guidance_scale=guidance_scale, options=options)


def generate_from(
    config, params, mesh: jax.sharding.Mesh, num_samples: int, *, step: int | None = None,
    sampler: str | None = None, num_steps: int | None = None, eta: float | None = None,
    spacing: str | None = None, seed: int = 0, batch_size: int = 64, snapshots: int = 0,
    progress: bool = False, variance: str | None = None, class_labels: list | None = None,
    class_names: list[str] | None = None, guidance_scale: float | None = None,
    options: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`generate` for a loaded model (`config`, `params` on `mesh`; `class_names` name its
    classes, `step` is only logged)."""
    named = {"sampler": sampler, "num_steps": num_steps, "eta": eta, "spacing": spacing,
             "guidance_scale": guidance_scale, "variance": variance}
    overrides = {**(options or {}), **{k: v for k, v in named.items() if v is not None}}
    settings = SamplerSettings.from_config(config.sample, **overrides)
    unknown = sorted(set(options or {}) - set(settings.options) - set(settings.spacing_options))
    if unknown:
        raise UserError(f"{settings.name} with the {settings.describe()['spacing']} spacing has no "
                        f"option {', '.join(unknown)}; its options: "
                        f"{', '.join([*settings.options, *settings.spacing_options]) or 'none'}")
    labels = None
    if class_labels:
        numbers = class_numbers(class_labels, class_names,
                                config.model.num_classes)
        labels = np.resize(np.asarray(numbers, np.int32), num_samples)
    batch_size = min(batch_size, num_samples)
    sample_fn = compiled_sampler.make_sample_fn(config, mesh, settings, num_images=batch_size,
                                        num_snapshots=snapshots)
    logging.info("sampling %d images%s with %s", num_samples,
                 "" if step is None else f" from step {step}", settings.summary())
    images, strips = [], []
    num_batches = -(-num_samples // batch_size)
    # One batch: the bar counts the sampler's steps; several: the images done.
    total, unit = ((sample_fn.num_steps, "step") if num_batches == 1 else (num_samples, "image"))
    with progress_bars.bar(total, "sampling", unit, progress) as bar:
        on_steps = bar.update if num_batches == 1 else None
        for index in range(num_batches):
            batch_labels = (None if labels is None
                            else labels[index * batch_size:(index + 1) * batch_size])
            outputs = sample_fn(params, jax.random.fold_in(jax.random.PRNGKey(seed), index),
                                on_steps=on_steps, labels=batch_labels)
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


def write(samples: np.ndarray, strips: np.ndarray | None, output: str,
          num_columns: int | None = None) -> None:
    """Writes a grid (.png, `num_columns` wide: default square) or an array file (.npz),
    plus the denoising strip if given."""
    path = epath.Path(output)
    if path.suffix == ".png":
        image_utils.save_png(image_utils.make_grid(samples, num_columns), output)
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
        class_labels, num_samples, columns = _class_choice()
        samples, strips = generate(
            FLAGS.workdir, num_samples, step=FLAGS.step, sampler=FLAGS.sampler,
            num_steps=FLAGS.num_steps, eta=FLAGS.eta, spacing=FLAGS.spacing, seed=FLAGS.seed,
            variance=FLAGS.variance,
            batch_size=FLAGS.batch_size, snapshots=FLAGS.snapshots, progress=True,
            class_labels=class_labels, guidance_scale=FLAGS.guidance_scale,
            options=_options(FLAGS.options),
        )
        if jax.process_index() == 0:
            write(samples, strips, FLAGS.output, columns)
            logging.info("wrote %s", FLAGS.output)


def _options(items: list[str] | None) -> dict[str, float]:
    """`--options` KEY=VALUE items as numbers."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--options takes KEY=NUMBER items, got {item!r}")
    return options


def _class_choice() -> tuple[list[str] | None, int, int | None]:
    """(class labels, images, grid columns) the class flags ask for."""
    chosen = [flag for flag, given in (("class_label", FLAGS.class_label is not None),
                                       ("class_labels", bool(FLAGS.class_labels)),
                                       ("class_grid", FLAGS.class_grid)) if given]
    if len(chosen) > 1:
        raise UserError(f"--{chosen[0]} and --{chosen[1]} cannot be combined; pass one")
    if FLAGS.class_label is not None:
        return [str(FLAGS.class_label)], FLAGS.num_samples, None
    if FLAGS.class_labels:
        return FLAGS.class_labels, FLAGS.num_samples, None
    if FLAGS.class_grid:
        config, _ = runs.run_config(FLAGS.workdir, FLAGS.step)
        if not config.model.num_classes:
            raise UserError("--class_grid needs a class-conditional run; this one is "
                            "unconditional (model.num_classes=0)")
        per_class = FLAGS.num_samples
        labels = np.repeat(np.arange(config.model.num_classes), per_class)
        return [str(k) for k in labels], len(labels), per_class
    return None, FLAGS.num_samples, None


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser("ddpm_jax.sample"))
