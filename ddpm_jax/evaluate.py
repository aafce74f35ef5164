"""FID, IS, KID and bits/dim on demand: `python -m ddpm_jax.evaluate COMMAND --flags`.

Commands:

* ``fid-stats --config=configs/celeba.py --output=celeba64_stats.npz``: reference
  statistics of a dataset as the training pipeline feeds it (RGB, ``data.crop``, bicubic
  resize to ``data.image_size``, no flips), over every image or ``--num_images`` drawn at
  random. Any config field can be overridden as in training (``--config.data.path=...``).
* ``fid --samples=PATH --reference=STATS.npz``: FID and KID of samples against reference
  statistics, and their Inception Score (`fid.py`). PATH is a folder of images, an ``.npz``
  of uint8 images (the sample command's output), or a training workdir, in which case
  ``--num_images`` samples (default the run's ``eval.num_samples``) are drawn from its
  newest checkpoint (or ``--step``) and go from the sampler to the Inception network
  without being stored. KID needs a statistics file written by ``fid-stats`` (it keeps a
  feature subset); with another tool's file it is reported as null. A class-conditional
  run's samples are class-balanced (``--class_distribution=data``: the training data's
  class frequencies) and guided with ``--guidance_scale`` (default ``eval.guidance_scale``);
  ``--guidance_scales=1,1.5,2,3`` measures each scale in turn and writes the table
  (``--json``) and a chart of FID and IS against the scale (``--plot``, default
  WORKDIR/eval/guidance_sweep.png).
* ``convert-weights --input=pt_inception-2015-12-05-6726825d.pth --output=inception.npz``:
  the standard PyTorch weight file as a NumPy file that loads without PyTorch.
* ``nll --workdir=DIR [--step=N] [--num_images=N] [--split=S | --config=F]``: the negative
  log-likelihood bound in bits/dim, as Ho et al. report it (`likelihood.py`), of the run's
  data (its `data` section; ``--split`` another split, ``--config`` another config's data) as
  training sees it without flips; the total, the prior, the decoder and the sum of the KL
  terms, and (``--json``) the mean term at every t.
* ``fid --samples=DIR --sigma_rels=0.03,0.05,0.08`` and ``nll --workdir=DIR --sigma_rels=...``
  on a run trained with power EMAs: each EMA length reconstructed from the run's snapshots
  (at ``--step``, default the newest snapshot; `ddpm_jax/ema.py`) and measured, with a table
  (``--json``) and a chart against the length (``--plot``, default WORKDIR/eval/ema_sweep.png).

The Inception weights come from ``--weights`` (or the run's ``eval.inception_weights``);
see `ddpm_jax/inception.py` for the file and its source.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from ddpm_jax import (
    checkpointing,
    cli,
    console,
    data_sources,
    ema,
    fid,
    image_utils,
    inception,
    input_pipeline,
    recipe,
    runs,
)
from ddpm_jax import progress as progress_bars
from ddpm_jax.core import likelihood
from ddpm_jax.core.errors import UserError
from ddpm_jax.runtime import network, sharding
from ddpm_jax.samplers import SamplerSettings
from ddpm_jax.train.step import images_to_model_space

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a command, so importing defines none."""
    config_flags.DEFINE_config_file("config", None, "Training config naming the dataset (fid-stats, "
                                    "nll); --config.FIELD=VALUE overrides a field, every field "
                                    "is documented in configs/default.py.",
                                    lock_config=True)
    flags.DEFINE_string("output", None, "fid-stats / convert-weights: file to write (.npz).")
    flags.DEFINE_string("input", None, "convert-weights: the PyTorch weight file (.pth).")
    flags.DEFINE_string("weights", None, "Inception weights (.pth or .npz); default eval.inception_weights.")
    flags.DEFINE_string("samples", None, "fid: a folder of images, an .npz of uint8 images, or a workdir.")
    flags.DEFINE_string("reference", None, "fid: reference statistics (.npz); default eval.reference_stats.")
    flags.DEFINE_integer("num_images", None, "fid-stats: images to use (default all); fid on a "
                         "workdir: samples to draw (default eval.num_samples).", lower_bound=0)
    flags.DEFINE_integer("batch_size", 100, "Images per Inception (and sampling) batch.",
                         lower_bound=1)
    flags.DEFINE_integer("step", None, "fid on a workdir: checkpoint step (default the newest).")
    flags.DEFINE_string("sampler", None, "fid on a workdir: sampler (default eval.sampler).")
    flags.DEFINE_integer("num_steps", None, "fid on a workdir: sampler steps (default eval.num_steps).")
    flags.DEFINE_float("eta", None, "fid on a workdir: DDIM eta (default eval.eta).")
    flags.DEFINE_string("spacing", None, "fid on a workdir: timestep spacing (default eval.spacing).")
    flags.DEFINE_integer("seed", 0, "Sampling seed (fid on a workdir) or subset seed (fid-stats).")
    flags.DEFINE_string("json", None, "Also write the result as JSON here.")
    flags.DEFINE_float("guidance_scale", None, "fid on a class-conditional workdir: guidance "
                       "scale (default eval.guidance_scale).")
    flags.DEFINE_list("guidance_scales", None, "fid on a class-conditional workdir: measure "
                      "each of these scales; writes a table and a chart.")
    flags.DEFINE_enum("class_distribution", None, ["uniform", "data"], "fid on a class-"
                      "conditional workdir: balanced classes, or the data's frequencies.")
    flags.DEFINE_list("sigma_rels", None, "fid on a workdir, nll: the run's power-EMA "
                      "snapshots reconstructed at each of these EMA lengths and measured in "
                      "turn (`ddpm_jax.ema`); writes a table and a chart.")
    flags.DEFINE_string("plot", None, "fid with --guidance_scales or --sigma_rels, nll with "
                        "--sigma_rels: the chart (.png).")
    flags.DEFINE_string("workdir", None, "nll: the training run.")
    flags.DEFINE_string("split", None, "nll: the data split (default the run's data.split).")


