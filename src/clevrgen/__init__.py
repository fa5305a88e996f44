"""clevrgen: conditional diffusion for compositional CLEVR scenes."""

__version__ = "0.1.0"
