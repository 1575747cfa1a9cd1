"""Every hand-written text the models see, in one place. Class names are ``DatasetInfo.prompt_names`` entries."""

from __future__ import annotations

from biovlm.data import DatasetInfo

PLACEHOLDER = "X"
"""Context placeholder word: prompt learners tokenize ``"X X X X <class>."`` and overwrite the X embeddings."""


def template_text(info: DatasetInfo, class_name: str) -> str:
    """The hand template of the zero-shot baseline, e.g. ``"a breast ultrasound of malignant."``."""
    return f"a {info.modality} of {class_name}."


def attribute_text(info: DatasetInfo, class_name: str, attribute: str) -> str:
    """An attribute description, e.g. ``"breast ultrasound of malignant, which has irregular margins"``."""
    return f"{info.modality} of {class_name}, which has {attribute}"


def context_prompt(class_name: str, n_ctx: int) -> str:
    """The text a prompt learner tokenizes before its context vectors replace the placeholders."""
    return " ".join([PLACEHOLDER] * n_ctx + [f"{class_name}."])
