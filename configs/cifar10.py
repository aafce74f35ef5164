"""CIFAR-10 32x32, the DDPM paper's setup (Ho et al. 2020): the 35.7 M-parameter net.

The paper's recipe (`ddpm_paper.py`) with multipliers (1, 2, 2, 2), dropout 0.1, lr 2e-4,
batch 128, and samples with beta_t ("fixed large") variance.
"""

from configs import ddpm_paper


def get_config():
    config = ddpm_paper.get_config()
    config.num_train_steps = 800_000
    config.batch_size = 128
    config.learning_rate = 2e-4
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.model.channel_mults = (1, 2, 2, 2)
    config.model.dropout = 0.1
    config.diffusion.variance = "fixed_large"
    return config
