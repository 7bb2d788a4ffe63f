"""CelebA at 64×64 (the DDPM paper's CelebA-HQ-style network, scaled to 64×64).

For TPU pods: 6 levels would be 256×256; at 64×64 we use multipliers (1, 2, 2, 4) with
attention at 16×16, as improved-diffusion's 64×64 models do.
Needs: celeb_a prepared as ArrayRecord in `data.data_dir` (`tfds build celeb_a
--file_format=array_record --data_dir=...`; CelebA's files need a manual download step).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "celeb_a"
  config.data.image_size = 64
  config.data.num_channels = 3
  config.data.random_flip = True
  config.data.num_workers = 8
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 4)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.out_channels = 3
  config.train.num_steps = 500_000
  config.train.batch_size = 64
  config.train.learning_rate = 2e-5
  config.train.warmup_steps = 5000
  config.train.lr_decay = "constant"
  config.train.ema_decay = 0.9999
  config.train.ema_warmup = False
  config.train.log_every = 100
  config.train.checkpoint_every = 10_000
  config.train.sample_every = 50_000
  return config
