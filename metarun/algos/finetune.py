"""Fine-tuning baselines at test time (Chen et al. 2019): `finetune` (Baseline: a new linear head on the
frozen body's support features), `finetune_cosine` (Baseline++: a cosine head), `finetune_all` (every
weight, from the run's body and a new head).

They are evaluation-time algorithms: no meta-training. In the MetaAlgorithm interface, `adapt` is the
fine-tuning on the support set (the one inner loop, `torch_sgd` over Closer Look's minibatch epochs) and
`loss` scores the query set with the result; `init` gives the learner's body ({"net"}), which mode=eval
replaces by a trained run's (`mode=eval ckpt=RUN algo=finetune`, metarun.members). A run of any algorithm
whose learner lives under params["net"] can be fine-tuned: pretrain, protonet, maml, anil, ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.heads import (check_head, epoch_minibatches, head_logits, init_head, masked_cross_entropy,
                                 torch_sgd)
from metarun.errors import UserError
from metarun.inner import inner_loop
from metarun.learners import Net
from metarun.registry import register


@dataclass(frozen=True)
class FitSettings:
    """How a head (or every weight) is fitted on the support set; the defaults are Closer Look's."""
    epochs: int = 100
    batch_size: Optional[int] = 4
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 1e-3

    def check(self, name: str) -> "FitSettings":
        if self.epochs < 1:
            raise UserError(f"algo.epochs={self.epochs} must be >= 1 (algo={name})")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"algo.batch_size={self.batch_size} must be >= 1, or null for the whole support set")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or not 0 <= self.dampening <= 1 or self.weight_decay < 0:
            raise UserError(f"algo.lr={self.lr} must be > 0, algo.momentum={self.momentum} in [0, 1), "
                            f"algo.dampening={self.dampening} in [0, 1], algo.weight_decay={self.weight_decay} >= 0")
        return self

    def optimizer(self):
        return torch_sgd(self.lr, self.momentum, self.dampening, self.weight_decay)


def finetune(body: Net, objective, ways: int, settings: FitSettings, head: str = "linear",
             scale: Optional[float] = None, learnable_norm: bool = True, adapt_all: bool = False,
             info=None) -> MetaAlgorithm:
    """Fine-tuning as a MetaAlgorithm over an embedding network `body` (a learner in a mode, no head).

    meta_params = {"net": the body's params}; algo_state = {"batch_stats": ...} when the learner keeps
    running statistics (used, never updated). The head is drawn from the adapt key, so each episode's
    fine-tuning is reproducible. adapt_all=False: the support features are computed once and only the
    head is fitted (cheap); True: body and head are fitted together, the body starting from meta_params.
    """
    opt = settings.optimizer()

    def init(key, task):
        params, stats = body.init(key, task.support.x)
        return {"net": params}, ({"batch_stats": stats} if stats else {})

    def adapt(meta_params, algo_state, support, key):
        stats = algo_state.get("batch_stats")
        head_key, order_key = jax.random.split(key)
        n = support.x.shape[0]
        indices, mask = epoch_minibatches(order_key, n, settings.batch_size, settings.epochs)
        dim = jax.eval_shape(lambda x: body.apply(meta_params["net"], x, stats), support.x).shape[-1]
        fresh = init_head(head_key, dim, ways, head, learnable_norm)
        if not adapt_all:
            features = jax.lax.stop_gradient(body.apply(meta_params["net"], support.x, stats))

            def head_loss(h, step, batch):
                i, m = batch
                return masked_cross_entropy(head_logits(h, features[i], scale), support.y[i], m), None

            fitted, *_ = inner_loop(head_loss, fresh, opt, indices.shape[0], xs=(indices, mask))
            return {"head": fitted, "net": meta_params["net"], "support_x": support.x}

        def all_loss(p, step, batch):
            i, m = batch
            logits = head_logits(p["head"], body.apply(p["net"], support.x[i], stats), scale)
            return masked_cross_entropy(logits, support.y[i], m), None

        fitted, *_ = inner_loop(all_loss, {"net": meta_params["net"], "head": fresh}, opt, indices.shape[0],
                                xs=(indices, mask))
        return {**fitted, "support_x": support.x}

    def loss(meta_params, algo_state, task_state, query, key):
        del meta_params, key
        features = body.apply_query(task_state["net"], query.x, task_state["support_x"], algo_state.get("batch_stats"))
        return objective(head_logits(task_state["head"], features, scale), query.y, query.mask)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


