"""Validation of a config before any data is read or anything is compiled.

Each part of the config is checked by the module that uses it (the mesh, the optimizer, the
speed settings, the diffusion math, the samplers, the data source, the network); `validate`
calls them in order, adds the checks of the loop's own fields (intervals, checkpoints, EMA,
FID) and turns their errors into `ConfigError`. Every message names the config field to
change and how.
"""

from __future__ import annotations

import ml_collections
from absl import logging
from etils import epath

from ddpm_jax import console, data_sources, image_utils, models, ops, recipe, samplers, wandb_writer
from ddpm_jax.core import power_ema
from ddpm_jax.core.errors import UserError
from ddpm_jax.core.registry import check_choice
from ddpm_jax.models.architecture import augment_dim
from ddpm_jax.runtime import sharding
from ddpm_jax.train import optimizer


class ConfigError(UserError):
    """A config that cannot train; raised before any expensive work."""


def _positive(config: ml_collections.ConfigDict, *fields: str) -> None:
    for field in fields:
        value = config
        for part in field.split("."):
            value = value[part]
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{field} must be a positive integer, got {value!r}")


def _checked(check, *args) -> None:
    """Runs a module's own config check, reporting its ValueError as a ConfigError."""
    try:
        check(*args)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    _checked(check_choice, field, value, choices)


# Fields a checkpoint's arrays depend on: changing them makes the checkpoint unloadable.
SHAPE_FIELDS = ("data.image_size",)
# Fields that define what the network learned to output: resuming with others would train
# and sample with a different meaning of the same weights.
DIFFUSION_FIELDS = ("diffusion.prediction", "diffusion.schedule", "diffusion.num_timesteps",
                    "diffusion.beta_start", "diffusion.beta_end", "diffusion.sigma_data")
SHAPE_SECTIONS = ("model",)
IGNORED_MODEL_FIELDS = ("dtype", "dropout")  # compute settings, not parameter shapes


def check_compatible(saved: dict, config: ml_collections.ConfigDict, *,
                     allow_diffusion_change: bool = False) -> None:
    """Refuses to resume a checkpoint whose network differs from the one `config` builds, or
    (unless `allow_diffusion_change`, a deliberate fine-tune) whose network learned another
    target or noise schedule."""
    current = config.to_dict()
    differences = []
    for section in SHAPE_SECTIONS:
        for key in sorted(set(saved.get(section, {})) | set(current.get(section, {}))):
            if key in IGNORED_MODEL_FIELDS:
                continue
            old, new = saved.get(section, {}).get(key), current.get(section, {}).get(key)
            if _normalise(old) != _normalise(new):
                differences.append(f"{section}.{key}: checkpoint {old!r}, config {new!r}")
    differences += _changed_fields(saved, current, SHAPE_FIELDS)
    old, new = saved.get("diffusion", {}).get("variance"), current["diffusion"]["variance"]
    if (old == "learned_range") != (new == "learned_range"):  # 6 output channels or 3
        differences.append(f"diffusion.variance: checkpoint {old!r}, config {new!r}")
    old, new = saved.get("diffusion", {}).get("formulation", "ddpm"), current["diffusion"]["formulation"]
    if old != new:  # the net's input, time input and output mean other things
        differences.append(f"diffusion.formulation: checkpoint {old!r}, config {new!r}")
    differences += _ema_differences(saved.get("ema", {}), current["ema"])
    old_dim = augment_dim(saved.get("data", {}).get("augment"))
    new_dim = augment_dim(current["data"]["augment"])
    if old_dim != new_dim:  # the net's augmentation input, or its width
        differences.append(f"data.augment: the checkpoint's net takes an augmentation vector "
                           f"of {old_dim} entries, the config's {new_dim} (0: none)")
    old_clip, new_clip = saved.get("grad_clip_norm", 0), current.get("grad_clip_norm", 0)
    if (old_clip > 0) != (new_clip > 0):  # optax.chain with clipping or plain AdamW
        differences.append(f"grad_clip_norm: checkpoint {old_clip!r}, config {new_clip!r} (clipping "
                           "on or off is another optimizer state; any value > 0 resumes a "
                           "clipped run)")
    changed = _changed_fields(saved, current, DIFFUSION_FIELDS)
    if changed and allow_diffusion_change and not differences:
        logging.warning("fine-tuning with another diffusion (--allow_diffusion_change): %s",
                        "; ".join(changed))
        return
    if differences or changed:
        raise ConfigError(
            "the workdir holds checkpoints of a different network or diffusion:\n  "
            + "\n  ".join(differences + changed)
            + "\nuse a new --workdir, or set these fields back to the checkpoint's values"
            + ("; to fine-tune on purpose with the new diffusion settings, pass "
               "--allow_diffusion_change" if changed and not differences else "")
        )


