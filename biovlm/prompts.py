"""Every hand-written text the models see, in one place. Class names are ``DatasetInfo.prompt_names`` entries."""

from __future__ import annotations

from biovlm.data import DatasetInfo

PLACEHOLDER = "X"
"""Context placeholder word: prompt learners tokenize ``"X X X X <class>."`` and overwrite the X embeddings."""


def template_text(info: DatasetInfo, class_name: str) -> str:
    """The hand template of the zero-shot baseline (``info.hand_template``), e.g. ``"a photo of a malignant."``
    (published) or ``"a breast ultrasound of malignant."`` (this project's)."""
    return info.hand_template.format(class_name, modality=info.modality)


def attribute_text(info: DatasetInfo, class_name: str, attribute: str) -> str:
    """An attribute description in the wording ``info.attribute_template`` selects: "project", e.g.
    ``"breast ultrasound of malignant, which has irregular margins"``, or "reference", the public BioVLM code's,
    e.g. ``"an ultrasound image of malignant tumor found in breast tissue, which has irregular margins"``."""
    if info.attribute_template == "reference":
        prefix, suffix = info.reference_phrase
        return f"{prefix} {class_name} {suffix}, {which_clause(attribute)}"
    return f"{info.modality} of {class_name}, which has {attribute}"


def which_clause(attribute: str) -> str:
    """The public code's rule (``make_descriptor_sentence``) for joining an attribute to its class: by the
    attribute's first letters, "which is ..." (starts with "a" or "used"), "which ..." (starts with "has", "often",
    "typically", "may" or "can"), else "which has ..."."""
    if attribute.startswith("a"):  # the public code tests "a" or "an": any word starting with the letter a
        return f"which is {attribute}"
    if attribute.startswith(("has", "often", "typically", "may", "can")):
        return f"which {attribute}"
    if attribute.startswith("used"):
        return f"which is {attribute}"
    return f"which has {attribute}"


def context_prompt(class_name: str, n_ctx: int) -> str:
    """The text a prompt learner tokenizes before its context vectors replace the placeholders."""
    return " ".join([PLACEHOLDER] * n_ctx + [f"{class_name}."])
