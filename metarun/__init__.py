"""metarun: a Hydra-driven JAX runner for meta-learning experiments."""

__version__ = "0.1.0"
