"""Publishing and loading slim models in timm's own hub format: save_pretrained, push_to_hub, chase_slim.

A slim model is saved as timm saves any model (``timm.models.save_for_hf``, safetensors only):
``config.json`` names the ``chase_slim`` architecture registered here, and its ``model_args`` carry the base
architecture and a JSON width plan (``chase_timm.slim.width_plan``); the other ``model_args`` are the base's
build kwargs. ``timm.create_model("hf-hub:..." | "local-dir:...")`` then rebuilds the base on the ``meta``
device, applies the plan and goes through timm's ``build_model_with_cfg``, so weights load strictly and
``num_classes=``, ``in_chans=``, ``global_pool=`` and ``features_only=True`` behave as for any timm model.
"""
from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import timm
import torch
import torch.nn as nn
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download
from safetensors import SafetensorError
from timm.data import resolve_data_config
from timm.layers import get_spatial_dim
from timm.models import build_model_with_cfg, generate_default_cfgs, get_model_args, register_model, save_for_hf

from ._timm import classifier_modules, deepcopy_model, model_input_size, unwrap_model
from .adapters.autograd import has_non_persistent_buffers
from .adapters.timm import record_model_args, recorded_model_args
from .config import ChaseConfig
from .fold import fold_pairs, folded_pairs
from .heads import head_counts
from .metrics import count_flops
from .slim import apply_width_plan, width_plan

__all__ = ["save_pretrained", "push_to_hub", "create_model", "read_config", "render_card", "slim_summary", "speed_rows",
           "ARCHITECTURE", "FORMAT_VERSION", "MODEL_FILES"]

ARCHITECTURE = "chase_slim"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
MODEL_FILES = (CARD, WEIGHTS, CONFIG)  # the files save_pretrained writes, in the order they are replaced
CHASE_PAPER = {"paper_name": "Dynamic Sparsity Is Channel-Level Sparsity Learner (Chase)",
               "paper_ids": "arXiv:2305.19454"}
# base pretrained_cfg fields that describe the base's own checkpoint and would be false for the slim model
_BASE_ONLY = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag", "license",
              "description", "origin_url", "paper_name", "paper_ids", "notes", "test_input_size",
              "test_crop_pct", "test_pool_size", "label_offset", "label_names", "label_descriptions")
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # a Hub dataset id such as 'imagenet-1k' or 'org/name'
_REPO_ID_CHARS = re.compile(r"[^\w.-]+")


# ------------------------------------------------------------------------------------------ loading

# registry default, used only when a chase_slim is built without its config.json (e.g. by transformers)
default_cfgs = generate_default_cfgs({ARCHITECTURE: {"license": "unknown", **CHASE_PAPER}})


@register_model
def chase_slim(pretrained: bool = False, chase: Optional[Mapping] = None, **kwargs) -> nn.Module:
    """timm entrypoint of a saved Chase slim model; ``chase`` (from config.json's model_args) names the base
    architecture and its width plan, the other kwargs are the base's build kwargs (caller's kwargs win)."""
    base, plan = _parse_spec(chase)
    folded = chase.get("folded_bn", [])
    pretrained_cfg = dict(kwargs.pop("pretrained_cfg", None) or {})
    where = pretrained_cfg.get("hf_hub_id") or pretrained_cfg.get("file") or "the chase folder"
    if pretrained:
        _require_safetensors(pretrained_cfg)
    feature_cfg = _feature_cfg(base, kwargs) if kwargs.get("features_only") else None
    try:
        return build_model_with_cfg(functools.partial(_build, base, plan, pretrained, folded), ARCHITECTURE, pretrained,
                                    pretrained_cfg=pretrained_cfg, feature_cfg=feature_cfg, **kwargs)
    except SafetensorError as err:
        raise ValueError(f"{where}: {WEIGHTS} is unreadable ({err}); it is truncated or corrupt: download it "
                         f"again (force_download=True) or re-save with chase_timm.save_pretrained") from err
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ValueError(f"{where}: {WEIGHTS} does not fit the slim architecture in {CONFIG} ({first}); both "
                         f"files must come from one chase_timm.save_pretrained call: re-save or re-download both"
                         ) from err


