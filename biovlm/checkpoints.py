"""Trained methods read back from their checkpoints, ready to classify new images.

Two kinds of file hold a trained method: a *method checkpoint* (``Method.checkpoint()``: ``{"meta", "tensors"}``)
and a *run file* of the train stage (``checkpoints/<dataset>/<method>/<setting>/<dataset>/k<K>_seed<S>.pt``:
``{"hash", "run", "method", "checkpoint", "history", "rows", "features"}``, the method checkpoint under
``"checkpoint"``). A checkpoint's metadata holds everything the method was built from (method, knobs, backbone,
class ids, attributes, the dataset's prompt wording), so :func:`load_method` rebuilds it without a config file.
This module is not part of the training path (``plan.CODE_FILES``): changing it retrains nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RUN_FILE = "checkpoints/<dataset>/<method>/<setting>/<dataset>/k<K>_seed<S>.pt"


def read_checkpoint(source: Any) -> tuple[dict, dict, str]:
    """``(method checkpoint, the run file's other entries ({} for a bare method checkpoint), a name for messages)``
    of ``source``: a path to either kind of file, or its loaded dict. Anything else is a one-line ValueError."""
    import torch

    from biovlm.methods.base import CHECKPOINT_VERSION

    where = "the checkpoint"
    if isinstance(source, (str, Path)):
        path, where = Path(source), str(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist; give a run file of the train stage "
                                    f"({RUN_FILE}) or a saved Method.checkpoint()")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # not a torch file, truncated, or holding objects a checkpoint never holds
            raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:160] if str(error) else 'no details'}); give a run file "
                             f"of the train stage ({RUN_FILE}) or a saved Method.checkpoint()") from None
    if isinstance(source, dict) and isinstance(source.get("checkpoint"), dict):
        state, run = source["checkpoint"], {k: v for k, v in source.items() if k != "checkpoint"}
    elif isinstance(source, dict) and "rows" in source and "meta" not in source:
        raise ValueError(f"{where} holds result rows but no trained method (a cross-dataset result file?); give a "
                         f"run file of the train stage ({RUN_FILE})")
    else:
        state, run = source, {}
    if not (isinstance(state, dict) and isinstance(state.get("meta"), dict) and isinstance(state.get("tensors"), dict)):
        raise ValueError(f"{where} is neither a method checkpoint ({{'meta', 'tensors'}}) nor a run file of the train "
                         f"stage ({RUN_FILE})")
    version = state["meta"].get("version")
    if version != CHECKPOINT_VERSION:
        dataset = state["meta"].get("dataset") or "<dataset>"
        raise ValueError(f"{where} has checkpoint format {version!r}, this code reads format {CHECKPOINT_VERSION}; "
                         f"retrain it with this code (dvc repro train@{dataset})")
    return state, run, where


def load_method(source: Any, backbone, expected: type | None = None, same_weights: bool = False):
    """The method of ``source`` (see :func:`read_checkpoint`) rebuilt on ``backbone`` with the checkpoint's knobs,
    classes, attributes, prompt wording and tensors, in eval mode. ``expected``: a method class the checkpoint must
    be of. A checkpoint of another backbone or method is a ValueError that says what to load instead, unless
    ``same_weights`` (the caller checked that ``backbone`` holds the training weights under another name)."""
    from biovlm.data import DatasetInfo
    from biovlm.methods import METHOD_NAMES, build_method

    state, _, where = read_checkpoint(source)
    meta = state["meta"]
    name = meta.get("method")
    if name not in METHOD_NAMES:
        raise ValueError(f"{where} is a checkpoint of method {name!r}, which this code does not have "
                         f"(methods: {', '.join(METHOD_NAMES)})")
    if expected is not None and name != expected.name:
        raise ValueError(f"{where} is a checkpoint of method {name!r}, not {expected.name!r}; "
                         f"Method.from_checkpoint loads any method")
    trained_on, given = meta.get("backbone"), getattr(backbone, "name", None)
    if trained_on != given and not same_weights:
        raise ValueError(f"{where} was trained with backbone {trained_on!r}, but the backbone given is {given!r}; "
                         f"load {trained_on!r} (python -m biovlm.predict does by default)")
    info = DatasetInfo.from_meta(meta["info"])
    class_ids = [int(c) for c in meta["class_ids"]]
    attributes = None
    if meta.get("attributes") is not None:  # the training classes' lists, by label id (others are not needed)
        attributes = [[] for _ in range(info.n_classes)]
        for c, attrs in zip(class_ids, meta["attributes"], strict=True):
            attributes[c] = list(attrs)
    method = build_method(name, backbone, {name: dict(meta["knobs"])}, info, attributes=attributes,
                          class_ids=class_ids)
    method.load_checkpoint({**state, "meta": {**meta, "backbone": given}})  # the name is checked above
    method.load_extra_meta(meta)
    return method.eval()
