"""Time metarun's MAML meta-step on the peer's workload, and the torch peer beside it.

The step is built the way `metarun` trains: Hydra composes the config (dataset=synthetic),
`build.initial_state` + `make_train_chunk`, episodes sampled on the device inside
the jitted step. Defaults are the peer's workload (../shared/peer/maml_torch.py): 5-way
1-shot, 15 queries, meta-batch 32, Conv-4 with 64 filters on 28x28x1, 1 inner step, second
order, Adam outer step.

  python scripts/bench.py                       # metarun, then the torch peer; one JSON line
  python scripts/bench.py --inner-steps 5 --no-peer
  python scripts/bench.py --override learner.conv_impl=xla --json
  python scripts/bench.py --no-peer --peak-size 4096   # a bigger matmul for the machine's peak

Prints one JSON line: ms per meta-step (median over --iters calls, divided by
--steps-per-call), compile seconds (AOT lower+compile), peak memory, backend, and, when torch
imports, the peer's ms and the ratio peer_ms / metarun_ms (> 1: metarun is faster).

Unless --no-peak, also the fraction of the machine's peak that the meta-step reaches:
`peak`: the best FLOP/s of a jitted n x n matmul (float32, and bfloat16 inputs with float32
accumulation), best of --peak-iters calls; `flops`: the meta-step's FLOPs from XLA's cost analysis
(`lower(...).compile().cost_analysis()`) of a loop-free build of the same step (every lax.scan
unrolled, the meta-batch vmapped, one step per call: XLA counts a while loop's body once, whatever
its trip count, so the timed program's own count misses the tasks and inner steps); and
`peak_fraction` = flops / (ms / 1000) / peak float32 FLOP/s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--hidden", type=int, default=64, help="Conv-4 filters")
    p.add_argument("--size", type=int, default=28, help="image side")
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--iters", type=int, default=20, help="timed calls (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "xla", "im2col"])
    p.add_argument("--steps-per-call", type=int, default=1, help="meta-steps per jitted call (lax.scan)")
    p.add_argument("--task-batching", default=None, choices=["auto", "vmap", "map"],
                   help="how the meta-batch is batched (train.task_batching; default: the config's, auto)")
    p.add_argument("--task-chunk", type=int, default=None, help="tasks per lax.map iteration (train.task_chunk)")
    p.add_argument("--compile-cache", default=os.environ.get("JAX_COMPILATION_CACHE_DIR"),
                   help="persistent compilation cache dir (jax_compilation_cache_dir); a second run compiles fast")
    p.add_argument("--xla-flags", default=None, help="appended to XLA_FLAGS before jax starts")
    p.add_argument("--override", action="append", default=[],
                   help="extra Hydra override, e.g. learner.conv_impl=xla (repeatable)")
    p.add_argument("--no-peer", action="store_true", help="skip the torch peer")
    p.add_argument("--peer-path", default=os.environ.get("METARUN_PEER",
                                                         str(REPO.parent / "shared" / "peer" / "maml_torch.py")))
    p.add_argument("--peer-mode", default="loop", choices=["loop", "func"])
    p.add_argument("--peer-iters", type=int, default=None, help="peer timed steps (default: --iters)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--no-peak", action="store_true",
                   help="skip the peak FLOP/s matmuls and the meta-step's FLOP count")
    p.add_argument("--peak-size", type=int, default=2048, help="side n of the n x n peak matmul")
    p.add_argument("--peak-iters", type=int, default=10, help="timed peak matmuls (the best is kept)")
    p.add_argument("--sweep", action="append", default=[], metavar="FLAG=V1,V2",
                   help="cost growth: rerun this script (fresh process per point) over meta-batch or "
                        "inner-steps values, e.g. --sweep meta-batch=1,2,4,8; prints one JSON line per point")
    p.add_argument("--plot", default=None, help="with --sweep: write ms per meta-step vs the swept values (PNG)")
    return p.parse_args(argv)


def sweep(a, argv):
    """One fresh process per point (clean peak RSS); returns {flag: [result, ...]}."""
    base, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok in ("--sweep", "--plot", "--json"):
            skip = tok != "--json"
            continue
        if tok.startswith(("--sweep=", "--plot=")):
            continue
        base.append(tok)
    curves = {}
    for spec in a.sweep:
        flag, values = spec.split("=", 1)
        for v in values.split(","):
            cmd = [sys.executable, __file__, *base, f"--{flag}", v, "--json"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            row["swept"] = {flag: int(v)}
            print(json.dumps(row), flush=True)
            curves.setdefault(flag, []).append(row)
    return curves


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), dpi=80, squeeze=False)
    for ax, (flag, rows) in zip(axes[0], curves.items()):
        xs = [r["swept"][flag] for r in rows]
        ax.plot(xs, [r["metarun"]["ms"] for r in rows], "o-", label="metarun (JAX)")
        peer = [(x, r["peer"]["median_ms"]) for x, r in zip(xs, rows) if "peer" in r]
        if peer:
            ax.plot(*zip(*peer), "s--", label="torch loop (peer)")
        ax.set_xlabel(flag)
        ax.set_ylabel("ms per meta-step")
        ax.set_xscale("log", base=2) if flag == "meta-batch" else None
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"second-order MAML, Conv-4/64, 5-way 1-shot 15q, {rows[0]['metarun']['backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def compose(a):
    """The training config for this workload, composed by Hydra from conf/ as `metarun` does."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metarun.cli import CONF_DIR
    from metarun.config import register_configs

    register_configs()
    overrides = [
        "dataset=synthetic", f"dataset.image_size={a.size}",
        "algo=" + ("fomaml" if a.first_order else "maml"), f"algo.inner_steps={a.inner_steps}",
        f"task.ways={a.ways}", f"task.shots={a.shots}", f"task.queries={a.queries}",
        f"dataset.examples_per_class={max(20, a.shots + a.queries)}",
        f"dataset.classes=[{max(64, a.ways)},16,16]",
        f"learner.filters={a.hidden}", f"learner.conv_impl={a.conv_impl}",
        f"train.meta_batch={a.meta_batch}", f"train.steps_per_call={a.steps_per_call}",
        "meta_opt=adam",
        *([f"train.task_batching={a.task_batching}"] if a.task_batching else []),
        *([f"train.task_chunk={a.task_chunk}"] if a.task_chunk else []),
        *a.override,
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def peak_memory():
    import jax
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        pass
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def bench_metarun(a, log):
    import jax

    if a.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(a.compile_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from metarun.build import initial_state, load_family
    from metarun.core import make_train_chunk, resolve_task_batching
    from metarun.learners.conv4 import resolve_conv_impl

    cfg = compose(a)
    family = load_family(cfg)
    sampler = family.sampler("train")
    data = family.data["train"]
    algo, optimizer, state = initial_state(cfg, family)
    batching = resolve_task_batching(cfg.train.get("task_batching", "auto"))
    task_chunk = int(cfg.train.get("task_chunk", 1))
    chunk = make_train_chunk(algo, optimizer, sampler, cfg.train.meta_batch, cfg.train.steps_per_call,
                             task_batching=batching, task_chunk=task_chunk)

    t0 = time.perf_counter()
    lowered = chunk.lower(state, data)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    log(f"compiled in {compile_s:.1f} s")

    t0 = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    first_s = time.perf_counter() - t0
    for _ in range(a.warmup):
        state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    times = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(a.iters):
        t = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t) * 1e3 / a.steps_per_call)
        log(f"  call {i}: {times[-1]:.0f} ms/step")
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_ms = ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) * 1e3 / (a.iters * a.steps_per_call)
    loss = float(metrics["loss"][-1])
    peak_mb, peak_kind = peak_memory()
    counted = {}
    if not a.no_peak:
        log("counting the meta-step's FLOPs (loop-free build) ...")
        _, _, fresh = initial_state(cfg, family)  # `state` was donated to the timed calls
        counted = meta_step_flops(cfg, algo, optimizer, fresh, sampler, data)
        # The timed program's own count, for contrast: its loops' bodies counted once.
        counted["timed_program_xla_flops"] = compiled_flops(compiled)
    dev = jax.devices()[0]
    return dict(
        ms=round(statistics.median(times), 2), min_ms=round(min(times), 2), max_ms=round(max(times), 2),
        cpu_ms=round(cpu_ms, 1), compile_s=round(compile_s, 2), first_call_s=round(first_s, 3), peak_mb=round(peak_mb, 1),
        peak_kind=peak_kind, backend=jax.default_backend(), device=f"{dev.platform}:{dev.device_kind}",
        jax=jax.__version__, conv_impl=resolve_conv_impl(cfg.learner.conv_impl), task_batching=batching,
        task_chunk=task_chunk, xla_flags=os.environ.get("XLA_FLAGS", ""), compile_cache=a.compile_cache,
        final_loss=round(loss, 4),
        overrides=list(a.override), **counted)


