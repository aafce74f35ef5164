"""Weights both ways with diffusers: `python -m ddpm_jax.convert COMMAND --flags`.

Commands:

* ``from-diffusers --input=DIR --workdir=WORKDIR``: DIR is a `DDPMPipeline` folder
  (``model_index.json``, ``unet/``, ``scheduler/``), such as a published DDPM checkpoint
  (``huggingface-cli download google/ddpm-cifar10-32 --local-dir DIR``), or a bare
  `UNet2DModel` folder (``config.json`` and ``diffusion_pytorch_model.safetensors``, or
  ``.bin`` when torch is installed). Writes a step-0 checkpoint (weights and EMA both the
  imported weights) and its config (also as ``WORKDIR/config.py``), so that
  ``ddpm_jax.sample``, ``ddpm_jax.evaluate fid`` and fine-tuning with ``ddpm_jax.main`` work
  on WORKDIR; prints the commands that do.
* ``to-diffusers --workdir=WORKDIR --output=DIR [--step=N] [--weights=ema|params]``: writes a
  `DDPMPipeline` folder that ``DDPMPipeline.from_pretrained(DIR)`` loads.

Field-by-field mapping: `diffusers_format.py`. What one side cannot express is refused
before anything is written, naming the field.
"""

from __future__ import annotations

import json
import os
import pprint
import shutil
import socket
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from safetensors.numpy import save_file

from ddpm_jax import (
    checkpointing,
    cli,
    console,
    diffusers_format,
    diffusers_weights,
    models,
    recipe,
    runs,
    workdir_lock,
)
from ddpm_jax.core.errors import MissingError, UserError
from ddpm_jax.diffusers_format import UnsupportedError

FLAGS = flags.FLAGS
COMMANDS = ("from-diffusers", "to-diffusers")


def define_flags() -> None:
    """Command-line flags; defined only when run as a command, so importing defines none."""
    flags.DEFINE_string("input", None, "from-diffusers: a DDPMPipeline or UNet2DModel folder.")
    flags.DEFINE_string("workdir", None, "from-diffusers: the workdir to create; to-diffusers: "
                        "the run to export.")
    flags.DEFINE_string("output", None, "to-diffusers: the DDPMPipeline folder to write.")
    flags.DEFINE_integer("step", None, "to-diffusers: checkpoint step (default: the newest).")
    flags.DEFINE_enum("weights", "ema", ["ema", "params"],
                      "to-diffusers: the EMA weights (the raw ones when the run kept no EMA) "
                      "or the raw weights.")


# ------------------------------------------------------------------------------ reading


def _read_json(path: epath.Path) -> dict:
    """A JSON file holding an object (diffusers' configs and indexes all do)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object of fields "
                         "as diffusers writes it")
    return value


def find_folders(folder: str) -> tuple[epath.Path, epath.Path | None]:
    """(UNet folder, scheduler config file or None) of a pipeline or bare UNet folder."""
    root = epath.Path(folder)
    if (root / "model_index.json").exists():
        index = _read_json(root / "model_index.json")
        if "unet" not in index:
            raise UnsupportedError(f"{root}/model_index.json names no unet; its components: "
                                   f"{sorted(k for k in index if not k.startswith('_'))}")
        scheduler = root / "scheduler" / "scheduler_config.json"
        return root / "unet", scheduler if scheduler.exists() else None
    if (root / "config.json").exists():
        return root, None
    raise MissingError(f"{root} holds neither model_index.json (a DDPMPipeline folder) nor "
                            "config.json (a UNet2DModel folder)")


def _load_torch_file(path: epath.Path) -> dict[str, np.ndarray]:
    try:
        import torch  # optional and heavy: only to read a PyTorch pickle (.bin)
    except ImportError as error:
        raise UserError(f"{path.name} is a PyTorch pickle, which needs torch (pip install "
                         "torch); a .safetensors file of the same weights needs nothing") from error
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    return {name: value.float().numpy() for name, value in state.items()}


def _load_weight_file(path: epath.Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise MissingError(f"{path} does not exist (named by the weights' index)")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(os.fspath(path))
        except Exception as error:  # safetensors' own error type for a damaged header
            raise UserError(f"cannot read {path}: {error} (the file is damaged or truncated; "
                             "download it again)") from error
    return _load_torch_file(path)


def read_weights(unet_folder: epath.Path) -> dict[str, np.ndarray]:
    """The UNet's state dict: from .safetensors (NumPy, no torch) or .bin (torch), single or
    sharded (``*.index.json``)."""
    for name in diffusers_format.UNET_FILES:
        index = unet_folder / f"{name}.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(file, str) for file in weight_map.values()):
                raise UserError(f"{index} has no weight_map of weight names to file names")
            files = sorted(set(weight_map.values()))
            state: dict[str, np.ndarray] = {}
            for file in files:
                state.update(_load_weight_file(unet_folder / file))
            return state
        if (unet_folder / name).exists():
            return _load_weight_file(unet_folder / name)
    raise MissingError(f"no weights in {unet_folder}: expected one of "
                            f"{list(diffusers_format.UNET_FILES)}")


def read_diffusers(folder: str) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of a diffusers folder; configs are checked before weights are read."""

    unet_folder, scheduler_file = find_folders(folder)
    unet = _read_json(unet_folder / "config.json")
    scheduler = _read_json(scheduler_file) if scheduler_file is not None else None
    if scheduler is None:
        logging.warning("no scheduler config in %s: using the DDPM paper's diffusion settings "
                        "(linear betas 1e-4..0.02, T=1000, eps prediction)", folder)
    config = diffusers_format.config_from_diffusers(unet, scheduler)
    models.check_config(config)
    recipe.check_config(config)
    params = diffusers_weights.from_state_dict(read_weights(unet_folder), config)
    return config, params


