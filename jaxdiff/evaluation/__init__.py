"""Looking at and measuring trained models."""
