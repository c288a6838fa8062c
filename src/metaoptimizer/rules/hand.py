"""Hand-designed update rules (SGD, momentum, RMSProp, Adam, AdamW) in the functional form.

They implement the same ``init`` / ``update`` contract as the learned rules, so baselines and
learned optimizers share every code path, and they reproduce ``torch.optim``'s trajectories.
They have no meta-parameters. Each hyperparameter may be a Python number or a 0-dim
floating-point tensor; a tensor that requires grad is differentiated through the update, which
makes any of these rules a differentiable inner optimizer with learnable hyperparameters.

Adam and RMSProp divide by ``sqrt(second_moment + eps_root) + eps``. ``eps_root`` (default
:data:`EPS_ROOT` = 1e-16) keeps the derivative of the square root finite where the second moment
is zero (a coordinate whose gradient is always zero), so meta-gradients through these rules never
become ``inf * 0 = NaN``. Its value is small enough that the trajectories still match
``torch.optim`` to 1e-6 over hundreds of steps, and ``sqrt(EPS_ROOT)`` equals the default ``eps``.
Raise it (for example to 1e-12) for smoother meta-gradients near zero gradients; in float16 it
underflows, so pass a larger value there.

Rules check names and shapes of their inputs but not their values: a finiteness check reads the
data (a device sync per tensor, and data-dependent control flow that ``torch.func.vmap`` and
``torch.compile`` reject). The ``torch.optim`` adapter validates values with ``check_grads``.
Parameters absent from ``grads`` get no update and keep their state, like ``torch.optim`` skips
parameters whose ``.grad`` is ``None``.

Where no meta-gradient is needed, :meth:`HandRule.torch_step` applies the same update in place
with torch's multi-tensor (``torch._foreach_*``) kernels, as ``torch.optim``'s foreach
implementations do, or with ``torch.optim``'s fused kernels (the torch adapter does so by
default): SGD and momentum call ``torch.optim``'s own functional kernels; Adam and RMSProp run
``torch.optim``'s foreach passes (at ``eps_root=0`` their results are bitwise those of
``torch.optim``); with ``eps_root`` Adam takes as many passes (the division by
``sqrt(1 - beta2^t)`` moves into the step size), RMSProp one more. Fused Adam has no
``eps_root``, so it is available at ``eps_root=0`` only. Centered RMSProp keeps the functional
form. The kernels agree with the functional form to rounding (tests: 1e-6 in float32, 1e-12 in
float64).

Under autograd (unrolled meta-training), Adam and AdamW record each update of all tensors as one
node (:class:`_AdamStep`: multi-tensor kernels forward, a hand-written backward) instead of about
16 operations per tensor, when only ``lr`` (and the weight decay) may require grad; its values and
derivatives match the functional form to rounding (tests), and higher derivatives go through the
functional form.

Example: three Adam steps on ``sum((w - 1)^2)`` with a learning rate that requires grad.

>>> import torch
>>> from metaoptimizer.rules.base import apply_updates
>>> lr = torch.tensor(0.1, requires_grad=True)
>>> rule = Adam(lr=lr)
>>> params = {"w": torch.zeros(2)}
>>> state = rule.init(params)
>>> for _ in range(3):
...     grads = {"w": 2 * (params["w"] - 1)}
...     updates, state = rule.update(grads, state, params)
...     params = apply_updates(params, updates)
>>> [round(x, 3) for x in params["w"].tolist()]  # each Adam step moves w by about lr
[0.298, 0.298]
>>> loss = ((params["w"] - 1) ** 2).sum()
>>> round(torch.autograd.grad(loss, lr)[0].item(), 2)  # d loss / d lr
-8.31
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

from metaoptimizer._validation import check_flag, check_positive, check_unit_interval
from metaoptimizer.rules.base import Params, UpdateRule, check_slots, zeros_like_dict
from metaoptimizer.rules.state import OptimizerState

#: Default ``eps_root`` of Adam and RMSProp (see the module docstring for the choice).
EPS_ROOT = 1e-16

Hyper = float | Tensor


def _hyper(name: str, value: Hyper, check: Callable[..., None], **kwargs) -> Hyper:
    """Validate a hyperparameter given as a number or a 0-dim floating tensor; return it unchanged."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a number or a 0-dim floating-point tensor, "
                f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        number = value.detach().item()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a 0-dim floating-point tensor, got {value!r}")
    else:
        number = value
    check(name, number, **kwargs)
    return value


