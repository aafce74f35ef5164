"""CelebA with the defaults of the PyTorch + Accelerate project this trainer reimplements.

192x192 squash-resize of the 178x218 aligned faces (no crop, no flip), global batch 256,
AdamW lr 1e-4 with weight decay 1e-4, 5000 warmup steps then cosine decay, 75,000 steps,
a checkpoint every 5000 steps keeping only the newest, no EMA, the posterior
("fixed small") variance for samples. The net: base width 224, multipliers
(1, 2, 3, 4), 2 residual blocks per level, GroupNorm(16), no dropout, 4-head
transformer-style attention after each downsample (96, 48, 24 and 12 pixels), stride-2
convs padded 1 on each side (PyTorch's padding=1), a decoder
that mirrors the encoder (the "mirror" layout), a 448-wide sinusoidal time embedding and a
linear time projection in the residual blocks: 332.5 M parameters.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.num_train_steps = 75_000
    config.batch_size = 256
    config.learning_rate = 1e-4
    config.lr_schedule = "cosine"
    config.warmup_steps = 5000
    config.weight_decay = 1e-4
    config.grad_clip_norm = 1.0
    config.ema_decay = 0.0
    config.save_every_steps = 5000
    config.sample_every_steps = 5000
    config.keep_checkpoints = 1

    config.data.source = "tfds"
    config.data.name = "celeb_a"
    config.data.split = "train"
    config.data.image_size = 192
    config.data.crop = "none"
    config.data.random_flip = False

    config.model.base_channels = 224
    config.model.channel_mults = (1, 2, 3, 4)
    config.model.num_res_blocks = 2
    config.model.layout = "mirror"
    config.model.attention_resolutions = (96, 48, 24, 12)
    config.model.attention_type = "transformer"
    config.model.num_heads = 4
    config.model.mlp_ratio = 2.0
    config.model.dropout = 0.0
    config.model.norm_groups = 16
    config.model.time_embedding_width = 2 * config.model.base_channels
    config.model.time_projection = "linear"
    config.model.downsample_padding = "symmetric"  # PyTorch's Conv2d(padding=1)

    config.diffusion.variance = "fixed_small"
    config.sample.num_images = 5
    config.sample.num_snapshots = 10
    return config
