"""clevrgen: conditional diffusion for compositional CLEVR scenes.

``from clevrgen import ClevrgenPipeline`` loads torch and diffusers on first use only, so that
``clevrgen --help`` stays instant.
"""

__version__ = "0.1.0"

__all__ = ["ClevrgenPipeline", "LabelEncoder"]


def __getattr__(name: str):
    if name == "ClevrgenPipeline":
        from clevrgen.pipeline import ClevrgenPipeline

        return ClevrgenPipeline
    if name == "LabelEncoder":  # model_index.json names the label encoder as ["clevrgen", "LabelEncoder"]
        from clevrgen.model import LabelEncoder

        return LabelEncoder
    if name == "ModelMixin":  # diffusers checks a component's base class by its name in the component's library
        from diffusers import ModelMixin

        return ModelMixin
    raise AttributeError(f"module 'clevrgen' has no attribute {name!r}")
