"""Noise-prediction networks (Flax linen); `UNet(**config.model)` builds the DDPM U-Net."""

from jaxdiff.models.unet import UNet, count_params, timestep_embedding

__all__ = ["UNet", "count_params", "timestep_embedding"]
