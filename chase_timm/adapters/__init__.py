"""Third-party adapters: the only modules that touch another library's private names, one module per surface.

``torch_pruning`` (Torch-Pruning's dependency-walk internals), ``autograd`` (autograd graph nodes' saved values and
``nn.Module`` hook/buffer bookkeeping), ``ddp`` (rebuilding a live ``DistributedDataParallel``), ``timm`` (the model
args ``timm.create_model`` records), ``optim`` (timm ``Lookahead``'s base optimizer), ``attention`` (slim
subclasses of timm attention classes, their forward derived from timm's source) and ``multihead`` (the same for
torch's ``nn.MultiheadAttention`` and the functional attention it calls). Each adapter defines
``check_version(found)`` and calls it when it is first imported: on a version it was not written for it fails with one clear line. The supported ranges live in
:data:`SUPPORTED`, the same ranges pyproject.toml declares (a test keeps the two equal).
"""
from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

__all__ = ["SUPPORTED", "require"]

# distribution -> the versions whose private names the adapters were written against (see pyproject.toml)
SUPPORTED = {
    "torch": ">=2.4,<2.15",
    "timm": ">=1.0.31,<1.1",
    "torch-pruning": ">=1.6,<1.7",
}


def require(distribution: str, found: str) -> None:
    """ImportError naming the supported range and the pip command unless ``found`` is a supported version of
    ``distribution`` (pre-releases and local builds such as ``2.14.1+cpu`` count by their release number)."""
    supported = SUPPORTED[distribution]
    try:
        ok = SpecifierSet(supported).contains(Version(found), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ImportError(f"chase_timm supports {distribution} {supported} (found {found}); "
                          f"pip install '{distribution}{supported}'")