def create_model(name: str, pretrained: bool = True, **kwargs) -> nn.Module:
    """``timm.create_model`` for users who prefer one import (``chase_slim`` is registered by importing us)."""
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _parse_spec(chase: Optional[Mapping]) -> tuple[str, Mapping]:
    """Validated (base architecture, width plan) from config.json's ``model_args["chase"]``."""
    if chase is None:
        raise TypeError(f"{ARCHITECTURE} is rebuilt from a saved chase folder: use timm.create_model("
                        f"'local-dir:PATH') or timm.create_model('hf-hub:ORG/NAME') after `import chase_timm`")
    if not isinstance(chase, Mapping):
        raise ValueError(f"{CONFIG}: model_args.chase must be a mapping, got {type(chase).__name__}")
    version = chase.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{CONFIG}: chase format_version {version!r} is not supported by this chase_timm "
                         f"(reads version {FORMAT_VERSION}): install the chase_timm release that wrote it, "
                         f"e.g. `pip install -U chase-timm`")
    base = chase.get("base_architecture")
    if not isinstance(base, str) or not timm.is_model(base):
        raise ValueError(f"{CONFIG}: base architecture {base!r} is unknown to timm {timm.__version__}: "
                         f"upgrade timm (`pip install -U timm`) or fix model_args.chase.base_architecture")
    plan = chase.get("width_plan")
    if not isinstance(plan, Mapping) or not isinstance(plan.get("tensors"), Mapping):
        raise ValueError(f"{CONFIG}: model_args.chase.width_plan must be a mapping with a 'tensors' mapping; "
                         f"re-save the model with chase_timm.save_pretrained")
    folded = chase.get("folded_bn", [])
    if not isinstance(folded, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p)
                                               for p in folded):
        raise ValueError(f"{CONFIG}: model_args.chase.folded_bn must be a list of [conv, batchnorm] module names; "
                         f"re-save the model with chase_timm.save_pretrained")
    return base, plan


def _require_safetensors(pretrained_cfg: dict) -> None:
    """Weights load from model.safetensors only: timm would otherwise fall back to pickle checkpoints."""
    source = pretrained_cfg.get("source")
    if source == "hf-hub":
        pretrained_cfg["hf_hub_filename"] = WEIGHTS  # no fallback to pytorch_model.bin
    elif source == "local-dir":
        path = Path(pretrained_cfg.get("file") or ".") / WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a chase folder holds {', '.join(MODEL_FILES)} "
                                    f"(pickle checkpoints are never loaded); re-save with chase_timm.save_pretrained")


def _feature_cfg(base: str, kwargs: Mapping) -> dict:
    """features_only wrapper: timm's FeatureGetterNet (forward_intermediates) where the base has it; the last
    three levels of block-wise models (ViT-style, as timm's own default), every level of stage-wise ones."""
    skip = ("features_only", "out_indices", "feature_cls", "pretrained_model_args", "cache_dir",
            "pretrained_cfg_overlay", "device", "dtype")
    with torch.device("meta"):
        probe = _create_base(base, **{k: v for k, v in kwargs.items() if k not in skip})
    if not hasattr(probe, "forward_intermediates"):
        return {"flatten_sequential": True}
    levels = len(getattr(probe, "feature_info", None) or ())
    return {"feature_cls": "getter", "out_indices": 3 if levels > 6 else tuple(range(levels))}


def _create_base(base: str, **kwargs) -> nn.Module:
    """``timm.create_model(base)`` from a copy of ``kwargs``: timm's EfficientNet-style builders (MobileNetV5's
    ``block_args``) pop keys from the dicts they are given, which are the model args a slim model records."""
    return timm.create_model(base, pretrained=False, **copy.deepcopy(kwargs))