# ------------------------------------------------------------------------------ commands


def config_file_text(config: ml_collections.ConfigDict, source: str) -> str:
    """A config file (for `--config=`) that returns `config`."""
    return (f'"""The config of the diffusers model converted from {source}\n'
            '(python -m ddpm_jax.convert from-diffusers); override fields with --config.X=Y."""\n\n'
            "import ml_collections\n\n"
            'inf = float("inf")  # how the values below write infinity\n\n\n'
            "def get_config():\n"
            f"    return ml_collections.ConfigDict({pprint.pformat(config.to_dict(), indent=4)})\n")


def from_diffusers(folder: str, workdir: str) -> str:
    """Writes a step-0 run of the diffusers model in `folder` into `workdir`; returns the
    commands that sample from it and fine-tune it."""

    path = checkpointing.absolute_path(workdir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--workdir={workdir} is a file; choose a new folder")
    config, params = read_diffusers(folder)  # everything is checked before anything is written
    runs.write_run(config, params, workdir)
    config_file = path / "config.py"
    config_file.write_text(config_file_text(config, folder))
    logging.info("wrote step 0 of %s and %s", path / "checkpoints", config_file)
    return (f"sample:    python -m ddpm_jax.sample --workdir={workdir} --num_samples=16 "
            f"--output=samples.png\n"
            f"fine-tune: python -m ddpm_jax.main --config={config_file} --workdir={workdir} "
            "--config.data.path=YOUR_IMAGE_FOLDER --config.num_train_steps=STEPS")


def _staging_prefix(target: epath.Path) -> str:
    """The name prefix of the hidden folder an export of `target` is written into."""
    return f".{target.name}.staging-"


def _remove_abandoned_staging(target: epath.Path) -> None:
    """Removes staging folders of `target` (named PID@HOST.RANDOM) whose exporting process on
    this host is gone (killed); another host's are left alone."""

    for folder in target.parent.glob(f"{_staging_prefix(target)}*"):
        pid, _, rest = folder.name[len(_staging_prefix(target)):].partition("@")
        host = rest.rsplit(".", 1)[0]
        if pid.isdigit() and host == socket.gethostname() and not workdir_lock.alive(int(pid)):
            logging.info("removing %s, left by an export that was stopped", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _follow_umask(folder: epath.Path) -> None:
    """Gives `folder` and what it holds the modes the user's umask gives new files (mkdtemp
    and safetensors make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, folders, files in os.walk(os.fspath(folder)):
        os.chmod(root, 0o777 & ~umask)
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def write_diffusers(config: ml_collections.ConfigDict, params: Any, output: str) -> None:
    """Writes `params` as a `DDPMPipeline` folder at `output` (complete or not at all)."""
    unet, scheduler = diffusers_format.unet_config(config), diffusers_format.scheduler_config(config)
    state_dict = diffusers_weights.to_state_dict(params, config)
    target = epath.Path(output)
    if target.exists() and not target.is_dir():
        raise UserError(f"--output={output} is a file; choose a new folder")
    if target.exists() and any(target.iterdir()):
        raise UserError(f"--output={output} exists and is not empty; choose a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(target)
    staging = epath.Path(tempfile.mkdtemp(
        prefix=f"{_staging_prefix(target)}{os.getpid()}@{socket.gethostname()}.",
        dir=os.fspath(target.parent)))
    try:
        (staging / "unet").mkdir()
        (staging / "scheduler").mkdir()
        (staging / "model_index.json").write_text(
            json.dumps(diffusers_format.pipeline_index(), indent=2))
        (staging / "unet" / "config.json").write_text(json.dumps(unet, indent=2))
        (staging / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler, indent=2))
        save_file(state_dict, os.fspath(staging / "unet" / diffusers_format.UNET_FILES[0]),
                  metadata={"format": "pt"})
        _follow_umask(staging)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def to_diffusers(workdir: str, output: str, step: int | None = None,
                 weights: str = "ema") -> dict:
    """Exports checkpoint `step` of the run in `workdir` as a `DDPMPipeline` folder."""

    config, _ = runs.run_config(workdir, step)
    recipe.refuse_edm(config, "convert to-diffusers (a DDPMPipeline's scheduler)")
    diffusers_format.check_exportable(config)  # before restoring anything
    # `step` None: the newest checkpoint whose weights read, as `sample` takes
    config, params, step, _ = runs.load_run(workdir, step, weights)
    diffusers_format.check_exportable(config)
    if jax.process_index() == 0:
        write_diffusers(config, params, output)
    return {"workdir": workdir, "step": step, "weights": weights, "output": output}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m ddpm_jax.convert {{{'|'.join(COMMANDS)}}} --flags")
    command = argv[1]
    required = {"from-diffusers": ("input", "workdir"), "to-diffusers": ("workdir", "output")}
    missing = [f"--{name}" for name in required[command] if not FLAGS[name].value]
    if missing:
        raise app.UsageError(f"{command} needs {', '.join(missing)}")
    with console.exit_on_user_error(f"ddpm_jax.convert {command}"):
        if command == "from-diffusers":
            print(from_diffusers(FLAGS.input, FLAGS.workdir))
        else:
            result = to_diffusers(FLAGS.workdir, FLAGS.output, FLAGS.step, FLAGS.weights)
            print(f"wrote {result['output']} (step {result['step']}, {result['weights']} weights); "
                  "in PyTorch: DDPMPipeline.from_pretrained(" + repr(result["output"]) + ")")


if __name__ == "__main__":
    define_flags()

    app.run(main, flags_parser=cli.flags_parser("ddpm_jax.convert"))
