"""Publishing and loading slim models through the real timm, huggingface_hub and transformers code paths.

Round trips: ``local-dir:``, a pre-seeded offline ``HF_HUB_CACHE``, and ``push_to_hub`` to a hub-compatible
server on 127.0.0.1 followed by ``hf-hub:`` loading into a fresh cache (huggingface_hub reads HF_* variables
at import, so hub clients run in fresh processes). Outputs must equal the in-memory slim model bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import chase_timm
from chase_timm import cli
from chase_timm.hub import MODEL_FILES
from chase_timm.slim import apply_width_plan
from hub_fixtures import (REPO_ORG, make_slim, model_files, reference, run_python, seed_hub_cache,  # noqa: F401
                          slim_folders)  # slim_folders: a session fixture
from hub_server import HubServer
import zoo_coverage


@pytest.fixture(scope="module")
def hub():
    server = HubServer().start()
    yield server
    server.stop()


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _broken_copy(slim_folders, tmp_path: Path, case: str = "resnet18-noskip") -> Path:
    folder = tmp_path / case
    shutil.copytree(model_files(slim_folders[case]), folder)
    return folder


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------ round trips

def test_local_dir_round_trip_is_bitwise_for_every_family(slim_folders):
    for case, folder in slim_folders.items():
        assert {p.name for p in folder.iterdir()} == {*MODEL_FILES, "reference.safetensors"}  # no pickle file
        config = json.loads((folder / "config.json").read_text())
        assert config["architecture"] == "chase_slim" and "num_classes" not in config["model_args"]
        chase = config["model_args"]["chase"]
        assert chase["format_version"] == 1 and case.startswith(chase["base_architecture"])
        cfg = config["pretrained_cfg"]
        assert not {"tag", "origin_url", "hf_hub_id", "url", "test_input_size"} & set(cfg), case
        assert cfg["paper_ids"] == "arXiv:2305.19454" and cfg["license"] == "apache-2.0"
        x, expected = reference(folder)
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(model(x), expected), case
        assert timm.data.resolve_data_config(model=model)["input_size"] == tuple(x.shape[1:])
        assert timm.data.resolve_data_config(model=model)["crop_pct"] == cfg["crop_pct"]


@pytest.mark.network
def test_push_then_fresh_cache_hf_hub_load_is_bitwise(slim_folders, hub, tmp_path):
    code = f"""
import timm, torch, chase_timm
from pathlib import Path
from hub_fixtures import make_slim, reference
folders = {{name: Path(p) for name, p in {json.dumps({k: str(v) for k, v in slim_folders.items()})}.items()}}
for name, folder in folders.items():
    print(chase_timm.push_to_hub(folder, "{REPO_ORG}/" + name))
for name, folder in folders.items():
    x, expected = reference(folder)
    model = timm.create_model("hf-hub:{REPO_ORG}/" + name, pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected), name
slim, config = make_slim("mobilenetv3_small_050", True)  # a model object goes through save_pretrained first
chase_timm.push_to_hub(slim, "{REPO_ORG}/from-model", data_config={{"input_size": (3, 32, 32)}}, chase_config=config)
x = torch.randn(2, 3, 32, 32)
loaded = chase_timm.create_model("hf-hub:{REPO_ORG}/from-model").eval()
with torch.no_grad():
    assert torch.equal(loaded(x), slim(x))
print("OK")
"""
    out = run_python(code, {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_TOKEN": "hf_test"})
    assert out.stdout.strip().endswith("OK")
    assert f"{hub.url}/{REPO_ORG}/resnet18-skip/commit/" in out.stdout
    for name in [*slim_folders, "from-model"]:
        repo = hub.repos[f"{REPO_ORG}/{name}"]
        assert set(repo.commits[repo.branches["main"]]) == set(MODEL_FILES), name  # only the model files
    card = hub.repos[f"{REPO_ORG}/from-model"].commits[hub.repos[f"{REPO_ORG}/from-model"].branches["main"]]
    assert f'hf-hub:{REPO_ORG}/from-model' in card["README.md"].decode()


def test_offline_preseeded_cache_loads_a_first_class_timm_model(slim_folders, tmp_path):
    cache = tmp_path / "hub-cache"
    for case in ("resnet18-skip", "vit_tiny_patch16_224-noskip"):
        seed_hub_cache(cache, f"{REPO_ORG}/{case}", slim_folders[case])
    code = f"""