def _value(value: Hyper) -> float:
    """A hyperparameter's current value as a float, without touching autograd."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


@functools.cache
def _constructor_arguments(cls: type) -> frozenset[str]:
    return frozenset(name for name in inspect.signature(cls.__init__).parameters if name != "self")


def _is_zero(value: Hyper) -> bool:
    """True for the number 0; a tensor is never treated as zero, so it stays differentiable."""
    return not isinstance(value, Tensor) and value == 0


def _ema(average: Tensor, value: Tensor, decay: Hyper) -> Tensor:
    """The moving average, kept in the accumulator's dtype (a tensor ``decay`` would promote a
    0-d half-precision accumulator to float32)."""
    return (decay * average + (1 - decay) * value).to(average.dtype)


def _scaled(tensors: Mapping[str, Tensor], factor: Hyper) -> Params:
    return {name: (factor * t).to(t.dtype) for name, t in tensors.items()}


def _step_counters(params: list[Tensor], count: int) -> list[Tensor]:
    """One step counter at ``count`` per parameter, on its device, as torch's fused kernels take
    them (they increment each in place): views of one tensor, copied for parameters elsewhere."""
    counters = torch.full((len(params),), float(count), device=params[0].device).unbind()
    return [c if c.device == p.device else c.to(p.device) for c, p in zip(counters, params, strict=True)]


def _advance(state: OptimizerState, step: int, **slots: Params) -> OptimizerState:
    """The state after ``step``, with the given slot entries replaced (other parameters kept)."""
    merged = {slot: {**state.slots[slot], **values} for slot, values in slots.items()}
    return state.replace(step_count=step, slots={**state.slots, **merged})


class HandRule(UpdateRule):
    """Shared plumbing: zero-initialised slots, input checks, coupled weight decay, the
    hyperparameters a ``torch.optim`` param group sets, and the torch kernels."""

    #: Slots (``state.slots`` keys) this rule keeps; set per instance when options add slots.
    slot_names: tuple[str, ...] = ()
    #: Hyperparameters a ``torch.optim`` param group may set, by torch's names: the torch adapter
    #: puts them in each group and runs the group with its values (so ``OneCycleLR`` can cycle
    #: ``momentum`` or ``betas``, and the AdamW recipe can leave biases undecayed).
    group_hyperparameters: tuple[str, ...] = ("weight_decay",)

    def with_hyperparameters(self, **values: object) -> HandRule:
        """This rule with ``values`` in place of its hyperparameters (checked as by the constructor)."""
        return type(self).from_hyperparameters({**self.hyperparameters(), **values})

    def with_unchecked_hyperparameters(self, **values: Hyper | tuple[Hyper, Hyper]) -> HandRule:
        """A copy of this rule with ``values`` in place of its hyperparameters, without the
        constructor's checks: for values in range by construction (learned hyperparameters through
        ``exp``/``sigmoid``) at every inner step, where the checks would cost more than the update
        (they read each tensor hyperparameter's value: a device sync each on a GPU)."""
        known = _constructor_arguments(type(self))
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{type(self).__name__} has no hyperparameters {unknown}; it has {sorted(known)}")
        rule = copy.copy(self)
        rule.__dict__.update(values)
        return rule

    def has_torch_kernel(self, fused: bool = False) -> bool:
        """Whether :meth:`torch_step` can apply this rule (with a ``fused`` kernel); see the module docstring."""
        return False

    def torch_step(
        self, params: list[Tensor], grads: list[Tensor], slots: dict[str, list[Tensor]], count: int, *,
        lr_scale: float = 1.0, fused: bool = False,
    ) -> dict[str, list[Tensor]]:
        """Apply update ``count + 1``, times ``lr_scale``, to ``params`` in place with torch's
        foreach kernels (or ``torch.optim``'s ``fused`` kernel), without autograd.

        ``slots[slot][i]`` is ``params[i]``'s state after ``count`` updates (tensors are updated in
        place); returns the slots after the update.
        """
        raise NotImplementedError(f"{type(self).__name__} has no torch kernel")

    def init(self, params: Mapping[str, Tensor], *, num_steps: int | None = None) -> OptimizerState:
        slots = {slot: zeros_like_dict(params) for slot in self.slot_names}
        return OptimizerState(num_steps=self.resolve_num_steps(num_steps), slots=slots)

    def _gradients(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], weight_decay: Hyper
    ) -> Params:
        """Check the state's slots for ``grads``; add ``weight_decay * p`` (coupled, L2)."""
        check_slots(self, state, grads, self.slot_names)
        if _is_zero(weight_decay):
            return dict(grads)
        return {name: g + weight_decay * params[name] for name, g in grads.items()}


