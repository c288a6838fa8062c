"""Learned optimizers that scale: step time and memory against fused Adam, from 1e5 to 3e7 parameters.

    python benchmarks/bench_scaling.py check                  # compiled kernels == eager reference
    python benchmarks/bench_scaling.py step --model mlp       # ~12M-parameter MLP: time, state, peak RSS
    python benchmarks/bench_scaling.py step --model transformer
    python benchmarks/bench_scaling.py step --model mlp --features factored
    python benchmarks/bench_scaling.py lstm                   # chunked coordinatewise LSTM, one step at ~12M
    python benchmarks/bench_scaling.py scaling --plot docs/results/scaling.png
    python benchmarks/bench_scaling.py quality --budget 600   # held-out speedup after meta-training

Every timing is a ratio to ``torch.optim.Adam(fused=True)`` measured in the same process, on the
same parameters and gradients (real gradients of one batch), with the optimizers interleaved in
each repeat and the median of the per-repeat ratios reported: the machine is shared, so
absolute times drift while ratios taken side by side stay comparable. Ratios are given in CPU
time of the calling thread (one torch thread) and in wall time. A learned rule's step is
``rule.update`` under ``torch.no_grad`` with ``backend='compiled'`` plus the in-place
``p.add_(update)`` a ``torch.optim`` adapter does; compilation happens in a warm-up step and is
reported separately. Peak RSS is measured in a fresh process per optimizer (``/proc`` VmHWM, reset
after the warm-up, so that it covers steady-state steps and not the compiler).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.rules.features import FeatureConfig, state_numel
from metaoptimizer.rules.hierarchical import HierarchicalRule
from metaoptimizer.rules.lstm import LSTMRule
from metaoptimizer.rules.mlp import MLPRule

SCALING_SIZES = (100_000, 300_000, 1_000_000, 3_000_000, 10_000_000, 30_000_000)
#: The LSTM keeps 2 x 2 x 20 bfloat16 state values per coordinate and transiently several times
#: that; above this many state bytes (so above about 1.2e7 parameters) it is skipped.
LSTM_STATE_BUDGET = 2e9

# -- models with real gradients -------------------------------------------------------------------


def mlp_model(num_params: int) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """A 3-hidden-layer ReLU MLP of width ``w`` (about ``3 w^2`` parameters) and its loss on a batch."""
    width = max(8, round(math.sqrt(num_params / 3)))
    model = nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10),
    )
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, width, generator=generator), torch.randint(0, 10, (64,), generator=generator)
    return model, lambda m: F.cross_entropy(m(x), y)


def transformer_model() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """A 3-layer, 512-wide Transformer encoder language model (about 11.6M parameters)."""
    vocab, width = 4096, 512

    class LanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            layer = nn.TransformerEncoderLayer(width, 8, 4 * width, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
            self.head = nn.Linear(width, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
            return self.head(self.encoder(self.embed(tokens), mask=mask, is_causal=True))

    tokens = torch.randint(0, vocab, (4, 65), generator=torch.Generator().manual_seed(0))
    return LanguageModel(), lambda m: F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def build(model_name: str, num_params: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model (its parameters' ``.grad`` set from one batch) and its gradients by name."""
    torch.manual_seed(0)
    model, loss = transformer_model() if model_name == "transformer" else mlp_model(num_params)
    loss(model).backward()
    return model, {name: p.grad for name, p in model.named_parameters()}


# -- optimizers as step functions -----------------------------------------------------------------

#: ``--features factored``: two momenta and a factored second moment (still 2 floats per coordinate).
FACTORED = FeatureConfig(
    momentum_decays=(0.9, 0.99), rms_decays=(), factored_decays=(0.999,),
    features=("grad", "param", "momentum", "factored", "mom_ratio", "grad_ratio"),
)
FEATURES = {"default": FeatureConfig(), "factored": FACTORED}
RULES = {
    "l2o": lambda features="default": MLPRule(features=FEATURES[features], backend="compiled"),
    "hierarchical": lambda features="default": HierarchicalRule(features=FEATURES[features], backend="compiled"),
}


def torch_adam(model: nn.Module, grads: dict[str, torch.Tensor], **kwargs):
    """(step, state bytes) of ``torch.optim.Adam`` over ``model`` with ``grads`` as its ``.grad``."""
    for name, p in model.named_parameters():
        p.grad = grads[name]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **kwargs)
    state_bytes = lambda: sum(  # noqa: E731
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0
    )
    return optimizer.step, state_bytes