def _build(base: str, plan: Mapping, pretrained: bool, folded: list, device: Any = None, dtype: Any = None,
           **kwargs) -> nn.Module:
    """The slim model: with weights to come, shapes on ``meta`` then uninitialised storage (no wasted
    allocation); without, timm's own random initialisation of the base cut to the slim widths. ``folded``:
    the (conv, bn) pairs a folded model was saved with (:func:`chase_timm.fold_batchnorm`), folded first."""
    if pretrained:
        with torch.device("meta"):
            model = _create_base(base, **kwargs)
        if not has_non_persistent_buffers(model):  # weights restore everything else
            if folded:
                fold_pairs(model, folded)
            apply_width_plan(model, plan)
            model.to_empty(device=device or "cpu")
            if dtype is not None:
                model.to(dtype)
            for head in classifier_modules(model):  # a new num_classes drops the saved classifier
                for module in head.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
            return model
    model = _create_base(base, device=device, dtype=dtype, **kwargs)
    if folded:
        fold_pairs(model, folded)
    return apply_width_plan(model, plan, keep_values=True)


# ------------------------------------------------------------------------------------------- saving

def save_pretrained(model: nn.Module, directory: Union[str, os.PathLike], *,
                    chase_config: Union[ChaseConfig, Mapping, None] = None, data_config: Optional[Mapping] = None,
                    metrics: Optional[Mapping[str, Any]] = None, dataset: Optional[str] = None,
                    recipe: Union[Mapping, str, None] = None, license: Optional[str] = None,
                    overwrite: bool = False, repo_id: Optional[str] = None, base_model: Optional[str] = None,
                    started_from: Optional[str] = None, label_names: Optional[list] = None) -> Path:
    """Write a slim model as config.json + model.safetensors + README.md, verified by reloading it.

    ``model`` is what ``Chase.export()`` returned (or a model loaded from a chase folder); ``data_config`` the
    timm data config used in training (lands in ``pretrained_cfg``); ``metrics``/``dataset``/``recipe``/
    ``license``/``base_model`` feed the model card; ``base_model`` is the Hub id of the dense starting checkpoint
    (card metadata), ``started_from`` a sentence naming a start that has none (e.g. a local file; card body);
    ``repo_id`` names the Hub repo in the card's usage snippet.
    A folder holding anything is refused unless ``overwrite=True``, which replaces only the three model files.
    """
    directory = Path(directory)
    _check_target(directory, overwrite)
    model = unwrap_model(model)
    spec, base = _slim_spec(model)
    cfg = _pretrained_cfg(model, base, data_config, license)
    full_metrics = _complete_metrics(model, base, cfg["input_size"], metrics)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
    try:
        export = copy.copy(model)  # shallow: same tensors, its own pretrained_cfg / model args
        if not all(_row_major(t) for t in model.state_dict().values()):  # e.g. a channels_last model is written
            export = deepcopy_model(model)  # from a row-major copy, what safetensors stores and timm loads into (and
            for tensor in export.state_dict(keep_vars=True).values():  # what the reloaded model computes with);
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)  # the user's model is kept
        export.pretrained_cfg = cfg
        if _shares_memory(export.state_dict()):  # e.g. CoaT registers one conv under several names; safetensors
            export.state_dict = functools.partial(_unshared_state_dict, export)  # refuses that, timm reloads both
        record_model_args(export, spec.pop("base_args"))
        save_for_hf(export, str(staging), model_args={"chase": spec}, safe_serialization=True,
                    data_config={k: cfg[k] for k in _DATA_KEYS if k in cfg},
                    model_config={"label_names": label_names} if label_names else None)
        _drop_num_classes_arg(staging / CONFIG)
        _record_speed(staging / CONFIG, full_metrics)
        card = render_card(model, base, staging, chase_config=chase_config, metrics=full_metrics, dataset=dataset,
                           recipe=recipe, license=cfg["license"], repo_id=repo_id or f"YOUR-ORG/{directory.name}",
                           base_model=base_model, started_from=started_from)
        card.save(staging / CARD)
        _verify(export, staging, cfg["input_size"])
        directory.mkdir(exist_ok=True)
        for name in MODEL_FILES:
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _shares_memory(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether two state_dict entries share storage (one module or tensor registered under several names)."""
    storages = [t.untyped_storage().data_ptr() for t in state.values() if t.numel()]
    return len(storages) != len(set(storages))


def _unshared_state_dict(model: nn.Module, *args: Any, **kwargs: Any) -> dict:
    """``model``'s state_dict with every entry after the first on a shared storage cloned (what safetensors needs;
    loading writes the same values into the one shared tensor under each name)."""
    state, seen = type(model).state_dict(model, *args, **kwargs), set()
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            state[name] = tensor.clone()
        seen.add(ptr)
    return state


def _row_major(tensor: torch.Tensor) -> bool:
    """Strides exactly those of a fresh tensor of its shape (a channels_last 1x1 conv weight counts as contiguous
    but has other strides, and convolution kernels pick their algorithm, and so their rounding, by strides)."""
    expected, step = [], 1
    for size in reversed(tensor.shape):
        expected.insert(0, step)
        step *= size
    return tensor.stride() == tuple(expected)


def _drop_num_classes_arg(path: Path) -> None:
    """num_classes stays top-level only: transformers' TimmWrapper passes its own num_classes next to
    model_args (a duplicate keyword otherwise), and timm reads the top-level value as the default."""
    config = json.loads(path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    path.write_text(json.dumps(config, indent=2))


def _record_speed(path: Path, metrics: Mapping) -> None:
    """Measured speedups (``measured_speed``, ``throughput_device``) go into config.json's ``chase_speed`` too, so
    ``chase-timm info`` reports them without the card."""
    if metrics.get("measured_speed"):
        config = json.loads(path.read_text())
        config["chase_speed"] = {"measured_speed": list(metrics["measured_speed"]),
                                 "throughput_device": metrics.get("throughput_device")}
        path.write_text(json.dumps(config, indent=2))


def _check_target(directory: Path, overwrite: bool) -> None:
    """Refuse a file, or a folder holding anything, unless ``overwrite`` (which keeps unrelated files)."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file: save_pretrained writes a folder; choose another path")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        held = sorted(p.name for p in directory.iterdir())
        raise FileExistsError(f"{directory} is not empty ({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}): "
                              f"choose an empty folder, or pass overwrite=True to replace only "
                              f"{', '.join(MODEL_FILES)} (other files are kept)")