class SGD(HandRule):
    """Plain gradient descent: ``update = -lr * (g + weight_decay * p)``."""

    name = "sgd"

    def __init__(self, lr: Hyper, weight_decay: Hyper = 0.0) -> None:
        super().__init__()
        self.lr = _hyper("lr", lr, check_positive)
        self.weight_decay = _hyper("weight_decay", weight_decay, check_positive, allow_zero=True)

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        grads = self._gradients(grads, state, params, self.weight_decay)
        return _scaled(grads, -self.lr), state.replace(step_count=step)

    def has_torch_kernel(self, fused: bool = False) -> bool:
        return True

    def torch_step(self, params, grads, slots, count, *, lr_scale=1.0, fused=False):
        torch_sgd(
            params, grads, [None] * len(params), foreach=not fused, fused=fused, weight_decay=_value(self.weight_decay),
            momentum=0.0, lr=lr_scale * _value(self.lr), dampening=0.0, nesterov=False, maximize=False,
        )
        return slots


class Momentum(HandRule):
    """SGD with (heavy-ball or Nesterov) momentum, as ``torch.optim.SGD``.

    ``buf = g`` on the first step, then ``buf = momentum * buf + (1 - dampening) * g``; the update
    is ``-lr * buf``, or ``-lr * (g + momentum * buf)`` with ``nesterov``. A parameter whose first
    gradient comes after step 1 starts from a zero buffer (``torch.optim`` copies that gradient;
    the two agree unless ``dampening`` is not 0).
    """

    name = "momentum"
    slot_names = ("momentum_buffer",)
    group_hyperparameters = ("momentum", "weight_decay")

    def __init__(
        self, lr: Hyper, momentum: Hyper = 0.9, nesterov: bool = False, dampening: Hyper = 0.0,
        weight_decay: Hyper = 0.0,
    ) -> None:
        super().__init__()
        self.lr = _hyper("lr", lr, check_positive)
        self.momentum = _hyper("momentum", momentum, check_unit_interval)
        self.nesterov = check_flag("nesterov", nesterov)
        self.dampening = _hyper("dampening", dampening, check_unit_interval)
        self.weight_decay = _hyper("weight_decay", weight_decay, check_positive, allow_zero=True)
        if nesterov and (_value(momentum) == 0 or _value(dampening) != 0):
            raise ValueError(
                "nesterov=True needs momentum > 0 and dampening = 0, "
                f"got momentum={momentum!r}, dampening={dampening!r}"
            )

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        grads = self._gradients(grads, state, params, self.weight_decay)
        old = state.slots["momentum_buffer"]
        buf = {
            name: g.clone() if step == 1 else self.momentum * old[name] + (1 - self.dampening) * g
            for name, g in grads.items()
        }
        direction = {name: g + self.momentum * buf[name] for name, g in grads.items()} if self.nesterov else buf
        return _scaled(direction, -self.lr), _advance(state, step, momentum_buffer=buf)

    def has_torch_kernel(self, fused: bool = False) -> bool:
        return True

    def torch_step(self, params, grads, slots, count, *, lr_scale=1.0, fused=False):
        # torch.optim starts a buffer as a copy of the first gradient, as update() does at step 1.
        buffers = [None] * len(params) if count == 0 else list(slots["momentum_buffer"])
        torch_sgd(
            params, grads, buffers, foreach=not fused, fused=fused, weight_decay=_value(self.weight_decay),
            momentum=_value(self.momentum), lr=lr_scale * _value(self.lr), dampening=_value(self.dampening),
            nesterov=self.nesterov, maximize=False,
        )
        return {"momentum_buffer": buffers}