def compiled_flops(compiled) -> float:
    """The "flops" of XLA's cost analysis of a compiled program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def xla_flops(jitted, *args) -> float:
    """FLOPs of `jitted(*args)` by XLA's cost analysis of the compiled program. A while loop's body
    (lax.scan, lax.map, fori_loop) is counted once, whatever its trip count: see `unrolled_scans`."""
    return compiled_flops(jitted.lower(*args).compile())


@contextlib.contextmanager
def unrolled_scans():
    """While active, every `jax.lax.scan` traced is fully unrolled (straight-line code, no while loop),
    so XLA's cost analysis counts every iteration. For counting only: unrolled programs compile slower."""
    import jax

    original = jax.lax.scan

    def scan(*args, **kwargs):
        kwargs["unroll"] = True
        return original(*args, **kwargs)

    jax.lax.scan = scan
    try:
        yield
    finally:
        jax.lax.scan = original


def peak_flops(n: int = 2048, iters: int = 10, dtype: str = "float32") -> dict:
    """The best FLOP/s of a jitted n x n x n matmul (2·n³ FLOPs) over `iters` calls; `dtype` inputs,
    float32 accumulation and output. Also XLA's own FLOP count of that program (a check of the count)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    flops = 2.0 * n ** 3
    # Times unrounded: a small test matmul takes ~10 µs, where rounding to 1 µs would skew best_ms against gflops.
    return dict(dtype=dtype, n=n, best_ms=min(times) * 1e3, median_ms=statistics.median(times) * 1e3,
                gflops=round(flops / min(times) / 1e9, 2), flops=flops, xla_flops=xla_flops(matmul, a, b))


def loops_with_matmuls(hlo_text: str) -> int:
    """How many while loops of a compiled HLO module contain a dot or convolution (directly or in a
    computation they call): the loops whose FLOPs XLA's cost analysis would count once per program."""
    comps = {m.group(1): m.group(2) for m in
             re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S)}
    refs = re.compile(r"(?:body|condition|calls|to_apply)=%([\w.\-]+)|branch_computations=\{([^}]*)\}")

    def called(text):
        for m in refs.finditer(text):
            yield from ([m.group(1)] if m.group(1) else [c.strip().lstrip("%") for c in m.group(2).split(",")])

    def has_matmul(name, seen):
        if name in seen or name not in comps:
            return False
        seen.add(name)
        return bool(re.search(r"\b(dot|convolution)\(", comps[name])) or any(has_matmul(c, seen) for c in called(comps[name]))

    bodies = re.findall(r"\bwhile\([^\n]*?body=%([\w.\-]+)", hlo_text)
    return sum(has_matmul(b, set()) for b in bodies)


