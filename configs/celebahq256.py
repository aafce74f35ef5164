"""CelebA-HQ 256x256, the DDPM paper's setup: the 114 M-parameter net.

Base 128, multipliers (1, 1, 2, 2, 4, 4), 2 res blocks, single-head attention at 16x16,
no dropout; lr 2e-5, batch 64, EMA 0.9999; samples with the posterior ("fixed small")
variance. TFDS's `celeb_a_hq` needs its files prepared by hand (see README).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.num_train_steps = 500_000
    config.batch_size = 64
    config.learning_rate = 2e-5
    config.lr_schedule = "constant"
    config.warmup_steps = 5000
    config.ema_decay = 0.9999

    config.data.source = "tfds"
    config.data.name = "celeb_a_hq/256"
    config.data.image_size = 256
    config.data.random_flip = True

    config.model.base_channels = 128
    config.model.channel_mults = (1, 1, 2, 2, 4, 4)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.num_heads = 1
    config.model.dropout = 0.0

    config.diffusion.variance = "fixed_small"
    config.sample.num_images = 8
    return config
