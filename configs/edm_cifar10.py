"""CIFAR-10 32x32 with EDM's training and sampling (Karras et al. 2022, Table 7 and its
`train.py --arch=ddpmpp`; FID 1.97 unconditional, 1.79 conditional, at 35 network calls).

As published: EDM's preconditioning and loss (sigma_data 0.5, ln sigma ~ N(-1.2, 1.2^2)),
200 M training images at batch 512 (390,625 steps), Adam at lr 1e-3 (betas 0.9/0.999,
eps 1e-8) ramped up over the first 10 M images then constant, no weight decay or gradient
clipping, an EMA of half-life 0.5 M images (decay 0.5^(512 / 500,000) per step), dropout
0.13, no flips, float32; sampling with Heun on the Karras grid (18 sigmas from 80 to 0.002,
rho 7: 35 calls).

The net is EDM's DDPM++ (`configs/ddpmpp_cifar10.py`): 55,733,891 parameters with the map
of the augmentation vector, EDM's 55.73 M.

With EDM's non-leaky augmentation (--augment=0.12: x-flips, y-flips, scaling, rotation,
anisotropic scaling, translation; `data.augment`), the net told the 9 parameters.

Differs from the published run: the EMA ramp: EDM grows the half-life with training
(ema_rampup_ratio 0.05); this uses `ema_warmup` instead (or --config.ema.kind=power).
Conditional (EDM's 1.79): --config.data.label=label --config.model.num_classes=10
--config.label_dropout=0 (EDM trains without classifier-free guidance).
"""

from configs import ddpmpp_cifar10, default


def get_config():
    config = default.get_config()
    config.num_train_steps = 390_625
    config.batch_size = 512
    config.learning_rate = 1e-3
    config.lr_schedule = "constant"
    config.warmup_steps = 19_531  # 10 M images
    config.grad_clip_norm = 0.0
    config.ema_decay = 0.5 ** (512 / 500_000)
    config.ema_warmup = True
    config.save_every_steps = 10_000
    config.sample_every_steps = 10_000

    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.random_flip = False
    config.data.augment.probability = 0.12  # EDM's CIFAR-10 set of transforms (the default)

    ddpmpp_cifar10.ddpmpp_net(config.model)

    config.diffusion.formulation = "edm"

    for section in (config.sample, config.eval):
        section.sampler = "heun"
        section.num_steps = 35
        section.spacing = "karras"
    return config
