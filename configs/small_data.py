"""Your own folder of a few hundred to a few thousand images, at 64x64, trained so that it
does not overfit: EDM's recipe for its smallest data set (AFHQv2 64x64, Karras et al. 2022:
`--arch=ddpmpp --cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15`), with EDM2's power
EMAs so that the EMA length is chosen after training.

    python -m ddpm_jax.main --config=configs/small_data.py --workdir=runs/mine \
        --config.data.path=/path/to/your/images

With this few images a diffusion model soon reproduces its training set and its FID gets
worse with more training. Two things hold it off: dropout 0.25 in every residual block, and
non-leaky augmentation (`data.augment`): 15% of the time each of x-flip, y-flip, scaling,
rotation, anisotropic scaling and translation is applied, and the net is told which, so it
learns the augmented images as a conditional distribution and samples plain images from a
zero vector. With tens of thousands of images, lower the dropout (EDM's FFHQ 64: 0.05) and
keep the augmentation; with hundreds of thousands, turn both off (celeba64.py).

The net is DDPM++ at 64x64 (128 x (1, 2, 2, 2) channels, 4 blocks a level, attention at
16x16; 61.8 M parameters); training is EDM's (its preconditioning and loss), sampled with
Heun on the Karras grid (40 sigmas: 79 network calls, EDM's for 64x64).

Differs from the published run: batch 128 (EDM: 256), a 10,000-step warm-up (EDM: 10 M
images), 200,000 steps (25.6 M images; EDM trained 200 M) and power EMAs (EDM: one EMA of
half-life 0.5 M images); pick the EMA with `python -m ddpm_jax.evaluate fid --sigma_rels=...`.
"""

from configs import edm_cifar10


def get_config():
    config = edm_cifar10.get_config()  # DDPM++ and EDM's training
    config.num_train_steps = 200_000
    config.batch_size = 128
    config.learning_rate = 2e-4
    config.warmup_steps = 10_000
    config.save_every_steps = 5_000
    config.sample_every_steps = 5_000
    config.ema.kind = "power"  # snapshots every save: reconstruct any EMA length afterwards

    config.data.source = "folder"
    config.data.path = ""  # your images: --config.data.path=...
    config.data.image_size = 64
    config.data.random_flip = False  # the augmentation flips, and tells the net
    config.data.augment.probability = 0.15  # EDM's set: x-flip, y-flip, scale, rotations, shifts

    config.model.channel_mults = (1, 2, 2, 2)
    config.model.dropout = 0.25

    for section in (config.sample, config.eval):
        section.num_steps = 79  # Heun: 40 sigmas
    return config
