"""Training: ``t2t_fast.train.train(...)`` / ``t2t-fast train`` and ``finetune(...)`` / ``t2t-fast finetune``.

Both take CLI-style arguments (``train(["--epochs", "3"])``), an ``argparse.Namespace``, a dict of settings
(``train({"epochs": 3})``, keys are the flags' dest names) or a ``TrainConfig``, and return the run summary
(the content of OUTPUT/summary.json). See ``t2t_fast.train.config`` for every setting and its default. Bad input
(a setting, a path, the data, a checkpoint that does not fit) raises ``ConfigError`` (a ValueError) before the run
folder is created.
"""
from __future__ import annotations

import argparse
from typing import Sequence, Union

from t2t_fast.train.config import PRESETS, ConfigError, TrainConfig, build_parser, resolve
from t2t_fast.train.engine import TrainingDiverged

Settings = Union[Sequence[str], argparse.Namespace, dict, TrainConfig, None]


def train(args_or_config: Settings = None) -> dict:
    """Train from scratch (the paper's ImageNet recipe; the quick built-in preset when no data is given)."""
    from t2t_fast.train.engine import run

    return run(resolve(args_or_config, "train"))


def finetune(args_or_config: Settings = None) -> dict:
    """Transfer a checkpoint to new classes (the paper's CIFAR recipe: SGD, backbone lr x0.01 of the head's)."""
    from t2t_fast.train.engine import run

    return run(resolve(args_or_config, "finetune"))


__all__ = ["train", "finetune", "TrainConfig", "ConfigError", "TrainingDiverged", "build_parser", "resolve", "PRESETS"]