import timm, torch, chase_timm
from pathlib import Path
from hub_fixtures import reference
for case in ("resnet18-skip", "vit_tiny_patch16_224-noskip"):
    name = "hf-hub:{REPO_ORG}/" + case
    x, expected = reference(Path({str(slim_folders['resnet18-skip'].parent)!r}) / case)
    model = timm.create_model(name, pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        # a new head, properly initialised; the trunk's weights still load
        head = timm.create_model(name, pretrained=True, num_classes=3).eval()
        weight = head.get_classifier().weight  # initialised, not left as uninitialised memory
        assert head(x).shape == (2, 3) and torch.isfinite(weight).all() and 0 < weight.std() < 1
        assert torch.equal(head.forward_head(head.forward_features(x), pre_logits=True),
                           model.forward_head(model.forward_features(x), pre_logits=True))
        features = timm.create_model(name, pretrained=True, features_only=True).eval()
        maps = features(x)
        assert [m.shape[1] for m in maps] == features.feature_info.channels()
        assert features.feature_info.channels()[-1] == model.num_features
        gray = timm.create_model(name, pretrained=True, in_chans=1).eval()
        assert gray(x[:, :1]).shape == expected.shape
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
    with torch.no_grad():
        intermediates = model.forward_intermediates(x, intermediates_only=True)
    assert [t.shape[1] for t in intermediates][-1] == model.num_features
trunk = timm.create_model("hf-hub:{REPO_ORG}/resnet18-skip", pretrained=True, num_classes=0, global_pool="").eval()
assert trunk(torch.randn(1, 3, 32, 32)).dim() == 4
print("OK")
"""
    out = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert out.stdout.strip().endswith("OK")
    info = subprocess.run(["chase-timm", "info", f"hf-hub:{REPO_ORG}/resnet18-skip"], capture_output=True, text=True,
                          env={**_env(), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "slimmed from resnet18" in info.stdout and "layer4" in info.stdout and "dense FLOPs" in info.stdout


def test_transformers_loads_a_saved_folder(slim_folders):
    transformers = pytest.importorskip("transformers")
    for case in ("resnet18-skip", "vit_tiny_patch16_224-noskip"):
        folder = model_files(slim_folders[case])
        x, expected = reference(slim_folders[case])
        model = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
        backbone = transformers.TimmWrapperModel.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            assert torch.equal(model(pixel_values=x).logits, expected), case
            assert backbone(pixel_values=x).pooler_output.shape[-1] == model.timm_model.num_features


@pytest.mark.slow
@pytest.mark.parametrize("base", ["resnet50", "mobilenetv3_small_050"])
def test_export_parity_of_a_loaded_slim_model(base, tmp_path, monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime")
    # one bottleneck block per stage: the same ops to capture (downsampling shortcuts, every stage) at 1/3 the graph
    monkeypatch.setitem(zoo_coverage.SMALLER, "resnet50", {"layers": (1, 1, 1, 1)})
    slim, _ = make_slim(base, prune_skip=True)
    chase_timm.save_pretrained(slim, tmp_path / "m", data_config={"input_size": (3, 32, 32)})
    model = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-6)
        torch._dynamo.reset()  # graph capture + AOT autograd; inductor codegen takes minutes on 2 cores
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), expected, rtol=1e-5, atol=1e-6)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input

def test_weights_that_do_not_fit_config_are_refused(slim_folders, tmp_path):
    folder = _broken_copy(slim_folders, tmp_path)
    shutil.copy(slim_folders["resnet18-skip"] / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit the slim architecture in config.json.*re-save"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_width_plan_for_another_base_is_refused(slim_folders, tmp_path):
    folder = _broken_copy(slim_folders, tmp_path)
    _edit_config(folder, lambda c: c["model_args"]["chase"].update(base_architecture="resnet34"))
    with pytest.raises(ValueError, match="width plan does not fit this ResNet.*base architecture the plan was made"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    plan = json.loads((folder / "config.json").read_text())["model_args"]["chase"]["width_plan"]
    with torch.device("meta"):
        resnet34 = timm.create_model("resnet34", num_classes=10)
        wider = timm.create_model("resnet18", num_classes=10, channels=(64, 128, 256, 1024))  # same tensor names
    with pytest.raises(ValueError, match="tensor names differ"):
        apply_width_plan(resnet34, plan)  # used to replay silently
    with pytest.raises(ValueError, match="layer4.* in the base the plan was made for"):
        apply_width_plan(wider, plan)


def test_width_plan_keeps_unchanged_dims_open_for_overrides(slim_folders):
    folder = slim_folders["densenet121-skip"]  # its stem conv lost output channels
    plan = json.loads((folder / "config.json").read_text())["model_args"]["chase"]["width_plan"]
    stem = plan["tensors"]["features.conv0.weight"]
    assert stem[0] is not None and stem[1:] == [None, None, None]  # the input-channel dim stays an override
    assert plan["tensors"]["classifier.weight"][0] is None and plan["classifier"] == ["classifier.weight"]
    rgb = timm.create_model(f"local-dir:{folder}", pretrained=True)
    gray = timm.create_model(f"local-dir:{folder}", pretrained=True, in_chans=1, num_classes=4).eval()
    assert gray.features.conv0.weight.shape == (stem[0], 1, 7, 7)
    torch.testing.assert_close(gray.features.conv0.weight, rgb.features.conv0.weight.sum(1, keepdim=True))
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize("damage, error, match", [
    ("missing", FileNotFoundError, "model.safetensors is missing.*never loaded"),
    ("truncated", ValueError, "truncated or corrupt"),
    ("pickle-only", FileNotFoundError, "model.safetensors is missing.*pickle checkpoints are never loaded"),
    ("unknown-base", ValueError, "'resnet_nonexistent' is unknown to timm"),
    ("format-version", ValueError, "format_version 99 is not supported.*pip install -U chase-timm"),
])
def test_damaged_folders_fail_with_a_clear_error(slim_folders, tmp_path, damage, error, match):
    folder = _broken_copy(slim_folders, tmp_path)
    weights = folder / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "pickle-only":  # loading must not fall back to an (unpicklable) torch.save checkpoint
        torch.save(timm.create_model(f"local-dir:{folder}", pretrained=True).state_dict(), folder / "pytorch_model.bin")
        weights.unlink()
    elif damage == "unknown-base":
        _edit_config(folder, lambda c: c["model_args"]["chase"].update(base_architecture="resnet_nonexistent"))
    else:
        _edit_config(folder, lambda c: c["model_args"]["chase"].update(format_version=99))
    with pytest.raises(error, match=match):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_save_refuses_a_non_empty_folder_and_keeps_other_files(tmp_path):
    slim, config = make_slim("resnet18", prune_skip=False)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        chase_timm.save_pretrained(slim, folder, data_config={"input_size": (3, 32, 32)})
    assert [p.name for p in folder.iterdir()] == ["metrics.json"]
    chase_timm.save_pretrained(slim, folder, data_config={"input_size": (3, 32, 32)}, chase_config=config,
                               overwrite=True)
    assert {p.name for p in folder.iterdir()} == {"metrics.json", *MODEL_FILES}
    good = _digest(folder)
    # a save whose verification fails (outputs differ after reloading) must leave the good folder as it was
    hook = slim.fc.register_forward_hook(lambda module, args, output: output + 1)
    with pytest.raises(RuntimeError, match="verification failed"):
        chase_timm.save_pretrained(slim, folder, data_config={"input_size": (3, 32, 32)}, overwrite=True)
    hook.remove()
    assert _digest(folder) == good
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left behind
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    chase_timm.save_pretrained(loaded, tmp_path / "again", data_config={"input_size": (3, 32, 32)})  # re-saving works
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_args"]["chase"] == \
        json.loads((folder / "config.json").read_text())["model_args"]["chase"]


def test_save_unwraps_a_compiled_model_and_resaves_a_loaded_one(slim_folders, tmp_path):
    folder = slim_folders["mobilenetv3_small_050-skip"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    again = chase_timm.save_pretrained(torch.compile(loaded), tmp_path / "again")  # data config kept from config.json
    config, original = (json.loads((f / "config.json").read_text()) for f in (again, folder))
    assert config["model_args"] == original["model_args"]
    assert config["pretrained_cfg"]["input_size"] == original["pretrained_cfg"]["input_size"]
    x, expected = reference(folder)
    with torch.no_grad():
        assert torch.equal(timm.create_model(f"local-dir:{again}", pretrained=True).eval()(x), expected)


def test_a_channels_last_model_saves_and_reloads_with_the_same_weights(tmp_path):
    slim, config = make_slim("resnet18", prune_skip=False)
    slim.to(memory_format=torch.channels_last)  # trained with timm's --channels-last; safetensors needs NCHW
    folder = chase_timm.save_pretrained(slim, tmp_path / "run", data_config={"input_size": (3, 32, 32)},
                                        chase_config=config)
    assert slim.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the user's model is left as it was
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in slim.state_dict().items())


def test_a_float64_model_saves_and_reloads_in_float64_bit_for_bit(tmp_path):
    # trained in float64 its weights have bits float32 lacks: verification must reload in float64, not cast back
    model = timm.create_model("test_vit", num_classes=5).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    folder = chase_timm.save_pretrained(model, tmp_path / "f64")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 160, 160, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_model_whose_attention_path_the_user_switched_saves(tmp_path):
    # fused_attn is a runtime switch, not saved: verification must run the reloaded model on the same path
    model = timm.create_model("test_vit", num_classes=5).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = not module.fused_attn
    folder = chase_timm.save_pretrained(model, tmp_path / "switched")
    assert (folder / "model.safetensors").exists()


@pytest.mark.parametrize("base", ["vit_tiny_patch16_224", "mixer_s16_224"])
def test_a_model_built_at_another_size_is_saved_and_described_at_that_size(base, tmp_path):
    """Built with img_size=32 while pretrained_cfg says 224: FLOPs, verification, config and info use 32."""
    slim, config = make_slim(base, prune_skip=False)
    assert slim.pretrained_cfg["input_size"] == (3, 224, 224)
    folder = chase_timm.save_pretrained(slim, tmp_path / "run", chase_config=config)  # no data_config
    saved = json.loads((folder / "config.json").read_text())
    assert tuple(saved["pretrained_cfg"]["input_size"]) == (3, 32, 32)
    assert f"{chase_timm.metrics.count_flops(slim, 32):,}" in (folder / "README.md").read_text()  # card FLOPs
    assert tuple(chase_timm.hub.slim_summary(str(folder))["input_size"]) == (3, 32, 32)  # chase-timm info


def test_a_model_that_keeps_no_img_size_attribute_is_saved_at_the_size_timm_built_it(tmp_path):
    # EfficientFormerV2 (like GCViT) takes img_size=64 but stores it on no module: timm's recorded args say it
    model = timm.create_model("efficientformerv2_s0", img_size=64, num_classes=10)
    folder = chase_timm.save_pretrained(model, tmp_path / "run")  # no data_config: verified at 64, not 224
    assert tuple(json.loads((folder / "config.json").read_text())["pretrained_cfg"]["input_size"]) == (3, 64, 64)


def test_a_model_that_shares_a_module_under_two_names_saves_and_reloads_tied(tmp_path):
    # CoaT registers one conv as cpe1 and as serial_blocks1.*.cpe; safetensors refuses storage shared by two keys
    model = timm.create_model("coat_tiny", img_size=32, num_classes=5).eval()
    folder = chase_timm.save_pretrained(model, tmp_path / "coat", data_config={"input_size": (3, 32, 32)})
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x)) and loaded.serial_blocks1[0].cpe is loaded.cpe1


def test_save_refuses_a_model_that_is_not_a_slim_timm_model(tmp_path):
    features = timm.create_model("resnet18", features_only=True)
    with pytest.raises(ValueError, match="not a wrapper or a features_only model"):
        chase_timm.save_pretrained(features, tmp_path / "x")
    with pytest.raises(TypeError, match="rebuilt from a saved chase folder"):
        timm.create_model("chase_slim")
    assert not (tmp_path / "x").exists()
    # CoaT's crpe_window {kernel size: heads}: config.json would write its int keys as strings, which CoaT cannot use
    coat = timm.create_model("coat_lite_tiny", img_size=32, embed_dims=(16,) * 4, serial_depths=(1,) * 4,
                             mlp_ratios=(2,) * 4, num_heads=2, crpe_window={3: 1, 5: 1}, num_classes=5)
    with pytest.raises(ValueError, match="crpe_window hold dict keys that are not strings.*timm's default"):
        chase_timm.save_pretrained(coat, tmp_path / "coat")
    assert not (tmp_path / "coat").exists()


# ----------------------------------------------------------------------------------------- command line

def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.network
def test_cli_push_uploads_and_info_describes_a_folder(slim_folders, hub):
    folder = slim_folders["regnetx_002-skip"]
    env = {**_env(), "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}
    push = subprocess.run(["chase-timm", "push", str(folder), f"{REPO_ORG}/cli-regnet", "--message", "from the CLI",
                           "--revision", "v1", "--private", "--token", "hf_other"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert push.returncode == 0, push.stderr
    assert push.stdout.strip().startswith(f"{hub.url}/{REPO_ORG}/cli-regnet/commit/")
    repo = hub.repos[f"{REPO_ORG}/cli-regnet"]
    assert set(repo.commits[repo.branches["v1"]]) == set(MODEL_FILES) and not repo.commits[repo.branches["main"]]
    assert repo.private and repo.tokens[-1] == "Bearer hf_other"
    info = subprocess.run(["chase-timm", "info", str(folder)], capture_output=True, text=True, env=_env(), timeout=120)
    assert info.returncode == 0, info.stderr
    assert "RegNet slimmed from regnetx_002" in info.stdout and "pruned:" in info.stdout and "parameters" in info.stdout


@pytest.mark.network
def test_cli_push_to_an_unreachable_hub_leaves_the_folder_and_says_how_to_retry(slim_folders, tmp_path):
    folder = _broken_copy(slim_folders, tmp_path)
    before = _digest(folder)
    down = HubServer()
    url = down.url
    down.server_close()  # nothing listens there now
    push = subprocess.run(["chase-timm", "push", str(folder), f"{REPO_ORG}/never"], capture_output=True, text=True,
                          env={**_env(), "HF_ENDPOINT": url, "HF_TOKEN": "hf_test", "HF_HUB_ETAG_TIMEOUT": "2"},
                          timeout=120)
    assert push.returncode == 1
    assert "failed" in push.stderr and f"retry with `chase-timm push {folder} {REPO_ORG}/never`" in push.stderr
    assert _digest(folder) == before


def test_cli_info_on_a_folder_that_is_not_a_chase_folder_says_so(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path)]) == 1
    assert "has no config.json: it is not a chase folder" in capsys.readouterr().err


@pytest.mark.slow
def test_hf_hub_load_time_is_at_most_twice_the_dense_base():
    script = Path(__file__).resolve().parents[1] / "recipes" / "benchmark_load.py"
    out = subprocess.run([sys.executable, str(script), "--repeats", "5"], capture_output=True, text=True, env=_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ratio = float(out.stdout.rsplit("load-time ratio slim/dense:", 1)[1])
    assert ratio <= 2.0, out.stdout


def test_model_card_metadata_is_what_the_hub_understands(tmp_path):
    """library_name timm, the chase/pruned tags, a dataset id only where one was given, the measured top-1."""
    from huggingface_hub import ModelCard

    slim, config = make_slim("resnet18", False)
    metrics = {"masked_top1": 91.5, "slim_top1": 91.25, "dense_throughput": 100.0, "slim_throughput": 150.0}
    for dataset, listed in (("ILSVRC/imagenet-1k", ["ILSVRC/imagenet-1k"]), ("digits (embedded, 20 % held out)", None)):
        folder = chase_timm.save_pretrained(slim, tmp_path / listed[0].replace("/", "-") if listed else tmp_path / "d",
                                            chase_config=config, data_config={"input_size": (3, 32, 32)},
                                            metrics=metrics, dataset=dataset, license="apache-2.0")
        card = ModelCard.load(folder / "README.md")
        data = card.data.to_dict()
        assert data["library_name"] == "timm" and data["license"] == "apache-2.0"
        assert {"chase", "pruned", "timm"} <= set(data["tags"]) and data.get("datasets") == listed
        result = data["model-index"][0]["results"][0]
        assert result["metrics"][0]["value"] == 91.25 and result["dataset"]["name"] == dataset
        text = card.text
        assert "91.25" in text and "91.50" in text and "150.0" in text and f"density {config.density}" in text
        assert "hf-hub:" in text and "resnet18" in text
