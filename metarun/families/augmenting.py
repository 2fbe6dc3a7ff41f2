"""The `augment` config section as an augmentation of a family's training tasks (metarun.data.augment)."""
from __future__ import annotations

from typing import Optional

import jax

from metarun.data.augment import Augment, augment_task, make_augment
from metarun.data.tasks import Sampler

KEYS = ("crop_padding", "rotation_degrees", "hflip", "hflip_prob")  # make_augment's keys; `name` is a label


def augment_from_config(cfg) -> Optional[Augment]:
    """The augmentation the section asks for, or None when everything is off (or there is no section:
    runs saved before `augment` existed). Bad values fail here in one line (make_augment's checks)."""
    if cfg is None:
        return None
    opts = {k: cfg.get(k) for k in KEYS}
    if not (opts["crop_padding"] or opts["rotation_degrees"] or (opts["hflip"] and opts["hflip_prob"] != 0)):
        make_augment(**opts)  # still refuse bad values of an inactive section (negative padding, ...)
        return None
    return make_augment(**opts)


def augmented(sampler: Sampler, augment: Augment) -> Sampler:
    """`sampler` followed by `augment` on the task's support and query images, labels kept.

    The task is drawn from one split of the key and the augmentation from the other: the same key gives
    the same task and the same augmented images."""
    def sample(data, key):
        task_key, aug_key = jax.random.split(key)
        return augment_task(augment, aug_key, sampler(data, task_key))
    return sample
