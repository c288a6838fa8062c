"""Celo's step at 10M parameters against fused ``torch.optim.AdamW``: time and state.

    python benchmarks/bench_celo_step.py check            # compiled == eager, Celo and Celo-Adam (1e-6, float32)
    python benchmarks/bench_celo_step.py step             # ~10M-parameter MLP, one thread

Timings follow ``bench_scaling.py``: the same model and real gradients of one batch, every
optimizer's step interleaved in each repeat, medians of the per-repeat ratios to
``torch.optim.AdamW(fused=True)`` in CPU time of the calling thread and in wall time (the machine
is shared: absolute times drift, side-by-side ratios much less). A rule's step is ``rule.update``
under ``torch.no_grad`` plus the in-place ``p.add_(update)`` the torch adapter does. The compiled
backend compiles in a warm-up step, reported separately. State is counted in floats per
parameter: every tensor a rule keeps across steps (its per-tensor scheduler rows included).
"""

from __future__ import annotations

import argparse

import torch
from bench_scaling import build, interleaved_ratios, warm_up
from torch import nn

from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.rules.celo import CeloAdamRule, CeloRule

CELO_VARIANTS = {
    "celo_compiled": lambda: CeloRule.pretrained(backend="compiled"),
    "celo_eager": lambda: CeloRule.pretrained(),
    "celo_adam_compiled": lambda: CeloAdamRule.pretrained(backend="compiled"),
    "celo_adam_eager": lambda: CeloAdamRule.pretrained(),
}


def adamw_stepper(model: nn.Module, grads: dict[str, torch.Tensor]):
    """(step, state floats) of ``torch.optim.AdamW(fused=True)`` with ``grads`` as the ``.grad``."""
    for name, p in model.named_parameters():
        p.grad = grads[name]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    floats = lambda: sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)  # noqa: E731
    return optimizer.step, floats


def rule_stepper(rule: UpdateRule, model: nn.Module, grads: dict[str, torch.Tensor], loss: float, num_steps: int):
    """(step, state floats) of ``rule`` as the torch adapter runs it: update under no_grad, added in place."""
    params = dict(model.named_parameters())
    holder = {"state": rule.init(params, num_steps=num_steps)}

    def step() -> None:
        with torch.no_grad():
            updates, holder["state"] = rule.update(grads, holder["state"], params, loss=loss)
            for name, p in params.items():
                p.add_(updates[name])

    floats = lambda: sum(t.numel() for values in holder["state"].slots.values() for t in values.values())  # noqa: E731
    return step, floats


def check(steps: int = 4) -> float:
    """Largest ``|compiled - eager| / (|eager| + max|eager|)`` of Celo's and Celo-Adam's updates
    over a few steps on tensors of rank 0 to 4; asserts it is below 1e-6."""
    torch.set_num_threads(1)
    worst = max(check_rule(rule_class, steps) for rule_class in (CeloRule, CeloAdamRule))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"worst {worst:.2e} (bound 1e-6); compiled graphs in this process: {graphs}")
    assert worst < 1e-6, f"compiled differs from eager by {worst:.2e} > 1e-6"
    return worst


def check_rule(rule_class, steps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(300, 200, generator=generator), "conv": torch.randn(8, 4, 3, 3, generator=generator),
        "b": torch.randn(200, generator=generator), "s": torch.tensor(0.3), "one": torch.randn(1, generator=generator),
    }
    rules = {"eager": rule_class.pretrained(), "compiled": rule_class.pretrained(backend="compiled")}
    states = {name: rule.init(params, num_steps=50) for name, rule in rules.items()}
    current = dict.fromkeys(rules, params)
    worst = 0.0
    for t in range(steps):
        grads = {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in params.items()}
        updates = {}
        for name, rule in rules.items():
            with torch.no_grad():
                updates[name], states[name] = rule.update(grads, states[name], current[name], loss=2.0 - 0.1 * t)
            current[name] = {k: current[name][k] + updates[name][k] for k in params}
        for k in params:
            eager, fused = updates["eager"][k], updates["compiled"][k]
            ratio = float(((fused - eager).abs() / (eager.abs() + eager.abs().max())).max())
            worst = max(worst, ratio)
            shape = str(tuple(params[k].shape))
            print(f"{rule_class.name} step {t} {k:5s} {shape:14s} |compiled - eager| / (|eager| + max|eager|) "
                  f"<= {ratio:.2e}")
    return worst


def step_benchmark(num_params: int, repeats: int, variants: list[str]) -> dict:
    torch.set_num_threads(1)
    model, grads = build("mlp", num_params)
    total = sum(p.numel() for p in model.parameters())
    print(f"MLP with {total:,} parameters in {len(grads)} tensors, one thread, {repeats} interleaved repeats")
    steps, floats = {}, {}
    models = {"adamw_fused": model}
    steps["adamw_fused"], floats["adamw_fused"] = adamw_stepper(model, grads)
    for name in variants:
        models[name], _ = build("mlp", num_params)
        steps[name], floats[name] = rule_stepper(CELO_VARIANTS[name](), models[name], grads, loss=2.3, num_steps=10_000)
    warm = warm_up(steps)
    timing = interleaved_ratios(steps, repeats, reference="adamw_fused")
    for name, t in timing.items():
        print(
            f"{name:14s} step {1e3 * t['wall_s']:8.1f} ms wall, {1e3 * t['cpu_s']:8.1f} ms CPU; "
            f"ratio to fused AdamW: CPU {t['cpu_ratio']:6.2f}  wall {t['wall_ratio']:6.2f}; "
            f"state {floats[name]() / total:.3f} floats/parameter; warm-up {warm[name]:.1f} s"
        )
    per_param = {name: count() / total for name, count in floats.items()}
    return {"params": total, "timing": timing, "warm_up_s": warm, "floats_per_param": per_param}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("check", "step"))
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", nargs="+", default=list(CELO_VARIANTS), choices=list(CELO_VARIANTS))
    args = parser.parse_args()
    if args.command == "check":
        check()
    else:
        step_benchmark(args.params, args.repeats, args.variants)


if __name__ == "__main__":
    main()
