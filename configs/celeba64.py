"""CelebA 64x64, the usual DDPM setting (as in the DDIM paper's code).

The DDPM recipe (`ddpm_paper.py`) with multipliers (1, 2, 2, 2, 4), dropout 0.1, lr 2e-4,
batch 128, "fixed large" variance. Preprocessing: a 140x140 centre crop of the 178x218
aligned faces resized to 64 (the score-SDE choice); FIDs are only comparable under the same
preprocessing.
"""

from configs import ddpm_paper


def get_config():
    config = ddpm_paper.get_config()
    config.num_train_steps = 500_000
    config.batch_size = 128
    config.learning_rate = 2e-4
    config.data.name = "celeb_a"
    config.data.image_size = 64
    config.data.crop = "center"
    config.data.crop_size = 140
    config.model.channel_mults = (1, 2, 2, 2, 4)
    config.model.dropout = 0.1
    config.diffusion.variance = "fixed_large"
    return config
