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
    # "exponential": the one EMA above. "power": EDM2's power-function EMAs, one per
    # sigma_rel (their lengths relative to the run so far; ema_decay is then unused), snapshot
    # into workdir/ema_snapshots so that `python -m ddpm_jax.ema reconstruct` can give the
    # EMA of any length after training. Samples during training use the first sigma_rel's.
    config.ema = ema = ml_collections.ConfigDict()
    ema.kind = "exponential"
    ema.sigma_rels = (0.05, 0.10)  # EDM2's; each in (0, 0.2887]
    ema.snapshot_every_steps = 0  # 0: every save_every_steps; also at the last step
    # Class-conditional models (model.num_classes > 0): the fraction of examples trained with
    # the null label instead of their own, so one net is also the unconditional model that
    # classifier-free guidance needs (Ho & Salimans 2022 use 0.1 or 0.2).
    config.label_dropout = 0.1

    # ---- logging, samples, checkpoints ---------------------------------------------
    config.log_every_steps = 100  # loss, learning rate, grad norm, steps/s, images/s, TFLOP/s
    # Count the train step's FLOPs at start-up (XLA's cost analysis; seconds of tracing) to
    # log model TFLOP/s per device and, where the device's peak is known, MFU.
    config.log_model_flops = True
    # MFU's denominator: the dense bfloat16 peak TFLOP/s per device; 0: the device kind's
    # from ddpm_jax/runtime/flops.py (none known, as on a CPU: TFLOP/s only).
    config.peak_tflops_per_device = 0.0
    # grid of EMA samples to TensorBoard and workdir/samples (and at the last step); 0: none
    config.sample_every_steps = 5000
    config.save_every_steps = 5000  # Orbax checkpoint under workdir/checkpoints
    config.keep_checkpoints = 3  # newest checkpoints kept
    config.keep_every_steps = 0  # also keep every checkpoint at a multiple of this (0: none)
    # Trace this many train steps (after the first, compiled, call) into
    # WORKDIR/plugins/profile, for TensorBoard's profile tab or Perfetto; 0: no trace.
    config.profile_steps = 0
    config.on_nonfinite = "stop"  # NaN/inf loss or gradient: "stop" the run or "skip" the step
    # Refuse, before training, a step whose compiled memory exceeds the device's (CPU: the
    # available host memory); False skips the check.
    config.check_memory = True

    # ---- Weights & Biases (optional: pip install -e ".[wandb]") ---------------------------
    # Mirrors every scalar and image of the TensorBoard logs into one W&B run, resumed after
    # a restart (its id is kept in WORKDIR/wandb_run_id). Off while `project` is empty.
    config.wandb = wandb = ml_collections.ConfigDict()
    wandb.project = ""
    wandb.entity = ""  # team or user; "" means your default
    wandb.name = ""  # display name; "" lets W&B pick one
    wandb.tags = ()
    wandb.mode = "online"  # "online", "offline" (sync later with `wandb sync`) or "disabled"

    # ---- speed (ddpm_jax/ops; none of these changes results) --------------------------
    # JAX's persistent compilation cache: a restart (preemption, resume) loads the compiled
    # step instead of compiling again. A local, gs:// or shared path; "" turns it off;
    # JAX_COMPILATION_CACHE_DIR in the environment takes precedence.
    config.compilation_cache_dir = "~/.cache/ddpm_jax/xla"
    config.compute_chunk_size = 0  # max examples per device per pass; 0: automatic, -1: never split
    config.steps_per_dispatch = 0  # train steps per compiled call; 0: automatic
    config.cpu_conv_library = "eigen"  # CPU: "eigen" (XLA's own conv/dot kernels) or "default"
    config.conv_algorithm = "auto"  # "auto", "winograd" or "direct" (XLA's convolutions)

    # ---- devices -------------------------------------------------------------------
    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.fsdp = 1  # devices that split params/optimizer state (FSDP); 1 = pure data parallel
    mesh.fsdp_min_size = 2**14  # arrays with fewer elements stay replicated

    # ---- data ----------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.source = "tfds"  # registered source: "tfds", "folder" or "bundled" (offline LFW faces)
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
    # Non-leaky augmentation (EDM; ddpm_jax/core/augment.py): each image is transformed with
    # `probability` times each transform's multiplier (0: off) and the net is told how (zero
    # at sampling), so samples stay unaugmented. probability 0 turns it off; with it on, the
    # multipliers below are EDM's CIFAR-10 set (--augment=0.12): x-flips always drawn (the
    # 1e8), y-flips, isotropic and anisotropic scaling, rotation, fractional translation.
    data.augment = augment = ml_collections.ConfigDict()
    augment.probability = 0.0  # EDM: 0.12 (CIFAR-10), 0.15 (FFHQ, AFHQ)
    augment.xflip = 1e8
    augment.yflip = 1.0
    augment.rotate_int = 0.0  # quarter turns
    augment.translate_int = 0.0  # whole-pixel shifts up to 1/8 of the side, reflected
    augment.scale = 1.0
    augment.rotate_frac = 1.0  # any angle
    augment.aniso = 1.0
    augment.translate_frac = 1.0
    augment.brightness = 0.0
    augment.contrast = 0.0
    augment.lumaflip = 0.0
    augment.hue = 0.0
    augment.saturation = 0.0
    data.num_workers = 0  # grain worker processes; 0 reads in the training process
    data.max_bad_fraction = 0.01  # unreadable files tolerated (skipped and logged) in a folder
    # Class labels for a class-conditional model; "" trains unconditionally. "tfds": a class
    # feature ("label" for cifar10) or binary attributes, each combination a class
    # ("Male,Smiling" for celeb_a: 4 classes); "folder": "subfolder" (each immediate
    # subfolder of data.path is a class, in sorted order). Set model.num_classes to match.
    data.label = ""

    # ---- network ---------------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.name = "unet"  # registered network (ddpm_jax/models)
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
    model.time_embedding_freq_shift = 1.0  # frequencies 10000^(-i / (width/2 - shift)) (DDPM: 1)
    model.time_embedding_cos_first = False  # cosines before sines (diffusers' flip_sin_to_cos)
    # Stride-2 downsample padding: "same" (0 before, 1 after: TensorFlow's SAME, Ho et al.)
    # or "symmetric" (1 on each side: PyTorch's padding=1, the PyTorch project's net).
    model.downsample_padding = "same"
    model.norm_eps = 1e-6  # GroupNorm epsilon
    model.dtype = "float32"  # compute dtype ("bfloat16" for mixed precision); params stay float32
    model.remat = False  # recompute residual blocks in the backward pass to save memory
    # Classes of a class-conditional net (0: unconditional): a learned vector per class, and
    # one for the null label, added to the time embedding (diffusers' num_class_embeds).
    model.num_classes = 0
    # The blocks of later nets (ddpm layout; the defaults keep Ho et al.'s; see
    # models/architecture.py): ADM (Dhariwal & Nichol 2021) uses scale_shift_norm,
    # resample="resblock" and head_channels=64; DDPM++ (Song et al. 2021, EDM) resample=
    # "resblock", resample_projection, skip_scale=1/sqrt(2) and decoder_attention="last_block".
    model.scale_shift_norm = False  # the embedding scales and shifts the second GroupNorm
    model.resample = "conv"  # "conv" (strided / nearest-x2 convs) or "resblock" (residual)
    model.resample_projection = False  # a 1x1 conv on a resampling block's skip
    model.skip_scale = 1.0  # residual and attention outputs times this
    model.head_channels = 0  # fixed attention head width (0: model.num_heads heads)
    model.decoder_attention = "every_block"  # or "last_block" of each attended up level

    # ---- diffusion -----------------------------------------------------------------
    config.diffusion = diffusion = ml_collections.ConfigDict()
    # "ddpm": the discrete schedule below, the net predicting `prediction` at integer
    # timesteps (Ho et al.). "edm": Karras et al. 2022's continuous noise levels sigma and
    # preconditioning (the net sees c_in x and ln(sigma) / 4 and its output makes D(x; sigma)
    # = c_skip x + c_out F); schedule, beta_*, num_timesteps and prediction then play no part,
    # the EDM fields at the end of this section do, and sampling takes heun, euler or
    # dpm_solver++.
    diffusion.formulation = "ddpm"
    diffusion.schedule = "linear"  # registered beta schedule: "linear", "cosine" or "quadratic"
    diffusion.num_timesteps = 1000
    diffusion.beta_start = 1e-4
    diffusion.beta_end = 0.02
    diffusion.prediction = "eps"  # network target: "eps", "x0" or "v"
    diffusion.loss = "mse"  # "mse", "l1" or "huber"
    # "none", or "min_snr": the loss at t weighted by min(SNR_t, gamma) over the target's SNR
    # factor (Hang et al. 2023).
    diffusion.loss_weighting = "none"
    diffusion.min_snr_gamma = 5.0
    # Reverse-process variance: "fixed_large" (beta_t), "fixed_small" (the posterior's), or
    # "learned_range" (the net also outputs where each pixel's variance lies between the two,
    # trained by the bound's term: Nichol & Dhariwal 2021).
    diffusion.variance = "fixed_large"
    diffusion.vlb_weight = 0.001  # lambda of the hybrid loss (learned_range only)
    diffusion.clip_x0 = True  # clip the predicted x0 to [-1, 1] while sampling
    # formulation="edm" only (EDM's values): the data's std, the noise levels a model is
    # sampled between, and the training sigmas, ln(sigma) ~ N(p_mean, p_std^2).
    diffusion.sigma_data = 0.5
    diffusion.sigma_min = 0.002
    diffusion.sigma_max = 80.0
    diffusion.p_mean = -1.2
    diffusion.p_std = 1.2

    # ---- sampling during training -----------------------------------------------------
    # A sampling section names a sampler, its steps, its timestep spacing and one field per
    # knob of a registered sampler (DDIM: eta); `eval` below has the same shape.
    config.sample = sample = ml_collections.ConfigDict()
    sample.num_images = 16  # images in each logged grid
    # registered sampler: "ddpm", "ddim", "dpm_solver++", "heun" or "euler"
    sample.sampler = "ddpm"
    # network calls; 0: the sampler's default (all T; dpm_solver++: 20; heun, euler: 35)
    sample.num_steps = 0
    # Noise levels visited (ddpm_jax/samplers/spacing.py): "linspace", "leading", "trailing",
    # "logsnr", "karras", or "auto" for the sampler's own default.
    sample.spacing = "auto"
    sample.eta = 0.0  # DDIM noise scale (0 deterministic, 1 ~ DDPM)
    # ddpm's variance rule: "auto" (the run's own over all T steps, the posterior's,
    # fixed_small, over fewer: Nichol & Dhariwal), "fixed_small" or "fixed_large"
    sample.variance = "auto"
    # The karras spacing: rho, and the sigma range (0: the model's own).
    sample.rho = 7.0
    sample.sigma_min = 0.0
    sample.sigma_max = 0.0
    # heun and euler: EDM's stochastic churn (Algorithm 2); s_churn = 0 is deterministic.
    sample.s_churn = 0.0
    sample.s_tmin = 0.0
    sample.s_tmax = float("inf")
    sample.s_noise = 1.0
    sample.num_snapshots = 0  # also log x_t at this many points along the chain
    # Classifier-free guidance of a class-conditional model: output = uncond + scale * (cond
    # - uncond) (1: the conditional model, 0: the unconditional one), only at timesteps in
    # guidance_interval = (first, last) when given (Kynkaanniemi et al. 2024).
    sample.guidance_scale = 1.0
    sample.guidance_interval = ()
    sample.max_class_rows = 10  # a conditional model's grid: one row per class, up to this many

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
    evaluation.spacing = "auto"
    evaluation.eta = 0.0
    evaluation.variance = "auto"
    for field in ("rho", "sigma_min", "sigma_max", "s_churn", "s_tmin", "s_tmax", "s_noise"):
        evaluation[field] = sample[field]  # as in `sample`
    evaluation.guidance_scale = 1.0  # as sample.guidance_scale
    evaluation.guidance_interval = ()
    # A conditional model's FID samples: classes drawn "uniform" (balanced) or as "data"
    # frequencies (the training set's).
    evaluation.class_distribution = "uniform"

    return config
