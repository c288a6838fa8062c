"""The README's first snippet, run as a newcomer runs it: the pretrained optimizer trains a digits MLP, silently."""

import re
import warnings
from pathlib import Path

import torch

from metaoptimizer.tasks.digits import load_digits_tensors

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_first_snippet_trains_with_the_pretrained_optimizer_and_no_warning():
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "pretrained.load" in snippet
    images, labels = load_digits_tensors()
    x, y = images.flatten(1) / 16.0, labels
    starts = [(64 * i) % (len(x) - 64) for i in range(200)]  # the 200 steps the snippet announces
    batches = [(x[i : i + 64], y[i : i + 64]) for i in starts]
    namespace = {"batches": batches}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the untrained-rule warning nor the budget warning
        exec(compile(snippet, str(README), "exec"), namespace)
    model = namespace["model"]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
    assert loss < 0.3  # chance is log(10) = 2.3
