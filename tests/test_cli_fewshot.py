"""``metaopt fewshot``: a small run writes its report and prints progress; bad options are usage errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from metaoptimizer.cli import app


def test_fewshot_command_writes_a_report(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["fewshot", "--dataset", "sinusoid", "--methods", "maml,meta_sgd", "--k-shot", "3", "--query-shots", "4",
         "--inner-lr", "0.01", "--meta-steps", "2", "--meta-batch-size", "2", "--test-episodes", "3",
         "--width", "8", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "meta_sgd: meta-test mse" in result.output
    # not a terminal: progress comes as plain lines, the last step of each method included
    assert "meta-training maml: 2/2" in result.output and "meta-training meta_sgd: 2/2" in result.output
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["results"]] == ["maml", "meta_sgd"]
    assert all(len(r["values"]) == 3 for r in data["results"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--methods", "meta_sgd,reptile"], "unknown methods"),
        (["--methods", " , "], "unknown methods"),
        (["--dataset", "omniglot", "--data-dir", "/nonexistent/folder"], "does not exist"),
        (["--dataset", "cifar"], "accepted values"),
    ],
)
def test_fewshot_command_rejects_bad_options(arguments, message):
    result = CliRunner().invoke(app, ["fewshot", *arguments])
    assert result.exit_code == 2 and message in result.output