@dataclass
class FinetuneConfig:
    """Baseline (Chen et al. 2019): a new linear head on the frozen body, Closer Look's fitting settings."""
    name: str = "finetune"
    epochs: int = 100                  # passes over the support set
    batch_size: Optional[int] = 4      # null: the whole support set per step
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9             # torch.optim.SGD's dampening (buffer = 0.9 buffer + 0.1 grad)
    weight_decay: float = 1.0e-3


@dataclass
class FinetuneCosineConfig(FinetuneConfig):
    """Baseline++: a cosine head (scale null: 2 up to 200 classes, else 10; learnable_norm: the authors' code)."""
    name: str = "finetune_cosine"
    scale: Optional[float] = None
    learnable_norm: bool = True


@dataclass
class FinetuneAllConfig(FinetuneConfig):
    """Every weight fine-tuned from the run's body plus a new head (`head`: linear | cosine)."""
    name: str = "finetune_all"
    # The whole support set per step: with transductive BatchNorm a minibatch's padding would enter the statistics.
    batch_size: Optional[int] = None
    head: str = "linear"
    scale: Optional[float] = None
    learnable_norm: bool = True


def settings_of(a) -> FitSettings:
    return FitSettings(a.epochs, a.batch_size, a.lr, a.momentum, a.dampening, a.weight_decay).check(a.name)


def build_finetune(a, c: Collaborators, head: str, adapt_all: bool) -> MetaAlgorithm:
    if c.train:
        raise UserError(f"algo={a.name} fine-tunes at evaluation only (no meta-training): evaluate a trained run "
                        f"with `mode=eval ckpt=RUN_DIR algo={a.name}`")
    if c.family.kind != "classification":
        raise UserError(f"algo={a.name} fits a classifier head; dataset={c.family.name} is {c.family.kind}")
    check_head(head, "algo.head")
    settings = settings_of(a)
    batch_norm = getattr(c.learner_cfg.get("batch_norm"), "value", c.learner_cfg.get("batch_norm"))
    support = c.family.ways("eval") * c.family.describe("test")["shots"]
    if adapt_all and batch_norm == "transductive" and settings.batch_size is not None and settings.batch_size < support:
        raise UserError(f"algo.batch_size={settings.batch_size}: algo={a.name} with learner.batch_norm=transductive "
                        f"fits on the whole support set ({support} examples); use algo.batch_size=null")
    scale = a.get("scale") if head == "cosine" else None
    learnable_norm = bool(a.get("learnable_norm", True))
    info = {"name": a.name, "head": head, "adapted": "all" if adapt_all else "head", "epochs": settings.epochs,
            "batch_size": settings.batch_size, "optimizer": "sgd (torch: momentum, dampening, weight decay)",
            "lr": settings.lr, "momentum": settings.momentum, "dampening": settings.dampening,
            "weight_decay": settings.weight_decay}
    if head == "cosine":
        info.update(scale=scale, learnable_norm=learnable_norm)
    body = Net(c.learner(None), train=False, transductive=c.transductive)
    return finetune(body, c.family.objective, c.family.ways("eval"), settings, head, scale, learnable_norm,
                    adapt_all, info)


@register("algo", "finetune", schema=FinetuneConfig, evaluation_only=True)
def build(a, c: Collaborators) -> MetaAlgorithm:
    return build_finetune(a, c, "linear", adapt_all=False)


@register("algo", "finetune_cosine", schema=FinetuneCosineConfig, evaluation_only=True)
def build_cosine(a, c: Collaborators) -> MetaAlgorithm:
    return build_finetune(a, c, "cosine", adapt_all=False)


@register("algo", "finetune_all", schema=FinetuneAllConfig, evaluation_only=True)
def build_all(a, c: Collaborators) -> MetaAlgorithm:
    return build_finetune(a, c, a.head, adapt_all=True)
