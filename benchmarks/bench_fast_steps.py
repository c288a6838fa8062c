"""Learned optimizer steps against their floors, in one process (issue 17, items 1, 2 and 5).

    python benchmarks/bench_fast_steps.py l2o  [--numel 10_000_000] [--device cpu|cuda]
    python benchmarks/bench_fast_steps.py l2o-breakdown [--numel 10_000_000]
    python benchmarks/bench_fast_steps.py lstm [--numel 1_000_000] [--device cpu|cuda]

``l2o``: fused ``torch.optim.Adam`` (the reference; ``AdamW`` with ``--adamw``) against the default
``method='l2o'`` rule (``MLPRule()``: ``backend='auto'``, ``statistics='previous'``) as a user gets
it through the torch adapter (``LearnedOptimizer``), called directly (``update`` then an in-place
add), and its best path (``update_in_place``: one pass per tensor, nothing allocated); beside them
the reference mode (``statistics='current'``, two passes). Prints seconds per step, the ratio to
Adam, the state's floats per parameter and the compile seconds (first calls). ``l2o-breakdown``
times the one-pass kernel without parts of its arithmetic (see :func:`run_l2o_breakdown`).

``lstm``: the bare matrix products of the coordinatewise LSTM's default step (``[x, h] @ W`` per
layer over every coordinate, same chunks, outputs preallocated) against the default step
(``LSTMRule().update``), its in-place form and the cell compiled by ``torch.compile`` over the
same chunks (``--no-compiled`` skips it).

Times are the best of ``--rounds`` blocks of ``--repeats`` calls, the methods interleaved so that
load on a shared machine hits all of them alike. One thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer.rules.fused import COMPILE_SECONDS
from metaoptimizer.rules.lstm import LSTMRule
from metaoptimizer.rules.mlp import MLPRule


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_times(steps: dict[str, Callable[[], object]], device: str, repeats: int, rounds: int) -> dict[str, float]:
    """Best mean seconds per call of each step, rounds interleaving the methods (two warm-up calls)."""
    for fn in steps.values():
        fn()
        fn()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, fn in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - start) / repeats)
    return best


def model_shapes(numel: int) -> list[tuple[int, ...]]:
    """Two square-ish matrices and their biases, ``numel`` coordinates in all (to 0.1%)."""
    side = int((numel / 2) ** 0.5)
    return [(side, side), (side, side), (side,), (side,)]


def make_params(numel: int, device: str) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in model_shapes(numel):
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.05).to(device))
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device)
        params.append(p)
    return params


def functional_step(rule, params: list[torch.nn.Parameter], in_place: bool) -> Callable[[], None]:
    """The rule called directly: ``update`` then ``p += u`` (or ``update_in_place``). Budget-aware
    rules get a 10,000-step budget, rules that read the loss a constant loss."""
    named = {f"p{i}": p.detach() for i, p in enumerate(params)}
    grads = {f"p{i}": p.grad for i, p in enumerate(params)}
    state = rule.init(named, num_steps=10_000 if rule.budget_aware else None)
    loss = torch.tensor(1.0, device=params[0].device) if rule.reads_loss else None

    @torch.no_grad()
    def step() -> None:
        nonlocal state
        if in_place:
            state = rule.update_in_place(grads, state, named, loss=loss)
        else:
            updates, state = rule.update(grads, state, named, loss=loss)
            torch._foreach_add_(list(named.values()), [updates[n] for n in named])

    step.state = lambda: state  # type: ignore[attr-defined]
    return step


def state_floats_per_param(state, numel: int) -> float:
    return sum(t.numel() for values in state.slots.values() for t in values.values()) / numel


def run_l2o(args: argparse.Namespace) -> dict[str, float]:
    reference_cls = torch.optim.AdamW if args.adamw else torch.optim.Adam
    make = lambda: make_params(args.numel, args.device)  # noqa: E731 - fresh parameters per method
    steps: dict[str, Callable[[], object]] = {
        "fused Adam" + "W" * args.adamw: reference_cls(make(), lr=1e-3, fused=True).step,
        "l2o via torch adapter (default)": LearnedOptimizer(make(), MLPRule()).step,
        "l2o update + add": functional_step(MLPRule(), make(), in_place=False),
        "l2o update_in_place (best)": functional_step(MLPRule(), make(), in_place=True),
    }
    if not args.skip_reference:
        steps["l2o statistics='current' (reference mode)"] = functional_step(
            MLPRule(statistics="current"), make(), in_place=False
        )
    start = time.perf_counter()
    for fn in steps.values():  # compile outside the timed blocks (a tensor's first update has its own kernels)
        fn()
        fn()
    print(f"first calls (compilation included): {time.perf_counter() - start:.1f} s; {dict(COMPILE_SECONDS)}")
    times = best_times(steps, args.device, args.repeats, args.rounds)
    reference = next(iter(times.values()))
    print(f"numel={args.numel:,} device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    for name, seconds in times.items():
        print(f"{name:45s} {seconds * 1e3:9.2f} ms  {seconds / reference:6.2f}x")
    floats = state_floats_per_param(steps["l2o update_in_place (best)"].state(), args.numel)  # type: ignore[attr-defined]
    print(f"l2o state: {floats:.4f} floats per parameter")
    return times


def run_l2o_breakdown(args: argparse.Namespace) -> dict[str, float]:
    """Where the one-pass l2o kernel's time goes: the in-place step recompiled without parts of its
    arithmetic (a profile of a single fused kernel cannot split it), each against fused Adam.

    Variants patch :mod:`metaoptimizer.rules.mlp` for this process only: ``no statistics sums``
    replaces the per-tensor sums by constants, ``no exp`` drops the magnitude's exponential,
    ``linear`` is ``num_layers=0``. Their numbers are meaningless; only their times are read.
    """
    from metaoptimizer.rules import fused, mlp

    originals = (mlp.feature_moments, mlp.scaled_update)

    def no_sums(features, with_means=False):
        return None, torch.ones(len(features), dtype=features[0].dtype, device=features[0].device)

    def no_exp(features, layers, skip, step_size, magnitude_scale, pointwise):
        direction, magnitude = mlp.mlp_pointwise(features, layers, skip)
        return (direction + magnitude) * step_size

    variants = {
        "full": ({}, originals),
        "no statistics sums": ({}, (no_sums, originals[1])),
        "no exp": ({}, (originals[0], no_exp)),
        "neither": ({}, (no_sums, no_exp)),
        "linear rule (num_layers=0)": ({"num_layers": 0}, originals),
    }
    results = {}
    for name, (options, (moments, update)) in variants.items():
        mlp.feature_moments, mlp.scaled_update = moments, update
        fused.compiled.cache_clear()
        torch._dynamo.reset()
        steps = {
            "fused Adam": torch.optim.Adam(make_params(args.numel, args.device), lr=1e-3, fused=True).step,
            name: functional_step(MLPRule(**options), make_params(args.numel, args.device), in_place=True),
        }
        for fn in steps.values():
            fn()
        times = best_times(steps, args.device, args.repeats, args.rounds)
        results[name] = times[name] / times["fused Adam"]
        print(f"{name:30s} {times[name] * 1e3:9.2f} ms  {results[name]:6.2f}x fused Adam ({times['fused Adam'] * 1e3:.2f} ms)")
    mlp.feature_moments, mlp.scaled_update = originals
    return results


def bare_products(rule: LSTMRule, numel: int, device: str) -> Callable[[], None]:
    """``[x, h] @ W`` for every layer over all coordinates in the rule's chunks, into preallocated outputs."""
    size = rule._chunk_size(numel, torch.device(device))
    with torch.no_grad():
        weights = rule._weights(torch.float32)["layers"]
    inputs = [torch.randn(size, w.shape[0], device=device) for w, _ in weights]
    outputs = [torch.empty(size, w.shape[1], device=device) for w, _ in weights]

    def step() -> None:
        for start in range(0, numel, size):
            rows = min(size, numel - start)
            for (w, _), x, out in zip(weights, inputs, outputs, strict=True):
                torch.mm(x[:rows], w, out=out[:rows])

    return step


