"""Weights & Biases as a metric writer: every scalar and image TensorBoard gets, mirrored.

Optional (`pip install -e ".[wandb]"`); on when `config.wandb.project` is set. The run id is
kept in `WORKDIR/wandb_run_id`, so a restarted training run (preemption, resume) goes on
logging into the same W&B run. Only process 0 logs.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import metric_writers
from ddpm_jax.core.errors import UserError

RUN_ID_FILE = "wandb_run_id"


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError when W&B logging is asked for and cannot work."""
    w = config.wandb
    if not w.project:
        return
    if w.mode not in ("online", "offline", "disabled"):
        raise UserError(f"wandb.mode must be 'online', 'offline' or 'disabled', got {w.mode!r}")
    try:
        import wandb  # noqa: F401  (optional: only where W&B logging is asked for)
    except ImportError as error:
        raise UserError("wandb.project is set but wandb is not installed: "
                         'pip install -e ".[wandb]", or leave wandb.project empty') from error


class WandbWriter(metric_writers.MetricWriter):
    """Logs to one W&B run, resumed by the id stored in the workdir."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        import wandb  # optional and heavy: only where W&B logging is asked for

        self._wandb = wandb
        id_file = epath.Path(workdir) / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        w = config.wandb
        self._run = wandb.init(
            project=w.project, entity=w.entity or None, name=w.name or None,
            tags=list(w.tags) or None, mode=w.mode, id=run_id, resume="allow",
            dir=str(workdir), config=config.to_dict())
        if not id_file.exists():
            id_file.write_text(run_id)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._run.log({key: float(value) for key, value in scalars.items()}, step=step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        self._run.log({key: [self._wandb.Image(np.asarray(image)) for image in batch]
                       for key, batch in images.items()}, step=step)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._run.config.update(dict(hparams), allow_val_change=True)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._run.log(dict(texts), step=step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        del num_buckets
        self._run.log({key: self._wandb.Histogram(np.asarray(value))
                       for key, value in arrays.items()}, step=step)

    def flush(self) -> None:
        pass  # W&B sends in the background

    def close(self) -> None:
        self._run.finish()
