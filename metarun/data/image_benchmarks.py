"""The ImageNet- and CIFAR-derived few-shot benchmarks as registered datasets of the classification family.

`dataset=mini_imagenet | tiered_imagenet | cifar_fs | fc100`: schemas and builders over the loaders in
mini_imagenet.py, tiered_imagenet.py and cifar_fs.py (which read local files only and name the
expected files in one line when they are missing). Images arrive as uint8 [classes, examples, S, S, 3].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from metarun.data.cifar_fs import load_cifar_fs, load_fc100
from metarun.data.mini_imagenet import load_mini_imagenet
from metarun.data.tiered_imagenet import load_tiered_imagenet
from metarun.registry import register


@dataclass
class MiniImageNetConfig:
    """miniImageNet (Ravi & Larochelle split): the cache pickles or images/ + {train,val,test}.csv."""
    name: str = "mini_imagenet"
    local_dir: Optional[str] = None
    image_size: int = 84
    cache_dir: Optional[str] = None


@dataclass
class TieredImageNetConfig:
    """tieredImageNet (Ren et al. 2018): {split}_images_png.pkl (or .npz) and {split}_labels.pkl."""
    name: str = "tiered_imagenet"
    local_dir: Optional[str] = None
    image_size: int = 84
    cache_dir: Optional[str] = None
    examples_per_class: Optional[int] = None   # None: the smallest class's size (classes hold 732..1300)
    npz_order: str = "bgr"                     # channel order of {split}_images.npz: bgr (Ren et al.) | rgb


@dataclass
class CifarFSConfig:
    """CIFAR-FS (Bertinetto et al. 2019) from the local CIFAR-100 python archive."""
    name: str = "cifar_fs"
    local_dir: Optional[str] = None
    image_size: int = 32
    cache_dir: Optional[str] = None


@dataclass
class FC100Config:
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, from the local python archive."""
    name: str = "fc100"
    local_dir: Optional[str] = None
    image_size: int = 32
    cache_dir: Optional[str] = None


@register("dataset", "mini_imagenet", schema=MiniImageNetConfig, family="classification")
def load_mini(cfg, seed: int = 0):
    del seed  # fixed published split
    return load_mini_imagenet(cfg.local_dir, cfg.image_size, cfg.cache_dir)


@register("dataset", "tiered_imagenet", schema=TieredImageNetConfig, family="classification")
def load_tiered(cfg, seed: int = 0):
    del seed
    return load_tiered_imagenet(cfg.local_dir, cfg.image_size, cfg.cache_dir, cfg.examples_per_class, cfg.npz_order)


@register("dataset", "cifar_fs", schema=CifarFSConfig, family="classification")
def load_cifar(cfg, seed: int = 0):
    del seed
    return load_cifar_fs(cfg.local_dir, cfg.image_size, cfg.cache_dir)


@register("dataset", "fc100", schema=FC100Config, family="classification")
def load_fc(cfg, seed: int = 0):
    del seed
    return load_fc100(cfg.local_dir, cfg.image_size, cfg.cache_dir)
