"""CelebA-HQ 256x256, the DDPM paper's setup: the 114 M-parameter net.

The paper's recipe (`ddpm_paper.py`) with multipliers (1, 1, 2, 2, 4, 4), no dropout, lr 2e-5,
batch 64, and samples with the posterior ("fixed small") variance. TFDS's `celeb_a_hq` needs
its files prepared by hand (see docs/training.md).
"""

from configs import ddpm_paper


def get_config():
    config = ddpm_paper.get_config()
    config.num_train_steps = 500_000
    config.batch_size = 64
    config.learning_rate = 2e-5
    config.data.name = "celeb_a_hq/256"
    config.data.image_size = 256
    config.model.channel_mults = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.diffusion.variance = "fixed_small"
    config.sample.num_images = 8
    return config
