"""An optimizer named by a string, as ``metaopt eval --optimizer`` takes it: a pretrained name,
a saved ``MetaOptimizer`` file, or a hand-designed rule with its hyperparameters (``'adam:lr=0.001'``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from metaoptimizer import pretrained
from metaoptimizer.facade import MetaOptimizer
from metaoptimizer.rules.base import UpdateRule
from metaoptimizer.rules.hand import HAND_RULES, make_hand_rule

__all__ = ["RuleLoader", "load_optimizer", "parse_hand_spec"]

#: ``spec -> rule``: how a command line's optimizer string becomes an update rule.
RuleLoader = Callable[[str], UpdateRule]


def parse_hand_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``'name'`` or ``'name:key=value,key=value'`` (numeric values) as (name, hyperparameters)."""
    name, _, options = spec.partition(":")
    hyperparameters = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        number = _as_float(value)
        if not key.strip() or number is None:
            raise ValueError(f"bad hyperparameter {item!r} in {spec!r}; write key=number, e.g. 'adam:lr=0.001'")
        hyperparameters[key.strip()] = number
    return name.strip(), hyperparameters


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def load_optimizer(spec: str) -> UpdateRule:
    """The update rule named by ``spec``: a shipped pretrained optimizer
    (:func:`metaoptimizer.pretrained.available`), the path of a saved ``MetaOptimizer``, or a
    hand-designed rule (``'adam:lr=0.001'``, names as in :data:`metaoptimizer.rules.hand.HAND_RULES`)."""
    if spec in pretrained.available():
        return pretrained.load(spec).rule
    if Path(spec).is_file():
        return MetaOptimizer.load(spec).rule
    name, hyperparameters = parse_hand_spec(spec)
    if name in HAND_RULES:
        return make_hand_rule(name, **hyperparameters)
    raise ValueError(
        f"optimizer {spec!r} is not a pretrained name ({', '.join(pretrained.available())}), an existing "
        f"checkpoint file or a hand-designed rule ({', '.join(HAND_RULES)}, e.g. 'adam:lr=0.001')"
    )
