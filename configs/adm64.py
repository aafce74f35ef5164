"""ADM for class-conditional ImageNet 64x64 (Dhariwal & Nichol 2021, guided-diffusion's
ImageNet-64 flags; 296 M parameters).

The net: base 192 channels, multipliers (1, 2, 3, 4), 3 residual blocks per level, attention
at 32, 16 and 8 with 64 channels per head, scale-shift normalisation of the embedding,
BigGAN-style residual resampling, dropout 0.1, a learned embedding per class; the diffusion:
T = 1000 cosine schedule, eps prediction with learned variances (Nichol & Dhariwal's hybrid
loss). Training as the paper's ImageNet-64 run: batch 2048, Adam at lr 3e-4, EMA 0.9999.

Differs from the published net: the class embedding has one more row, the null label that
classifier-free guidance samples with (768 parameters; `label_dropout` 0 trains it never, as
ADM, which guides with a classifier instead); ADM's attention computes the same function in
another order. Data: TFDS `imagenet_resized/64x64`, which must be prepared first (its
ImageNet files are a manual download).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.num_train_steps = 540_000
    config.batch_size = 2048
    config.learning_rate = 3e-4
    config.lr_schedule = "constant"
    config.warmup_steps = 0
    config.grad_clip_norm = 0.0
    config.ema_decay = 0.9999
    config.label_dropout = 0.0

    config.data.source = "tfds"
    config.data.name = "imagenet_resized/64x64"
    config.data.image_size = 64
    config.data.label = "label"
    config.data.random_flip = False

    config.model.base_channels = 192
    config.model.channel_mults = (1, 2, 3, 4)
    config.model.num_res_blocks = 3
    config.model.attention_resolutions = (32, 16, 8)
    config.model.head_channels = 64
    config.model.dropout = 0.1
    config.model.scale_shift_norm = True
    config.model.resample = "resblock"
    config.model.num_classes = 1000

    config.diffusion.schedule = "cosine"
    config.diffusion.prediction = "eps"
    config.diffusion.variance = "learned_range"
    config.diffusion.vlb_weight = 0.001

    config.sample.sampler = "ddpm"
    config.sample.num_steps = 250
    config.eval.sampler = "ddpm"
    config.eval.num_steps = 250
    return config
