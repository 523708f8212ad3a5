"""The prunability table's recipe: one family measured end to end, and a hanging family costs only itself."""
import pytest
import timm
import torch

from chase_timm.graph import TIMEOUT_REASON, find_channel_groups

from prunability_table import SHRINKS, families, markdown, measure, run_family


def test_family_timeout_is_recorded():
    row = run_family("resnet", timeout=1)
    assert row["status"] == "failed" and row["error"] == "time-out after 1 s"


# cspnet (its focus stem concatenates input slices) and shvit (a reshape to zero channels) have graphs
# torch-pruning cannot fully map and used to keep every channel; convit's input-size cache buffer grows at the
# first forward and used to break the reload
FAMILIES = {"resnet": "resnet10t", "cspnet": "cs3darknet_focus_s", "shvit": "shvit_s1", "starnet": "starnet_s050",
            "lcnetv2": "lcnetv2_small", "convit": "convit_tiny"}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_row(family):
    row = measure(family, families()[family])
    assert row["model"] == FAMILIES[family]  # fewest parameters, without timm's test_* fixtures
    assert row["status"] == "ok" and row["exact"] and row["roundtrip_diff"] == 0.0
    assert min(row["flops"], row["flops_skip"]) <= SHRINKS
    assert f"| {family} | {FAMILIES[family]} |" in markdown([row])


@pytest.mark.slow
def test_discovery_of_chained_reshapes_finishes_within_the_default_time_limit():
    """EfficientViT-MSRA's cascaded attention chains reshapes whose index mappings multiply positions: the walk
    used to run past the 60 s limit (every group "discovery time limit reached"); now it stops early per group."""
    model = timm.create_model("efficientvit_m0", img_size=32)
    groups = find_channel_groups(model, torch.randn(1, 3, 32, 32))
    assert not [g.name for g in groups if g.reason == TIMEOUT_REASON]
    assert sum(g.prunable for g in groups) >= 10
