"""scripts/bench.py's FLOP accounting: XLA's cost analysis against 2·m·n·k, and the loops it undercounts."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("metarun_bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("m, k, n", [(8, 16, 32), (5, 7, 3), (64, 64, 64)])
def test_matmul_flops_are_2mnk(bench, m, k, n):
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    assert bench.xla_flops(jax.jit(jnp.matmul), a, b) == 2 * m * n * k


def test_unrolled_scans_count_every_iteration(bench):
    """XLA counts a while loop's body once; the bench's loop-free build (scans unrolled) counts all of them."""
    a = jnp.ones((16, 16))
    one = 2 * 16 ** 3

    def ten_matmuls():  # a fresh function per use: jax caches traces by function
        return jax.jit(lambda x: jax.lax.scan(lambda c, _: (c @ a, None), x, None, length=10)[0])

    assert bench.xla_flops(ten_matmuls(), a) < 2 * one  # the loop's body, once
    with bench.unrolled_scans():
        assert bench.xla_flops(ten_matmuls(), a) == 10 * one
    assert bench.xla_flops(ten_matmuls(), a) < 2 * one  # jax.lax.scan restored


def test_loops_with_matmuls_finds_the_loops_that_hide_flops(bench):
    a = jnp.ones((16, 16))
    mapped = jax.jit(lambda x: jax.lax.map(lambda r: r @ a, x)).lower(jnp.ones((4, 16, 16))).compile()
    assert bench.loops_with_matmuls(mapped.as_text()) == 1
    integer_loop = jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda i, c: c ^ (c << 1), x))
    assert bench.loops_with_matmuls(integer_loop.lower(jnp.ones(4, jnp.uint32)).compile().as_text()) == 0
    straight = jax.jit(lambda x: x @ a).lower(a).compile()
    assert bench.loops_with_matmuls(straight.as_text()) == 0


def test_peak_flops_reports_2n3_over_the_best_time(bench):
    for dtype in ("float32", "bfloat16"):
        peak = bench.peak_flops(n=64, iters=2, dtype=dtype)
        assert peak["flops"] == peak["xla_flops"] == 2 * 64 ** 3
        assert peak["gflops"] == pytest.approx(peak["flops"] / (peak["best_ms"] / 1e3) / 1e9, rel=1e-2)
        assert peak["best_ms"] <= peak["median_ms"]
