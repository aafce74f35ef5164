"""CelebA 64x64, the usual DDPM setting (as in the DDIM paper's code).

Base 128, multipliers (1, 2, 2, 2, 4), 2 res blocks, attention at 16x16, dropout 0.1;
"fixed large" variance, EMA 0.9999, batch 128, Adam lr 2e-4, clip 1.0. Preprocessing:
a 140x140 centre crop of the 178x218 aligned faces resized to 64 (the score-SDE choice);
FIDs are only comparable under the same preprocessing.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.num_train_steps = 500_000
    config.batch_size = 128
    config.learning_rate = 2e-4
    config.lr_schedule = "constant"
    config.warmup_steps = 5000
    config.ema_decay = 0.9999

    config.data.source = "tfds"
    config.data.name = "celeb_a"
    config.data.image_size = 64
    config.data.crop = "center"
    config.data.crop_size = 140
    config.data.random_flip = True

    config.model.base_channels = 128
    config.model.channel_mults = (1, 2, 2, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.num_heads = 1
    config.model.dropout = 0.1

    config.diffusion.variance = "fixed_large"
    return config
