"""Train the PyTorch peer's MAML on real Omniglot, logging like a metarun run, for time-to-accuracy plots.

The model and the meta-step are copied from ../shared/peer/maml_torch.py (`make_model`, `functional_forward`,
the `--mode loop` clone-and-adapt step: autograd.grad(create_graph=True) per task, learn2learn style); what is
added is data (metarun's own Omniglot loader and Vinyals split, so both sides see the same classes), periodic
validation and a metrics.jsonl with `step`, `wall_s` and `val/accuracy`. The run dir gets a `.hydra/` folder
with its settings so `metarun-report DIR --time-to 0.95,0.97` reads it beside metarun runs.

  python scripts/peer_maml_train.py --omniglot ../shared/data/omniglot --out outputs/peer_maml --minutes 30

Defaults are metarun's `experiment=maml_omniglot_5w1s` at the README's reduced meta-batch: 5-way 1-shot,
15 queries, 1 inner step of 0.4 (3 at validation), Adam 1e-3, meta-batch 8, validation on 200 episodes.
Episodes are drawn with numpy on the host (the peer has no on-device sampler); its time is counted.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
PEER = Path(__file__).resolve().parent.parent.parent / "shared" / "peer"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--omniglot", required=True, help="the Omniglot folder (metarun's dataset.local_dir)")
    p.add_argument("--out", required=True, type=Path, help="run dir for metrics.jsonl and .hydra/")
    p.add_argument("--peer", type=Path, default=PEER, help="folder of maml_torch.py")
    p.add_argument("--minutes", type=float, default=30.0, help="stop after this much wall time")
    p.add_argument("--steps", type=int, default=10**9, help="or after this many meta-steps")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--eval-inner-steps", type=int, default=3)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-episodes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    return p.parse_args(argv)


def episode(rng, images, ways, shots, queries):
    """One N-way episode from uint8 [classes, 20, S, S, 1]: (xs, ys, xq, yq) as torch tensors, NCHW in [0, 1]."""
    classes = rng.choice(len(images), ways, replace=False)
    picks = np.stack([rng.choice(images.shape[1], shots + queries, replace=False) for _ in range(ways)])
    x = images[classes[:, None], picks].astype(np.float32) / 255.0          # [ways, shots+queries, S, S, 1]
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3)))  # [ways, n, 1, S, S]
    labels = torch.arange(ways)
    xs = x[:, :shots].reshape(-1, *x.shape[2:])
    xq = x[:, shots:].reshape(-1, *x.shape[2:])
    return xs, labels.repeat_interleave(shots), xq, labels.repeat_interleave(queries)


def adapt(forward, params, xs, ys, steps, lr, create_graph):
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(forward(fast, xs), ys)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
        fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
    return fast


def validate(forward, params, rng, images, a):
    correct = []
    for _ in range(a.val_episodes):
        xs, ys, xq, yq = episode(rng, images, a.ways, a.shots, a.queries)
        fast = adapt(forward, params, xs, ys, a.eval_inner_steps, a.inner_lr, create_graph=False)
        with torch.no_grad():
            correct.append((forward(fast, xq).argmax(1) == yq).float().mean().item())
    correct = np.asarray(correct)
    return float(correct.mean()), float(1.96 * correct.std(ddof=1) / np.sqrt(len(correct)))


def main(argv=None):
    a = parse_args(argv)
    sys.path.insert(0, str(a.peer))
    from maml_torch import functional_forward, make_model  # the peer's own model and forward pass
    from metarun.data.omniglot import load_omniglot, split_classes

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    splits = split_classes(load_omniglot(a.omniglot, 28), "vinyals")
    model = make_model(a.hidden, a.ways, 28)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(model.parameters(), a.lr)
    train_rng, val_seed = np.random.default_rng(a.seed), 1000 + a.seed

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / ".hydra").mkdir(exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    (a.out / ".hydra" / "overrides.yaml").write_text(f"- peer=torch-loop\n- meta_batch={a.meta_batch}\n")
    (a.out / "peer_settings.json").write_text(json.dumps({**settings, "torch": torch.__version__,
                                                         "threads": torch.get_num_threads()}, indent=1))
    metrics = open(a.out / "metrics.jsonl", "w")
    t0, step, losses = time.perf_counter(), 0, []
    while step < a.steps and time.perf_counter() - t0 < a.minutes * 60:
        opt.zero_grad()
        for _ in range(a.meta_batch):
            xs, ys, xq, yq = episode(train_rng, splits["train"], a.ways, a.shots, a.queries)
            fast = adapt(functional_forward, params, xs, ys, a.inner_steps, a.inner_lr, create_graph=True)
            loss = F.cross_entropy(functional_forward(fast, xq), yq) / a.meta_batch
            loss.backward()
            losses.append(loss.item() * a.meta_batch)
        opt.step()
        step += 1
        if step % a.val_every == 0:
            # the same validation episodes at every check (one seed), as metarun's validator
            acc, ci = validate(functional_forward, params, np.random.default_rng(val_seed), splits["val"], a)
            row = {"step": step, "wall_s": round(time.perf_counter() - t0, 3),
                   "train/loss": float(np.mean(losses)), "val/accuracy": acc, "val/accuracy_ci95": ci}
            losses = []
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            os.fsync(metrics.fileno())
            print(f"step {step}  {row['wall_s'] / 60:.1f} min  val {acc:.4f} ± {ci:.4f}", flush=True)
    metrics.close()


if __name__ == "__main__":
    main()