def _ema_differences(saved: dict, current: dict) -> list[str]:
    """The EMA fields whose change makes the saved EMAs other averages (or another tree)."""
    old_kind, new_kind = saved.get("kind", "exponential"), current["kind"]
    if old_kind != new_kind:
        return [f"ema.kind: checkpoint {old_kind!r}, config {new_kind!r}"]
    old, new = _normalise(saved.get("sigma_rels")), _normalise(current["sigma_rels"])
    if new_kind == "power" and old != new:
        return [f"ema.sigma_rels: checkpoint {old!r}, config {new!r} (the saved EMAs are of "
                "the checkpoint's)"]
    return []


def _check_ema(config: ml_collections.ConfigDict) -> None:
    """The EMA section: a known kind, and power EMAs of lengths a power EMA can have."""
    ema = config.ema
    _choice("ema.kind", ema.kind, ("exponential", "power"))
    if not isinstance(ema.snapshot_every_steps, int) or ema.snapshot_every_steps < 0:
        raise ConfigError("ema.snapshot_every_steps must be an integer >= 0 (0: every "
                          f"save_every_steps), got {ema.snapshot_every_steps!r}")
    if ema.kind != "power":
        return
    sigma_rels = list(ema.sigma_rels)
    if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
        raise ConfigError(f"ema.sigma_rels={tuple(sigma_rels)}: name one or more different "
                          "EMA lengths (EDM2 keeps 0.05 and 0.10)")
    for sigma_rel in sigma_rels:
        try:
            power_ema.check_sigma_rel(float(sigma_rel))
        except ValueError as error:
            raise ConfigError(f"ema.sigma_rels: {error}") from error


def _changed_fields(saved: dict, current: dict, fields: tuple[str, ...]) -> list[str]:
    """`field: checkpoint X, config Y` for each of `fields` whose value differs."""
    changed = []
    for field in fields:
        section, key = field.split(".")
        old, new = saved.get(section, {}).get(key), current[section][key]
        if _normalise(old) != _normalise(new):
            changed.append(f"{field}: checkpoint {old!r}, config {new!r}")
    return changed


