"""A plain-number look at a run's samples: the share that look like its training images.

    python -m benchmarks.sample_quality --workdir=runs/quickstart [--num_samples=64]
        [--cases=ddim:100:linspace,dpm_solver++:20,ddpm:50:auto:fixed_large,ddpm:0]
        [--png_prefix=PATH] [--json=F]

For data whose images share simple statistics (the quickstart's grayscale faces), two
per-image numbers tell a clean sample from a failed one, without any network:
  * colour: the mean over pixels of the spread between the R, G and B values (0 for a
    grayscale image; the training images are grayscale, so colour is a sign of an
    undertrained net);
  * high-frequency energy: the mean squared difference between the grayscale image and its
    3x3 box blur (noise and speckle raise it; a washed-out blob lowers it).
A sample is "clean" when its colour is at most `--max_colour` levels and its high-frequency
energy lies within the range of the training images' (as the pipeline feeds them). Each case
(sampler:network calls[:spacing[:ddpm's variance rule]]) samples the same seed from the run's
newest checkpoint; `--png_prefix` also writes each case's grid.
"""

from __future__ import annotations

import argparse
import json

import ml_collections
import numpy as np

from benchmarks import common


def colour(images: np.ndarray) -> np.ndarray:
    """Per image: mean over pixels of max - min over the colour channels (0-255 levels)."""
    values = images.astype(np.float64)
    return (values.max(axis=-1) - values.min(axis=-1)).mean(axis=(1, 2))


def high_frequency_energy(images: np.ndarray) -> np.ndarray:
    """Per image: mean squared difference between its gray levels and their 3x3 box blur."""
    gray = images.astype(np.float64).mean(axis=-1)
    padded = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    height, width = gray.shape[1:]
    blur = sum(padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)) / 9
    return ((gray - blur) ** 2).mean(axis=(1, 2))


def training_range(config: ml_collections.ConfigDict) -> tuple[float, float]:
    """(min, max) high-frequency energy of the training images as the pipeline feeds them."""
    from ddpm_jax import data_sources, input_pipeline

    source = data_sources.make_source(config.data)
    count, read = input_pipeline.evaluation_images(config.data, source)
    energy = high_frequency_energy(read(range(count)))
    return float(energy.min()), float(energy.max())


def judge(images: np.ndarray, energy_range: tuple[float, float], max_colour: float) -> dict:
    """Shares of `images` that are gray, within the training energy range, and both."""
    gray = colour(images) <= max_colour
    energy = high_frequency_energy(images)
    in_range = (energy >= energy_range[0]) & (energy <= energy_range[1])
    return {"gray": float(gray.mean()), "energy_in_range": float(in_range.mean()),
            "clean": float((gray & in_range).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--cases", default="ddim:100,dpm_solver++:20")
    parser.add_argument("--max_colour", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png_prefix", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from ddpm_jax import image_utils, runs, sample

    config, step = runs.run_config(args.workdir)
    energy_range = training_range(config)
    rows = []
    for case in args.cases.split(","):
        name, calls, spacing, variance = (case.split(":") + ["auto", ""])[:4]
        images, _ = sample.generate(args.workdir, args.num_samples, sampler=name,
                                    num_steps=int(calls), spacing=spacing, seed=args.seed,
                                    variance=variance or None)
        rows.append({"step": step, "sampler": name, "network_calls": int(calls) or "all",
                     "spacing": spacing, "variance": variance or "-",
                     "mean_colour": float(colour(images).mean()),
                     **judge(images, energy_range, args.max_colour)})
        if args.png_prefix:
            suffix = f"_{variance}" if variance else ""
            image_utils.save_png(image_utils.make_grid(images[:16]),
                                 f"{args.png_prefix}_{name}_{calls}_{spacing}{suffix}.png")
    print(f"training images' high-frequency energy: {energy_range[0]:.1f} .. {energy_range[1]:.1f}")
    common.report(f"sample quality of {args.workdir}", rows, None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "sample_quality", "machine": common.machine(),
                       "training_energy_range": energy_range, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
