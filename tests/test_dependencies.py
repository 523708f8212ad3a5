"""The core library imports and works without its optional dependencies (the recipes' and plots' extras)."""
import subprocess
import sys

import pytest

OPTIONAL = ["accelerate", "matplotlib", "sklearn", "datasets", "tensorboard"]  # tqdm comes with huggingface_hub

WITHOUT_OPTIONAL = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # any import of it raises ImportError, as if it were not installed
import torch, timm, chase_timm
import chase_timm.analysis, chase_timm.cli, chase_timm.data, chase_timm.metrics, chase_timm.training
model = timm.create_model("resnet18", num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
config = chase_timm.ChaseConfig(total_steps=2, channel_sparsity=0.5, channel_interval=1, channel_offset=0)
chase = chase_timm.Chase(model, config, optimizer=optimizer, example_inputs=torch.randn(1, 3, 32, 32))
chase.step()
chase_timm.save_pretrained(chase.export(), sys.argv[1])
print("ok")
"""


def test_core_library_runs_without_optional_dependencies(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_OPTIONAL, str(tmp_path / "slim")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert (tmp_path / "slim" / "model.safetensors").exists()


def test_embedded_digits_without_scikit_learn_name_the_extra(monkeypatch):
    from chase_timm.data import DigitsDataset

    for name in ("sklearn", "sklearn.model_selection", "sklearn.datasets"):  # also when a test imported it
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'pip install "chase-timm\[recipes\]"'):
        DigitsDataset("train")
