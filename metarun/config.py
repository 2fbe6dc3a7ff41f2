"""Structured config schemas: a misspelt key or a wrong type fails in Hydra before any compute."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Mode(enum.Enum):
    train = "train"
    eval = "eval"


class BatchNormMode(enum.Enum):
    transductive = "transductive"  # batch statistics of whatever batch is seen (original MAML)
    none = "none"


class TaskBatching(enum.Enum):
    auto = "auto"      # map on CPU, vmap on accelerators (see metarun.core.resolve_task_batching)
    vmap = "vmap"      # the whole meta-batch in one vmapped pass
    map = "map"        # lax.map over tasks, train.task_chunk tasks vmapped per iteration


class ConvImpl(enum.Enum):
    auto = "auto"      # im2col on CPU, XLA's convolution on accelerators
    xla = "xla"
    im2col = "im2col"


# ---- datasets -------------------------------------------------------------------------
@dataclass
class OmniglotConfig:
    name: str = "omniglot"
    kind: str = "classification"
    local_dir: Optional[str] = None
    image_size: int = 28
    split: str = "vinyals"
    rotations: List[int] = field(default_factory=lambda: [0, 90, 180, 270])
    cache_dir: Optional[str] = None


@dataclass
class SinusoidConfig:
    name: str = "sinusoid"
    kind: str = "regression"
    amplitude: List[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: List[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: List[float] = field(default_factory=lambda: [-5.0, 5.0])


@dataclass
class SyntheticConfig:
    """Generated image classes (a random pattern per class plus noise): tests and benchmarks."""
    name: str = "synthetic"
    kind: str = "classification"
    image_size: int = 28
    classes: List[int] = field(default_factory=lambda: [64, 16, 16])  # train, val, test
    examples_per_class: int = 20
    noise: float = 0.3


# ---- learners -------------------------------------------------------------------------
@dataclass
class Conv4Config:
    name: str = "conv4"
    filters: int = 64
    blocks: int = 4
    batch_norm: BatchNormMode = BatchNormMode.transductive
    conv_impl: ConvImpl = ConvImpl.auto


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [40, 40])


# ---- algorithms -----------------------------------------------------------------------
@dataclass
class MAMLConfig:
    name: str = "maml"
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int = 3
    first_order: bool = False
    # MAML++ (Antoniou et al. 2019) options; all off = plain MAML.
    msl: bool = False                        # multi-step loss over the inner steps
    msl_anneal_steps: int = 0                # >0: anneal MSL weights to the last step over these meta-steps
    first_order_steps: int = 0               # first-order for the first N meta-steps, then second order
    msl_last_weight: Optional[float] = None  # None: uniform over steps; else the last step's weight
    lslr: bool = False                       # learned per-layer per-step inner learning rates
    per_step_bn: bool = False                # per-step BatchNorm scale/bias (BNWB)


@dataclass
class ReptileConfig:
    name: str = "reptile"
    inner_opt: str = "adam"                   # adam | sgd; fresh state per task
    inner_lr: float = 1e-3
    inner_beta1: float = 0.0                  # supervised-reptile's Adam has beta1=0
    inner_steps: int = 5
    inner_batch: Optional[int] = 10           # examples per inner step; null = the whole support set
    eval_inner_steps: int = 50
    eval_inner_batch: Optional[int] = 5
    transductive: bool = True                 # query scored as one batch (BN statistics over the queries)


@dataclass
class MetaSGDConfig:
    name: str = "metasgd"
    inner_lr_init: List[float] = field(default_factory=lambda: [0.005, 0.1])  # uniform [low, high]
    learn_inner_lr: bool = True
    inner_steps: int = 1
    eval_inner_steps: int = 1
    first_order: bool = False


@dataclass
class ANILConfig:
    name: str = "anil"
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int = 3
    first_order: bool = False


@dataclass
class ProtoNetConfig:
    """Prototypical Networks: no hyperparameters beyond the episode shapes (task.ways > test_ways is fine)."""
    name: str = "protonet"


@dataclass
class MatchingNetConfig:
    name: str = "matchingnet"
    fce: bool = False        # full context embeddings (bidirectional LSTM + attention LSTM)
    fce_steps: int = 5       # processing steps K of the attention LSTM (used only when fce)
    distance: str = "cosine" # cosine (the paper) | l2 (negative squared Euclidean distance)


@dataclass
class RelationNetConfig:
    name: str = "relationnet"
    hidden: int = 8              # the relation module's FC width (8 in the paper)
    class_feature: str = "sum"   # sum (the paper's K-shot rule) | mean of a class's support maps


# ---- the rest -------------------------------------------------------------------------
@dataclass
class TaskConfig:
    ways: int = 5
    shots: int = 1
    queries: int = 15
    # Test-time episode shape when it differs from training (ProtoNets train 60-way, test 5-way).
    test_ways: Optional[int] = None
    test_shots: Optional[int] = None
    test_queries: Optional[int] = None


@dataclass
class MetaOptConfig:
    name: str = "adam"          # adam | adamw | sgd
    lr: float = 1e-3
    schedule: str = "constant"  # constant | cosine | linear | step
    warmup_steps: int = 0
    decay_every: int = 0        # schedule=step: multiply lr by decay_factor every this many meta-steps
    decay_factor: float = 0.5
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    momentum: Optional[float] = None
    grad_clip: Optional[float] = None


@dataclass
class TrainConfig:
    steps: int = 60000
    meta_batch: int = 32
    steps_per_call: int = 50   # meta-steps fused into one host call with lax.scan
    task_batching: TaskBatching = TaskBatching.auto  # how the meta-batch's tasks are batched
    task_chunk: int = 1        # tasks vmapped per lax.map iteration when task_batching=map
    log_every: int = 100
    val_every: int = 1000
    val_episodes: int = 200
    ckpt_every: int = 1000
    keep_ckpts: int = 3
    progress: bool = True
    tensorboard: bool = False


@dataclass
class EvalConfig:
    episodes: int = 1000
    seed: int = 1234
    batch: int = 50              # episodes per device call
    split: str = "test"
    use_best: bool = True        # evaluate the best-on-validation checkpoint when there is one
    report_steps: List[int] = field(default_factory=list)  # extra test-time inner-step counts
    # mode=eval only: test episode shape (default: the evaluated run's task.test_* / task.*), e.g.
    # a ProtoNet trained on 60-way 1-shot episodes tested 20-way as well as 5-way.
    ways: Optional[int] = None
    shots: Optional[int] = None
    queries: Optional[int] = None


@dataclass
class Config:
    algo: Any = MISSING
    dataset: Any = MISSING
    learner: Any = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    meta_opt: MetaOptConfig = field(default_factory=MetaOptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    mode: Mode = Mode.train
    ckpt: Optional[str] = None
    resume: bool = False
    experiment: Any = None
    debug: Any = None


SCHEMAS = {
    "dataset": {"omniglot": OmniglotConfig, "sinusoid": SinusoidConfig, "synthetic": SyntheticConfig},
    "learner": {"conv4": Conv4Config, "mlp": MLPConfig},
    "algo": {"maml": MAMLConfig, "reptile": ReptileConfig, "metasgd": MetaSGDConfig, "anil": ANILConfig,
             "protonet": ProtoNetConfig, "matchingnet": MatchingNetConfig,
             "relationnet": RelationNetConfig},
    "task": {"task": TaskConfig},
    "meta_opt": {"meta_opt": MetaOptConfig},
}


def register_configs() -> None:
    """Store the schemas; each group's YAML option names `<schema>_schema` in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"{name}_schema", node=node)