def _check_eps(eps: Hyper, eps_root: Hyper) -> None:
    if _value(eps) == 0 and _value(eps_root) == 0:
        raise ValueError("eps and eps_root cannot both be 0: the update would be 0/0 where the second moment is 0")


class RMSProp(HandRule):
    """RMSProp (Tieleman & Hinton 2012), as ``torch.optim.RMSprop``.

    ``v = alpha * v + (1 - alpha) * g^2``; the direction is ``g / (sqrt(v + eps_root) + eps)``,
    with ``v`` replaced by the variance ``v - mean(g)^2`` (clamped at 0 against rounding) when
    ``centered``, and accumulated in a momentum buffer when ``momentum`` is not 0.
    """

    name = "rmsprop"

    def __init__(
        self, lr: Hyper = 1e-2, alpha: Hyper = 0.99, eps: Hyper = 1e-8, momentum: Hyper = 0.0,
        centered: bool = False, weight_decay: Hyper = 0.0, eps_root: Hyper = EPS_ROOT,
    ) -> None:
        super().__init__()
        self.lr = _hyper("lr", lr, check_positive)
        self.alpha = _hyper("alpha", alpha, check_unit_interval)
        self.eps = _hyper("eps", eps, check_positive, allow_zero=True)
        self.momentum = _hyper("momentum", momentum, check_unit_interval)
        self.centered = check_flag("centered", centered)
        self.weight_decay = _hyper("weight_decay", weight_decay, check_positive, allow_zero=True)
        self.eps_root = _hyper("eps_root", eps_root, check_positive, allow_zero=True)
        _check_eps(eps, eps_root)
        self.slot_names = ("square_avg",)
        if centered:
            self.slot_names += ("grad_avg",)
        if not _is_zero(momentum):
            self.slot_names += ("momentum_buffer",)
            self.group_hyperparameters = ("momentum", "weight_decay")

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        grads = self._gradients(grads, state, params, self.weight_decay)
        slots = state.slots
        square_avg = {name: _ema(slots["square_avg"][name], g * g, self.alpha) for name, g in grads.items()}
        new_slots = {"square_avg": square_avg}
        variance = square_avg
        if self.centered:
            grad_avg = {name: _ema(slots["grad_avg"][name], g, self.alpha) for name, g in grads.items()}
            variance = {name: (square_avg[name] - grad_avg[name] ** 2).clamp_min(0) for name in grads}
            new_slots["grad_avg"] = grad_avg
        direction = {
            name: g / (torch.sqrt(variance[name] + self.eps_root) + self.eps) for name, g in grads.items()
        }
        if "momentum_buffer" in self.slot_names:
            direction = {name: self.momentum * slots["momentum_buffer"][name] + d for name, d in direction.items()}
            new_slots["momentum_buffer"] = direction
        return _scaled(direction, -self.lr), _advance(state, step, **new_slots)

    def has_torch_kernel(self, fused: bool = False) -> bool:
        return not fused and not self.centered

    def torch_step(self, params, grads, slots, count, *, lr_scale=1.0, fused=False):
        lr, weight_decay, momentum = lr_scale * _value(self.lr), _value(self.weight_decay), _value(self.momentum)
        if weight_decay:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        square_avg = slots["square_avg"]
        torch._foreach_mul_(square_avg, _value(self.alpha))
        torch._foreach_addcmul_(square_avg, grads, grads, value=1 - _value(self.alpha))
        denominator, factor = _foreach_root(square_avg, 1.0, _value(self.eps_root), _value(self.eps))
        if "momentum_buffer" in slots:
            torch._foreach_mul_(slots["momentum_buffer"], momentum)
            torch._foreach_addcdiv_(slots["momentum_buffer"], grads, denominator, value=factor)
            torch._foreach_add_(params, slots["momentum_buffer"], alpha=-lr)
        else:
            torch._foreach_addcdiv_(params, grads, denominator, value=-lr * factor)
        return slots


