"""The embedded default: scikit-learn's 1,797 real 8×8 digits, offline, CPU-friendly.

`python train.py` trains this config (a 1.0M-parameter U-Net, 1,500 steps of batch 128): on a
2-core CPU it takes about 10 minutes (573 s of training, 0.33 s a step; 593 s in all) and gives
recognisable digits.
It is also the base every other config starts from (`get_config()`, then overrides).
Needs: nothing beyond `pip install -e .` (scikit-learn carries the data).
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The device mesh: the batch is split over data × fsdp; the train state over fsdp (FSDP).
  # One size may be -1: the remaining devices.
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1

  config.data = data = ml_collections.ConfigDict()
  data.dataset = "digits"
  data.data_dir = "~/tensorflow_datasets"
  data.image_size = 8
  data.num_channels = 1
  data.random_flip = False     # digits are not mirror-symmetric
  data.train_split = "train"
  data.eval_split = "test"
  data.num_workers = 0         # grain worker processes; 0 reads in the main process
  data.prefetch = 2            # batches staged on the devices ahead of the step

  # The network, by name (jaxdiff.models.NETWORKS), and its fields; the fields of the networks
  # not chosen are left alone.
  config.model = model = ml_collections.ConfigDict()
  model.name = "unet"
  model.ch = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (4,)
  model.dropout = 0.0
  model.out_channels = 1
  model.num_classes = 0        # >0: class-conditional (label `num_classes` = unconditional)
  model.dtype = "float32"      # compute dtype; params, EMA and optimizer state stay float32
  model.resamp_with_conv = True
  model.num_heads = 1          # attention heads (both networks)
  model.remat = False
  # The DiT's own fields (--config.model.name=dit; Peebles & Xie 2023): patches of
  # patch_size², `depth` adaLN-Zero blocks of `width` channels. 1.06M params at these values.
  model.patch_size = 2
  model.depth = 6
  model.width = 96
  model.mlp_ratio = 4.0

  # The noise process (jaxdiff.processes): ddpm (DDPM's discrete chain, the fields up to
  # rescale_zero_terminal_snr), edm (Karras et al. 2022) or flow (rectified flow).
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.process = "ddpm"
  diffusion.schedule = "linear"
  diffusion.num_timesteps = 1000
  diffusion.schedule_kwargs = ml_collections.ConfigDict(dict(beta_start=1e-4, beta_end=0.02))
  diffusion.prediction = "eps"  # what the network predicts: eps, x0 or v
  diffusion.loss_weighting = "none"  # none | min_snr: min(SNR, γ) on the x0 error (Hang et al.)
  diffusion.min_snr_gamma = 5.0      # γ of min_snr
  diffusion.rescale_zero_terminal_snr = False  # ᾱ_T = 0 (Lin et al. 2024); needs prediction=v
  diffusion.sigma_data = 0.5   # edm: the data's standard deviation, in its preconditioning
  diffusion.sigma_min = 0.002  # edm: the sampling range of σ, ρ-spaced by default
  diffusion.sigma_max = 80.0
  diffusion.rho = 7.0
  diffusion.p_mean = -1.2      # edm: training ln σ ~ N(p_mean, p_std²)
  diffusion.p_std = 1.2
  diffusion.time_distribution = "logit_normal"  # flow: training t, uniform or logit_normal
  diffusion.logit_mean = 0.0   # flow: logit-normal t = sigmoid(N(logit_mean, logit_std²))
  diffusion.logit_std = 1.0
  diffusion.t_min = 0.001      # flow: the sampling grid's smallest t

  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 1500
  train.batch_size = 128       # global, over all devices and hosts
  train.learning_rate = 1e-3
  train.warmup_steps = 200
  train.lr_decay = "cosine"    # constant | cosine | linear
  train.grad_clip = 1.0
  train.adam_b1 = 0.9
  train.adam_b2 = 0.999
  train.adam_eps = 1e-8
  train.weight_decay = 0.0
  train.ema_decay = 0.999
  train.ema_warmup = True      # decay min(ema_decay, (1+step)/(10+step)) for short runs
  # Post-hoc EMA (Karras et al. 2024): with phema_every > 0, training also tracks a power-
  # function EMA per σ_rel here and saves their snapshots every phema_every steps (and at the
  # end) to WORKDIR/phema/, keeping the newest phema_keep (0: all); `python -m jaxdiff.phema`
  # then makes the EMA of any σ_rel. Each profile costs one copy of the params, in memory and
  # in each snapshot.
  train.phema_every = 0
  train.phema_sigma_rels = (0.05, 0.10)
  train.phema_keep = 0
  train.p_uncond = 0.0         # label dropout for classifier-free guidance
  train.log_every = 50
  train.checkpoint_every = 500
  train.sample_every = 1500      # also at the end; 0 = never
  train.eval_every = 1500        # config.eval's metrics, also at the end; 0 = never
  train.max_to_keep = 3
  train.max_nonfinite_steps = 10  # stop after this many unhealthy steps in a row:
  train.spike_factor = 10.0       # loss > this × its running median is a spike,
  train.max_relative_update = 0.5  # ‖Δθ‖/‖θ‖ above this is an exploding update
  train.resume_step = placeholder(int)  # unset: the newest good step; N: resume from step N
  train.loss_bins = 10            # loss logged in this many bins of t
  train.metric_sinks = ("jsonl", "tensorboard")  # where rows go (jaxdiff.metric_writer.SINKS)
  train.compilation_cache_dir = "~/.cache/jaxdiff/xla"  # compiled programs kept across runs; "" off
  train.profile_steps = ()        # (FIRST, LAST): a jax.profiler trace into WORKDIR/profile
  train.grad_accum_steps = 1      # the batch in this many micro-batches, one optimizer update
  train.steps_per_call = 1        # optimizer steps per compiled call (a scan over K batches;
                                  # for accelerators: XLA:CPU runs it 14-19x slower, NOTES.md)
  train.peak_tflops = 0.0         # one device's peak, for MFU; 0: from telemetry's chip table

  # The trainer's sample grids, read by samplers.SamplingOptions.from_config; sample.py's defaults.
  config.sample = sample = ml_collections.ConfigDict()
  sample.sampler = "ddpm"
  sample.num_steps = 1000
  sample.spacing = placeholder(str)       # unset: the sampler's (samplers.SAMPLERS)
  sample.num_samples = 64
  sample.batch_size = 64
  sample.guidance_scale = 0.0
  sample.clip_x0 = True                   # x̂0 clipped to [-1, 1]
  sample.threshold_percentile = placeholder(float)  # e.g. 0.995: dynamic thresholding of x̂0

  # In-training evaluation (evaluate.py takes its own flags).
  config.eval = eval_config = ml_collections.ConfigDict()
  eval_config.metrics = ("quality",)  # of bpd, fid, quality (quality: labelled digits only)
  eval_config.sampler = "dpm_solver"
  eval_config.num_steps = 20
  eval_config.spacing = placeholder(str)                 # unset: the sampler's
  eval_config.clip_x0 = placeholder(bool)               # unset: the sampler's default
  eval_config.threshold_percentile = placeholder(float)  # e.g. 0.995: dynamic thresholding
  eval_config.num_samples = 256
  eval_config.batch_size = 128
  eval_config.bpd_images = 128        # held-out images for bpd; each costs T network calls
  eval_config.timestep_chunk = 50     # network calls of the bound per image run at once
  return config
