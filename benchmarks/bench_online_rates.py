"""Online per-coordinate rates (``method='hypergradient'`` / ``'meta_sgd'``'s torch optimizer)
against Adam at lr 1e-3, on a small MLP and a tiny GPT-2-like model: chooses the rules' defaults.

Each optimizer trains each model from the same initialisation on the same batches for
``--steps`` steps; the table gives the mean training loss over the last 10% of steps and the loss
on held-out data, per model (mean over ``--seeds``), and the ratio of each to Adam(1e-3)'s. Models:

* ``mlp``: 64-128-128-10 ReLU MLP on scikit-learn's digits (standardised pixels, batch 64);
* ``gpt``: a 2-layer causal transformer (pre-LayerNorm, 4 heads, width 64, GELU MLP, learned
  positions, tied embeddings) on character-level tiny Shakespeare (context 64, batch 16), read
  from ``--data-dir`` (default ``../shared/data``).

    python benchmarks/bench_online_rates.py [--steps 300] [--seeds 0 1] [--data-dir DIR] [--json FILE]
        [--base-lrs 0.001 0.01 ...] [--alpha-lrs 0 0.01 ...] [--models mlp gpt]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaoptimizer.optim import LearnedOptimizer
from metaoptimizer.rules import HypergradientRule, ShrinkingRatesRule
from metaoptimizer.tasks.datasets import load_tiny_shakespeare
from metaoptimizer.tasks.digits import load_digits_tensors

BASE_LRS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
ALPHA_LRS = (0.0, 1e-2, 1.0, 100.0)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """GPT-2's layout at toy size: token + position embeddings, pre-norm blocks, tied readout."""

    def __init__(self, vocab: int, width: int = 64, layers: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, context) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.norm(self.blocks(x)) @ self.tokens.weight.T


def mlp_problem(steps: int, seed: int):
    x, y = load_digits_tensors()
    x = x.flatten(1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    train, test = order[:1500], order[1500:]
    batches = [train[torch.randint(len(train), (64,), generator=g)] for _ in range(steps)]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    batch_loss = lambda m, i: F.cross_entropy(m(x[i]), y[i])  # noqa: E731
    return model, [lambda m, i=i: batch_loss(m, i) for i in batches], lambda m: batch_loss(m, test)


def gpt_problem(steps: int, seed: int, data_dir: str, context: int = 64, batch: int = 16):
    text = load_tiny_shakespeare(data_dir)
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text[:200_000]])
    split = int(0.9 * len(ids))
    g = torch.Generator().manual_seed(seed)

    def windows(start: int, stop: int, n: int) -> tuple[Tensor, Tensor]:
        offsets = torch.randint(start, stop - context - 1, (n,), generator=g)
        rows = torch.stack([ids[o:o + context + 1] for o in offsets])
        return rows[:, :-1], rows[:, 1:]

    batches = [windows(0, split, batch) for _ in range(steps)]
    held_out = windows(split, len(ids), 64)
    torch.manual_seed(seed)
    model = TinyGPT(len(vocab), context=context)

    def loss(m: nn.Module, data: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(m(data[0]).flatten(0, 1), data[1].flatten())

    return model, [lambda m, b=b: loss(m, b) for b in batches], lambda m: loss(m, held_out)


def optimizers(base_lrs: list[float], alpha_lrs: list[float]) -> dict[str, object]:
    """Name -> (parameters -> torch optimizer)."""
    made = {"adam(1e-3)": lambda ps: torch.optim.Adam(ps, lr=1e-3)}
    for base_lr in base_lrs:
        for alpha_lr in alpha_lrs:
            made[f"hypergradient(base_lr={base_lr:g}, alpha_lr={alpha_lr:g})"] = (
                lambda ps, b=base_lr, a=alpha_lr: LearnedOptimizer(ps, HypergradientRule(base_lr=b, alpha_lr=a), nonfinite="skip")
            )
    made["hypergradient() defaults"] = lambda ps: LearnedOptimizer(ps, HypergradientRule(), nonfinite="skip")
    made["meta_sgd's former defaults (base_lr=1e-3, alpha_lr=1e-2)"] = lambda ps: LearnedOptimizer(
        ps, HypergradientRule(base_lr=1e-3, alpha_lr=1e-2), nonfinite="skip")
    made["shrinking_rates() defaults"] = lambda ps: LearnedOptimizer(ps, ShrinkingRatesRule(), nonfinite="skip")
    return made


def train(problem, make_optimizer, steps: int) -> tuple[float, float]:
    """(mean training loss over the last 10% of steps, held-out loss); inf for a run that diverged."""
    model, batch_losses, held_out = problem
    model = copy.deepcopy(model)
    optimizer = make_optimizer(list(model.parameters()))
    losses = []
    for batch_loss in batch_losses[:steps]:
        optimizer.zero_grad()
        loss = batch_loss(model)
        if not math.isfinite(loss.item()):
            return math.inf, math.inf  # diverged
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if getattr(optimizer, "skipped_steps", 0):  # a non-finite gradient: diverged
        return math.inf, math.inf
    tail = losses[-max(1, steps // 10):]
    with torch.no_grad():
        final = held_out(model).item()
    return sum(tail) / len(tail), final if math.isfinite(final) else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--json", default=None)
    parser.add_argument("--base-lrs", type=float, nargs="+", default=list(BASE_LRS))
    parser.add_argument("--alpha-lrs", type=float, nargs="+", default=list(ALPHA_LRS))
    parser.add_argument("--models", nargs="+", choices=("mlp", "gpt"), default=["mlp", "gpt"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for model_name in args.models:
        for seed in args.seeds:
            problem = (mlp_problem(args.steps, seed) if model_name == "mlp"
                       else gpt_problem(args.steps, seed, args.data_dir))
            for name, make in optimizers(args.base_lrs, args.alpha_lrs).items():
                results.setdefault(model_name, {}).setdefault(name, []).append(train(problem, make, args.steps))
    print(f"{args.steps} steps, seeds {args.seeds}; mean over seeds; ratio = loss / Adam(1e-3)'s loss "
          f"({time.perf_counter() - start:.0f} s)\n")
    for model_name, rows in results.items():
        mean = {name: tuple(sum(r[i] for r in runs) / len(runs) for i in (0, 1)) for name, runs in rows.items()}
        adam = mean["adam(1e-3)"]
        print(f"### {model_name}\n\n| optimizer | train loss (last 10%) | held-out loss | train / Adam | held-out / Adam |")
        print("|---|---|---|---|---|")
        for name, (tr, ho) in mean.items():
            print(f"| {name} | {tr:.3f} | {ho:.3f} | {tr / adam[0]:.3f} | {ho / adam[1]:.3f} |")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "seeds": args.seeds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
