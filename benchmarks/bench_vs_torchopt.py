"""Meta-training throughput against torchopt, in one process (issue 17, item 4).

    pip install -c constraints.txt -e ".[bench]"      # torchopt is an optional benchmark dependency
    python benchmarks/bench_vs_torchopt.py [--meta-steps 10] [--rounds 3] [--clock cpu] [--profile]

The comparison torchopt's ``MetaAdam`` is made for: Adam's learning rate (log-parametrised) is the
meta-parameter, the inner model a digits MLP 64-32-10 (ReLU, cross-entropy, batch 128 of
scikit-learn's digits), K=20 inner steps per truncation, second order (gradients of the inner
gradients), the meta-loss the mean training loss after each inner update, an outer
``torch.optim.Adam(1e-2)`` on the log learning rate, truncations chained (parameters and Adam
state carried over, the graph cut). Both sides read the same batches from the same initial weights.

* torchopt: ``MetaAdam(net, lr=schedule reading the meta-parameter, eps_root=1e-8)`` stepping the
  module in place, ``stop_gradient`` at truncation boundaries. Its default ``eps_root=0`` takes the
  square root of a zero second moment (a ReLU unit that never fired) and its meta-gradient is NaN:
  ``--nan-steps`` truncations are run with the default and the non-finite meta-gradients counted.
* metaoptimizer: ``LearnedHyperparameters('adam', learn=('lr',))`` through
  :func:`metaoptimizer.meta.unroll.unroll` on a ``ModuleTask`` (an ``nn.Sequential`` MLP: its
  ``F.linear`` layers called directly; each inner Adam update one autograd node).

Rounds alternate between the sides and the best round of each is kept; ``--clock cpu`` times the
process's CPU time instead of the wall clock (one thread: the same work, without the time the
process waits for a core on a loaded machine). Prints each side's seconds per truncation and inner steps per second, the ratio (target: at least
1.5x torchopt), the first truncation's meta-gradient on both sides (they compute the same thing)
and, with ``--profile``, the torch profiler's top operators of one truncation of each side
(``--cprofile``: the metaoptimizer side by Python function; ``--breakdown``: its CPU time by piece).
Without torchopt installed it says so and times metaoptimizer alone.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from metaoptimizer.meta.hyperparams import LearnedHyperparameters
from metaoptimizer.meta.unroll import detach_params, unroll
from metaoptimizer.rules import hand
from metaoptimizer.tasks.base import ModuleTask
from metaoptimizer.tasks.digits import load_digits_tensors

K = 20
BATCH = 128
LR = 0.01
META_LR = 0.01


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits_tensors()
    return images.reshape(len(images), -1) / 16.0, labels


def batch_stream(x: torch.Tensor, y: torch.Tensor, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        index = torch.randint(len(x), (BATCH,), generator=generator)
        out.append((x[index], y[index]))
    return out


class TorchoptSide:
    """torchopt's MetaAdam with a learned (log) learning rate, module stepped in place."""

    def __init__(self, batches, eps_root: float) -> None:
        import torchopt

        self.torchopt = torchopt
        torch.manual_seed(0)
        self.net = net()
        self.log_lr = torch.tensor(math.log(LR), requires_grad=True)
        self.inner = torchopt.MetaAdam(self.net, lr=lambda count: self.log_lr.exp(), eps_root=eps_root)
        self.outer = torch.optim.Adam([self.log_lr], lr=META_LR)
        self.batches, self.position = batches, 0

    def _next(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def truncation(self) -> float:
        x, y = self._next()
        loss = F.cross_entropy(self.net(x), y)
        terms = []
        for _ in range(K):
            self.inner.step(loss)
            x, y = self._next()
            loss = F.cross_entropy(self.net(x), y)
            terms.append(loss)
        meta_loss = torch.stack(terms).mean()
        self.outer.zero_grad()
        meta_loss.backward()
        grad = float(self.log_lr.grad)
        self.outer.step()
        self.torchopt.stop_gradient(self.net)
        self.torchopt.stop_gradient(self.inner)
        return grad


class MetaoptimizerSide:
    """``LearnedHyperparameters(rule)`` (Adam in the comparison) through the library's unroll."""

    def __init__(self, batches, device: str = "cpu", rule: str = "adam") -> None:
        x, y = digits()
        self.task = ModuleTask("digits_mlp_64_32_10", net, (x, y), (x, y), batch_size=BATCH)
        torch.manual_seed(0)
        self.params = detach_params({n: p.detach().to(device) for n, p in net().named_parameters()})
        self.rule = LearnedHyperparameters(rule, lr=LR, learn=("lr",), device=device)
        self.state = self.rule.init(self.params)
        self.outer = torch.optim.Adam(self.rule.parameters(), lr=META_LR)
        self.batches, self.position = batches, 0

    def _stream(self):
        while True:
            yield self.batches[self.position % len(self.batches)]
            self.position += 1

    def truncation(self) -> float:
        result = unroll(self.rule, self.task, self.params, self.state, self._stream(), K, second_order=True)
        self.position += 1  # the stream's generator stops one batch short of the last it read
        self.outer.zero_grad()
        result.meta_loss.backward()
        grad = float(next(iter(self.rule.parameters())).grad)
        self.outer.step()
        self.params, self.state = detach_params(result.params), result.state.detach()
        return grad


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_seconds(sides: dict, meta_steps: int, rounds: int, clock=time.perf_counter) -> dict[str, float]:
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(rounds):
        for name, side in sides.items():
            start = clock()
            for _ in range(meta_steps):
                side.truncation()
            best[name] = min(best[name], (clock() - start) / meta_steps)
    return best


def profile(side, label: str) -> None:
    from torch.profiler import profile as torch_profile

    with torch_profile() as prof:
        side.truncation()
    print(f"\nprofile of one truncation, {label} (self CPU time, top 12)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def cprofile(side, truncations: int = 10) -> None:
    """Python-level profile of the metaoptimizer side: where a truncation's time goes by function."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(lambda: [side.truncation() for _ in range(truncations)])
    print(f"\ncProfile of {truncations} metaoptimizer truncations (cumulative, top 25)")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def breakdown(side: MetaoptimizerSide, truncations: int = 20) -> None:
    """CPU time per truncation of the metaoptimizer side, by piece: timing wrappers around the
    task's loss, the inner gradients, the rule's update and the one-node Adam's forward and
    backward (inside the update and the outer backward), removed afterwards."""
    import importlib
    import inspect

    unroll_module = importlib.import_module("metaoptimizer.meta.unroll")
    pieces = {
        "task loss (21 forwards)": (ModuleTask, "loss"),
        "inner gradients (20 create_graph backwards)": (unroll_module, "inner_gradients"),
        "rule update (20 LearnedHyperparameters.update)": (LearnedHyperparameters, "update"),
        "  of which the Adam node's forward": (hand._AdamStep, "forward"),
        "  Adam node's backward (in the outer backward)": (hand._AdamStep, "backward"),
    }
    spent = dict.fromkeys(pieces, 0.0)
    originals = {}

    def timed(label, function):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] += time.process_time() - start
        return wrapper

    for label, (owner, name) in pieces.items():
        static = inspect.getattr_static(owner, name)
        originals[label] = static
        wrapped = timed(label, getattr(owner, name))
        setattr(owner, name, staticmethod(wrapped) if isinstance(static, staticmethod) else wrapped)
    try:
        start = time.process_time()
        for _ in range(truncations):
            side.truncation()
        total = time.process_time() - start
    finally:
        for label, (owner, name) in pieces.items():
            setattr(owner, name, originals[label])
    top = [label for label in pieces if not label.startswith(" ")]
    print(f"\nwhere a metaoptimizer truncation goes (CPU ms per truncation, mean of {truncations})")
    print(f"{'total':52s} {total / truncations * 1e3:7.2f}")
    for label in pieces:
        print(f"{label:52s} {spent[label] / truncations * 1e3:7.2f}")
    rest = total - sum(spent[label] for label in top)
    print(f"{'outer backward and bookkeeping (the rest)':52s} {rest / truncations * 1e3:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=10, help="truncations per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="timed blocks per side (best kept)")
    parser.add_argument("--nan-steps", type=int, default=10, help="truncations run with torchopt's default eps_root")
    parser.add_argument("--profile", action="store_true", help="torch profiler: top operators of each side")
    parser.add_argument("--cprofile", action="store_true", help="cProfile of the metaoptimizer side")
    parser.add_argument("--breakdown", action="store_true", help="CPU time of the metaoptimizer side by piece")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sgd-floor", action="store_true",
        help="also time the same unroll with a learned SGD rate: the part of a truncation that is not Adam's",
    )
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall clock or process CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = digits()
    batches = batch_stream(x, y, 4096)
    sides = {"metaoptimizer": MetaoptimizerSide(batches)}
    try:
        import torchopt
    except ImportError:
        print("torchopt is not installed (pip install -e '.[bench]'): timing metaoptimizer alone")
    else:
        print(f"torchopt {torchopt.__version__}, torch {torch.__version__}, threads={torch.get_num_threads()}")
        sides["torchopt (eps_root=1e-8)"] = TorchoptSide(batches, eps_root=1e-8)
        first = {name: side.truncation() for name, side in sides.items()}
        print("first truncation's meta-gradient d(meta-loss)/d(log lr): "
              + ", ".join(f"{name} {g:.6g}" for name, g in first.items()))
        default = TorchoptSide(batches, eps_root=0.0)
        nans = sum(not math.isfinite(default.truncation()) for _ in range(args.nan_steps))
        print(f"torchopt default eps_root=0: {nans} of {args.nan_steps} truncations gave a non-finite meta-gradient")
    if args.sgd_floor:
        sides["metaoptimizer, SGD (floor)"] = MetaoptimizerSide(batches, rule="sgd")
    seconds = best_seconds(sides, args.meta_steps, args.rounds, CLOCKS[args.clock])
    print(f"clock: {args.clock}, best of {args.rounds} rounds of {args.meta_steps} truncations")
    for name, s in seconds.items():
        print(f"{name:28s} {s * 1e3:8.2f} ms per truncation  {K / s:8.1f} inner steps/s")
    if "torchopt (eps_root=1e-8)" in seconds:
        ours, theirs = seconds["metaoptimizer"], seconds["torchopt (eps_root=1e-8)"]
        print(f"metaoptimizer / torchopt throughput: {theirs / ours:.2f}x (target >= 1.5x)")
    if args.profile:
        for name, side in sides.items():
            profile(side, name)
    if args.cprofile:
        cprofile(sides["metaoptimizer"])
    if args.breakdown:
        breakdown(sides["metaoptimizer"])


if __name__ == "__main__":
    main()
