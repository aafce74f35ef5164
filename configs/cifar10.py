"""CIFAR-10 32x32, the DDPM paper's setup (Ho et al. 2020): the 35.7 M-parameter net.

Base 128, multipliers (1, 2, 2, 2), 2 res blocks, single-head attention at 16x16,
dropout 0.1; T = 1000 linear betas, epsilon prediction, MSE; Adam lr 2e-4 after 5000
warmup steps, batch 128, global-norm clip 1.0, EMA 0.9999, random flips; samples with
beta_t ("fixed large") variance.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.num_train_steps = 800_000
    config.batch_size = 128
    config.learning_rate = 2e-4
    config.lr_schedule = "constant"
    config.warmup_steps = 5000
    config.grad_clip_norm = 1.0
    config.ema_decay = 0.9999

    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.random_flip = True

    config.model.base_channels = 128
    config.model.channel_mults = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.num_heads = 1
    config.model.dropout = 0.1

    config.diffusion.variance = "fixed_large"
    return config
