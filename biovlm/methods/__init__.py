"""Methods: BioVLM and its baselines behind one interface (see ``base.Method``), chosen by name.

``METHOD_NAMES`` and ``display_name`` are importable without torch (for config validation and the report);
``METHODS``, ``Method`` and ``NotTransferable`` are loaded on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Every method: its name (params.yaml, results files) and the name tables and figures print for it.
DISPLAY_NAMES = {"zeroshot": "Zero-shot", "zeroshot_attr": "Zero-shot + attributes", "coop": "CoOp", "cocoop": "CoCoOp",
                 "kgcoop": "KgCoOp", "biomedcoop": "BiomedCoOp", "clip_adapter": "CLIP-Adapter",
                 "linear_probe": "Linear probe", "biovlm": "BioVLM"}
METHOD_NAMES = tuple(DISPLAY_NAMES)


def _registry() -> dict:
    from biovlm.methods.biomedcoop import BiomedCoOp
    from biovlm.methods.biovlm import BioVLM
    from biovlm.methods.clip_adapter import ClipAdapter
    from biovlm.methods.cocoop import CoCoOp
    from biovlm.methods.coop import CoOp
    from biovlm.methods.kgcoop import KgCoOp
    from biovlm.methods.linear_probe import LinearProbe
    from biovlm.methods.zeroshot import ZeroShot
    from biovlm.methods.zeroshot_attr import ZeroShotAttr

    classes = (ZeroShot, ZeroShotAttr, CoOp, CoCoOp, KgCoOp, BiomedCoOp, ClipAdapter, LinearProbe, BioVLM)
    return {c.name: c for c in classes}


def __getattr__(name: str) -> Any:
    if name == "METHODS":
        return _registry()
    if name in ("Method", "NotTransferable", "PromptMethod"):
        from biovlm.methods import base

        return getattr(base, name)
    raise AttributeError(f"module 'biovlm.methods' has no attribute {name!r}")


def display_name(name: str) -> str:
    """The name tables and figures print for method ``name`` (an unknown name prints as itself)."""
    return DISPLAY_NAMES.get(name, name)


def check_method_name(name: str) -> None:
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHOD_NAMES)}")


def build_method(name: str, backbone, cfg: dict | None, info, attributes: Sequence[Sequence[str]] | None = None,
                 class_ids: Sequence[int] | None = None):
    """Build method ``name`` for training on ``class_ids`` (default: every class of ``info``).

    cfg: the full config dict; the method's knobs are ``cfg[name]`` (missing knobs take the method's defaults,
    unknown ones are an error). attributes: the filtered attributes by label id (all classes of ``info``), or None
    for methods that do not use them. The method is moved to ``backbone.device``.
    """
    check_method_name(name)
    if attributes is not None and any(isinstance(a, str) or not isinstance(a, Sequence) for a in attributes):
        raise TypeError("attributes must be a list of attribute lists (one per class id); "
                        "pass class_ids by keyword")
    cls = _registry()[name]
    # a params.yaml section may also hold the method's schedule and per-run values (biovlm.config.method_config)
    knobs = {k: v for k, v in ((cfg or {}).get(name) or {}).items() if k not in ("train", "per_run")}
    ids = list(range(info.n_classes)) if class_ids is None else list(class_ids)
    return cls(backbone, knobs, info, ids, attributes).to(backbone.device)
