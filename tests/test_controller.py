"""What the controller does around the training loop: registered EMA copies stay masked, and resuming loads in
the order that works (Chase's state before the model's and optimizer's)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from chase_timm import Chase, ChaseConfig
from chase_timm.training import load_checkpoint
from helpers import batch, tiny_model

STEPS = 8
SCHEDULE = dict(total_steps=STEPS, update_interval=2, channel_interval=3, channel_offset=0, channel_end_step=6,
                channel_sparsity=0.5, min_channel_ratio=0.5, shrink="events")


def _setup():
    model = tiny_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    chase = Chase(model, ChaseConfig(**SCHEDULE), optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
    ema = ModelEmaV3(model, decay=0.9)
    chase.register(ema)
    return model, optimizer, chase, ema


def _step(model, optimizer, chase, ema, step: int, ema_first: bool = False) -> None:
    """One step in the documented order (optimizer, Chase, EMA), or with the EMA update before chase.step()."""
    x, y = batch(step)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    if ema_first:
        ema.update(model)
    chase.step()
    if not ema_first:
        ema.update(model)
    optimizer.zero_grad()


def _masked_nonzeros(chase: Chase, ema: ModelEmaV3) -> int:
    """EMA entries that are non-zero where the weight masks or the removed channels' masks are 0."""
    params = dict(ema.module.named_parameters())
    masks = {**chase.masks, **chase.channels.channel_masks}
    return sum(int(params[n][m == 0].count_nonzero()) for n, m in masks.items())


def test_registered_ema_is_exactly_zero_where_masked_after_every_step():
    model, optimizer, chase, ema = _setup()
    masks_before = {n: m.clone() for n, m in chase.masks.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented order draws no warning
        for step in range(STEPS):
            _step(model, optimizer, chase, ema, step)
            assert _masked_nonzeros(chase, ema) == 0, step
            if step == 1:  # an update step: the masks moved, so the EMA held values where they are now 0
                assert any(not torch.equal(m, chase.masks[n]) for n, m in masks_before.items() if m.shape ==
                           chase.masks[n].shape)
    assert chase.removed_channels() and chase.channels.pending() == {}  # channels went and were sliced out
    assert {k: v.shape for k, v in ema.module.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert any(int(p.count_nonzero()) for p in ema.module.parameters())


def test_ema_updated_before_chase_step_is_warned_about():
    model, optimizer, chase, ema = _setup()
    with pytest.warns(UserWarning, match=r"call ema.update\(model\) after chase.step\(\)"):
        _step(model, optimizer, chase, ema, 0, ema_first=True)


def test_register_rejects_a_copy_of_another_model():
    model, optimizer, chase, _ = _setup()
    with pytest.raises(ValueError, match="does not match the training model"):
        chase.register(ModelEmaV3(tiny_model("resnet10t")))


def _checkpoint(model, optimizer, chase, ema) -> dict:
    return {"chase": chase.state_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict()}


def test_load_checkpoint_resumes_a_shrunk_run_into_a_fresh_base_model(tmp_path):
    full = _setup()
    for step in range(STEPS):
        _step(*full, step)

    first = _setup()
    for step in range(4):  # past the first shrink (step 3)
        _step(*first, step)
    torch.save(_checkpoint(*first), tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["chase"]["shrunk"]

    model, optimizer, chase, ema = _setup()  # full width: loading the model first cannot fit the shrunk tensors
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(saved["model"])
    load_checkpoint(chase, saved, {"model": model, "optimizer": optimizer, "ema": ema})
    for step in range(4, STEPS):
        _step(model, optimizer, chase, ema, step)
    for mine, theirs in ((model, full[0]), (ema, full[3])):
        ours = mine.state_dict()
        assert all(torch.equal(ours[k], v) for k, v in theirs.state_dict().items())
    assert chase.removed_channels() == full[2].removed_channels()


def test_load_checkpoint_names_a_missing_object_before_loading_anything():
    model, optimizer, chase, ema = _setup()
    saved = _checkpoint(model, optimizer, chase, ema)
    with pytest.raises(ValueError, match=r"entries \['ema'\] have no object"):
        load_checkpoint(chase, saved, {"model": model, "optimizer": optimizer})
    with pytest.raises(ValueError, match="no 'chase' entry"):
        load_checkpoint(chase, {"model": saved["model"]}, {"model": model})


def test_a_wrong_model_or_example_input_is_a_one_line_error_and_nothing_prunable_is_warned_about():
    with pytest.raises(TypeError, match="Chase wraps a torch.nn.Module"):
        Chase("resnet18", ChaseConfig(total_steps=STEPS))
    model = tiny_model("resnet18")
    with pytest.raises(ValueError, match=r"example_inputs \[\(1, 1, 32, 32\)\] does not run through ResNet"):
        Chase(model, ChaseConfig(total_steps=STEPS), example_inputs=torch.randn(1, 1, 32, 32))  # 1 channel, not 3
    assert model.training  # the check left the model's mode as it was
    with pytest.warns(UserWarning, match="none of the 2 channel groups of _Residual can be removed .*prune_skip=True"):
        Chase(_Residual(), ChaseConfig(total_steps=STEPS), example_inputs=torch.randn(1, 3, 8, 8))


class _Residual(torch.nn.Module):
    """Every channel group is a residual stream (as in RepVGG or Res2Net without prune_skip)."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv(x)
        return self.head(x.mean((2, 3)))
