"""Base configuration: every field ddpm-jax reads, with its meaning.

Setup files in this folder call `get_config()` from here and override fields.
Any field can be overridden on the command line, e.g. `--config.batch_size=64`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # ---- run length, optimisation -------------------------------------------------
    config.seed = 0  # seeds init, data order, flips, timesteps, noise and dropout
    config.num_train_steps = 100_000  # optimizer steps in the whole run
    config.batch_size = 128  # global batch: split over all processes and devices
    config.learning_rate = 2e-4  # peak learning rate
    config.lr_schedule = "cosine"  # "cosine" (decay to 0 after warmup) or "constant"
    config.warmup_steps = 5000  # linear warmup from 0 to learning_rate
    config.weight_decay = 0.0  # AdamW decoupled decay; never applied to biases or norms
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.grad_accum_steps = 1  # split each batch into this many sequential micro-batches
    config.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
    config.ema_decay = 0.9999  # EMA of the weights used for samples; 0 disables
    config.ema_warmup = False  # use min(ema_decay, (1 + step) / (10 + step))

    # ---- logging, samples, checkpoints ---------------------------------------------
    config.log_every_steps = 100  # loss, learning rate, grad norm, steps/s, images/s
    config.sample_every_steps = 5000  # grid of EMA samples to TensorBoard and workdir/samples
    config.save_every_steps = 5000  # Orbax checkpoint under workdir/checkpoints
    config.keep_checkpoints = 3  # newest checkpoints kept
    config.keep_every_steps = 0  # also keep every checkpoint at a multiple of this (0: none)
    config.on_nonfinite = "stop"  # NaN/inf loss or gradient: "stop" the run or "skip" the step

    # ---- compilation -----------------------------------------------------------------
    # Largest per-device micro-batch one forward/backward pass runs on; bigger batches run
    # as sequential chunks with the same gradient. 0: 16 on CPU (faster there), none elsewhere;
    # -1: never split.
    config.compute_chunk_size = 0
    # Train steps per compiled call (a lax.scan over that many batches): fewer dispatches,
    # and on CPU one set of temporary buffers for all of them (XLA:CPU maps them afresh on
    # every call; 4 steps per call train the CIFAR-10 net 1.2x faster there). Logging,
    # samples, checkpoints and stop requests are handled between calls, and steps next to an
    # event that is not a multiple of it away run one per call. 0: on CPU the largest of 4, 2
    # and 1 that divides every interval above, 1 elsewhere.
    config.steps_per_dispatch = 0
    # CPU backend only: "eigen" compiles convolutions and dots with XLA's own kernels (1.1-1.2x
    # faster train steps here, ddpm_jax/xla.py); "default" leaves XLA's library choice.
    config.cpu_conv_library = "eigen"
    # 3x3 convolutions: "winograd" (F(4x4, 3x3) from 16x16 maps, F(2x2, 3x3) on 4x4 and 8x8,
    # ddpm_jax/models/winograd.py: 4x and 2.25x fewer FLOPs, float32 rounding-level
    # differences), "direct" (XLA's), or "auto": Winograd on the CPU backend (1.4-1.7x faster
    # forward, 1.1-1.2x faster train step there), XLA's elsewhere.
    config.conv_algorithm = "auto"

    # ---- devices -------------------------------------------------------------------
    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.fsdp = 1  # devices that split params/optimizer state (FSDP); 1 = pure data parallel
    mesh.fsdp_min_size = 2**14  # arrays with fewer elements stay replicated

    # ---- data ----------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.source = "tfds"  # "tfds", "folder" or "bundled" (offline LFW faces)
    data.name = "celeb_a"  # TFDS dataset name (source="tfds")
    data.split = "train"
    data.image_key = "image"  # feature holding the image in each TFDS record
    data.data_dir = ""  # TFDS data_dir; "" means TFDS's default (~/tensorflow_datasets)
    data.manual_dir = ""  # folder with manually downloaded files TFDS builds from
    data.download = False  # let TFDS try its own download (slow to fail: it retries)
    data.path = ""  # image folder (source="folder")
    data.image_size = 64  # square training resolution
    data.crop = "none"  # "none" (resize whole image), "center" (crop_size square) or "box"
    data.crop_size = 0  # side of the centre crop (crop="center")
    data.crop_box = (0, 0, 0, 0)  # (top, left, height, width) (crop="box")
    data.random_flip = True  # random horizontal flip per image
    data.num_workers = 0  # grain worker processes; 0 reads in the training process
    data.max_bad_fraction = 0.01  # unreadable files tolerated (skipped and logged) in a folder

    # ---- network ---------------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.layout = "ddpm"  # "ddpm" (Ho et al.) or "mirror" (the PyTorch project's encoder/decoder)
    model.base_channels = 128
    model.channel_mults = (1, 2, 2, 2)  # width multiplier per resolution level
    model.num_res_blocks = 2  # residual blocks per level on the down path
    model.attention_resolutions = (16,)  # resolutions (pixels) that get self-attention
    model.attention_type = "ddpm"  # "ddpm" (GroupNorm + attention) or "transformer"
    model.num_heads = 1
    model.mlp_ratio = 2.0  # MLP width ratio of "transformer" attention blocks
    model.dropout = 0.1
    model.norm_groups = 32  # GroupNorm groups
    model.time_embedding_width = 0  # sinusoidal embedding width; 0 means base_channels
    model.time_projection = "silu_linear"  # res-block time input: "silu_linear" (DDPM) or "linear"
    model.dtype = "float32"  # compute dtype ("bfloat16" for mixed precision); params stay float32
    model.remat = False  # recompute residual blocks in the backward pass to save memory

    # ---- diffusion -----------------------------------------------------------------
    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"  # "linear", "cosine" or "quadratic" betas
    diffusion.num_timesteps = 1000
    diffusion.beta_start = 1e-4
    diffusion.beta_end = 0.02
    diffusion.prediction = "eps"  # network target: "eps", "x0" or "v"
    diffusion.loss = "mse"  # "mse", "l1" or "huber"
    diffusion.variance = "fixed_large"  # sampling variance: "fixed_large" (beta) or "fixed_small"
    diffusion.clip_x0 = True  # clip the predicted x0 to [-1, 1] while sampling

    # ---- sampling during training -----------------------------------------------------
    config.sample = sample = ml_collections.ConfigDict()
    sample.num_images = 16  # images in each logged grid
    sample.sampler = "ddpm"  # "ddpm" (all T steps) or "ddim"
    sample.num_steps = 0  # sampler steps; 0 means all T
    sample.eta = 0.0  # DDIM noise scale (0 deterministic, 1 ~ DDPM)
    sample.num_snapshots = 0  # also log x_t at this many points along the chain

    # ---- FID during training -------------------------------------------------------------
    # Every eval_every_steps (and at the last step), FID of eval.num_samples EMA samples
    # against eval.reference_stats, logged as "fid". Needs both files below; without them
    # the run logs that FID is off and trains on. The same noise is used at every evaluation.
    config.eval_every_steps = 0  # 0: no FID during training
    config.eval = evaluation = ml_collections.ConfigDict()
    evaluation.inception_weights = ""  # FID Inception weights (.pth or converted .npz)
    evaluation.reference_stats = ""  # .npz from `python -m ddpm_jax.evaluate fid-stats`
    evaluation.num_samples = 10_000  # samples per evaluation (50,000 for published numbers)
    evaluation.batch_size = 256  # samples per sampler/Inception batch (global)
    evaluation.sampler = "ddim"  # cheaper than 1000 DDPM steps; `evaluate fid` for final numbers
    evaluation.num_steps = 100
    evaluation.eta = 0.0

    return config
