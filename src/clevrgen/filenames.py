"""The names of the files and folders clevrgen writes, in one place: the saved model's
(:mod:`clevrgen.model`), a run folder's (:mod:`clevrgen.runfolder`) and an evaluation's, which
:mod:`clevrgen.claims` also reads to tell one output from another. No imports: every module may
take its names from here.
"""

# --- a saved model (a ClevrgenPipeline folder) ----------------------------------------------------
UNET_DIR = "unet"
LABEL_ENCODER_DIR = "label_encoder"
LABEL_PROJ_FILE = "label_proj.safetensors"
"""How runs written before the label encoder kept its one linear layer (still read)."""
SCHEDULER_DIR = "scheduler"
CONFIG_FILE = "config.toml"
DATA_FILE = "training_data.json"
MODEL_INDEX = "model_index.json"
STUB_MODULE = "pipeline_clevrgen"
"""A one-line module in every artifact, named by ``model_index.json``'s ``_class_name``, through
which diffusers' own ``DiffusionPipeline.from_pretrained`` finds ``clevrgen.ClevrgenPipeline``."""

# --- a run folder ---------------------------------------------------------------------------------
STATE_FILE = "state.pt"
SNAPSHOTS_DIR = "snapshots"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = "train.lock"
"""The one-writer lock of a run folder (:func:`clevrgen.locks.run_lock`)."""

# --- an evaluation --------------------------------------------------------------------------------
PASSES_DIR = ".passes"
"""An evaluation's finished passes, kept until it is done: a stopped evaluation resumes from them."""
