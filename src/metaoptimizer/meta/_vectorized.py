"""Pure-tensor unrolls, batched with ``torch.func.vmap`` over tasks and over ES particles.

An unroll here is a pure function of the rule's meta-parameters (one flat vector), the inner
parameters, the rule state and a fixed list of batches. The rule runs through
``torch.func.functional_call``, so every particle carries its own meta-parameters without touching
the module, and inner gradients come from ``torch.func.grad_and_value``; the same function then
runs under ``vmap``, under ``torch.no_grad`` (ES, PES) and under ``torch.func.grad`` (vectorised
truncated BPTT).

A :class:`UnrollJob` is one truncation of one task for a population of *members* (meta-parameter
vectors) that all see the same batches. :func:`run_jobs` stacks jobs whose tasks compute the same
loss function (equal :meth:`Task.loss_signature`) and whose parameters, states and batches agree in
shape and step count, and runs each stack in one ``vmap(vmap(unroll))`` call; every other job runs
one member at a time through the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from metaoptimizer.config import META_OBJECTIVES, OptimizerState
from metaoptimizer.meta.unroll import inner_step, objective
from metaoptimizer.rules.base import Params, UpdateRule
from metaoptimizer.tasks.base import Batch, Task

# -- meta-parameters as one flat vector ---------------------------------------------------------


def meta_parameters(rule: nn.Module) -> dict[str, nn.Parameter]:
    """The rule's trainable meta-parameters by name (those that require grad)."""
    return {name: p for name, p in rule.named_parameters() if p.requires_grad}


def flatten_meta(rule: nn.Module) -> Tensor:
    """The meta-parameters concatenated into one detached vector (empty for hand-designed rules)."""
    params = list(meta_parameters(rule).values())
    if not params:
        return torch.zeros(0)
    return torch.cat([p.detach().reshape(-1) for p in params])


def unflatten_meta(rule: nn.Module, vector: Tensor) -> dict[str, Tensor]:
    """Split ``vector`` back into tensors shaped like the rule's meta-parameters (views, differentiable)."""
    params = meta_parameters(rule)
    sizes = [p.numel() for p in params.values()]
    if vector.shape != (sum(sizes),):
        raise ValueError(f"meta-parameter vector must have shape ({sum(sizes)},), got {tuple(vector.shape)}")
    pieces = torch.split(vector, sizes)
    return {name: piece.view(p.shape) for (name, p), piece in zip(params.items(), pieces, strict=True)}


# -- which tasks can share one vmapped call ---------------------------------------------------


def loss_signature(task: Task) -> Hashable | None:
    """A hashable that equal-loss tasks share, or None when ``task`` cannot be vmapped with others
    (see :meth:`~metaoptimizer.tasks.base.Task.loss_signature`)."""
    return task.loss_signature()


# -- pytrees split into tensors (vmapped) and Python values (static) ----------------------------


@dataclass(frozen=True)
class _Static:
    """Everything of a pytree but its tensors: the structure and the non-tensor leaves."""

    spec: pytree.TreeSpec
    is_tensor: tuple[bool, ...]
    values: tuple[Any, ...]

    def join(self, tensors: Sequence[Tensor]) -> Any:
        it = iter(tensors)
        leaves = [next(it) if t else v for t, v in zip(self.is_tensor, self.values, strict=True)]
        return pytree.tree_unflatten(leaves, self.spec)

    def key(self) -> Hashable:
        return (str(self.spec), self.is_tensor, tuple(repr(v) for v in self.values))


def _split(tree: Any) -> tuple[list[Tensor], _Static]:
    leaves, spec = pytree.tree_flatten(tree)
    is_tensor = tuple(isinstance(x, Tensor) for x in leaves)
    values = tuple(None if t else x for t, x in zip(is_tensor, leaves, strict=True))
    return [x for x in leaves if isinstance(x, Tensor)], _Static(spec, is_tensor, values)