def _slim_spec(model: nn.Module) -> tuple[dict, nn.Module]:
    """{format_version, base_architecture, width_plan, base_args} of a slim model, and its base on ``meta``."""
    if not isinstance(getattr(model, "pretrained_cfg", None), Mapping) or not hasattr(model, "num_classes"):
        raise ValueError(f"save_pretrained needs a timm model as Chase.export() returns it, not a wrapper or a "
                         f"features_only model (got {type(model).__name__})")
    saved = recorded_model_args(model)
    chase = saved.pop("chase", None)
    arch = chase["base_architecture"] if isinstance(chase, Mapping) else model.pretrained_cfg.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch) or arch == ARCHITECTURE:
        raise ValueError(f"cannot tell which timm architecture this {type(model).__name__} slims (pretrained_cfg "
                         f"architecture {arch!r}): pass the model Chase.export() returned, or one loaded with "
                         f"timm.create_model('local-dir:...')")
    probe = copy.copy(model)
    record_model_args(probe, saved)
    args = get_model_args(probe)
    keyed = sorted(k for k, v in args.items() if _non_str_keys(v))
    if keyed:  # json.dumps writes {3: 2} as {"3": 2}, which the model's builder then cannot use
        raise ValueError(f"model argument(s) {', '.join(keyed)} hold dict keys that are not strings, which config.json "
                         f"turns into strings, so timm could not rebuild the model from the saved folder (timm's own "
                         f"save_for_hf has the same limit): build the model with timm's default for them")
    with torch.device("meta"):
        base = _create_base(arch, **args)
    folded = folded_pairs(model)
    if folded:  # a folded model's plan is relative to the base folded the same way (the loader folds, then cuts)
        fold_pairs(base, folded)
    if type(base) is not type(model):
        raise ValueError(f"the model is a {type(model).__name__} but {arch!r} builds a {type(base).__name__}: pass "
                         f"the model Chase.export() returned, not a wrapper or a features_only model")
    try:
        plan = width_plan(model, base)
    except ValueError as err:
        raise ValueError(f"the model does not fit its base architecture {arch!r} ({err}); pass the model "
                         f"Chase.export() returned") from err
    return {"format_version": FORMAT_VERSION, "base_architecture": arch, "width_plan": plan,
            **({"folded_bn": folded} if folded else {}), "base_args": args}, base


