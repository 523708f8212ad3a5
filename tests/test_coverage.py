"""Every model of the coverage list: Chase trains, removes channels, and exports a slim model that computes the same."""
import pytest

from helpers import coverage_params, coverage_row


@pytest.mark.slow
@pytest.mark.parametrize("prune_skip", [False, True], ids=["internal", "prune_skip"])
@pytest.mark.parametrize("name", coverage_params())
def test_export_matches_masked_model(name, prune_skip):
    row = coverage_row(name, prune_skip)
    assert row["rel_diff"] <= 1e-4, f"slim output differs from the masked model by {row['rel_diff']:.2e}"
    if row["groups"]:
        assert row["removed"] > 0 and row["params_ratio"] < 1.0 and row["flops_ratio"] < 1.0
    else:
        assert row["params_ratio"] == 1.0