COMMANDS = ("fid-stats", "fid", "convert-weights", "nll")


def _required(**values: object) -> None:
    missing = [f"--{name}" for name, value in values.items() if not value]
    if missing:
        raise app.UsageError(f"missing {', '.join(missing)}")


def fid_stats(config, output: str, weights: str, num_images: int = 0, batch_size: int = 100,
              seed: int = 0) -> dict:
    """Writes reference statistics of `config.data` to `output`; returns what it wrote."""

    features = fid.InceptionFeatures(weights, sharding.create_mesh())  # fails fast on bad weights
    source = data_sources.make_source(config.data)
    count, read = input_pipeline.evaluation_images(config.data, source, num_images, seed)
    d = config.data
    logging.info("Inception statistics of %d images of %s", count, d.name or d.path or d.source)
    scores = features.statistics(read, count, batch_size, progress=True)
    inception_score, _ = scores.inception_score()
    described = {
        "source": d.source, "dataset": d.name if d.source == "tfds" else d.path,
        "split": d.split, "image_size": d.image_size, "crop": d.crop, "crop_size": d.crop_size,
        "crop_box": tuple(d.crop_box), "resize": "PIL bicubic (antialiased) to image_size",
        "flip": "none",
    }
    if jax.process_index() == 0:
        fid.save_statistics(output, scores.features, kid_features=scores.kid_subset.features(),
                            inception_score=inception_score, **described)
    return {"num_images": scores.count, "output": output, "inception_score": inception_score,
            **described}


def _read_image_files(paths: list[str]):
    """`read(indices)` of sample image files, decoded as training decodes images."""

    def read(indices):
        images = [data_sources.read_image(paths[index]) for index in indices]
        shapes = {image.shape for image in images}
        if len(shapes) > 1:
            raise UserError(f"sample images differ in size ({sorted(shapes)}); resize them to one "
                             "size first")
        return np.stack(images)

    return read


def _load_npz_images(path: str) -> np.ndarray:
    with epath.Path(path).open("rb") as f, np.load(f) as data:
        # arr_0: the sample command's and the ADM evaluator's key; images: older files
        key = next((k for k in ("arr_0", "images") if k in data.files), data.files[0])
        images = data[key]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}[{key!r}] is {images.dtype} {images.shape}; expected uint8 "
                         "images [N, H, W, 3] (the sample command's .npz)")
    return images


