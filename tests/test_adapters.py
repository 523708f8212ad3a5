"""Third-party private names live only in chase_timm/adapters/, each adapter refuses a version it was not written
for with one clear line, and no module imports another module's private name."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import chase_timm.adapters
from chase_timm.adapters import SUPPORTED

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "chase_timm" / "adapters"
SCANNED = [p for d in ("chase_timm", "recipes") for p in sorted((ROOT / d).rglob("*.py"))]
THIRD_PARTY = ("torch", "timm", "torch_pruning", "accelerate", "huggingface_hub", "datasets", "safetensors")

# Private names used outside the adapters on purpose, each with its reason. Everything here is a convention of
# its library that every user of it relies on (or stdlib), not an internal of one release.
ALLOWED = {
    "_ConvNd": "torch's base class of Conv1d/2d/3d and their transposes: the way to match every convolution",
    "_BatchNorm": "torch's base class of BatchNorm1d/2d/3d and SyncBatchNorm (what torch.optim.swa_utils matches)",
    "_InstanceNorm": "torch's base class of InstanceNorm1d/2d/3d",
    "_NormBase": "torch's base class of the batch and instance norms (running statistics)",
    "_parameters": "nn.Module's parameter dict: replacing a tensor while keeping the Parameter object (and so the "
                   "optimizer's references) has no public call",
    "_buffers": "nn.Module's buffer dict: replacing a buffer in place (register_buffer refuses an existing name)",
    "_modules": "nn.Module's child dict, as torch.ao.quantization uses it to swap children",
    "_orig_mod": "the eager module inside torch.compile's OptimizedModule; accelerate's unwrapping reads it too",
    "_actions": "argparse (stdlib, not a third-party library): the parser's declared options",
}
ALLOWED_PREFIXES = {
    "_foreach_": "torch._foreach_* multi-tensor ops, what torch.optim's own optimizers call",
}
_ACCESSORS = ("getattr", "setattr", "hasattr", "delattr")


def _is_private(name: str) -> bool:
    """A single-underscore name (dunders and name-mangled ``__x`` are not what this test is about)."""
    return name.startswith("_") and not name.startswith("__") and name != "_"


def _allowed(name: str) -> bool:
    return name in ALLOWED or name.startswith(tuple(ALLOWED_PREFIXES))


def own_private_names(trees: list[ast.AST]) -> set[str]:
    """Private names our own code defines: functions, classes, module- and class-level names, self./cls.
    attributes. An attribute access to any other private name reaches into another library."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                if isinstance(node, ast.ClassDef):
                    names.update(_assigned(node.body))
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
        names.update(_assigned(getattr(tree, "body", [])))
    return {n for n in names if _is_private(n)}


def _assigned(body: list[ast.stmt]) -> set[str]:
    """Names bound directly in a module or class body."""
    out = set()
    for stmt in body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        out.update(t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name))
    return out


def third_party_private_uses(tree: ast.AST, ours: set[str]) -> list[str]:
    """``line: what`` for every private name reached on an object (attribute, getattr-style string) that our code
    does not define, and every private name or private module imported from a third-party library."""
    found = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _ACCESSORS and \
                len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            name = node.args[1].value
        if name is not None and _is_private(name) and name not in ours and not _allowed(name):
            found.append(f"{node.lineno}: .{name}")
        if isinstance(node, ast.Import):
            imports = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imports = [(node.module, [a.name for a in node.names])]
        else:
            continue
        for module, names in imports:
            if module.split(".")[0] not in THIRD_PARTY:
                continue
            if any(_is_private(part) for part in module.split(".")):
                found.append(f"{node.lineno}: private module {module}")
            found.extend(f"{node.lineno}: from {module} import {n}" for n in names if _is_private(n) and not _allowed(n))
    return sorted(found, key=lambda use: int(use.split(":")[0]))