def compiled_cells(rule: LSTMRule, numel: int, device: str) -> Callable[[], None]:
    """The rule's cells through ``torch.compile`` over the same chunks (state in place), features given."""
    size = rule._chunk_size(numel, torch.device(device))
    with torch.no_grad():
        weights = rule._weights(torch.float32)
    cells = torch.compile(LSTMRule._cells_into)
    directions = torch.randn(numel, rule.input_weights[0].shape[0], device=device)
    hidden = torch.zeros(rule.num_layers, numel, rule.hidden_size, device=device)
    cell = torch.zeros_like(hidden)
    out = torch.empty(numel, device=device)

    @torch.no_grad()
    def step() -> None:
        for start in range(0, numel, size):
            end = start + size
            h, c = hidden[:, start:end], cell[:, start:end]
            out[start:end] = cells(rule, directions[start:end], h, c, h, c, None, weights)

    return step


def run_lstm(args: argparse.Namespace) -> dict[str, float]:
    rule = LSTMRule()
    grad = torch.randn(args.numel, device=args.device) * 1e-3

    def param() -> list[torch.nn.Parameter]:
        p = torch.nn.Parameter(torch.zeros(args.numel, device=args.device))
        p.grad = grad
        return [p]

    steps: dict[str, Callable[[], object]] = {
        "bare [x,h] @ W products (floor)": bare_products(rule, args.numel, args.device),
        "lstm update + add (default: compiled cells)": functional_step(rule, param(), in_place=False),
        "lstm update_in_place (compiled cells)": functional_step(rule, param(), in_place=True),
        "lstm update + add, backend='eager'": functional_step(LSTMRule(backend="eager"), param(), in_place=False),
    }
    if not args.no_compiled:
        steps["compiled cells alone (features given)"] = compiled_cells(rule, args.numel, args.device)
    start = time.perf_counter()
    for fn in steps.values():
        fn()
    print(f"first calls (compilation included): {time.perf_counter() - start:.1f} s; {dict(COMPILE_SECONDS)}")
    times = best_times(steps, args.device, args.repeats, args.rounds)
    floor = next(iter(times.values()))
    chunk = rule._chunk_size(args.numel, torch.device(args.device))
    print(f"numel={args.numel:,} chunk={chunk} device={args.device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    for name, seconds in times.items():
        print(f"{name:45s} {seconds * 1e3:9.2f} ms  {seconds / floor:6.2f}x")
    if args.profile:
        from torch.profiler import profile

        step = functional_step(LSTMRule(backend="eager"), param(), in_place=False)
        step()
        with profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("l2o", "l2o-breakdown", "lstm"))
    parser.add_argument("--numel", type=int, default=None, help="coordinates (l2o: 10M, lstm: 1M)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adamw", action="store_true", help="l2o: fused AdamW as the reference")
    parser.add_argument("--skip-reference", action="store_true", help="l2o: skip the reference mode")
    parser.add_argument("--no-compiled", action="store_true", help="lstm: skip the compiled cells")
    parser.add_argument("--profile", action="store_true", help="lstm: torch profiler of one eager step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.numel = args.numel or (1_000_000 if args.which == "lstm" else 10_000_000)
    {"l2o": run_l2o, "l2o-breakdown": run_l2o_breakdown, "lstm": run_lstm}[args.which](args)


if __name__ == "__main__":
    main()
