"""Training: optimizer groups, schedules, checkpoints and the loop."""

from leanformer.train.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from leanformer.train.loop import Trainer, train
from leanformer.train.optim import build_optimizer, lr_at

__all__ = ["CheckpointError", "Trainer", "build_optimizer", "load_checkpoint", "load_model", "lr_at",
           "save_checkpoint", "train"]