def _non_str_keys(value: Any) -> bool:
    """Whether ``value`` holds, at any depth, a dict with a key that is not a string (lost by a JSON round trip)."""
    if isinstance(value, Mapping):
        return any(not isinstance(k, str) or _non_str_keys(v) for k, v in value.items())
    return isinstance(value, (list, tuple)) and any(map(_non_str_keys, value))


def _pretrained_cfg(model: nn.Module, base: nn.Module, data_config: Optional[Mapping],
                    license: Optional[str]) -> dict:
    """The slim model's pretrained_cfg: base structure fields, the training data config, our own metadata."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _BASE_ONLY}
    unknown = set(data_config or {}) - set(_DATA_KEYS) - {"img_size"}
    if unknown:
        raise ValueError(f"data_config has unknown keys {sorted(unknown)}; timm's data config keys are "
                         f"{', '.join(_DATA_KEYS)}")
    args = dict(data_config or {})
    if args.get("input_size") is None and args.get("img_size") is None:  # the size it was built at, not the cfg's
        args["input_size"] = model_input_size(model)
    resolved = resolve_data_config(args=args, model=model)
    cfg.update({k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in resolved.items() if k in _DATA_KEYS})
    cfg.update(architecture=ARCHITECTURE, license=license or "unknown", num_classes=model.num_classes,
               description=f"{base.pretrained_cfg.get('architecture')} slimmed by Chase", **CHASE_PAPER)
    if cfg.get("pool_size"):
        cfg["pool_size"] = _pool_size(base, cfg["input_size"])
    return cfg


def _pool_size(base: nn.Module, input_size: tuple) -> Optional[tuple]:
    """Spatial size of ``forward_features`` at ``input_size`` (shape-only forward on ``meta``)."""
    with torch.no_grad():
        features = base.eval().forward_features(torch.empty(1, *input_size, device="meta"))
    dims = get_spatial_dim(getattr(base, "output_fmt", "NCHW"))
    return tuple(int(features.shape[d]) for d in dims) if features.dim() == 4 else None


def _complete_metrics(model: nn.Module, base: nn.Module, input_size: tuple, metrics: Optional[Mapping]) -> dict:
    """Caller's metrics plus parameters and dense FLOPs before/after at the data config's input size."""
    out = dict(metrics or {})
    out.setdefault("base_params", sum(p.numel() for p in base.parameters()))
    out.setdefault("slim_params", sum(p.numel() for p in model.parameters()))
    out.setdefault("base_dense_flops", count_flops(base, input_size))
    out.setdefault("slim_dense_flops", count_flops(model, input_size))
    return out


def _verify(model: nn.Module, folder: Path, input_size: tuple) -> None:
    """Reload through the user path (``local-dir:``) and compare a forward pass; a mismatch is an error."""
    param = next(model.parameters())
    # built in the saved dtype: float32 weights cast back to float64 would lose bits the saved ones have
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True, dtype=param.dtype).eval()
    for name, module in model.named_modules():  # runtime switches the user set (fused_attn): the same kernels
        if hasattr(module, "fused_attn"):
            loaded.get_submodule(name).fused_attn = module.fused_attn
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x.to(param.device, param.dtype)).float().cpu()
            got = loaded(x.to(param.dtype)).float()
    finally:
        model.train(was_training)
    exact = param.device.type == "cpu"
    if (exact and not torch.equal(got, expected)) or not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):
        diff = float((got - expected).abs().max())
        raise RuntimeError(f"verification failed: the saved model reloads with outputs {diff:.3g} away from the "
                           f"in-memory model (nothing was written); please report this with the model name")


# --------------------------------------------------------------------------------------------- card

def render_card(model: nn.Module, base: nn.Module, folder: Path, *,
                chase_config: Union[ChaseConfig, Mapping, None], metrics: Mapping[str, Any], dataset: Optional[str],
                recipe: Union[Mapping, str, None], license: str, repo_id: str, base_model: Optional[str],
                started_from: Optional[str] = None) -> ModelCard:
    """The model card from ``hub_cards/model_card.md`` (Hub metadata + what Chase did + usage)."""
    config = json.loads((folder / CONFIG).read_text())
    chase = ChaseConfig.from_dict(dict(chase_config)) if isinstance(chase_config, Mapping) else chase_config
    name = repo_id.split("/")[-1]
    top1 = metrics.get("slim_top1")
    dataset_id = dataset if dataset and _REPO_ID.fullmatch(dataset) else None  # Hub metadata wants an id
    results = [EvalResult(task_type="image-classification", dataset_type=dataset_id or _REPO_ID_CHARS.sub(
                              "-", dataset.split(" (")[0]).strip("-") or "custom", dataset_name=dataset,
                          metric_type="accuracy", metric_name="top-1 (slim)", metric_value=float(top1))
               ] if top1 is not None and dataset else None
    data = ModelCardData(library_name="timm", license=license, tags=["image-classification", "timm", "chase",
                         "pruned", "sparse"], pipeline_tag="image-classification",
                         datasets=[dataset_id] if dataset_id else None,
                         base_model=base_model, model_name=name, eval_results=results)
    if isinstance(recipe, Mapping):
        recipe = yaml.safe_dump(dict(recipe), sort_keys=False)
    template = importlib.resources.files("chase_timm.hub_cards") / "model_card.md"
    return ModelCard.from_template(
        data, template_str=template.read_text(encoding="utf-8"), model_name=name, repo_id=repo_id,
        base_architecture=config["model_args"]["chase"]["base_architecture"], model_class=type(model).__name__,
        chase=chase.to_dict() if chase is not None else None, stages=_stage_widths(base, model),
        pruned_tensors=len(config["model_args"]["chase"]["width_plan"]["tensors"]),
        total_tensors=sum(1 for _ in model.state_dict()), metrics=_card_metrics(metrics),
        pretrained_cfg=config["pretrained_cfg"], recipe=recipe, dataset=dataset, base_model=base_model,
        started_from=started_from)


def _stage_widths(base: nn.Module, model: nn.Module) -> list[dict]:
    """Per feature level (timm ``feature_info``): module, reduction, output channels before/after, and the
    summed output channels of its Conv/Linear layers before/after (where internal widths were cut)."""
    def layer_widths(m: nn.Module) -> dict[str, int]:
        heads = {id(h) for h in classifier_modules(m)}
        return {n: layer.weight.shape[0] for n, layer in m.named_modules()
                if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) and id(layer) not in heads}

    before, after = layer_widths(base), layer_widths(model)
    rows, claimed = [], set()
    for b, s in zip(getattr(base, "feature_info", None) or [], getattr(model, "feature_info", None) or []):
        names = [n for n in before if n.startswith(b.get("module", "") + ".") and n not in claimed]
        claimed.update(names)
        rows.append({"module": b.get("module", ""), "reduction": b.get("reduction"), "before": b.get("num_chs"),
                     "after": s.get("num_chs"), "layers_before": sum(before[n] for n in names),
                     "layers_after": sum(after[n] for n in names)})
    rest = [n for n in before if n not in claimed]
    if rest:
        rows.append({"module": "(stem, head, other)", "reduction": None, "before": None, "after": None,
                     "layers_before": sum(before[n] for n in rest), "layers_after": sum(after[n] for n in rest)})
    return rows


def _card_metrics(metrics: Mapping) -> list[tuple[str, str]]:
    """(label, value) rows of the metrics present, formatted for the card."""
    rows = []
    for key, label, fmt in (("masked_top1", "top-1, masked sparse model (%)", "{:.2f}"),
                            ("slim_top1", "top-1, slim model (%)", "{:.2f}"),
                            ("dense_top1", "top-1, dense baseline (%)", "{:.2f}"),
                            ("base_params", "parameters, base", "{:,}"), ("slim_params", "parameters, slim", "{:,}"),
                            ("base_dense_flops", "dense FLOPs / image, base", "{:,}"),
                            ("slim_dense_flops", "dense FLOPs / image, slim", "{:,}"),
                            ("slim_sparse_flops", "sparse FLOPs / image, masked model", "{:,}"),
                            ("train_flops", "training FLOPs (Chase)", "{:.3g}"),
                            ("dense_train_flops", "training FLOPs (dense)", "{:.3g}"),
                            ("dense_throughput", "throughput, base (img/s)", "{:.1f}"),
                            ("slim_throughput", "throughput, slim (img/s)", "{:.1f}"),
                            ("throughput_batch_size", "throughput batch size", "{}"),
                            ("throughput_device", "throughput device", "{}")):
        if metrics.get(key) is not None:
            try:
                rows.append((label, fmt.format(metrics[key])))
            except (TypeError, ValueError):  # e.g. a device name where a number was expected
                rows.append((label, str(metrics[key])))
    rows += speed_rows(metrics)
    if metrics.get("base_params") and metrics.get("slim_params"):
        rows.append(("parameters, slim / base", f"{metrics['slim_params'] / metrics['base_params']:.2f}x"))
    if metrics.get("base_dense_flops") and metrics.get("slim_dense_flops"):
        rows.append(("dense FLOPs, slim / base", f"{metrics['slim_dense_flops'] / metrics['base_dense_flops']:.2f}x"))
    return rows


def speed_rows(metrics: Mapping) -> list[tuple[str, str]]:
    """(label, value) rows of the measured speedups in ``metrics["measured_speed"]`` (``recipes/benchmark.py
    --save-dir`` writes them: batch size, layout, speedup over the base, img/s), on ``throughput_device``."""
    where = f" on {metrics['throughput_device']}" if metrics.get("throughput_device") else ""
    return [(f"measured speedup over base, batch {r['batch_size']}, {r['layout']}{where}",
             f"{r['speedup']:.2f}x ({r['img_per_s']:.1f} img/s)") for r in metrics.get("measured_speed") or []
            if isinstance(r, Mapping) and {"batch_size", "layout", "speedup", "img_per_s"} <= set(r)]


# ------------------------------------------------------------------------------------------ the Hub

def read_config(folder: Union[str, os.PathLike]) -> dict:
    """config.json of a chase folder, checked to be one (architecture, format version, safetensors weights)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} has no {CONFIG}: it is not a chase folder; create one with "
                                f"chase_timm.save_pretrained(model, '{folder}')") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG} is not valid JSON ({err}); re-save with chase_timm.save_pretrained") from err
    if config.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{folder / CONFIG} describes architecture {config.get('architecture')!r}, not a chase "
                         f"slim model ({ARCHITECTURE!r}); create one with chase_timm.save_pretrained")
    _parse_spec(config.get("model_args", {}).get("chase"))
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS}; re-save with chase_timm.save_pretrained")
    return config


