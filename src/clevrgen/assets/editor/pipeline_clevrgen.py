"""Lets diffusers' DiffusionPipeline.from_pretrained load this folder (clevrgen must be installed)."""
from clevrgen.pipeline import ClevrgenPipeline  # noqa: F401
