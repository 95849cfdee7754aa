"""RAM (Swin-L) + DAPE tagger: the text prompt of the released model."""

from .loading import load_tagger, merge_dape, ram_state_dict
from .model import TINY_RAM_CONFIG, RAMConfig, RAMTagger, check_data_files, read_tag_list, read_thresholds, tags_from_probs

__all__ = [
    "TINY_RAM_CONFIG",
    "RAMConfig",
    "RAMTagger",
    "check_data_files",
    "load_tagger",
    "merge_dape",
    "ram_state_dict",
    "read_tag_list",
    "read_thresholds",
    "tags_from_probs",
]
