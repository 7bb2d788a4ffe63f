"""CelebA at 64×64: the CIFAR-10 network with a fourth resolution level (multipliers
(1, 2, 2, 4), attention at 16×16), as improved-diffusion's 64×64 models.

For TPU pods: batch 64, lr 2e-5 (the DDPM paper's CelebA-HQ rate), 500k steps.
Needs: celeb_a prepared as ArrayRecord in `data.data_dir` (`tfds build celeb_a
--file_format=array_record --data_dir=...`; CelebA's files need a manual download step).
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.dataset = "celeb_a"
  config.data.image_size = 64
  config.model.ch_mult = (1, 2, 2, 4)
  config.train.num_steps = 500_000
  config.train.batch_size = 64
  config.train.learning_rate = 2e-5
  return config
