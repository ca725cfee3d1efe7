"""Backbone features, timm style: index selection, ``feature_info`` and the ``features_only`` wrapper.

A model's ``feature_info`` lists, for every place ``forward_intermediates`` can take a feature from, a dict
with ``num_chs``, ``reduction`` (stride against the input) and ``module`` (the submodule that makes it).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

Indices = Union[None, int, Sequence[int]]


def feature_take_indices(num_features: int, indices: Indices = None) -> tuple[list[int], int]:
    """timm's index rule: None -> all ``num_features``; an int n -> the last n; a sequence -> those indices
    (negative ones count from the end). Returns the sorted-as-given non-negative indices and their max.

    ValueError for an index out of range or a count outside 1..num_features.
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices: the last {indices} of {num_features} features cannot be taken")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            if not -num_features <= i < num_features:
                raise ValueError(f"indices: {i} is out of range for {num_features} features")
            take.append(i % num_features)
        if not take:
            raise ValueError("indices: empty")
    return take, max(take)


class FeatureInfo(list):
    """The ``feature_info`` of a ``features_only`` model: a list of dicts with timm's accessors."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


class FeatureNet(nn.Module):
    """A backbone that returns feature maps: ``forward(x)`` -> list of (B, C_i, H / r_i, W / r_i), one per
    ``out_indices`` entry (indices into ``model.feature_info``; None: the model's ``default_out_indices``).

    The model is pruned past the last index (blocks after it, the classifier, and the final norm unless
    ``norm``); its weights keep their keys under ``model.``.
    """

    def __init__(self, model: nn.Module, out_indices: Indices = None, norm: bool = False):
        super().__init__()
        if out_indices is None:
            out_indices = getattr(model, "default_out_indices", None)
        take = model.prune_intermediate_layers(out_indices, prune_norm=not norm, prune_head=True)
        self.model, self.out_indices, self.norm = model, take, norm
        self.feature_info = FeatureInfo(model.feature_info[i] for i in take)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, norm=self.norm, output_fmt="NCHW",
                                                intermediates_only=True)

