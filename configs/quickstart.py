"""Quickstart: a small net on the 100 LFW faces bundled with scikit-image, offline, minutes on a CPU.

v prediction, because the few-step samplers of the grids take the clean image from the
net's output: with eps prediction, 600 steps leave most DDIM and DPM-Solver++ samples of
these grayscale faces in colour noise (the error in eps is amplified by 1 / sqrt(abar) at
high noise), with v all of them are gray faces (docs/benchmarks.md, "quickstart").
"""

from configs import default


def get_config():
    config = default.get_config()
    config.num_train_steps = 600
    config.batch_size = 32
    config.learning_rate = 1e-3
    config.lr_schedule = "constant"
    config.warmup_steps = 50
    config.ema_decay = 0.995
    config.ema_warmup = True
    config.log_every_steps = 20
    config.sample_every_steps = 300
    config.save_every_steps = 200

    config.data.source = "bundled"
    config.data.image_size = 32
    config.data.random_flip = True

    config.model.base_channels = 32
    config.model.channel_mults = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (8,)
    config.model.num_heads = 1
    config.model.dropout = 0.0
    config.model.norm_groups = 8
    # XLA's convolutions: on this small net Winograd does not repay its compile time in a
    # 600-step run (docs/performance-notes.md).
    config.conv_algorithm = "direct"

    config.diffusion.prediction = "v"

    config.sample.num_images = 16
    config.sample.sampler = "dpm_solver++"
    config.sample.num_steps = 20
    return config