def _foreach_root(second: list[Tensor], correction: float, eps_root: float, eps: float) -> tuple[list[Tensor], float]:
    """Denominators ``d`` (new tensors) and a factor ``f`` with ``f / d = 1 / (sqrt(second /
    correction + eps_root) + eps)``, in three passes as ``torch.optim``'s foreach Adam takes: at
    ``eps_root=0`` its own (``sqrt(second) / sqrt(correction) + eps``, ``f = 1``), otherwise
    ``sqrt(second + eps_root * correction) + eps * sqrt(correction)`` with ``f = sqrt(correction)``
    (the division moved into the caller's scalar)."""
    if not eps_root:
        root = torch._foreach_sqrt(second)
        if correction != 1:
            torch._foreach_div_(root, correction**0.5)
        torch._foreach_add_(root, eps)
        return root, 1.0
    root = torch._foreach_add(second, eps_root * correction)
    torch._foreach_sqrt_(root)
    torch._foreach_add_(root, eps * correction**0.5)
    return root, correction**0.5


def _adam_direction(
    m: Tensor, second: Tensor, lr: Hyper, correction1: Hyper, correction2: Hyper, eps_root: Hyper, eps: Hyper
) -> Tensor:
    """Adam's update from its moments: ``-lr * m_hat / (sqrt(v_hat + eps_root) + eps)``, the
    differentiable reference form."""
    return (-lr * (m / correction1) / (torch.sqrt(second / correction2 + eps_root) + eps)).to(m.dtype)


def _gradient_list(grads: tuple[Tensor | None, ...], like: list[Tensor]) -> list[Tensor] | None:
    """Incoming gradients of a list of outputs: None when none has one, zeros for the missing ones."""
    if all(g is None for g in grads):
        return None
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


