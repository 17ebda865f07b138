"""User-level DP-SGD for the recommendations scenario.

The privacy unit is a user with all of their training ratings, not a single
rating. The model represents a user by their other rated items, so one
rating feeds into the gradients of the user's other ratings, and clipping per
rating would not bound its influence. Clipping per user does.

In one step each sampled user contributes ``targets_per_user`` of their
ratings as targets (chosen at random), represented by the mean embedding of
their remaining training items. This generalises the non-private loop, which
leaves out exactly one item (the target) per row.

Opacus computes per-user gradients layer by layer, so every layer receives the
batch of users as its first dimension. ``ItemFactorizationModel.global_mean``
belongs to no layer, so this module registers a grad sampler for the model
itself that computes the per-user gradient of ``global_mean``.
"""

from __future__ import annotations

import numpy as np
import torch
from opacus.grad_sample.utils import register_grad_sampler
from torch.nn import functional
from torch.utils.data import Dataset

from scenarios.recommendations.data import NUM_ITEMS, InteractionSplit
from scenarios.recommendations.model import ItemFactorizationModel, sample_negatives

# Ratings per user and step used as targets; the rest of the user's items form the history.
DEFAULT_TARGETS_PER_USER = 4


@register_grad_sampler(ItemFactorizationModel)
def compute_global_mean_grad_sample(
    layer: ItemFactorizationModel, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Return the per-user gradient of ``global_mean``.

    ``backprops`` is the gradient of the loss with respect to the first
    output of ``ItemFactorizationModel.forward``, the predicted ratings, which
    are ``global_mean`` plus terms that do not depend on it. The per-user
    gradient is therefore the sum of the user's rating backprops. The layers
    inside the model have their own grad samplers.
    """
    if not layer.global_mean.requires_grad:
        return {}
    return {layer.global_mean: backprops.reshape(backprops.shape[0], -1).sum(dim=1)}


class UserRatingsDataset(Dataset):
    """The training ratings of a split grouped by user: one item per user.

    ``__getitems__`` returns a whole batch already collated as
    ``(items, ratings, mask)``, each of shape ``(users, max_ratings)``:
    item indices (0 where padded), ratings, and true where a rating exists.

    Parameters
    ----------
    split : InteractionSplit
        A node's training split.
    """

    def __init__(self, split: InteractionSplit) -> None:
        users, user_of_row = np.unique(split.users, return_inverse=True)
        order = np.argsort(user_of_row, kind="stable")
        counts = np.bincount(user_of_row, minlength=len(users))

        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.items = torch.from_numpy(split.items[order].astype(np.int64))
        self.ratings = torch.from_numpy(split.ratings[order].astype(np.float32))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items, ratings, mask = self.__getitems__([index])
        return items[0], ratings[0], mask[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the padded ratings of the users at ``indices``; an empty list gives zero rows."""
        users = np.asarray(indices, dtype=np.int64)
        starts = self.offsets[users]
        lengths = self.offsets[users + 1] - starts
        width = int(lengths.max()) if len(users) else 1

        items = torch.zeros((len(users), width), dtype=torch.int64)
        ratings = torch.zeros((len(users), width), dtype=torch.float32)
        mask = torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]

        rows = np.repeat(np.arange(len(users)), lengths)
        columns = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        sources = np.repeat(starts, lengths) + columns
        items[rows, columns] = self.items[sources]
        ratings[rows, columns] = self.ratings[sources]
        return items, ratings, mask


def user_level_loss(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_negatives: int,
    generator: torch.Generator,
    targets_per_user: int = DEFAULT_TARGETS_PER_USER,
) -> torch.Tensor:
    """Return the mean over users of each user's mean target loss.

    A target's loss is the squared rating error plus the implicit head's mean
    binary cross-entropy over the target (label 1) and ``num_negatives`` items
    the user did not rate (label 0), as in the non-private loop. A user with
    ``n`` ratings gets ``min(targets_per_user, max(n - 1, 1))`` targets, so at
    least one rating stays in the history whenever ``n >= 2``.

    Parameters
    ----------
    model : torch.nn.Module
        An ``ItemFactorizationModel``, possibly wrapped by Opacus.
    batch : tuple of torch.Tensor
        ``(items, ratings, mask)`` from ``UserRatingsDataset``, with at least one user.
    num_negatives : int
        Sampled unrated items per target.
    generator : torch.Generator
        Source of the target choice and the negatives.
    targets_per_user : int
        Maximum targets per user.
    """
    items, ratings, mask = batch
    num_users, width = items.shape
    lengths = mask.sum(dim=1)

    # A random permutation of each user's ratings; padding sorts last.
    keys = torch.rand((num_users, width), generator=generator).masked_fill(~mask, 2.0)
    order = keys.argsort(dim=1)
    slots = min(targets_per_user, width)
    target_positions = order[:, :slots]
    num_targets = (lengths - 1).clamp(min=1, max=slots)
    target_valid = torch.arange(slots)[None, :] < num_targets[:, None]

    is_target = torch.zeros_like(mask).scatter(1, target_positions, target_valid)
    history = mask & ~is_target
    counts = history.sum(dim=1)
    bag_offsets = torch.cumsum(counts, dim=0) - counts
    bag_items = items[history]

    target_items = items.gather(1, target_positions)
    target_ratings = ratings.gather(1, target_positions)
    rated = torch.zeros((num_users, NUM_ITEMS), dtype=torch.bool)
    rated[torch.nonzero(mask, as_tuple=True)[0], items[mask]] = True
    user_of_target = torch.arange(num_users).repeat_interleave(slots)
    negatives = sample_negatives(user_of_target, rated, num_negatives, generator).reshape(num_users, slots, num_negatives)
    candidates = torch.cat([target_items[:, :, None], negatives], dim=2)

    predicted, logits = model(bag_items, bag_offsets, target_items, candidates)
    labels = torch.zeros_like(logits)
    labels[:, :, 0] = 1.0
    implicit = functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=2)
    per_target = (predicted - target_ratings) ** 2 + implicit

    weights = target_valid.to(per_target.dtype)
    per_user = (per_target * weights).sum(dim=1) / weights.sum(dim=1)
    return per_user.mean()