def rule_stepper(rule: UpdateRule, model: nn.Module, grads: dict[str, torch.Tensor]):
    """A ``torch.optim``-like step for ``rule``: update under no_grad, applied in place."""
    params = {name: p for name, p in model.named_parameters()}
    holder = {"state": rule.init(params)}

    def step() -> None:
        with torch.no_grad():
            updates, holder["state"] = rule.update(grads, holder["state"], params)
            for name, p in params.items():
                p.add_(updates[name])

    state_bytes = lambda: sum(t.numel() * t.element_size() for t in holder["state"].tensors())  # noqa: E731
    return step, state_bytes, holder


def make_optimizer(name: str, model: nn.Module, grads: dict[str, torch.Tensor], features: str = "default"):
    """(step function, state-bytes function) for ``name``: adam, adam_foreach, or a rule of RULES."""
    if name == "adam":
        return torch_adam(model, grads, fused=True)
    if name == "adam_foreach":
        return torch_adam(model, grads, foreach=True)
    step, state_bytes, _ = rule_stepper(RULES[name](features), model, grads)
    return step, state_bytes


def interleaved_ratios(steps: dict[str, Callable[[], None]], repeats: int, reference: str = "adam") -> dict:
    """Per optimizer: median CPU and wall seconds, and median per-repeat ratios to ``reference``."""
    cpu = {name: [] for name in steps}
    wall = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            c, w = time.thread_time(), time.perf_counter()
            step()
            cpu[name].append(time.thread_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {
        name: {
            "cpu_s": statistics.median(cpu[name]),
            "wall_s": statistics.median(wall[name]),
            "cpu_ratio": statistics.median(a / b for a, b in zip(cpu[name], cpu[reference], strict=True)),
            "wall_ratio": statistics.median(a / b for a, b in zip(wall[name], wall[reference], strict=True)),
        }
        for name in steps
    }


def warm_up(steps: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Run each step once (compilation happens here); returns the seconds each took."""
    seconds = {}
    for name, step in steps.items():
        started = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - started
    return seconds


# -- peak memory, one fresh process per optimizer -------------------------------------------------


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(optimizer: str, model_name: str, num_params: int, steps: int, lstm_options: str, features: str) -> None:
    """Runs in a fresh process: prints JSON with RSS before the optimizer and peak RSS over its steps."""
    torch.set_num_threads(1)
    model, grads = build(model_name, num_params)
    baseline = _proc_kib("VmRSS")
    if optimizer == "lstm":
        step, state_bytes, _ = rule_stepper(LSTMRule(**json.loads(lstm_options)), model, grads)
    else:
        step, state_bytes = make_optimizer(optimizer, model, grads, features)
    started = time.perf_counter()
    step()  # warm-up: allocates the state and compiles
    warmup = time.perf_counter() - started
    after_warmup = _proc_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    print(json.dumps({
        "baseline_mib": baseline / 1024, "after_warmup_mib": after_warmup / 1024,
        "peak_mib": _proc_kib("VmHWM") / 1024, "warmup_s": warmup, "step_s": times,
        "state_mib": state_bytes() / 2**20,
    }))


def measure_rss(
    optimizer: str, model_name: str, num_params: int, steps: int, lstm_options: dict | None = None,
    features: str = "default",
) -> dict:
    command = [
        sys.executable, __file__, "_rss", optimizer, "--model", model_name, "--params", str(num_params),
        "--steps", str(steps), "--lstm-options", json.dumps(lstm_options or {}), "--features", features,
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- commands ----------------------------------------------------------------------------------------


def check() -> dict:
    """Compiled steps against the eager matmul reference on a small model, over 5 steps."""
    torch.set_num_threads(1)
    results = {}
    for name, make in {"l2o": MLPRule, "hierarchical": HierarchicalRule}.items():
        finals = {}
        for backend in ("matmul", "pointwise", "compiled"):
            model, grads = build("mlp", 30_000)
            step, _, _ = rule_stepper(make(backend=backend), model, grads)
            for _ in range(5):
                step()
            finals[backend] = {n: p.detach().clone() for n, p in model.named_parameters()}
        for backend in ("pointwise", "compiled"):
            diff = max(float((finals[backend][n] - finals["matmul"][n]).abs().max()) for n in finals["matmul"])
            scale = max(float(p.abs().max()) for p in finals["matmul"].values())
            results[f"{name}/{backend}"] = diff
            print(f"{name:12s} {backend:9s} vs matmul: max |difference| {diff:.3g} (parameters up to {scale:.3g})")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"compiled graphs in this process: {graphs}")
    results["compiled_graphs"] = graphs
    return results


def step_benchmark(model_name: str, repeats: int, rss_steps: int, features: str) -> dict:
    torch.set_num_threads(1)
    model, grads = build(model_name, 10_000_000)
    num_params = sum(p.numel() for p in model.parameters())
    names = ["adam", "adam_foreach", *RULES]
    optimizers = {
        name: make_optimizer(name, copy.deepcopy(model) if name != "adam" else model, grads, features) for name in names
    }
    steps = {name: opt[0] for name, opt in optimizers.items()}
    print(f"model: {model_name}, {num_params / 1e6:.2f}M parameters in {len(grads)} tensors; rule features: "
          f"{features}; 1 torch thread; load average {os.getloadavg()}")
    compile_s = warm_up(steps)
    timings = interleaved_ratios(steps, repeats)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    figures = {"model": model_name, "params": num_params, "tensors": len(grads), "repeats": repeats}
    for name in names:
        t = timings[name]
        state = optimizers[name][1]()
        figures[name] = {**t, "first_step_s": compile_s[name], "state_over_params": state / param_bytes}
        print(f"  {name:13s} step {1e3 * t['cpu_s']:8.1f} ms CPU ({1e3 * t['wall_s']:8.1f} ms wall)  "
              f"ratio to fused Adam: CPU {t['cpu_ratio']:5.2f}  wall {t['wall_ratio']:5.2f}  "
              f"state {state / param_bytes:.3f} x params  first step {compile_s[name]:.1f} s")
    for name in names:
        rss = measure_rss(name, model_name, 10_000_000, rss_steps, features=features)
        figures[name]["rss"] = rss
        print(f"  {name:13s} RSS: model+grads {rss['baseline_mib']:5.0f} MiB, after the warm-up step "
              f"{rss['after_warmup_mib']:5.0f} MiB, peak over {rss_steps} more steps {rss['peak_mib']:5.0f} MiB "
              f"(+{rss['peak_mib'] - rss['baseline_mib']:.0f} over model+grads), state {rss['state_mib']:.0f} MiB")
    rule = HierarchicalRule(features=FEATURES[features])
    params = dict(model.named_parameters())
    counts = state_numel(rule.init(params))
    figures["hierarchical_state_elements"] = {**counts, "params": num_params}
    print(f"  hierarchical state elements: {counts} for {num_params} parameters "
          f"({counts['per_coordinate'] / num_params:.2f} per coordinate)")
    print(f"load average after: {os.getloadavg()}")
    return figures


def lstm_benchmark(chunk_size: int, steps: int) -> dict:
    figures = {}
    for state_dtype in (None, "bfloat16"):
        options = {"chunk_size": chunk_size, "state_dtype": state_dtype}
        rss = measure_rss("lstm", "mlp", 10_000_000, steps, options)
        adam = measure_rss("adam", "mlp", 10_000_000, steps)
        key = state_dtype or "float32"
        figures[key] = {"lstm": rss, "adam": adam}
        print(f"LSTM 2x20 chunk_size={chunk_size} state {key}: step {statistics.median(rss['step_s']):.2f} s "
              f"(fused Adam {1e3 * statistics.median(adam['step_s']):.1f} ms), state {rss['state_mib']:.0f} MiB, "
              f"peak RSS {rss['peak_mib']:.0f} MiB (model+grads {rss['baseline_mib']:.0f} MiB)")
    return figures


def scaling(sizes: tuple[int, ...], repeats: int, plot: Path | None) -> dict:
    torch.set_num_threads(1)
    rows = []
    for size in sizes:
        model, grads = build("mlp", size)
        num_params = sum(p.numel() for p in model.parameters())
        steps = {name: make_optimizer(name, copy.deepcopy(model) if name != "adam" else model, grads)[0]
                 for name in ("adam", *RULES)}
        lstm_state_bytes = num_params * 2 * 2 * 20 * 2  # bfloat16 hidden and cell
        if lstm_state_bytes <= LSTM_STATE_BUDGET:
            lstm = LSTMRule(chunk_size=2**20, state_dtype="bfloat16")
            steps["lstm"] = rule_stepper(lstm, copy.deepcopy(model), grads)[0]
        warm_up(steps)
        lstm_repeats = {"lstm"} if "lstm" in steps and num_params > 1_000_000 else set()
        timings = interleaved_ratios({k: v for k, v in steps.items() if k not in lstm_repeats}, repeats)
        if lstm_repeats:  # one timed step against one Adam step: the LSTM takes seconds here
            pair = interleaved_ratios({"adam": steps["adam"], "lstm": steps["lstm"]}, 1)
            timings["lstm"] = pair["lstm"]
        row = {"params": num_params, **{name: timings.get(name) for name in ("adam", *RULES, "lstm")}}
        rows.append(row)
        cells = "  ".join(
            f"{name} {1e3 * timings[name]['cpu_s']:9.2f} ms (x{timings[name]['cpu_ratio']:.2f})" if name in timings
            else f"{name} skipped" for name in ("adam", *RULES, "lstm")
        )
        print(f"{num_params:>11,d}  {cells}", flush=True)
    print(f"compiled graphs in this process: {torch._dynamo.utils.counters['stats']['unique_graphs']}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("adam", *RULES, "lstm"):
            points = [(r["params"], 1e3 * r[name]["cpu_s"]) for r in rows if r[name]]
            ax.loglog(*zip(*points, strict=True), marker="o", label="Adam (fused)" if name == "adam" else name)
        ax.set_xlabel("parameters")
        ax.set_ylabel("step time, ms CPU (1 thread)")
        ax.set_title("Optimizer step time vs model size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        print(f"plot written to {plot}")
    return {"rows": rows}


def quality(budget: float, num_tasks: int, seeds: int) -> dict:
    """Meta-train the LSTM, the l2o rule and the hierarchical rule on digits_mlp for the same
    wall-clock budget (truncated BPTT), then compare them, and the untrained hierarchical rule,
    with tuned Adam on held-out tasks."""
    from _speedups import speedups_over_tuned_adam
    from metaoptimizer.evaluate.suites import heldout_suite
    from metaoptimizer.meta.estimators import TruncatedBPTT
    from metaoptimizer.meta.trainer import MetaTrainer
    from metaoptimizer.tasks import make_family

    torch.set_num_threads(1)
    horizon, unroll_steps, tasks_per_step = 200, 20, 4
    makers = {"lstm": LSTMRule, "l2o": MLPRule, "hierarchical": HierarchicalRule}
    print(f"digits_mlp, horizon {horizon}, unroll {unroll_steps}, {tasks_per_step} tasks per meta-step, "
          f"Adam meta_lr 1e-3, truncated BPTT, {budget:.0f} s of meta-training each; load average {os.getloadavg()}")
    torch.manual_seed(0)
    trained, training = {"hierarchical_untrained": HierarchicalRule()}, {}
    for name, make in makers.items():
        torch.manual_seed(0)
        trainer = MetaTrainer(make(), make_family("digits_mlp"), meta_lr=1e-3, unroll_steps=unroll_steps,
                              run_steps=horizon, tasks_per_step=tasks_per_step, estimator=TruncatedBPTT(), seed=0)
        started, results = time.perf_counter(), []
        while time.perf_counter() - started < budget:
            results.append(trainer.step())
        tail = results[-max(1, len(results) // 10):]
        training[name] = {"meta_steps": len(results), "skipped": results[-1].skipped_total,
                          "meta_loss_last_10pct": sum(r.meta_loss for r in tail) / len(tail)}
        trained[name] = trainer.rule
        print(f"  {name}: {training[name]}", flush=True)
    suite = heldout_suite(family="digits_mlp", num_tasks=num_tasks, steps=horizon, seeds=tuple(range(seeds)))
    header = f"held-out speedup over tuned Adam ({num_tasks} tasks x {seeds} seeds, {horizon} steps):"
    speedups = speedups_over_tuned_adam(trained, suite, header)
    print(f"load average after: {os.getloadavg()}")
    return {"training": training, "speedup": speedups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check")
    step = sub.add_parser("step")
    step.add_argument("--model", choices=["mlp", "transformer"], default="mlp")
    step.add_argument("--repeats", type=int, default=11)
    step.add_argument("--rss-steps", type=int, default=3)
    step.add_argument("--features", choices=sorted(FEATURES), default="default")
    lstm = sub.add_parser("lstm")
    lstm.add_argument("--chunk-size", type=int, default=2**20)
    lstm.add_argument("--steps", type=int, default=2)
    scale = sub.add_parser("scaling")
    scale.add_argument("--sizes", type=int, nargs="+", default=list(SCALING_SIZES))
    scale.add_argument("--repeats", type=int, default=7)
    scale.add_argument("--plot", type=Path)
    qual = sub.add_parser("quality")
    qual.add_argument("--budget", type=float, default=600.0, help="meta-training seconds per rule")
    qual.add_argument("--tasks", type=int, default=8)
    qual.add_argument("--seeds", type=int, default=2)
    child = sub.add_parser("_rss")  # internal: one optimizer in a fresh process
    child.add_argument("optimizer")
    child.add_argument("--model", default="mlp")
    child.add_argument("--params", type=int, default=10_000_000)
    child.add_argument("--steps", type=int, default=3)
    child.add_argument("--lstm-options", default="{}")
    child.add_argument("--features", choices=sorted(FEATURES), default="default")
    for p in (step, lstm, scale, qual, sub.choices["check"]):
        p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.command == "_rss":
        rss_child(args.optimizer, args.model, args.params, args.steps, args.lstm_options, args.features)
        return
    if args.command == "check":
        figures = check()
    elif args.command == "step":
        figures = step_benchmark(args.model, args.repeats, args.rss_steps, args.features)
    elif args.command == "lstm":
        figures = lstm_benchmark(args.chunk_size, args.steps)
    elif args.command == "scaling":
        figures = scaling(tuple(args.sizes), args.repeats, args.plot)
    else:
        figures = quality(args.budget, args.tasks, args.seeds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
