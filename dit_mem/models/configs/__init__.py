"""Diffusers configs of the Wan2.1 base models, for loading the original release layout offline."""
