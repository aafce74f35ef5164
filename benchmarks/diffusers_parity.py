"""Checks `ddpm_jax.convert` against diffusers' own `UNet2DModel`, in both directions.

Ho et al.'s CIFAR-10 net (the `google/ddpm-cifar10-32` UNet config: 32x32, TensorFlow 'SAME'
downsample padding), random weights:
  * import: a random `UNet2DModel`, saved as diffusers saves it, loaded with
    `ddpm_jax.load_model`;
  * export: random ddpm-jax weights written by `convert.write_diffusers`, loaded with
    `UNet2DModel.from_pretrained` (which must report no missing or unexpected keys).
Each row is one timestep: the largest difference between the two outputs over the largest
output, for ddpm-jax with XLA's convolutions ("direct") and with the CPU default (Winograd),
and the float32 PyTorch output's own error against a float64 PyTorch run for scale.

Needs torch and diffusers (`pip install -e ".[interop]"`; on a CPU-only machine install the
CPU wheel of torch first):

    python -m benchmarks.diffusers_parity [--json=diffusers_parity.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch
from diffusers import UNet2DModel

from benchmarks.common import report

TIMESTEPS = (0, 1, 250, 500, 999)


def _torch_output(model: UNet2DModel, x: np.ndarray, t: np.ndarray, dtype) -> np.ndarray:
    with torch.no_grad():
        out = model.to(dtype)(torch.from_numpy(x.transpose(0, 3, 1, 2)).to(dtype),
                              torch.from_numpy(t)).sample
    model.float()
    return out.double().numpy().transpose(0, 2, 3, 1)


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


def compare(model: UNet2DModel, jax_models: dict, x: np.ndarray) -> list[dict]:
    rows = []
    for t in TIMESTEPS:
        steps = np.full((x.shape[0],), t)
        theirs = _torch_output(model, x, steps, torch.float32)
        exact = _torch_output(model, x, steps, torch.float64)
        row = {"timestep": t}
        for name, jax_model in jax_models.items():
            row[f"{name}_vs_torch"] = _relative(jax_model(x, steps), theirs)
        row["torch32_vs_torch64"] = _relative(theirs, exact)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="Also write the rows here.")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    from configs import cifar10
    from ddpm_jax import convert, diffusers_format, loading
    from ddpm_jax.runtime import network

    fields = diffusers_format.unet_config(cifar10.get_config())  # google/ddpm-cifar10-32's
    torch.manual_seed(0)
    unet = UNet2DModel(**{k: v for k, v in fields.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = np.random.default_rng(0).standard_normal((args.batch, 32, 32, 3)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        unet.save_pretrained(f"{folder}/unet")
        model, config = loading.load_model(f"{folder}/unet")
        winograd = loading.Model(config.copy_and_resolve_references(), model.params)
        config.conv_algorithm = "direct"
        direct = loading.Model(config, model.params)
        for row in compare(unet, {"direct": direct, "default": winograd}, x):
            rows.append({"direction": "import", **row})

        params = network.random_params(config, seed=1)
        convert.write_diffusers(config, params, f"{folder}/exported")
        exported, info = UNet2DModel.from_pretrained(f"{folder}/exported/unet",
                                                     output_loading_info=True)
        print("UNet2DModel.from_pretrained loading info:", json.dumps(info))
        ours = {"direct": loading.Model(config, params),
                "default": loading.Model(winograd.config, params)}
        for row in compare(exported.eval(), ours, x):
            rows.append({"direction": "export", **row})
    report("diffusers_parity", rows, args.json)


if __name__ == "__main__":
    main()
