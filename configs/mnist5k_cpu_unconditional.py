"""Unconditional real MNIST digits on a 2-core CPU: configs/mnist5k_cpu.py without its labels,
115,200 training images (1,800 steps of 64).

    python train.py --config=configs/mnist5k_cpu_unconditional.py

The best unconditional recipe measured at this budget (docs/results.md, "Unconditional mnist5k
by noise process"): DDPM's chain with v-prediction, the cosine schedule and min-SNR-γ, as in
mnist5k_cpu, scored 79.8 with UniPC at 20 steps and 70.4 at 50 (3.9× real-vs-real). The same
network trained as EDM scored 81–98 on karras steps from 9 to 35 network calls (4.7–5.7×),
better only at 10 calls (4.95× against 7.1×). Neither is within 2× real-vs-real: without
labels, 4,000 digits are too few at this budget (the class-conditional mnist5k_cpu: 1.40×).

Sample grids and the final quality score use UniPC at 50 logSNR-spaced steps, its best sampler.
"""

from configs import mnist5k_cpu


def get_config():
  config = mnist5k_cpu.get_config()
  config.model.num_classes = 0
  config.train.p_uncond = 0.0
  for section in (config.sample, config.eval):
    section.sampler = "unipc"
    section.spacing = "logsnr"
    section.num_steps = 50
  return config