def sample_fid(samples: str, reference: str, weights: str | None, *, num_images: int | None = None,
               batch_size: int = 100, step: int | None = None, sampler: str | None = None,
               num_steps: int | None = None, eta: float | None = None,
               spacing: str | None = None, seed: int = 0, guidance_scale: float | None = None,
               class_distribution: str | None = None, run: tuple | None = None,
               features: fid.InceptionFeatures | None = None) -> dict:
    """FID, Inception Score and KID (`fid.compare`) of a folder, an .npz or a workdir's
    samples against `reference` statistics. `run` (`runs.load_run`'s result) and `features`
    (the Inception of `weights`) spare loading them again when one workdir is scored
    several times."""

    path = epath.Path(samples)
    result: dict = {"samples": samples}
    if (path / "checkpoints").exists():
        config, params, step, mesh = run or runs.load_run(samples, step)
        e = config.eval
        weights = weights or e.inception_weights
        reference = reference or e.reference_stats
        _required(weights=weights, reference=reference)
        if class_distribution:
            e.class_distribution = class_distribution
        settings = SamplerSettings.from_config(e, sampler=sampler, num_steps=num_steps, eta=eta,
                                               spacing=spacing, guidance_scale=guidance_scale)
        sample_fid = fid.make_sample_fid_fn(
            config, mesh, settings, weights=features or weights, reference=reference,
            num_samples=num_images or e.num_samples, batch_size=batch_size, progress=True,
            class_counts=checkpointing.saved_class_counts(samples))
        result.update(step=step, seed=seed, **settings.describe())
        if config.model.num_classes:
            result["class_distribution"] = e.class_distribution
        scores = sample_fid(params, jax.random.PRNGKey(seed))
    else:
        _required(weights=weights, reference=reference)
        reference_stats = fid.load_reference(reference)  # fail before reading images
        if path.is_dir():
            files = data_sources.list_image_files(samples)
            count, read = len(files), _read_image_files(files)
        elif path.suffix == ".npz":
            images = _load_npz_images(samples)
            count, read = len(images), lambda indices: images[np.asarray(indices)]
        else:
            raise UserError(f"--samples={samples!r} is not a folder, an .npz or a workdir")
        features = fid.InceptionFeatures(weights, sharding.create_mesh())
        image_scores = features.statistics(read, count, batch_size, progress=True)
        scores = {**fid.compare(image_scores, reference_stats), "num_images": image_scores.count}
    result.update(reference=reference, **scores)
    return result


def guidance_sweep(samples: str, scales: list[float], plot: str | None = None,
                   **kwargs) -> dict:
    """`sample_fid` of a class-conditional workdir at each guidance scale (the same noise and
    classes for each), as a table, and a chart of FID and IS against the scale at `plot`
    (default WORKDIR/eval/guidance_sweep.png)."""
    if not (epath.Path(samples) / "checkpoints").exists():
        raise UserError("--guidance_scales needs --samples to be a training workdir")
    plot = plot or str(checkpointing.absolute_path(samples) / "eval" / "guidance_sweep.png")
    cli.check_output("plot", plot)
    run = runs.load_run(samples, kwargs.pop("step", None))  # once, for every scale
    weights = kwargs.pop("weights", None) or run[0].eval.inception_weights
    _required(weights=weights, reference=kwargs.get("reference") or run[0].eval.reference_stats)
    features = fid.InceptionFeatures(weights, run[3])
    rows = []
    for scale in scales:
        logging.info("guidance scale %g (%d of %d)", scale, len(rows) + 1, len(scales))
        rows.append(sample_fid(samples, guidance_scale=scale, weights=weights, run=run,
                               features=features, **kwargs))
    table = [{"guidance_scale": scale, **{key: row.get(key) for key in
                                          ("fid", "inception_score", "kid")}}
             for scale, row in zip(scales, rows, strict=True)]
    chart = image_utils.line_chart(scales, {"FID": [r["fid"] for r in table],
                                            "Inception Score": [r["inception_score"]
                                                                for r in table]},
                                   "guidance scale")
    if jax.process_index() == 0:
        image_utils.save_png(chart, plot)
    first = rows[0]
    return {"samples": samples, "step": first.get("step"), "num_images": first["num_images"],
            "reference": first["reference"], "plot": plot, "sweep": table}


