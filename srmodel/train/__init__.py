"""Fine-tuning the model (METHOD.md section 3): loss, trainable split, optimizer step, checkpoints. No Ray.

`pipelines/train/worker.py` drives these pieces from Ray Train workers; everything here
also runs in a plain process (tests compare the two).
"""

from .config import TrainRecipe
from .model import SRTrainModel, TrainParts, load_train_parts, trainable_state_dict
from .step import Trainer

__all__ = ["SRTrainModel", "TrainParts", "TrainRecipe", "Trainer", "load_train_parts", "trainable_state_dict"]
