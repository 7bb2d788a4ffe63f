"""jaxdiff: denoising diffusion models in functional JAX/Flax."""

__version__ = "0.1.0"