def nll(workdir: str, *, step: int | None = None, num_images: int = 0, split: str | None = None,
        data_config=None, batch_size: int = 100, seed: int = 0, progress: bool = False,
        timesteps_per_call: int = 50) -> dict:
    """Bits/dim of a run's data under its checkpoint `step` (default the newest): the mean
    over `num_images` images (0: all) of the bound and of its terms. Each batch's T terms
    are computed `timesteps_per_call` timesteps per compiled call, so the progress bar moves
    (and estimates the time left) within a batch; the terms are those of one call over all T."""
    if timesteps_per_call < 1:
        raise UserError(f"timesteps_per_call must be >= 1, got {timesteps_per_call}")
    recipe.refuse_edm(runs.run_config(workdir, step)[0], "evaluate nll (the variational bound)")
    config, params, step, mesh = runs.load_run(workdir, step)
    data = (data_config or config).data.copy_and_resolve_references()
    if split:
        data.split = split
    if data.image_size != config.data.image_size:
        raise UserError(f"the data config's image_size {data.image_size} is not the run's "
                         f"{config.data.image_size}")
    source = data_sources.make_source(data)
    count, read = input_pipeline.evaluation_images(data, source, num_images, seed)
    batch = sharding.padded_to_devices(min(batch_size, count), mesh)
    definition, schedule = network.graphdef(config), recipe.schedule(config)
    images_sharding = sharding.batch_sharding(mesh)
    num_timesteps = schedule.num_timesteps
    chunk = min(timesteps_per_call, num_timesteps)

    @jax.jit
    def chunk_terms(params, images, keys, timesteps):
        return likelihood.vb_terms(
            lambda x, t: network.apply(definition, params, x, t), schedule,
            images_to_model_space(images), timesteps, keys, **recipe.reverse_process(config))

    @jax.jit
    def batch_bound(images, terms):
        return likelihood.bound(terms, likelihood.prior_bpd(schedule, images_to_model_space(images)))

    term_keys = jax.jit(likelihood.term_keys, static_argnums=1)
    sums = None
    with progress_bars.bar(count, "nll", "image", progress) as bar:
        for index in range(-(-count // batch)):
            rows = np.arange(index * batch, min((index + 1) * batch, count))
            images = read(np.resize(rows, batch))  # the last batch padded with its own rows
            images = jax.make_array_from_callback(images.shape, images_sharding,
                                                  lambda where, images=images: images[where])
            keys = term_keys(jax.random.fold_in(jax.random.PRNGKey(seed), index), num_timesteps)
            terms = []
            for start in range(0, num_timesteps, chunk):
                # The last chunk repeats its last timestep to the common length (one program).
                timesteps = np.minimum(np.arange(start, start + chunk), num_timesteps - 1)
                done = min(chunk, num_timesteps - start)
                chunk_out = chunk_terms(params, images, keys[timesteps], timesteps.astype(np.int32))
                terms.append(chunk_out.block_until_ready()[:done])  # the bar counts work done
                bar.update(len(rows) * done / num_timesteps)
            out = jax.device_get(batch_bound(images, jnp.concatenate(terms)))
            kept = {key: value[..., :len(rows)].sum(axis=-1) for key, value in out.items()}
            sums = kept if sums is None else {k: sums[k] + kept[k] for k in sums}
    means = {key: value / count for key, value in sums.items()}
    return {"workdir": workdir, "step": step, "num_images": count, "split": data.split,
            "bits_per_dim": float(means["total"]), "prior_bpd": float(means["prior"]),
            "decoder_bpd": float(means["decoder"]),
            "kl_terms_bpd": float(means["terms"][1:].sum()),
            "terms_bpd": [float(v) for v in means["terms"]]}


def convert_weights(input_path: str, output: str) -> dict:
    """Converts the PyTorch weight file to the .npz `inception.load` reads without PyTorch."""

    state_dict = inception.read_state_dict(input_path)
    source_sha256 = hashlib.sha256(epath.Path(input_path).read_bytes()).hexdigest()
    inception.save_npz(state_dict, output, source=os.path.basename(input_path),
                       source_sha256=source_sha256)
    return {"input": input_path, "output": output, "arrays": len(state_dict)}


def strict_json(result: dict, indent: int | None = None) -> str:
    """`result` as JSON that every parser reads: a NaN or infinite number is refused (ValueError
    naming it) instead of written as the non-standard NaN/Infinity."""
    bad = [key for key, value in result.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise UserError(f"the result holds non-finite {', '.join(bad)}: {result}")
    return json.dumps(result, indent=indent, default=str, allow_nan=False)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m ddpm_jax.evaluate {{{'|'.join(COMMANDS)}}} --flags")
    command = argv[1]
    with console.exit_on_user_error(f"ddpm_jax.evaluate {command}"):
        for flag in ("output", "json"):
            cli.check_output(flag, getattr(FLAGS, flag))
        result = _run(command)
        if jax.process_index() == 0:
            _report(result)


def _run(command: str) -> dict:
    """The result of `command`, from the flags."""
    if command == "nll":
        _required(workdir=FLAGS.workdir)
        measure = lambda workdir, step=FLAGS.step: nll(  # noqa: E731
            workdir, step=step, num_images=FLAGS.num_images or 0, split=FLAGS.split,
            data_config=FLAGS.config, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
            progress=True)
        if FLAGS.sigma_rels:
            return ema.sweep(FLAGS.workdir, FLAGS.sigma_rels, lambda run: measure(run, None),
                             {"bits_per_dim": "bits/dim"}, step=FLAGS.step, plot=FLAGS.plot)
        return measure(FLAGS.workdir)
    if command == "convert-weights":
        _required(input=FLAGS.input, output=FLAGS.output)
        return convert_weights(FLAGS.input, FLAGS.output)
    if command == "fid-stats":
        config = FLAGS.config
        _required(config=config, output=FLAGS.output)
        weights = FLAGS.weights or config.eval.inception_weights
        _required(weights=weights)
        return fid_stats(config, FLAGS.output, weights, FLAGS.num_images or 0, FLAGS.batch_size,
                         FLAGS.seed)
    _required(samples=FLAGS.samples)
    common = dict(reference=FLAGS.reference, weights=FLAGS.weights, num_images=FLAGS.num_images,
                  batch_size=FLAGS.batch_size, step=FLAGS.step, sampler=FLAGS.sampler,
                  num_steps=FLAGS.num_steps, eta=FLAGS.eta, spacing=FLAGS.spacing,
                  seed=FLAGS.seed, class_distribution=FLAGS.class_distribution)
    if FLAGS.guidance_scales:
        try:
            scales = [float(scale) for scale in FLAGS.guidance_scales]
        except ValueError:
            raise UserError(f"--guidance_scales={','.join(FLAGS.guidance_scales)}: give numbers "
                            "separated by commas, such as 1,1.5,2,3") from None
        return guidance_sweep(FLAGS.samples, scales, FLAGS.plot, **common)
    if FLAGS.sigma_rels:
        step = common.pop("step")
        return ema.sweep(FLAGS.samples, FLAGS.sigma_rels,
                         lambda run: sample_fid(run, guidance_scale=FLAGS.guidance_scale, **common),
                         {"fid": "FID", "inception_score": "Inception Score", "kid": "KID"},
                         step=step, plot=FLAGS.plot)
    return sample_fid(FLAGS.samples, guidance_scale=FLAGS.guidance_scale, **common)


def _report(result: dict) -> None:
    """Prints `result` (a line for people, then strict JSON) and writes the --json file."""
    if "fid" in result:
        print(f"{fid.describe(result)} ({result['num_images']} images vs {result['reference']})")
    if "sweep" in result:
        print(f"{result['num_images']} images per scale vs {result['reference']}; chart: "
              f"{result['plot']}")
        print("guidance scale |    FID | Inception Score | KID")
        for row in result["sweep"]:
            kid = "-" if row["kid"] is None else f"{row['kid']:.5f}"
            print(f"{row['guidance_scale']:>14g} | {row['fid']:6.2f} | "
                  f"{row['inception_score']:15.3f} | {kid}")
    if "ema_sweep" in result:
        print(f"EMA lengths reconstructed at step {result['step']}; chart: {result['plot']}")
        for row in result["ema_sweep"]:
            measured = ", ".join(f"{key} {value:.4g}" for key, value in row.items()
                                 if key not in ("sigma_rel", "run", "step", "fit_error")
                                 and value is not None)
            print(f"sigma_rel {row['sigma_rel']:.3f} (fit error {row['fit_error']:.1e}): "
                  f"{measured}")
    if "bits_per_dim" in result:
        print(f"{result['bits_per_dim']:.4f} bits/dim over {result['num_images']} images "
              f"(prior {result['prior_bpd']:.4f}, KL terms {result['kl_terms_bpd']:.4f}, "
              f"decoder {result['decoder_bpd']:.4f})")
    # strict JSON (no NaN, which strict parsers refuse); the per-t terms (T numbers) only in
    # the --json file
    print(strict_json({k: v for k, v in result.items() if k != "terms_bpd"}))
    if FLAGS.json:
        image_utils.write_atomically(FLAGS.json, strict_json(result, indent=2).encode())


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser("ddpm_jax.evaluate"))
