"""Class-conditional quickstart: the 1,797 handwritten digits bundled with scikit-learn (8x8,
upsampled to 16x16), one class per digit, offline, minutes on a CPU.

Labels dropped to the null label 10% of the time, so the one net is also the unconditional
model classifier-free guidance needs; the grids have one row per digit, guided with scale
2. Install with `pip install -e ".[examples]"` (scikit-learn ships the digits).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.num_train_steps = 1000
    config.batch_size = 64
    config.learning_rate = 1e-3
    config.lr_schedule = "constant"
    config.warmup_steps = 50
    config.ema_decay = 0.995
    config.ema_warmup = True
    config.log_every_steps = 50
    config.sample_every_steps = 500
    config.save_every_steps = 500
    config.label_dropout = 0.1

    config.data.source = "digits"
    config.data.label = "digit"
    config.data.image_size = 16
    config.data.random_flip = False  # a mirrored digit is another shape

    config.model.num_classes = 10
    config.model.base_channels = 32
    config.model.channel_mults = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (8,)
    config.model.dropout = 0.0
    config.model.norm_groups = 8
    config.conv_algorithm = "direct"  # as the quickstart: a short run on a small net

    config.diffusion.prediction = "v"  # as the quickstart: few-step samplers read x0 from it

    config.sample.num_images = 50  # a row of 5 per digit
    config.sample.sampler = "dpm_solver++"
    config.sample.num_steps = 20
    config.sample.guidance_scale = 2.0
    return config