def push_to_hub(model_or_directory: Union[nn.Module, str, os.PathLike], repo_id: str, *, token: Optional[str] = None,
                private: Optional[bool] = None, revision: Optional[str] = None,
                commit_message: Optional[str] = None, **save_kwargs) -> str:
    """Upload a slim model (saved first with ``save_pretrained(**save_kwargs)``) or a saved chase folder; only
    config.json, model.safetensors and README.md are uploaded. Returns the commit URL."""
    if isinstance(model_or_directory, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_pretrained(model_or_directory, Path(tmp) / repo_id.split("/")[-1], repo_id=repo_id,
                                     **save_kwargs)
            return _upload(folder, repo_id, token, private, revision, commit_message,
                           retry=f"save it with chase_timm.save_pretrained(model, DIR) and run `chase-timm push DIR "
                                 f"{repo_id}`")
    if save_kwargs:
        raise TypeError(f"save options {sorted(save_kwargs)} only apply when pushing a model, not a saved folder")
    folder = Path(model_or_directory)
    read_config(folder)
    return _upload(folder, repo_id, token, private, revision, commit_message,
                   retry=f"{folder} is unchanged; retry with `chase-timm push {folder} {repo_id}`")


def _upload(folder: Path, repo_id: str, token, private, revision, commit_message, retry: str) -> str:
    """create_repo + upload_folder of the model files; a failure says what is intact and how to retry."""
    api = HfApi(token=token, library_name="chase_timm")
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, allow_patterns=list(MODEL_FILES),
                                 revision=revision, commit_message=commit_message or "Upload Chase slim model")
    except Exception as err:  # network, auth, server: all leave nothing local changed
        raise RuntimeError(f"push of {folder} to {repo_id} failed ({type(err).__name__}: {err}); {retry}") from err
    return info.commit_url