def _normalise(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_workdir_writable(workdir: str) -> None:
    """Creates `workdir` if needed and proves a file can be written there."""
    try:
        for name in ("checkpoints", "samples"):
            path = epath.Path(workdir) / name
            if path.exists() and not path.is_dir():
                raise ConfigError(f"{path} is a file, where the run keeps its {name} folder; "
                                  "move it away or choose another --workdir")
        image_utils.check_writable(epath.Path(workdir) / ".write_probe")
    except ConfigError:
        raise
    except Exception as error:
        fix = "choose another folder"
        if "://" in workdir and not console.tensorflow_installed():
            fix = ('remote workdirs are reached through TensorFlow\'s file system: '
                   'pip install -e ".[tfds]"')
        raise ConfigError(f"--workdir={workdir!r} is not writable ({error}); {fix}") from error


def _check_eval(config: ml_collections.ConfigDict) -> None:
    """The FID section; only checked when FID during training is on."""
    if config.eval_every_steps < 0:
        raise ConfigError(f"eval_every_steps must be >= 0 (0: no FID), got {config.eval_every_steps}")
    if config.eval_every_steps == 0:
        return
    e = config.eval
    _positive(config, "eval.batch_size")
    if not isinstance(e.num_samples, int) or e.num_samples < 2:
        raise ConfigError(f"eval.num_samples must be >= 2 (a covariance needs two), got {e.num_samples}")
    _checked(samplers.check_section, e, "eval", recipe.preconditioning(config))
    for field in ("inception_weights", "reference_stats"):
        path = e[field]
        if path and not epath.Path(path).exists():
            raise ConfigError(f"eval.{field}={path!r} does not exist; fix the path or set "
                              "eval_every_steps=0 (see docs/evaluation.md)")


def _check_classes(config: ml_collections.ConfigDict) -> None:
    """Labels, classes and guidance agree: a class-conditional net needs labels, labels need
    one, and guidance needs a class-conditional net."""
    num_classes, label = config.model.num_classes, config.data.label
    if label and not num_classes:
        raise ConfigError(f"data.label={label!r} gives the data classes, but model.num_classes=0 "
                          "(unconditional); set model.num_classes to the number of classes")
    if num_classes and not label:
        raise ConfigError(f"model.num_classes={num_classes} needs class labels: set data.label "
                          "(see configs/default.py), or model.num_classes=0")
    if not 0.0 <= config.label_dropout < 1.0:
        raise ConfigError(f"label_dropout must be in [0, 1), got {config.label_dropout}")
    for section in ("sample", "eval"):
        settings = config[section]
        try:
            guidance = samplers.Guidance(settings.guidance_scale, settings.guidance_interval)
        except ValueError as error:
            raise ConfigError(f"{section}.{error}") from error
        if guidance.active and not num_classes:
            raise ConfigError(f"{section}.guidance_scale={guidance.scale} needs a class-"
                              "conditional model (model.num_classes > 0); use 1")
    _choice("eval.class_distribution", config.eval.class_distribution, ("uniform", "data"))
    if not isinstance(config.sample.max_class_rows, int) or config.sample.max_class_rows < 1:
        raise ConfigError(f"sample.max_class_rows must be a positive integer, got "
                          f"{config.sample.max_class_rows!r}")


def validate(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    device_count: int = 1,
    process_count: int = 1,
) -> None:
    """Raises `ConfigError` naming the field to change if `config` cannot train."""
    _positive(config, "num_train_steps", "batch_size", "log_every_steps", "save_every_steps",
              "keep_checkpoints", "data.image_size", "sample.num_images",
              "diffusion.num_timesteps")
    _positive(config, "grad_accum_steps", "mesh.fsdp")
    _checked(sharding.check_config, config, device_count, process_count)
    _checked(optimizer.check_config, config)
    _choice("on_nonfinite", config.on_nonfinite, ("stop", "skip"))
    if not isinstance(config.sample_every_steps, int) or config.sample_every_steps < 0:
        raise ConfigError("sample_every_steps must be an integer >= 0 (0: no sample grids), got "
                          f"{config.sample_every_steps!r}")
    if config.profile_steps < 0:
        raise ConfigError(f"profile_steps must be >= 0 (0: no trace), got {config.profile_steps}")
    peak = config.get("peak_tflops_per_device", 0.0)
    if isinstance(peak, bool) or not isinstance(peak, int | float) or peak < 0:
        raise ConfigError("peak_tflops_per_device must be a number >= 0 (0: the device kind's "
                          f"peak from ddpm_jax/runtime/flops.py), got {peak!r}")
    if config.keep_every_steps < 0:
        raise ConfigError(f"keep_every_steps must be >= 0 (0 keeps none), got {config.keep_every_steps}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    _check_ema(config)
    _checked(ops.check_config, config)

    _checked(recipe.check_config, config)
    try:
        calls = samplers.check_section(config.sample, "sample", recipe.preconditioning(config))
    except ValueError as error:
        raise ConfigError(str(error)) from error  # it names the field
    try:
        samplers.snapshot_slots(calls, config.sample.num_snapshots)
    except ValueError as error:
        raise ConfigError(f"sample.num_snapshots: {error}") from error
    _check_eval(config)

    _checked(data_sources.check_config, config.data)

    _checked(models.check_config, config)
    _check_classes(config)
    _checked(wandb_writer.check_config, config)

    if workdir is not None:
        check_workdir_writable(workdir)
