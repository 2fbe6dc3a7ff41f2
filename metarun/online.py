"""Online meta-learning (FTML: Finn, Rajeswaran, Kakade & Levine 2019, "Online Meta-Learning"): the pure pieces.

Tasks arrive one at a time in an order fixed by the seed. Task t is scored after adapting on its
first k examples per class (k in `train.online.shots`) *before* it joins the buffer; then the learner
meta-trains on minibatches of the buffer's tasks 0..t (follow the meta leader) with the trainer's own
meta-step. The "train on everything so far" baseline (`train.online.baseline=toe`) trains the same
network jointly on the buffer's data (the algorithm at zero inner steps: plain supervised learning,
each task with its own fixed labels) and is scored by the same fine-tuning.

Here: the config checks, the stream (numpy, from the seed), the buffer, the on-device samplers and the
scorer (pure, jittable), proficiency and the stream's summary. The driver is metarun.online_train.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metarun.algos.base import MetaAlgorithm, task_loss
from metarun.data.tasks import Examples, Sampler, Task
from metarun.errors import UserError
from metarun.metrics import mean_ci95

SCHEDULES = ("batch", "online")
BASELINES = ("none", "toe")
# TOE trains the algorithm's own learner at zero inner steps, which is plain supervised learning only
# where the loss at zero inner steps is the learner's loss on the query (not Reptile: its meta-gradient
# θ − φ is zero without inner steps; not the metric learners: they have no fine-tuning to score with).
TOE_ALGOS = ("maml", "fomaml", "metasgd", "anil")
_STREAM_TAG = 0xF7_1  # the stream's own numpy generator: [tag, seed], independent of the JAX keys


def schedule(cfg) -> str:
    """train.schedule (runs saved before it existed were batch runs)."""
    return str(cfg.train.get("schedule", "batch"))


def accuracy_key(shots: int) -> str:
    """metrics.jsonl key of the scored task's held-out accuracy after `shots` examples per class."""
    return f"online/accuracy_k{shots}"


THRESHOLD_KEY = "online/shots_to_threshold"


def check_schedule(cfg) -> None:
    """One-line refusals of the schedule keys, before any data is read."""
    name = schedule(cfg)
    if name not in SCHEDULES:
        raise UserError(f"train.schedule={name} is unknown; expected one of: {', '.join(SCHEDULES)}")
    if name == "batch":
        return
    o = cfg.train.online
    shots = list(o.shots)
    if not shots:
        raise UserError("train.online.shots=[] is empty; give the support sizes per class to score each task "
                        "after, e.g. [1, 5, 10]")
    if any(isinstance(k, bool) or int(k) != k or k < 1 for k in shots):
        raise UserError(f"train.online.shots={shots} must hold integers >= 1 (support examples per class)")
    for key in ("held_out", "meta_steps"):
        if o[key] < 1:
            raise UserError(f"train.online.{key}={o[key]} must be >= 1")
    if not 0.0 < o.threshold <= 1.0:
        raise UserError(f"train.online.threshold={o.threshold} must be in (0, 1]: the held-out accuracy that "
                        f"counts as proficient")
    if o.baseline not in BASELINES:
        raise UserError(f"train.online.baseline={o.baseline} is unknown; expected one of: {', '.join(BASELINES)}")
    from metarun.registry import lookup

    family = lookup("dataset", cfg.dataset.name, "dataset").meta.get("family")
    if family != "classification":
        raise UserError(f"train.schedule=online streams classification tasks; dataset={cfg.dataset.name} feeds "
                        f"the {family} family: use an image dataset (dataset=omniglot) or train.schedule=batch")
    if o.baseline == "toe":
        if cfg.algo.name not in TOE_ALGOS:
            raise UserError(f"train.online.baseline=toe trains the learner at zero inner steps and fine-tunes it "
                            f"with the inner loop; algo={cfg.algo.name} has no such loop: use one of "
                            f"{', '.join(TOE_ALGOS)}")
        if cfg.algo.get("msl"):
            raise UserError("train.online.baseline=toe trains at zero inner steps: algo.msl=true (a loss per inner "
                            "step) has none; set algo.msl=false")


# -- the stream -------------------------------------------------------------------------------------

class Stream(NamedTuple):
    """The tasks in arrival order.

    classes: int32 [tasks, ways]: class ids of the split; the tasks' class sets are disjoint.
    order:   int32 [tasks, ways, examples]: each class's examples in the order they are revealed; the
             support of k shots is order[..., :k], the held-out set order[..., -held_out:].
    """
    classes: np.ndarray
    order: np.ndarray


def make_stream(seed: int, num_classes: int, ways: int, examples: int, tasks: int) -> Stream:
    """The first `tasks` tasks of the seed's stream. The stream is drawn for as many tasks as the classes
    allow and then cut, so a longer run (train.steps raised on resume) extends the same stream."""
    capacity = num_classes // ways
    if tasks > capacity:
        raise UserError(f"train.steps={tasks} stream tasks of task.ways={ways} disjoint classes need "
                        f"{tasks * ways} classes; the split has {num_classes}: use train.steps <= {capacity}")
    rng = np.random.default_rng([_STREAM_TAG, seed])
    classes = rng.permutation(num_classes)[: capacity * ways].reshape(capacity, ways)
    order = rng.permuted(np.tile(np.arange(examples), (capacity, ways, 1)), axis=-1)
    return Stream(classes[:tasks].astype(np.int32), order[:tasks].astype(np.int32))


