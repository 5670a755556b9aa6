"""The model-folders room: what a model folder is (kinds.py), how each kind loads (load.py) and
how a debias run folder is written (write.py).

This package and kinds.py are kept free of torch and diffusers: the command line asks
`sampling_size` (which classifies the folder) before it imports anything heavy, so that a bad size or a damaged
config file is one line in well under a second. load.py and write.py import torch; import them
by name (`from invdiff.model_folders.load import load_model`) where a model is really loaded.
"""
from .kinds import (
    BASE_META,
    RUN_META,
    SD_COMPONENTS,
    SD_WEIGHTED_COMPONENTS,
    FolderKind,
    NotAModelFolder,
    check_image_size,
    check_sample_size,
    classify,
    is_sd_folder,
    read_json_object,
    read_unet_config,
    read_vae_factor,
    refers_to_base,
    sampling_size,
    vae_downsampling_factor,
)

__all__ = [
    "BASE_META", "RUN_META", "SD_COMPONENTS", "SD_WEIGHTED_COMPONENTS", "FolderKind", "NotAModelFolder",
    "check_image_size", "check_sample_size", "classify", "is_sd_folder", "read_json_object", "read_unet_config",
    "read_vae_factor", "refers_to_base", "sampling_size", "vae_downsampling_factor",
]
