"""Unconditional real MNIST digits on a 2-core CPU: configs/mnist5k_cpu.py without its labels,
trained as rectified flow, 115,200 training images (1,800 steps of 64).

    python train.py --config=configs/mnist5k_cpu_unconditional.py

The best unconditional recipe measured at this budget (docs/results.md, "Unconditional mnist5k
by noise process"): rectified flow (logit-normal t, velocity target) on mnist5k_cpu's network
and optimizer scored 44.0 with the DPM-Solver++(2M) SDE at 20 logSNR steps (2.54× real-vs-real)
and 48.8 with UniPC at 10 karras steps (2.82×). The same network as DDPM's v + cosine + min-SNR
chain scored 70.4 at 50 steps (3.9×), and as EDM 81–98 (4.7–5.7×). None is within 2×
real-vs-real: without labels, 4,000 digits are too few at this budget (the class-conditional
mnist5k_cpu: 1.40×).

Sample grids and the final quality score use the DPM-Solver++(2M) SDE at 20 logSNR steps, its
best sampler.
"""

from configs import mnist5k_cpu


def get_config():
  config = mnist5k_cpu.get_config()
  config.model.num_classes = 0
  config.train.p_uncond = 0.0
  config.diffusion.process = "flow"
  config.diffusion.loss_weighting = "none"
  for section in (config.sample, config.eval):
    section.sampler = "dpm_solver_sde"
    section.spacing = "logsnr"
    section.num_steps = 20
  return config
