"""The hand-written texts: the zero-shot template and the two attribute wordings (published and project)."""

from __future__ import annotations

import pytest
from conftest import COMMITTED_PARAMS

from biovlm import prompts
from biovlm.config import ConfigError, load_config
from biovlm.data import DATASETS, REFERENCE_NAMES, REFERENCE_PHRASES, get_dataset


def test_zero_shot_template_published_and_project():
    published = get_dataset("breastmnist", "reference", "reference", "a photo of a {}.")
    assert prompts.template_text(published, "malignant") == "a photo of a malignant."
    project = get_dataset("breastmnist", hand_template="a {modality} of {}.")
    assert prompts.template_text(project, "malignant") == "a breast ultrasound of malignant."
    assert project is DATASETS["breastmnist"]  # the registry entry itself: the project's defaults


@pytest.mark.parametrize("template", ["a photo of a.", "{} and {}", "{0} {1}", "a {organ} of {}."])
def test_a_template_needs_one_class_slot_and_known_fields(template):
    with pytest.raises(ValueError, match=r"data.template must hold one '\{\}' for the class name"):
        get_dataset("breastmnist", hand_template=template)
    with pytest.raises(ConfigError, match=r"^params.yaml: data.template: data.template must hold one"):
        load_config(COMMITTED_PARAMS, {"data.template": template})


def test_reference_attribute_text_is_the_public_codes_sentence():
    info = get_dataset("breastmnist", "reference", "reference")
    name = REFERENCE_NAMES["breastmnist"][0]
    assert prompts.attribute_text(info, name, "irregular margins") == (
        "an ultrasound image of malignant tumor found in breast tissue, which has irregular margins")
    retina = get_dataset("retinamnist", "reference", "reference")  # an empty suffix keeps its space, as published
    assert prompts.attribute_text(retina, "normal retina", "has clear vessels") == (
        "a fundus image of normal retina , which has clear vessels")
    project = get_dataset("breastmnist", "reference", "project")
    assert prompts.attribute_text(project, name, "irregular margins") == (
        "breast ultrasound of malignant, which has irregular margins")
    assert set(REFERENCE_PHRASES) == set(DATASETS)


@pytest.mark.parametrize(("attribute", "clause"), [
    ("a dark core", "which is a dark core"),
    ("an oval shape", "which is an oval shape"),
    ("absence of nuclei", "which is absence of nuclei"),  # any word starting with "a", as the public rule
    ("has lobes", "which has lobes"),
    ("often round", "which often round"),
    ("typically pale", "which typically pale"),
    ("may bleed", "which may bleed"),
    ("can spread", "which can spread"),
    ("used in staging", "which is used in staging"),
    ("irregular margins", "which has irregular margins"),
    ("Abnormal cells", "which has Abnormal cells"),  # case-sensitive, as published
])
def test_which_clause_follows_the_public_rule(attribute, clause):
    assert prompts.which_clause(attribute) == clause


def test_the_paper_profile_uses_the_published_texts_and_the_demo_its_own():
    paper = load_config(COMMITTED_PARAMS)
    assert (paper["data"]["template"], paper["data"]["attribute_template"]) == ("a photo of a {}.", "reference")
    demo = load_config(COMMITTED_PARAMS, {"profile": "demo"})
    assert (demo["data"]["template"], demo["data"]["attribute_template"]) == ("a {modality} of {}.", "project")