def _shapes(tensors: Sequence[Tensor], skip: int = 0) -> tuple:
    return tuple((tuple(t.shape[skip:]), t.dtype, t.device) for t in tensors)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stack same-structured pytrees of tensors along a new leading dimension."""
    return pytree.tree_map(lambda *xs: torch.stack(xs), *trees)


def index_tree(tree: Any, index: int) -> Any:
    """Entry ``index`` of the leading dimension of every tensor in ``tree``."""
    return pytree.tree_map(lambda x: x[index] if isinstance(x, Tensor) else x, tree)


# -- jobs and their outcomes ---------------------------------------------------------------------


def needs_valid_batch(meta_objective: str) -> bool:
    """Whether ``meta_objective`` is measured on a validation batch (``valid_loss``, ``log_valid_loss``)."""
    return meta_objective.endswith("valid_loss")


@dataclass
class UnrollJob:
    """One truncation of ``task`` for ``members`` (M, D), each a meta-parameter vector.

    Members start from ``params``/``state``, shared by all, or with ``stacked_start`` stacked
    along a leading member dimension (one start per member, as PES particles need). All members
    see ``train_batches`` (``steps + 1`` of them) and, for the validation objectives, ``valid_batch``.
    """

    task: Task
    members: Tensor
    params: Params
    state: OptimizerState
    train_batches: list[Batch]
    valid_batch: Batch | None = None
    stacked_start: bool = False

    @property
    def steps(self) -> int:
        return len(self.train_batches) - 1


@dataclass
class UnrollOutcome:
    """What a job's members produced, stacked along the member dimension.

    ``meta_losses (M,)``; ``params`` and ``state`` at the end (tensors ``(M, ...)``); ``losses
    (M, steps)`` the inner training loss before each update; ``grads (M, D)`` the meta-gradients
    when requested.
    """

    meta_losses: Tensor
    params: Params
    state: OptimizerState
    losses: Tensor
    grads: Tensor | None = None

    def finite(self) -> Tensor:
        """Per member: True when its meta-loss, inner losses and meta-gradient are all finite."""
        ok = torch.isfinite(self.meta_losses) & torch.isfinite(self.losses).all(dim=1)
        return ok if self.grads is None else ok & torch.isfinite(self.grads).all(dim=1)


class _RuleCall(nn.Module):
    """Lets ``torch.func.functional_call`` run ``rule.update`` with substituted meta-parameters."""

    def __init__(self, rule: UpdateRule) -> None:
        super().__init__()
        self.rule = rule

    def forward(self, grads: Params, state: OptimizerState, params: Params, loss: Tensor) -> tuple[Params, OptimizerState]:
        return self.rule.update(grads, state, params, loss=loss)


class _MemberUnroll:
    """One member's unroll as a function of tensors only, the form ``vmap`` and ``grad`` need.

    Called as ``(meta_vector, params, state_tensors, train_batches, valid_batch)`` with the
    batches stacked along a leading step dimension; returns ``(meta_loss, (params,
    state_tensors, losses))``. The Python leaves of the final state (the step count) are kept in
    :attr:`out_state`.
    """

    def __init__(
        self, rule: UpdateRule, task: Task, state: _Static, steps: int, meta_objective: str, second_order: bool
    ) -> None:
        self.rule = rule
        self.call = _RuleCall(rule)
        self.task = task
        self.state = state
        self.steps = steps
        self.meta_objective = meta_objective
        self.second_order = second_order
        self.out_state: _Static | None = None

    def __call__(
        self, meta: Tensor, params: Params, state_tensors: list[Tensor], train: Any, valid: Any
    ) -> tuple[Tensor, tuple[Params, list[Tensor], Tensor]]:
        weights = {f"rule.{name}": t for name, t in unflatten_meta(self.rule, meta).items()}

        def update(grads: Params, state: OptimizerState, params: Params, *, loss: Tensor):
            return functional_call(self.call, weights, (grads, state, params, loss))

        state = self.state.join(state_tensors)
        loss_and_grad = grad_and_value(self.task.loss)
        terms, losses = [], []
        for k in range(self.steps):
            grads, loss = loss_and_grad(params, index_tree(train, k))
            if not self.second_order:
                grads = {name: g.detach() for name, g in grads.items()}
            if k > 0:
                terms.append(loss)
            losses.append(loss.detach())
            params, state = inner_step(update, params, state, grads, loss)
        terms.append(self.task.loss(params, index_tree(train, self.steps)))
        valid_loss = self.task.loss(params, valid) if needs_valid_batch(self.meta_objective) else None
        meta_loss = objective(terms, valid_loss, self.meta_objective)
        tensors, self.out_state = _split(state)
        return meta_loss, (params, tensors, torch.stack(losses))


def _job_key(job: UnrollJob) -> Hashable | None:
    """Jobs with equal keys run in one vmapped call; None: this job runs on its own."""
    signature = loss_signature(job.task)
    if signature is None:
        return None
    state_tensors, state_static = _split(job.state)
    skip = 1 if job.stacked_start else 0
    return (
        signature,
        job.steps,
        tuple(job.members.shape),
        job.stacked_start,
        tuple((name, *_shapes([p], skip)) for name, p in job.params.items()),
        _shapes(state_tensors, skip),
        state_static.key(),
        _shapes(pytree.tree_leaves(job.train_batches)),
        None if job.valid_batch is None else _shapes(pytree.tree_leaves(job.valid_batch)),
    )


def run_jobs(
    rule: UpdateRule,
    jobs: Sequence[UnrollJob],
    *,
    meta_objective: str = "train_loss",
    second_order: bool = False,
    with_grad: bool = False,
    vectorize: bool = True,
) -> list[UnrollOutcome]:
    """Run every job's members through their unrolls; outcomes in the order of ``jobs``.

    ``with_grad`` also returns each member's meta-gradient (w.r.t. its meta-parameter vector),
    ``second_order`` keeps inner gradients in that gradient's graph. ``vectorize=False`` runs every
    member on its own (the reference the vmapped path is tested against).
    """
    if meta_objective not in META_OBJECTIVES:
        raise ValueError(f"meta_objective={meta_objective!r} is not supported; accepted values: {META_OBJECTIVES}")
    for job in jobs:
        if job.steps < 1:
            raise ValueError(f"a job needs at least 2 train batches (steps >= 1), got {len(job.train_batches)}")
        if needs_valid_batch(meta_objective) and job.valid_batch is None:
            raise ValueError(f"meta_objective={meta_objective!r} needs a valid_batch in every job")
    groups: dict[Hashable, list[int]] = {}
    singles: list[int] = []
    for index, job in enumerate(jobs):
        key = _job_key(job) if vectorize else None
        if key is None:
            singles.append(index)
        else:
            groups.setdefault(key, []).append(index)
    outcomes: list[UnrollOutcome | None] = [None] * len(jobs)
    options = {"meta_objective": meta_objective, "second_order": second_order, "with_grad": with_grad}
    for index in singles:
        outcomes[index] = _run_single(rule, jobs[index], **options)
    for indices in groups.values():
        for index, outcome in zip(indices, _run_group(rule, [jobs[i] for i in indices], **options), strict=True):
            outcomes[index] = outcome
    return outcomes  # type: ignore[return-value]


def _member_function(
    rule: UpdateRule, job: UnrollJob, state: _Static, *, meta_objective: str, second_order: bool, with_grad: bool
) -> tuple[_MemberUnroll, Callable]:
    member = _MemberUnroll(rule, job.task, state, job.steps, meta_objective, second_order)
    if not with_grad:
        return member, member
    return member, grad_and_value(member, has_aux=True)


def _outcome(result: Any, with_grad: bool, state: _Static) -> UnrollOutcome:
    """An :class:`UnrollOutcome` from the (stacked) result of a member function."""
    grads, (meta_loss, (params, state_tensors, losses)) = result if with_grad else (None, result)
    return UnrollOutcome(meta_loss, params, state.join(state_tensors), losses, grads)


def _run_single(rule: UpdateRule, job: UnrollJob, **options: Any) -> UnrollOutcome:
    state_tensors, state_static = _split(job.state)
    member, fn = _member_function(rule, job, state_static, **options)
    train = stack_trees(job.train_batches)
    results = []
    for m in range(job.members.shape[0]):
        params = index_tree(job.params, m) if job.stacked_start else job.params
        tensors = [t[m] for t in state_tensors] if job.stacked_start else state_tensors
        results.append(fn(job.members[m], params, tensors, train, job.valid_batch))
    return _outcome(stack_trees(results), options["with_grad"], member.out_state)


def _run_group(rule: UpdateRule, jobs: list[UnrollJob], **options: Any) -> list[UnrollOutcome]:
    first = jobs[0]
    _, state_static = _split(first.state)
    member, fn = _member_function(rule, first, state_static, **options)
    start_dim = 0 if first.stacked_start else None
    valid = None if first.valid_batch is None else stack_trees([j.valid_batch for j in jobs])
    batched = vmap(
        vmap(fn, in_dims=(0, start_dim, start_dim, None, None)),
        in_dims=(0, 0, 0, 0, None if valid is None else 0),
    )
    result = batched(
        torch.stack([j.members for j in jobs]),
        stack_trees([j.params for j in jobs]),
        stack_trees([_split(j.state)[0] for j in jobs]),
        stack_trees([stack_trees(j.train_batches) for j in jobs]),
        valid,
    )
    return [_outcome(index_tree(result, g), options["with_grad"], member.out_state) for g in range(len(jobs))]
