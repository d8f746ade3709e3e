"""spo: Step-aware Preference Optimization for Stable Diffusion 1.5 and SDXL-family models."""

__version__ = "0.1.0"