def buffer_before(t: int, tasks: int) -> np.ndarray:
    """int32 [tasks]: the buffer's task ids when task t is scored (0..t-1; -1 marks an empty slot).
    FTML keeps every past task, so the buffer is the stream's prefix; the sampler reads only the ids."""
    buffer = np.full((tasks,), -1, np.int32)
    buffer[:t] = np.arange(t, dtype=np.int32)
    return buffer


def buffer_data(images, classes, buffer: np.ndarray) -> dict:
    """The buffer sampler's `data` (device arrays; `count` is traced, so one program serves every size)."""
    count = int((np.asarray(buffer) >= 0).sum())
    return {"images": images, "classes": classes, "buffer": jnp.asarray(buffer, jnp.int32),
            "count": jnp.asarray(count, jnp.int32)}


def _gather(images, classes, picks):
    """float32 [ways, n, H, W, C] in [0, 1] from uint8 images[class, example]."""
    return images[classes[:, None], picks].astype(jnp.float32) / 255.0


def _flatten(x, labels, count: int) -> Examples:
    ways = labels.shape[0]
    return Examples(x.reshape((ways * count,) + x.shape[2:]), jnp.repeat(labels, count))


def make_buffer_sampler(ways: int, shots: int, queries: int, shuffle_labels: bool) -> Sampler:
    """`(data, key) -> Task` from one buffer task (uniform over data["buffer"][:count]): `shots` + `queries`
    of each of its classes' examples, drawn without replacement.

    shuffle_labels: relabel the task's classes in a random order per episode (episodic meta-training: the
    labels carry no meaning across episodes, so the learner cannot memorise them); False keeps each task's
    own labels (class j of the task is label j), which joint training (TOE) needs.
    """
    n = shots + queries

    def sample(data, key):
        slot_key, label_key, example_key = jax.random.split(key, 3)
        slot = jax.random.randint(slot_key, (), 0, data["count"])
        classes = data["classes"][data["buffer"][slot]]
        if shuffle_labels:
            classes = jax.random.permutation(label_key, classes)
        examples = data["images"].shape[1]
        picks = jax.vmap(lambda k: jax.random.permutation(k, examples)[:n])(jax.random.split(example_key, ways))
        x = _gather(data["images"], classes, picks)
        labels = jnp.arange(ways, dtype=jnp.int32)
        return Task(_flatten(x[:, :shots], labels, shots), _flatten(x[:, shots:], labels, queries))

    return sample


def scoring_task(images, classes, order, shots: int, held_out: int) -> Task:
    """Task t as scored: support = its first `shots` revealed examples per class, query = its last
    `held_out` (never in any support); class j of the task is label j."""
    ways, examples = order.shape
    x = _gather(images, classes, order)
    labels = jnp.arange(ways, dtype=jnp.int32)
    return Task(_flatten(x[:, :shots], labels, shots), _flatten(x[:, examples - held_out:], labels, held_out))


def make_scorer(algo: MetaAlgorithm, shots: int, held_out: int) -> Callable:
    """A jitted `(params, algo_state, images, classes [ways], order [ways, examples], key) -> metrics`: the
    algorithm's test-time adaptation on the task's first `shots` examples per class, scored on its held-out
    examples (the eval build: test-time inner steps, learners in eval mode)."""
    @jax.jit
    def score(params, algo_state, images, classes, order, key):
        return task_loss(algo, params, algo_state, scoring_task(images, classes, order, shots, held_out), key)[1]

    return score


# -- metrics ------------------------------------------------------------------------------------------

def shots_to_threshold(accuracy_by_shots: Dict[int, float], threshold: float) -> Optional[int]:
    """The fewest shots (of those scored) whose held-out accuracy reaches `threshold`; None: none did."""
    for k in sorted(accuracy_by_shots):
        if accuracy_by_shots[k] >= threshold:
            return int(k)
    return None


def summarize_stream(rows: List[dict], shots: Sequence[int], threshold: float) -> dict:
    """results.json's `online` numbers from the per-task metrics.jsonl rows (one with `task` per task).

    Per task: the held-out accuracy after each k, and shots_to_threshold (null: not reached with the
    largest k). Over the stream's second half (tasks T//2 .. T-1, where the learner has a buffer):
    mean ± 95% CI of each accuracy, and of shots_to_threshold with the tasks that never reached the
    threshold counted at the largest k (`censored` of them: then the mean is a lower bound).
    """
    rows = sorted((r for r in rows if "task" in r), key=lambda r: r["task"])
    shots = sorted(set(int(k) for k in shots))
    tasks = len(rows)
    half = tasks // 2
    per_task = {str(k): [r.get(accuracy_key(k)) for r in rows] for k in shots}
    needed = [r.get(THRESHOLD_KEY) for r in rows]
    second = needed[half:]
    censored = sum(v is None for v in second)
    largest = shots[-1] if shots else None

    def ci(values):
        s = mean_ci95([np.nan if v is None else v for v in values])
        return {"mean": s["mean"], "ci95": s["ci95"], "n": s["n"]}

    return {
        "tasks": tasks, "shots": shots, "threshold": threshold, "second_half_from_task": half,
        "per_task": {"accuracy": per_task, "shots_to_threshold": needed},
        "second_half": {
            "accuracy": {k: ci(v[half:]) for k, v in per_task.items()},
            "shots_to_threshold": {**ci([largest if v is None else v for v in second]), "censored": censored,
                                   "reached_fraction": (len(second) - censored) / len(second) if second else None},
        },
    }