def own_private_imports(tree: ast.AST, path: Path) -> list[str]:
    """``line: what`` for every private name imported from one of our own modules (chase_timm or a sibling
    recipe). Private *modules* (``from . import _timm``, ``from ._timm import x``) are fine."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            package = path.parent
            for _ in range(node.level - 1):
                package = package.parent
        elif node.module and node.module.split(".")[0] == "chase_timm":
            package = ROOT
        elif node.module and (path.parent / f"{node.module.split('.')[0]}.py").exists():
            package = path.parent
        else:
            continue
        base = package.joinpath(*(node.module or "").split(".")) if node.module else package
        for alias in node.names:
            if _is_private(alias.name) and not ((base / f"{alias.name}.py").exists() or (base / alias.name).is_dir()):
                found.append(f"{node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    return found


def _trees() -> dict[Path, ast.AST]:
    return {p: ast.parse(p.read_text(), str(p)) for p in SCANNED}


def test_third_party_private_names_appear_only_in_the_adapters():
    trees = _trees()
    ours = own_private_names(list(trees.values()))
    offenders = [f"{p.relative_to(ROOT)}:{use}" for p, tree in trees.items() if ADAPTERS not in p.parents
                 for use in third_party_private_uses(tree, ours)]
    assert not offenders, ("third-party private names outside chase_timm/adapters/ (move them behind an adapter "
                           "function, or allow-list a convention with its reason):\n" + "\n".join(offenders))


def test_no_module_imports_another_modules_private_name():
    offenders = [f"{p.relative_to(ROOT)}:{use}" for p, tree in _trees().items() for use in own_private_imports(tree, p)]
    assert not offenders, "private names imported across modules (make them public or move them):\n" + "\n".join(offenders)


def test_the_scan_sees_each_way_of_reaching_a_private_name(tmp_path):
    # the two tests above can fail: each kind of use is reported, and the conventions and our own names are not
    source = """
import torch._dynamo
from torch_pruning._helpers import _HybridIndex
from timm.models import _hub
from torch.nn.modules.conv import _ConvNd
from .slim import _drop, width_plan
from . import _timm
from ._timm import unwrap_model
args = model._model_args
size = getattr(fn, "_saved_dim", None)
torch._foreach_mul_(xs, 2.0)
self._own = 1
value = chase._own
"""
    tree = ast.parse(source)
    (tmp_path / "slim.py").write_text("")
    (tmp_path / "_timm.py").write_text("")
    assert third_party_private_uses(tree, own_private_names([tree])) == [
        "2: private module torch._dynamo", "3: private module torch_pruning._helpers",
        "3: from torch_pruning._helpers import _HybridIndex", "4: from timm.models import _hub", "9: ._model_args",
        "10: ._saved_dim"]
    assert own_private_imports(tree, tmp_path / "module.py") == ["6: from .slim import _drop"]


ADAPTER_MODULES = sorted(m.name for m in pkgutil.iter_modules(chase_timm.adapters.__path__))


def test_every_adapter_surface_is_present():
    assert {"autograd", "ddp", "timm", "torch_pruning"} <= set(ADAPTER_MODULES)


@pytest.mark.parametrize("name", ADAPTER_MODULES)
@pytest.mark.parametrize("version", ["0.1", "999.0", "not-a-version"])
def test_an_adapter_refuses_a_version_outside_its_range_in_one_line(name, version):
    adapter = importlib.import_module(f"chase_timm.adapters.{name}")  # imported: the installed version passed
    with pytest.raises(ImportError) as err:
        adapter.check_version(version)
    message = str(err.value)
    match = re.fullmatch(r"chase_timm supports (\S+) (\S+) \(found (\S+)\); pip install '(\S+)'", message)
    assert match, message
    distribution, supported, found, pinned = match.groups()
    assert (supported, found, pinned) == (SUPPORTED[distribution], version, distribution + supported)


def test_the_supported_ranges_are_the_ones_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    assert {d: declared.get(d) for d in SUPPORTED} == {d: SpecifierSet(s) for d, s in SUPPORTED.items()}
    assert all(any(s.operator == "<" for s in SpecifierSet(spec)) for spec in SUPPORTED.values())  # upper bounds


@pytest.mark.parametrize("name", ADAPTER_MODULES)
def test_each_adapter_checks_the_version_when_imported(name):
    tree = ast.parse((ADAPTERS / f"{name}.py").read_text())
    calls = [s.value for s in tree.body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)]
    assert any(isinstance(c.func, ast.Name) and c.func.id == "check_version" and not c.args for c in calls)


def test_importing_chase_timm_with_an_unsupported_version_fails_in_one_line():
    # end to end: the user sees the range and the pip command, not an error from inside the library
    module, version = "torch_pruning", "1.7.0"
    code = f"import {module}; {module}.__version__ = {version!r}; import chase_timm"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"ImportError: chase_timm supports \S+ \S+ \(found {re.escape(version)}\); pip install '\S+'",
                        last), result.stderr


def test_a_torch_pruning_build_without_version_attribute_is_checked_by_its_metadata():
    # some torch-pruning 1.6.0 wheels have no __version__: the installed distribution's version decides
    code = ("import torch_pruning; vars(torch_pruning).pop('__version__', None); import chase_timm; "
            "print('imported')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "imported", result.stderr
