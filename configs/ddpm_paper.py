"""The training recipe shared by the DDPM paper's setups (Ho et al. 2020).

T = 1000 linear betas, epsilon prediction, MSE; Adam at a constant learning rate after 5000
warmup steps, global-norm clip 1.0, EMA 0.9999, random flips; a base-128 UNet with 2 res
blocks per level and single-head attention at 16x16. `cifar10.py`, `celeba64.py` and
`celebahq256.py` set the dataset, the width multipliers and the rest.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.lr_schedule = "constant"
    config.warmup_steps = 5000
    config.grad_clip_norm = 1.0
    config.ema_decay = 0.9999

    config.data.source = "tfds"
    config.data.random_flip = True

    config.model.base_channels = 128
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.num_heads = 1
    return config