class _AdamStep(torch.autograd.Function):
    """One Adam update of every tensor as a single autograd node (the fast path of
    :meth:`Adam.update` under autograd).

    The reference form records about 16 operations per tensor and update, and an unroll's
    backward pays for every node. This node computes the same update with torch's multi-tensor
    kernels and differentiates it by hand (gradients for the gradients, both moments and ``lr``).
    Differentiating its backward again (``create_graph=True``) runs autograd through the reference
    form, recomputed from the saved inputs, so higher derivatives stay exact. Inputs: ``lr`` (a
    number or a 0-dim tensor), the constants ``(beta1, beta2, correction1, correction2, eps_root,
    eps)``, the tensor count ``n``, then ``n`` gradients, first and second moments; outputs: ``n``
    updates, first and second moments.
    """

    @staticmethod
    def run(rule: Adam, step: int, grads: Mapping[str, Tensor], slots: Mapping[str, Params]):
        """``rule``'s update ``step`` as (updates, new moments), every tensor of ``grads`` in one node."""
        beta1, beta2 = (_value(beta) for beta in rule.betas)
        names = list(grads)
        count = len(names)
        constants = (beta1, beta2, 1 - beta1**step, 1 - beta2**step, _value(rule.eps_root), _value(rule.eps))
        outputs = _AdamStep.apply(
            rule.lr, constants, count, *grads.values(),
            *(slots["exp_avg"][n] for n in names), *(slots["exp_avg_sq"][n] for n in names),
        )
        updates = dict(zip(names, outputs[:count], strict=True))
        exp_avg = dict(zip(names, outputs[count : 2 * count], strict=True))
        return updates, {"exp_avg": exp_avg, "exp_avg_sq": dict(zip(names, outputs[2 * count :], strict=True))}

    @staticmethod
    def forward(ctx, lr, constants, count, *tensors):
        beta1, beta2, correction1, correction2, eps_root, eps = constants
        grads, exp_avg, exp_avg_sq = tensors[:count], tensors[count : 2 * count], tensors[2 * count :]
        # Factors as 0-dim tensors (lists of them broadcast in the sums): torch converts a Python
        # number in a product or a sum on every call, which doubles the cost of these small kernels.
        # Built on the CPU and sent without waiting (a blocking copy would sync a GPU every step).
        factors = torch.tensor(
            [beta1, beta2, 1 - beta1, 1 / correction2, -0.5 / correction2, eps_root, eps,
             -1 / correction1 if isinstance(lr, Tensor) else -lr / correction1],
            dtype=grads[0].dtype,
        ).to(grads[0].device, non_blocking=True).unbind()
        scale = lr * factors[7] if isinstance(lr, Tensor) else factors[7]
        m = torch._foreach_lerp(exp_avg, grads, 1 - beta1)
        v = torch._foreach_mul(exp_avg_sq, factors[1])
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        root = torch._foreach_mul(v, factors[3])
        if eps_root:
            torch._foreach_add_(root, [factors[5]] * count)
        torch._foreach_sqrt_(root)
        denominator = torch._foreach_add(root, [factors[6]] * count) if eps else root
        ratio = torch._foreach_div(m, denominator)
        ctx.set_materialize_grads(False)
        ctx.count, ctx.constants, ctx.factors, ctx.lr = count, constants, factors, lr
        ctx.save_for_backward(
            lr if isinstance(lr, Tensor) else None, scale, *tensors, *ratio, *root, *(denominator if eps else ())
        )
        return (*torch._foreach_mul(ratio, scale), *m, *v)

    @staticmethod
    def backward(ctx, *output_grads):
        count, factors = ctx.count, ctx.factors
        beta2, correction2, eps = (ctx.constants[i] for i in (1, 3, 5))
        saved = ctx.saved_tensors
        lr, scale, inputs = saved[0], saved[1], saved[2 : 2 + 3 * count]
        if torch.is_grad_enabled():
            return _AdamStep._reference_backward(ctx, lr, inputs, output_grads)
        grads = list(inputs[:count])
        ratio, root = list(saved[2 + 3 * count : 2 + 4 * count]), list(saved[2 + 4 * count : 2 + 5 * count])
        denominator = list(saved[2 + 5 * count :]) if eps else root
        d_update, d_m, d_v = (_gradient_list(output_grads[i * count : (i + 1) * count], grads) for i in range(3))
        d_lr = None
        if d_update is not None:
            if ctx.needs_input_grad[0]:
                d_lr = sum(torch.dot(u.reshape(-1), r.reshape(-1)) for u, r in zip(d_update, ratio)) * factors[7]
            # update = scale * m / (sqrt(v / c2 + eps_root) + eps): its derivatives in m and in v
            from_update = torch._foreach_mul(d_update, scale)
            torch._foreach_div_(from_update, denominator)
            through_root = torch._foreach_mul(from_update, ratio)
            torch._foreach_div_(through_root, root)
            d_m = from_update if d_m is None else torch._foreach_add(from_update, d_m)
            d_v = torch._foreach_mul(through_root, factors[4]) if d_v is None else (
                torch._foreach_add(d_v, through_root, alpha=-0.5 / correction2)
            )
        needs = ctx.needs_input_grad[3:]
        none = [None] * count
        d_grads = d_exp_avg = d_exp_avg_sq = none
        if any(needs[:count]) and (d_m is not None or d_v is not None):
            # m = lerp(m0, g, 1 - beta1), v = beta2 v0 + (1 - beta2) g^2
            d_grads = torch._foreach_mul(d_m, factors[2]) if d_m is not None else [torch.zeros_like(g) for g in grads]
            if d_v is not None:
                torch._foreach_addcmul_(d_grads, grads, d_v, value=2 * (1 - beta2))
        if any(needs[count : 2 * count]) and d_m is not None:
            d_exp_avg = torch._foreach_mul(d_m, factors[0])
        if any(needs[2 * count :]) and d_v is not None:
            d_exp_avg_sq = torch._foreach_mul(d_v, factors[1])
        return (d_lr, None, None, *d_grads, *d_exp_avg, *d_exp_avg_sq)

    @staticmethod
    def _reference_backward(ctx, lr, inputs, output_grads):
        """The backward by autograd through the reference form (for ``create_graph=True``)."""
        count, (beta1, beta2, correction1, correction2, eps_root, eps) = ctx.count, ctx.constants
        grads, exp_avg, exp_avg_sq = inputs[:count], inputs[count : 2 * count], inputs[2 * count :]
        lr = ctx.lr if lr is None else lr
        m = [_ema(a, g, beta1) for a, g in zip(exp_avg, grads, strict=True)]
        v = [_ema(a, g * g, beta2) for a, g in zip(exp_avg_sq, grads, strict=True)]
        updates = [_adam_direction(a, b, lr, correction1, correction2, eps_root, eps) for a, b in zip(m, v, strict=True)]
        pairs = [(out, grad) for out, grad in zip((*updates, *m, *v), output_grads, strict=True) if grad is not None]
        needed = ctx.needs_input_grad[:1] + ctx.needs_input_grad[3:]
        wanted = [t for t, flag in zip((lr, *inputs), needed, strict=True) if flag]
        found = iter(
            torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True, allow_unused=True)
            if wanted and pairs else ()
        )
        d_lr, *d_inputs = (next(found, None) if flag else None for flag in needed)
        return (d_lr, None, None, *d_inputs)


