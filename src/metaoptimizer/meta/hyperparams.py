"""Meta-learning a hand-designed optimizer's hyperparameters by differentiating through its updates.

:class:`LearnedHyperparameters` is an update rule that runs one of the hand rules
(:mod:`metaoptimizer.rules.hand`) with its learning rate, and optionally its momentum and
epsilon, computed from meta-parameters: the hand rules accept 0-dim tensor hyperparameters and
differentiate through them, so an unroll's meta-loss has a gradient with respect to these
meta-parameters and ``MetaTrainer`` (or any meta-optimizer) can learn them. Rates are global
or one per parameter tensor.

The module also reproduces optax's meta-learning example (:func:`meta_learn_line_fit`): fit
``y = 10 x + N(0, 1)`` with the model ``x * theta`` by RMSProp whose learning rate (starting at
0.1, sigmoid-parametrised) is meta-trained by Adam(0.03) on 7 samples per outer step (6 inner
updates, the loss on the 7th sample as the meta-loss), for 2000 outer steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import Tensor, nn

from metaoptimizer.config import MetaOptTrainResult, OptimizerState, check_positive
from metaoptimizer.meta.trainer import MetaTrainer
from metaoptimizer.rules.base import Params, UpdateRule
from metaoptimizer.rules.hand import HandRule, make_hand_rule
from metaoptimizer.tasks.base import Batch, Task, TaskFamily

LEARNABLE = ("lr", "momentum", "eps")
LR_PARAMETRISATIONS = ("log", "sigmoid")
#: Hand rules with each optional learnable hyperparameter (Adam's momentum is beta1).
_HAS = {"momentum": ("momentum", "rmsprop", "adam", "adamw"), "eps": ("rmsprop", "adam", "adamw")}
_ADAM_LIKE = ("adam", "adamw")


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class LearnedHyperparameters(UpdateRule):
    """A hand rule (``'sgd'``, ``'momentum'``, ``'rmsprop'``, ``'adam'``, ``'adamw'``) whose
    hyperparameters named in ``learn`` are meta-parameters.

    ``lr`` is parametrised as ``exp(raw)`` (``lr_parametrisation='log'``) or ``sigmoid(raw)``
    (``'sigmoid'``, rates in (0, 1) as in optax's example); ``momentum`` (Adam's beta1) as
    ``sigmoid(raw)``; ``eps`` as ``exp(raw)``. Each starts at the rule's value: ``lr``, or the
    ``momentum``/``betas``/``eps`` given in ``fixed`` (the other constructor arguments of the
    hand rule, kept constant), or the rule's default. With ``per_tensor`` every tensor named in
    ``param_names`` has its own values; otherwise one value serves all parameters.
    """

    name = "learned_hyperparameters"

    def __init__(
        self,
        rule: str = "rmsprop",
        lr: float = 0.1,
        *,
        learn: Sequence[str] = ("lr",),
        lr_parametrisation: str = "log",
        param_names: Sequence[str] | None = None,
        per_tensor: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **fixed: Any,
    ) -> None:
        super().__init__()
        check_positive("lr", lr)
        learn = tuple(learn)
        if not learn or len(set(learn)) != len(learn) or not set(learn) <= set(LEARNABLE):
            raise ValueError(f"learn={learn!r} must name distinct hyperparameters among {LEARNABLE}")
        if lr_parametrisation not in LR_PARAMETRISATIONS:
            raise ValueError(
                f"lr_parametrisation={lr_parametrisation!r} is not supported; accepted values: {LR_PARAMETRISATIONS}"
            )
        if not isinstance(per_tensor, bool):
            raise TypeError(f"per_tensor must be True or False, got {per_tensor!r}")
        if per_tensor and not param_names:
            raise ValueError("per_tensor=True needs param_names, the names of the parameter tensors")
        if param_names is not None and len(set(param_names)) != len(param_names):
            raise ValueError(f"param_names must be distinct, got {list(param_names)}")
        for hyper in learn:
            if hyper in _HAS and rule not in _HAS[hyper]:
                raise ValueError(f"rule {rule!r} has no {hyper}; learning {hyper} needs one of {_HAS[hyper]}")
        self.template: HandRule = make_hand_rule(rule, lr=lr, **fixed)
        self.rule_name = rule
        self.lr = float(lr)
        self.learn = learn
        self.lr_parametrisation = lr_parametrisation
        self.param_names = None if param_names is None else list(param_names)
        self.per_tensor = per_tensor
        self.fixed = fixed
        shape = (len(self.param_names),) if per_tensor else ()
        self.raw = nn.ParameterDict(
            {h: nn.Parameter(torch.full(shape, self._raw_init(h), device=device, dtype=dtype)) for h in learn}
        )

    def _initial(self, hyper: str) -> float:
        if hyper == "lr":
            return self.lr
        if hyper == "momentum":
            return float(self.template.betas[0] if self.rule_name in _ADAM_LIKE else self.template.momentum)
        return float(self.template.eps)

    def _raw_init(self, hyper: str) -> float:
        value = self._initial(hyper)
        if hyper == "momentum" or (hyper == "lr" and self.lr_parametrisation == "sigmoid"):
            if not 0.0 < value < 1.0:
                raise ValueError(f"a sigmoid-parametrised {hyper} must start in (0, 1), got {value!r}")
            return _logit(value)
        if value <= 0.0:
            raise ValueError(f"a log-parametrised {hyper} must start > 0, got {value!r}")
        return math.log(value)

    def hyperparameters(self) -> dict[str, object]:
        return {
            "rule": self.rule_name,
            "lr": self.lr,
            "learn": list(self.learn),
            "lr_parametrisation": self.lr_parametrisation,
            "param_names": self.param_names,
            "per_tensor": self.per_tensor,
            **self.fixed,
        }

    def values(self) -> dict[str, Tensor]:
        """Current learned hyperparameters (differentiable; shape ``()`` or ``(len(param_names),)``)."""
        out = {}
        for hyper, raw in self.raw.items():
            log_scale = hyper == "eps" or (hyper == "lr" and self.lr_parametrisation == "log")
            out[hyper] = torch.exp(raw) if log_scale else torch.sigmoid(raw)
        return out

    def _hand_rule(self, values: Mapping[str, Tensor]) -> HandRule:
        """The hand rule with ``values`` (0-dim tensors) in place of its fixed hyperparameters."""
        kwargs = {**self.fixed, "lr": values.get("lr", self.lr)}
        if "momentum" in values:
            if self.rule_name in _ADAM_LIKE:
                kwargs["betas"] = (values["momentum"], self.template.betas[1])
            else:
                kwargs["momentum"] = values["momentum"]
        if "eps" in values:
            kwargs["eps"] = values["eps"]
        return make_hand_rule(self.rule_name, **kwargs)

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        return self.template.init(params, num_steps=num_steps)

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        values = self.values()
        if not self.per_tensor:
            return self._hand_rule(values).update(grads, state, params)
        unknown = sorted(set(grads) - set(self.param_names))
        if unknown:
            raise ValueError(f"no learned hyperparameters for {unknown}; this rule knows {self.param_names}")
        updates: Params = {}
        for index, name in enumerate(self.param_names):
            if name in grads:
                rule = self._hand_rule({h: v[index] for h, v in values.items()})
                update, state = rule.update({name: grads[name]}, state.replace(step_count=step - 1), params)
                updates.update(update)
        return updates, state.replace(step_count=step)

    def learned_values(self) -> dict[str, dict[str, float]]:
        """Every learned hyperparameter by parameter tensor name (``'global'`` when no names are known)."""
        names = self.param_names or ["global"]
        with torch.no_grad():
            values = self.values()
            return {
                hyper: {n: float(v[i] if self.per_tensor else v) for i, n in enumerate(names)}
                for hyper, v in values.items()
            }

    def learned_lr(self) -> dict[str, float]:
        """The learning rate of every parameter tensor (a single ``'global'`` entry when no names are known)."""
        if "lr" in self.learn:
            return self.learned_values()["lr"]
        return dict.fromkeys(self.param_names or ["global"], self.lr)


# -- optax's meta-learning example -------------------------------------------------------------


class NoisyLineTask(Task):
    """Fit ``y = slope * x + N(0, noise_std^2)``, ``x ~ U(0, x_max)``, with the model ``x * theta``.

    Batches hold ``samples_per_batch`` points; the loss is ``0.5 * mean((x * theta - y)^2)``
    (optax's ``l2_loss``). Training and validation batches are independent draws of the same line.
    """

    name = "noisy_line"

    def __init__(
        self,
        slope: float = 10.0,
        noise_std: float = 1.0,
        x_max: float = 10.0,
        samples_per_batch: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        check_positive("noise_std", noise_std, allow_zero=True)
        check_positive("x_max", x_max)
        check_positive("samples_per_batch", samples_per_batch, integer=True)
        self.slope = float(slope)
        self.noise_std = float(noise_std)
        self.x_max = float(x_max)
        self.samples_per_batch = samples_per_batch
        self.device = device

    def init_params(self, seed: int) -> Params:
        return {"theta": torch.randn((), generator=torch.Generator().manual_seed(seed)).to(self.device)}

    def loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        x, y = batch
        return 0.5 * (x * params["theta"] - y).square().mean()

    def _batches(self, seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            x = self.x_max * torch.rand(self.samples_per_batch, generator=generator)
            y = self.slope * x + self.noise_std * torch.randn(self.samples_per_batch, generator=generator)
            yield x.to(self.device), y.to(self.device)

    def train_batches(self, seed: int) -> Iterator[Batch]:
        return self._batches(2 * seed)

    def valid_batches(self, seed: int) -> Iterator[Batch]:
        return self._batches(2 * seed + 1)


class NoisyLineFamily(TaskFamily):
    """Every seed gives the same line (:class:`NoisyLineTask`); seeds change the data and theta's start."""

    name = "noisy_line"

    def __init__(self, **task_options: Any) -> None:
        self.task_options = task_options
        NoisyLineTask(**task_options)  # validate now, not at the first sample

    def sample(self, seed: int) -> NoisyLineTask:
        return NoisyLineTask(**self.task_options)


@dataclass
class LineFitTrace:
    """The learned learning rate and theta after each outer step of :func:`meta_learn_line_fit`."""

    lrs: list[float] = field(default_factory=list)
    thetas: list[float] = field(default_factory=list)
    results: list[MetaOptTrainResult] = field(default_factory=list)

    def summary(self, window: int = 100) -> dict[str, float]:
        """Start, peak and end values (steps are 1-based) and the means of the last ``window`` outer steps."""
        tail = slice(-min(window, len(self.lrs)), None)
        peak = max(range(len(self.lrs)), key=self.lrs.__getitem__)
        return {
            "outer_steps": len(self.lrs),
            "lr_after_first_step": self.lrs[0],
            "lr_max": self.lrs[peak],
            "lr_max_step": peak + 1,
            "lr_final": self.lrs[-1],
            "theta_after_first_step": self.thetas[0],
            "theta_at_lr_max": self.thetas[peak],
            "theta_final": self.thetas[-1],
            f"theta_mean_last_{window}": sum(self.thetas[tail]) / len(self.thetas[tail]),
            f"lr_mean_last_{window}": sum(self.lrs[tail]) / len(self.lrs[tail]),
        }


def meta_learn_line_fit(
    outer_steps: int = 2000,
    samples_per_step: int = 7,
    inner_lr: float = 0.1,
    meta_lr: float = 0.03,
    seed: int = 0,
) -> LineFitTrace:
    """optax's example: meta-learn RMSProp's (sigmoid) lr while it fits ``y = 10 x + N(0, 1)``.

    One inner run continues over all outer steps. Each outer step makes ``samples_per_step - 1``
    RMSProp updates of theta, one sample each, and differentiates (second order, as ``jax.grad``
    does) the loss on one more sample with respect to the lr's meta-parameter, which Adam(``meta_lr``)
    then steps. RMSProp is optax's: decay 0.9 and ``g / sqrt(v + 1e-8)``.
    """
    check_positive("outer_steps", outer_steps, integer=True)
    check_positive("samples_per_step", samples_per_step, integer=True)
    if samples_per_step < 2:
        raise ValueError(f"samples_per_step must be >= 2 (inner samples plus the meta-loss sample), got {samples_per_step}")
    inner_steps = samples_per_step - 1
    rule = LearnedHyperparameters(
        "rmsprop", inner_lr, lr_parametrisation="sigmoid", param_names=["theta"], alpha=0.9, eps=0.0, eps_root=1e-8
    )
    trainer = MetaTrainer(
        rule,
        NoisyLineFamily(),
        meta_lr=meta_lr,
        unroll_steps=inner_steps,
        horizon=(outer_steps + 1) * inner_steps,  # never finished, so never replaced by a fresh run
        gradient_clipping=None,
        meta_objective="valid_loss",
        second_order=True,
        seed=seed,
    )
    trace = LineFitTrace()
    for _ in range(outer_steps):
        trace.results.append(trainer.step())
        trace.lrs.append(rule.learned_lr()["theta"])
        trace.thetas.append(float(trainer.runs[0].params["theta"]))
    return trace


def plot_line_fit(trace: LineFitTrace, path: str | Path) -> None:
    """Two panels, as in optax's notebook: the learned lr (log scale) and theta, per outer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(trace.lrs) + 1)
    fig, (ax_lr, ax_theta) = plt.subplots(2, sharex=True, figsize=(6, 5))
    fig.suptitle("Meta-learning RMSProp's learning rate (y = 10x + N(0, 1))")
    ax_lr.semilogy(steps, trace.lrs)
    ax_lr.set_ylabel("learned lr")
    ax_theta.plot(steps, trace.thetas)
    ax_theta.axhline(10.0, color="grey", linestyle="--", linewidth=0.8)
    ax_theta.set_ylabel("theta")
    ax_theta.set_xlabel("outer step")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lr_example_command(
    out_dir: Annotated[Path, typer.Option(help="Folder for lr_example.png and lr_example.json.")] = Path("docs/img"),
    outer_steps: Annotated[int, typer.Option(help="Outer (meta) steps.")] = 2000,
    samples_per_step: Annotated[int, typer.Option(help="Samples per outer step (inner updates + 1).")] = 7,
    inner_lr: Annotated[float, typer.Option(help="RMSProp's starting learning rate.")] = 0.1,
    meta_lr: Annotated[float, typer.Option(help="Adam's learning rate for the meta-parameter.")] = 0.03,
    seed: Annotated[int, typer.Option(help="Seed of the inner run.")] = 0,
) -> dict[str, float]:
    """Reproduce optax's meta-learning example; write the plot and the numbers, print the numbers."""
    trace = meta_learn_line_fit(outer_steps, samples_per_step, inner_lr, meta_lr, seed)
    summary = trace.summary()
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_line_fit(trace, out_dir / "lr_example.png")
    (out_dir / "lr_example.json").write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    typer.run(lr_example_command)
