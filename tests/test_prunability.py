"""The prunability table's recipe: one family measured end to end, and a hanging family costs only itself."""
import pytest

from prunability_table import SHRINKS, families, markdown, measure, run_family


def test_family_timeout_is_recorded():
    row = run_family("resnet", timeout=1)
    assert row["status"] == "failed" and row["error"] == "time-out after 1 s"


@pytest.mark.slow
def test_resnet_family_row():
    row = measure("resnet", families()["resnet"])
    assert row["model"] == "resnet10t" and row["input_size"] == 32  # fewest parameters, without timm's test_* fixtures
    assert row["status"] == "ok" and row["exact"] and row["roundtrip_diff"] == 0.0
    assert min(row["flops"], row["flops_skip"]) <= SHRINKS
    assert "Exact export" in markdown([row]) and "| resnet | resnet10t |" in markdown([row])
