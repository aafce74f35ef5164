"""Post-hoc EMA (EDM2): the EMA of any length, after training, from a power-EMA run's snapshots.

    python -m ddpm_jax.ema reconstruct --workdir=DIR --sigma_rel=0.08 [--step=N] [--output=OUT]

A run trained with `--config.ema.kind=power` snapshots its power-function EMAs (EDM2's
sigma_rels 0.05 and 0.10 by default) every `ema.snapshot_every_steps`. `reconstruct` finds
the combination of the snapshots up to step N (default the newest) whose averaging profiles
come closest to the EMA of length `sigma_rel` at step N (`core/power_ema.py`), and writes that
combination of their weights as a run of its own: OUT (default DIR/posthoc_ema/sigma_rel_X)
holds checkpoint N with those weights, which `sample`, `evaluate`, `convert to-diffusers` and
`ddpm_jax.load_model` read as any run (`--workdir=OUT`). A second call for the same
reconstruction reuses it.

`evaluate fid --samples=DIR --sigma_rels=0.03,0.05,...` (and `evaluate nll --workdir=DIR
--sigma_rels=...`) reconstructs each length and measures it: a table and a chart of the
metric against the EMA length.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath

from ddpm_jax import checkpointing, cli, console, ema_snapshots, image_utils, runs
from ddpm_jax.core import power_ema
from ddpm_jax.core.errors import MissingError, UserError
from ddpm_jax.train import state as train_state

FLAGS = flags.FLAGS
NOTE = "posthoc_ema.json"  # what a reconstructed run was made from


def define_flags() -> None:
    """Command-line flags; defined only when run as a command, so importing defines none."""
    flags.DEFINE_string("workdir", None, "The training run (trained with ema.kind=power).")
    flags.DEFINE_float("sigma_rel", None, "EMA length relative to the training so far, in "
                       "(0, 0.2887] (EDM2's best for FID lie between 0.03 and 0.14).")
    flags.DEFINE_integer("step", None, "Snapshot step to reconstruct at (default: the newest).")
    flags.DEFINE_string("output", None, "The run to write (default WORKDIR/posthoc_ema/"
                        "sigma_rel_X).")


def check_sigma_rels(values: Sequence[float], flag: str) -> list[float]:
    """`values` as floats, each a length a power EMA can have (UserError naming `flag`)."""
    try:
        sigma_rels = [float(value) for value in values]
        for sigma_rel in sigma_rels:
            power_ema.check_sigma_rel(sigma_rel)
    except ValueError as error:
        raise UserError(f"--{flag}: {error}") from None
    return sigma_rels


def default_output(workdir: str, sigma_rel: float) -> str:
    return str(checkpointing.absolute_path(workdir) / "posthoc_ema" / f"sigma_rel_{sigma_rel:.3f}")


def reconstruct(workdir: str, sigma_rel: float, step: int | None = None,
                output: str | None = None) -> dict:
    """Writes the EMA of length `sigma_rel` at snapshot `step` (default the newest) of
    `workdir` as a run at `output`; returns what it wrote (and the fit's relative error)."""
    (sigma_rel,) = check_sigma_rels([sigma_rel], "sigma_rel")
    snapshots = ema_snapshots.read_meta(workdir)
    step = max(snapshots) if step is None else step
    if step not in snapshots:
        raise MissingError(f"no EMA snapshot of step {step} in {ema_snapshots.directory(workdir)}"
                           f"; there are {sorted(snapshots)}")
    used = {s: meta for s, meta in snapshots.items() if s <= step}
    pairs = [(s, k) for s in sorted(used) for k in range(len(used[s]["sigma_rels"]))]
    coefficients, error = power_ema.reconstruction(
        [s for s, _ in pairs], [used[s]["sigma_rels"][k] for s, k in pairs], step, sigma_rel)
    output = output or default_output(workdir, sigma_rel)
    note = {"workdir": str(checkpointing.absolute_path(workdir)), "step": step,
            "sigma_rel": sigma_rel, "snapshots": sorted(used), "relative_error": error}
    result = {**note, "output": output}
    if _reusable(output, note):
        logging.info("%s already holds this reconstruction", output)
        return result
    config = ml_collections.ConfigDict(checkpointing.with_defaults(used[step]["config"]))
    like = train_state.train_state_shapes(config).params
    params = ema_snapshots.weighted_sum(
        workdir, {s: meta["sigma_rels"] for s, meta in used.items()},
        dict(zip(pairs, coefficients, strict=True)), like)
    config.ema.kind = "exponential"  # the written run holds one set of weights, as EMA
    path = runs.write_run(config, params, output, step)
    classes = checkpointing.saved_classes(workdir)
    if classes is not None:  # a class-conditional run's class names go with its weights
        checkpointing.save_classes(path, classes, checkpointing.saved_class_counts(workdir))
    if jax.process_index() == 0:
        image_utils.write_atomically(epath.Path(output) / NOTE, json.dumps(note, indent=2).encode())
    logging.info("EMA of sigma_rel %g at step %d from %d snapshots (profile fit error %.2e): %s",
                 sigma_rel, step, len(used), error, output)
    return result


def _reusable(output: str, note: dict) -> bool:
    """Whether `output` already holds the reconstruction `note` describes; a folder holding
    anything else is refused."""
    path = epath.Path(output)
    if not path.exists():
        return False
    written = path / NOTE
    same = ("workdir", "step", "sigma_rel", "snapshots")  # what the weights are made of
    if written.exists():
        previous = json.loads(written.read_text())
        if all(previous.get(key) == note[key] for key in same):
            return True
    if path.is_dir() and not any(path.iterdir()):
        return False
    raise UserError(f"--output={output} exists and holds something else; choose a new folder")


def sweep(workdir: str, sigma_rels: Sequence[float], measure: Callable[[str], dict],
          metrics: dict[str, str], *, step: int | None = None, plot: str | None = None) -> dict:
    """`measure(run)` of the reconstruction of each of `sigma_rels` at snapshot `step`, as a
    table (the `metrics` keys of each result) and a chart of each metric (named by `metrics`'
    values) against sigma_rel at `plot` (default WORKDIR/eval/ema_sweep.png)."""
    sigma_rels = check_sigma_rels(sigma_rels, "sigma_rels")
    plot = plot or str(checkpointing.absolute_path(workdir) / "eval" / "ema_sweep.png")
    cli.check_output("plot", plot)
    rows = []
    for sigma_rel in sigma_rels:
        logging.info("EMA sigma_rel %g (%d of %d)", sigma_rel, len(rows) + 1, len(sigma_rels))
        made = reconstruct(workdir, sigma_rel, step)
        rows.append({"sigma_rel": sigma_rel, "run": made["output"],
                     "fit_error": made["relative_error"], "step": made["step"],
                     **{key: value for key, value in measure(made["output"]).items()
                        if key in metrics}})
    chart = image_utils.line_chart(
        sigma_rels, {label: [row[key] for row in rows] for key, label in metrics.items()
                     if all(row.get(key) is not None for row in rows)}, "EMA length (sigma_rel)")
    if jax.process_index() == 0:
        image_utils.save_png(chart, plot)
    return {"workdir": workdir, "step": rows[0]["step"], "plot": plot, "ema_sweep": rows}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] != "reconstruct":
        raise app.UsageError("usage: python -m ddpm_jax.ema reconstruct --workdir=DIR "
                             "--sigma_rel=X [--step=N] [--output=DIR]")
    with console.exit_on_user_error("ddpm_jax.ema reconstruct"):
        if not FLAGS.workdir or FLAGS.sigma_rel is None:
            raise app.UsageError("reconstruct needs --workdir and --sigma_rel")
        result = reconstruct(FLAGS.workdir, FLAGS.sigma_rel, FLAGS.step, FLAGS.output)
        if jax.process_index() == 0:
            print(f"wrote {result['output']}: the EMA of sigma_rel {result['sigma_rel']:g} at "
                  f"step {result['step']} from {len(result['snapshots'])} snapshots (profile fit "
                  f"error {result['relative_error']:.2e}); sample it with: python -m "
                  f"ddpm_jax.sample --workdir={result['output']} --output=samples.png")
            print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser("ddpm_jax.ema"))