class Adam(HandRule):
    """Adam (Kingma & Ba 2015), as ``torch.optim.Adam``.

    The update is ``-lr * m_hat / (sqrt(v_hat + eps_root) + eps)`` with bias-corrected moments;
    ``amsgrad`` uses the running maximum of ``v``. ``weight_decay`` is added to the gradient (L2)
    unless ``decoupled_weight_decay``, where the update gets ``-lr * weight_decay * p`` (AdamW).
    """

    name = "adam"
    group_hyperparameters = ("betas", "weight_decay")

    def __init__(
        self, lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8,
        weight_decay: Hyper = 0.0, amsgrad: bool = False, decoupled_weight_decay: bool = False,
        eps_root: Hyper = EPS_ROOT,
    ) -> None:
        super().__init__()
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.lr = _hyper("lr", lr, check_positive)
        self.betas = tuple(_hyper(f"betas[{i}]", beta, check_unit_interval) for i, beta in enumerate(betas))
        self.eps = _hyper("eps", eps, check_positive, allow_zero=True)
        self.weight_decay = _hyper("weight_decay", weight_decay, check_positive, allow_zero=True)
        self.amsgrad = check_flag("amsgrad", amsgrad)
        self.decoupled_weight_decay = check_flag("decoupled_weight_decay", decoupled_weight_decay)
        self.eps_root = _hyper("eps_root", eps_root, check_positive, allow_zero=True)
        _check_eps(eps, eps_root)
        self.slot_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")

    def update(
        self, grads: Mapping[str, Tensor], state: OptimizerState, params: Mapping[str, Tensor], *,
        loss: Tensor | float | None = None,
    ) -> tuple[Params, OptimizerState]:
        step, state = self.begin_update(grads, state, params, loss)
        decoupled = self.decoupled_weight_decay
        grads = self._gradients(grads, state, params, 0.0 if decoupled else self.weight_decay)
        beta1, beta2 = self.betas
        slots = state.slots
        if self._records_one_node(grads, slots):
            updates, new_slots = _AdamStep.run(self, step, grads, slots)
        else:
            exp_avg = {name: _ema(slots["exp_avg"][name], g, beta1) for name, g in grads.items()}
            exp_avg_sq = {name: _ema(slots["exp_avg_sq"][name], g * g, beta2) for name, g in grads.items()}
            new_slots = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
            second = exp_avg_sq
            if self.amsgrad:
                second = {name: torch.maximum(slots["max_exp_avg_sq"][name], v) for name, v in exp_avg_sq.items()}
                new_slots["max_exp_avg_sq"] = second
            updates = {
                name: _adam_direction(m, second[name], self.lr, 1 - beta1**step, 1 - beta2**step, self.eps_root, self.eps)
                for name, m in exp_avg.items()
            }
        if decoupled and not _is_zero(self.weight_decay):
            updates = {
                name: (u - self.lr * self.weight_decay * params[name]).to(u.dtype) for name, u in updates.items()
            }
        return updates, _advance(state, step, **new_slots)

    def _records_one_node(self, grads: Mapping[str, Tensor], slots: Mapping[str, Params]) -> bool:
        """Whether this update runs as one :class:`_AdamStep` node: autograd records it, no
        ``torch.func`` transform is active, only ``lr`` (and the weight decay, applied outside) may
        require grad, no ``amsgrad``, and every tensor shares one dtype and device."""
        if self.amsgrad or not torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
            return False
        if any(isinstance(h, Tensor) and h.requires_grad for h in (*self.betas, self.eps, self.eps_root)):
            return False
        tensors = [*grads.values(), *(slots["exp_avg"][n] for n in grads), *(slots["exp_avg_sq"][n] for n in grads)]
        if not any(t.requires_grad for t in tensors) and not (isinstance(self.lr, Tensor) and self.lr.requires_grad):
            return False
        first = tensors[0]
        return all(t.dtype == first.dtype and t.device == first.device for t in tensors)

    def has_torch_kernel(self, fused: bool = False) -> bool:
        return not fused or _value(self.eps_root) == 0

    def torch_step(self, params, grads, slots, count, *, lr_scale=1.0, fused=False):
        beta1, beta2 = (_value(beta) for beta in self.betas)
        lr, weight_decay, step = lr_scale * _value(self.lr), _value(self.weight_decay), count + 1
        if fused:
            torch_adam(
                params, grads, slots["exp_avg"], slots["exp_avg_sq"], slots.get("max_exp_avg_sq", []),
                _step_counters(params, count), fused=True, decoupled_weight_decay=self.decoupled_weight_decay,
                amsgrad=self.amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
                eps=_value(self.eps), maximize=False,
            )
            return slots
        if weight_decay and self.decoupled_weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        elif weight_decay:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        exp_avg, second = slots["exp_avg"], slots["exp_avg_sq"]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(second, beta2)
        torch._foreach_addcmul_(second, grads, grads, value=1 - beta2)
        if self.amsgrad:
            torch._foreach_maximum_(slots["max_exp_avg_sq"], second)
            second = slots["max_exp_avg_sq"]
        denominator, factor = _foreach_root(second, 1 - beta2**step, _value(self.eps_root), _value(self.eps))
        torch._foreach_addcdiv_(params, exp_avg, denominator, value=-lr * factor / (1 - beta1**step))
        return slots


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``."""

    name = "adamw"

    def __init__(
        self, lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8,
        weight_decay: Hyper = 1e-2, amsgrad: bool = False, eps_root: Hyper = EPS_ROOT,
    ) -> None:
        super().__init__(lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, eps_root=eps_root)


#: Hand-designed rules by their ``name``.
HAND_RULES: dict[str, type[HandRule]] = {rule.name: rule for rule in (SGD, Momentum, RMSProp, Adam, AdamW)}


def make_hand_rule(name: str, **hyperparameters) -> HandRule:
    """Build the hand-designed rule called ``name`` (a key of :data:`HAND_RULES`)."""
    if name not in HAND_RULES:
        raise ValueError(f"unknown hand-designed rule {name!r}; accepted names: {', '.join(map(repr, HAND_RULES))}")
    return HAND_RULES[name](**hyperparameters)
