"""Structured config schemas: a misspelt key or a wrong type fails in Hydra before any compute."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Mode(enum.Enum):
    train = "train"
    eval = "eval"


class TaskBatching(enum.Enum):
    auto = "auto"      # map on CPU, vmap on accelerators (see metarun.core.resolve_task_batching)
    vmap = "vmap"      # the whole meta-batch in one vmapped pass
    map = "map"        # lax.map over tasks, train.task_chunk tasks vmapped per iteration


class OnNonfinite(enum.Enum):
    stop = "stop"            # stop at the next host sync, keep the last finite checkpoint, exit non-zero
    skip_step = "skip_step"  # drop a meta-step whose loss, gradient or parameters are not finite; go on


# The dataset, learner and algorithm schemas live beside their code (metarun/data, learners, algos)
# and register themselves (metarun.registry); register_configs stores them for Hydra.


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
    # Regression: the support size drawn per task from U{min_shots..shots} (masked); None = always shots.
    min_shots: Optional[int] = None
    # The task family over the dataset (None: the dataset's own). `stream` (conf/task/stream.yaml): ordered
    # trajectories of classes for continual meta-learning (metarun.families.stream).
    family: Optional[str] = None


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
class OnlineConfig:
    """train.schedule=online (metarun.online): a stream of tasks, each scored after k examples before it
    joins the buffer the learner then meta-trains on (FTML, Finn et al. 2019). train.steps counts tasks."""
    meta_steps: int = 20        # meta-steps on the buffer after each task joins it (follow the meta leader)
    shots: List[int] = field(default_factory=lambda: [1, 2, 5, 10])  # support examples per class scored after
    held_out: int = 5           # examples per class of the scored task that are never in a support set
    threshold: float = 0.9      # proficiency: held-out accuracy; shots_to_threshold = the first k reaching it
    baseline: str = "none"      # none (meta-learn the buffer) | toe (train on everything: joint training)


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
    keep_best: int = 1         # best-on-validation checkpoints kept (eval.ensemble_top_k ensembles up to this many)
    progress: bool = True
    tensorboard: bool = False
    on_nonfinite: OnNonfinite = OnNonfinite.stop
    schedule: str = "batch"    # batch (shuffled meta-batches) | online (a task stream: metarun.online)
    online: OnlineConfig = field(default_factory=OnlineConfig)


@dataclass
class EvalConfig:
    episodes: int = 1000
    seed: int = 1234
    batch: int = 50              # episodes per device call
    split: str = "test"
    use_best: bool = True        # evaluate the best-on-validation checkpoint when there is one
    report_steps: List[int] = field(default_factory=list)  # extra test-time inner-step counts
    # True: the query set is scored as one batch (BatchNorm statistics over the queries, as MAML and
    # Reptile's "transductive" setting); False: each query example with the support set alone.
    transductive: bool = True
    # mode=eval only: test episode shape (default: the evaluated run's task.test_* / task.*), e.g.
    # a ProtoNet trained on 60-way 1-shot episodes tested 20-way as well as 5-way.
    ways: Optional[int] = None
    shots: Optional[int] = None
    queries: Optional[int] = None
    # auto: the family's own protocol (episodes; continual for task.family=stream); continual: also run the
    # continual protocol (metarun.continual_protocol) on a classification-trained run (baselines).
    protocol: str = "auto"
    # The continual protocol: K classes learned one after another (continual_shots images each, one pass,
    # one example per step), then accuracy on each class's held-out images; continual_runs class orders per K
    # from eval.seed; the learning rate picked per K from continual_lrs on continual_val_runs validation runs.
    continual_classes: List[int] = field(default_factory=lambda: [10, 50, 75, 100, 150, 200])
    continual_runs: int = 50
    continual_val_runs: int = 10
    continual_lrs: List[float] = field(default_factory=lambda: [3e-3, 1e-3, 3e-4, 1e-4, 3e-5])
    continual_optimizer: str = "adam"   # adam (the OML/ANML evaluation code) | sgd
    continual_head: str = "reset"       # reset: re-initialise the final layer (the authors' code) | meta: keep it
    continual_shots: int = 15           # images learned per class; the rest of the class's images are held out
    # mode=eval only: an ensemble of the run's K best validation checkpoints (train.keep_best >= K), MAML++'s protocol.
    ensemble_top_k: Optional[int] = None
    # The test split's input range of a regression dataset that has one (sinusoid's dataset.test_x_range),
    # e.g. [-5, 10]: the DKT paper's out-of-range test, in training's final test or with mode=eval.
    x_range: Optional[List[float]] = None


@dataclass
class AugmentConfig:
    """`augment=`: on-device augmentation of training tasks (metarun.data.augment.make_augment's keys)."""
    name: str = "none"
    crop_padding: int = 0           # pad then crop back at a random corner: random shifts of up to this many pixels
    rotation_degrees: float = 0.0   # rotate by an angle from U[-d, d] (bilinear)
    hflip: bool = False             # mirror left-right (not for characters: a mirrored character is another one)
    hflip_prob: float = 0.5


@dataclass
class RegularizeConfig:
    """`regularize=`: techniques every algorithm accepts (metarun.regularize)."""
    name: str = "none"
    weight_decay: float = 0.0       # decoupled (AdamW-style) decay of the meta-parameters' kernels, any meta_opt
    label_smoothing: float = 0.0    # classification: the optimised cross-entropy's smoothing (inner and outer)
    dropout: float = 0.0            # refused > 0: dropout is learner.dropout (conv4), the one-line error says so


@dataclass
class DistributedConfig:
    """`distributed.*`: one run over several processes (metarun.distributed; docs/sweeps.md). All null: one
    process, or a SLURM job step with several tasks (joined from SLURM's variables)."""
    coordinator: Optional[str] = None     # HOST:PORT of process 0 (every process passes the same)
    num_processes: Optional[int] = None   # 1 forces a single process even inside a multi-task SLURM step
    process_id: Optional[int] = None      # 0..num_processes-1; process 0 writes the run directory's files
    timeout_s: int = 300                  # how long a process waits for the others to join


@dataclass
class Config:
    algo: Any = MISSING
    dataset: Any = MISSING
    learner: Any = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    meta_opt: MetaOptConfig = field(default_factory=MetaOptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # init.from=RUN_DIR: start the learner from another run's best checkpoint (metarun.init_from).
    # A dict, not a dataclass: `from` is a Python keyword; metarun.init_from checks the keys.
    init: Dict[str, Optional[str]] = field(default_factory=lambda: {"from": None})
    seed: int = 0
    mode: Mode = Mode.train
    ckpt: Any = None           # mode=eval: RUN_DIR, or [RUN_A, RUN_B, ...] for an ensemble (metarun.members)
    resume: bool = False
    experiment: Any = None
    debug: Any = None
    pipeline: Any = None       # pipeline=NAME: chained stages (metarun.pipeline; conf/pipeline/)


GROUPS = {"dataset": "dataset", "learner": "learner", "algo": "algo"}  # config group -> registry kind


def register_configs() -> None:
    """Store the schemas; each group's YAML option names `<schema>_schema` in its defaults."""
    from metarun.registry import entries

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="meta_opt", name="meta_opt_schema", node=MetaOptConfig)
    cs.store(group="augment", name="augment_schema", node=AugmentConfig)
    cs.store(group="regularize", name="regularize_schema", node=RegularizeConfig)
    for group, kind in GROUPS.items():
        for name, entry in entries(kind).items():
            if entry.schema is not None:
                cs.store(group=group, name=f"{name}_schema", node=entry.schema)
