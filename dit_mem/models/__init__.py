"""Base model folders: what a folder is (layout, stock pipeline, family, configs, clip sizes),
its VAE, and the original Wan2.1 release layout with the shipped configs of its presets.

Nothing here imports a pipeline: the bank, the latent job and the data loaders read base models
through this package; :func:`dit_mem.pipeline.load_base_model` loads one as a pipeline.
"""