def meta_step_flops(cfg, algo, optimizer, state, sampler, data) -> dict:
    """FLOPs of one meta-step of `cfg`'s workload by XLA's cost analysis of a loop-free build: the
    meta-batch vmapped (not lax.map), one step per call, every lax.scan (inner steps) unrolled.
    `loops_with_matmuls` (expected 0) counts the loops left that hold a dot or convolution; the
    random-number generator's rounds stay loops (integer work, no matmul)."""
    from metarun.core import make_train_chunk

    chunk = make_train_chunk(algo, optimizer, sampler, cfg.train.meta_batch, 1, task_batching="vmap")
    t0 = time.perf_counter()
    with unrolled_scans():
        lowered = chunk.lower(state, data)
    compiled = lowered.compile()
    return dict(flops=compiled_flops(compiled), loops_with_matmuls=loops_with_matmuls(compiled.as_text()),
                count_compile_s=round(time.perf_counter() - t0, 2))


def bench_peer(a, log):
    """Runs the torch peer on the same workload in a subprocess; None when torch or the file is missing."""
    try:
        import importlib.util
        if importlib.util.find_spec("torch") is None:
            log("torch is not importable: skipping the peer")
            return None
    except Exception:  # noqa: BLE001
        return None
    path = Path(a.peer_path)
    if not path.exists():
        log(f"peer not found at {path}: skipping it (set --peer-path or METARUN_PEER)")
        return None
    cmd = [sys.executable, str(path), "--mode", a.peer_mode, "--inner-steps", str(a.inner_steps),
           "--meta-batch", str(a.meta_batch), "--ways", str(a.ways), "--shots", str(a.shots),
           "--queries", str(a.queries), "--hidden", str(a.hidden), "--size", str(a.size),
           "--iters", str(a.peer_iters or a.iters), "--warmup", str(a.warmup), "--json"]
    if a.first_order:
        cmd.append("--first-order")
    log("peer: " + " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"^RESULT (\{.*\})$", out.stdout, re.M)
    if out.returncode or not m:
        log(f"peer failed ({out.returncode}): {out.stderr[-2000:]}")
        return None
    return json.loads(m.group(1))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.sweep:
        curves = sweep(a, argv)
        if a.plot:
            plot(curves, a.plot)
        return
    if a.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + a.xla_flags).strip()
    log = (lambda *_: None) if a.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = dict(
        workload=dict(ways=a.ways, shots=a.shots, queries=a.queries, meta_batch=a.meta_batch,
                      inner_steps=a.inner_steps, hidden=a.hidden, size=a.size,
                      order="first" if a.first_order else "second", steps_per_call=a.steps_per_call),
        host=dict(nproc=os.cpu_count(), machine=platform.machine(), load1=round(os.getloadavg()[0], 2)))
    result["metarun"] = bench_metarun(a, log)
    if not a.no_peak:
        log(f"peak: {a.peak_size}^3 matmuls, best of {a.peak_iters} ...")
        peaks = {dt: peak_flops(a.peak_size, a.peak_iters, dt) for dt in ("float32", "bfloat16")}
        result["peak"] = peaks
        m = result["metarun"]
        achieved = m["flops"] / (m["ms"] / 1e3)  # ms is per meta-step
        m["achieved_gflops"] = round(achieved / 1e9, 2)
        m["peak_fraction"] = round(achieved / (peaks["float32"]["gflops"] * 1e9), 4)
        m["peak_fraction_of_bf16"] = round(achieved / (peaks["bfloat16"]["gflops"] * 1e9), 4)
    if not a.no_peer:
        peer = bench_peer(a, log)
        if peer:
            result["peer"] = peer
            result["ratio_peer_over_metarun"] = round(peer["median_ms"] / result["metarun"]["ms"], 3)
    result["host"]["load1_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