def slim_summary(source: str) -> dict:
    """What ``chase-timm info`` prints: base, per-stage widths, parameters, dense FLOPs, pruned tensors, attention
    heads per block (``heads``: {module: (before, after)} for blocks that lost heads), measured speedups
    (``speed``: (label, value) rows, when saved with them, :func:`speed_rows`).

    Built on ``meta`` (no weights are read): ``source`` is ``hf-hub:ORG/NAME``, ``local-dir:PATH`` or a path.
    """
    name = source if source.startswith(("hf-hub:", "local-dir:")) else f"local-dir:{source}"
    if name.startswith("local-dir:"):
        config = read_config(name[len("local-dir:"):])
    else:
        repo, _, revision = name[len("hf-hub:"):].partition("@")
        config = json.loads(Path(hf_hub_download(repo, CONFIG, revision=revision or None)).read_text())
    slim = timm.create_model(name, pretrained=False, device="meta")
    chase = recorded_model_args(slim).get("chase")
    if not isinstance(chase, Mapping):
        raise ValueError(f"{source} is not a chase slim model (architecture {slim.pretrained_cfg.get('architecture')})")
    spec, base = _slim_spec(slim)
    input_size = model_input_size(slim)
    plan = spec["width_plan"]["tensors"]
    after = head_counts(slim)
    blocks: dict[str, int] = {}
    for tensor in plan:
        block = ".".join(tensor.split(".")[:2])
        blocks[block] = blocks.get(block, 0) + 1
    return {"source": source, "base_architecture": spec["base_architecture"], "class": type(slim).__name__,
            "input_size": input_size, "stages": _stage_widths(base, slim),
            "metrics": _complete_metrics(slim, base, input_size, None), "speed": speed_rows(config.get("chase_speed", {})),
            "pruned_tensors": len(plan), "total_tensors": len(slim.state_dict()), "pruned_by_block": blocks,
            "heads": {block: (n, after[block]) for block, n in head_counts(base).items() if after.get(block, n) != n}}
