"""The offline stand-ins: the shipped tiny-pretrained weights (pinned, refused when damaged), the recipe that
builds them (cached, deterministic, inside its band for every seed) and the rebuild command."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from biovlm import standins
from biovlm.backbone import load_backbone
from biovlm.data import DATASETS

QUICK = {"steps": 4, "text_warmup": 2, "warmup": 2, "batch_size": 16, "n_train": 11}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """The shipped weights and manifest copied to a folder the test may damage."""
    folder = tmp_path / "resources"
    folder.mkdir()
    for name in (standins.SHIPPED_WEIGHTS, standins.SHIPPED_MANIFEST):
        shutil.copyfile(standins.shipped_path().with_name(name), folder / name)
    monkeypatch.setattr(standins, "shipped_path", lambda: folder / standins.SHIPPED_WEIGHTS)
    monkeypatch.setattr(standins, "shipped_manifest",
                        lambda: json.loads((folder / standins.SHIPPED_MANIFEST).read_text()))
    return folder


def test_tiny_pretrained_is_the_shipped_file_and_builds_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOVLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(standins, "pretrain_tiny", lambda *a, **k: pytest.fail("the shipped model must not train"))
    model = load_backbone("tiny-pretrained")
    manifest = standins.shipped_manifest()
    assert model.info["sha256"] == manifest["sha256"] == standins._sha256(standins.shipped_path())
    assert model.info["gap"] == manifest["gap"] and not (tmp_path / "cache").exists()
    assert standins.shipped_path().stat().st_size < 2_000_000  # about 1 MB, shipped in the wheel
    # the vocabulary travels in the file: the tokenizer is the one the weights were trained with
    assert len(model.tokenizer.tokenizer) == model.model.text.transformer.get_input_embeddings().num_embeddings


def test_shipped_weights_come_from_the_current_recipe():
    """Editing the recipe (its values, texts, twins or loop) without re-shipping leaves the demo on weights that
    the project's code no longer builds."""
    manifest = standins.shipped_manifest()
    assert manifest["recipe"] == standins.recipe_key(), (
        "the tiny-pretrained recipe changed since the shipped weights were built: run "
        "`python -m biovlm.backbone tiny-pretrained --rebuild --ship` and re-measure the demo (python bench/demo.py)")
    assert manifest["config"] == standins.TINY_PRETRAIN
    assert not standins.band_violations(manifest["gap"]), manifest["gap"]


def test_damaged_or_missing_shipped_weights_are_refused(shipped_copy):
    weights = shipped_copy / standins.SHIPPED_WEIGHTS
    pinned = standins.shipped_manifest()["sha256"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    actual = standins._sha256(weights)
    with pytest.raises(standins.ShippedWeightsError) as error:
        load_backbone("tiny-pretrained")
    message = str(error.value)
    assert str(weights) in message and actual in message and pinned in message
    assert "changed or damaged" in message and "--rebuild --ship" in message and "git checkout" in message
    weights.unlink()
    with pytest.raises(standins.ShippedWeightsError, match=r"weights or their manifest are missing: .*resources"):
        load_backbone("tiny-pretrained")


def test_recipe_build_is_cached_and_deterministic(tmp_path, monkeypatch):
    model, _, info = standins.build_tiny_pretrained(QUICK, cache_dir=tmp_path / "a")
    path = standins.tiny_pretrained_path(QUICK, tmp_path / "a")
    assert path.exists() and path.name == f"tiny-pretrained-{standins.recipe_key(QUICK)}.safetensors"
    assert info["config"]["steps"] == 4 and set(info["gap"]["benchmark_per_dataset"]) == set(DATASETS)
    assert info["packages"]["torch"] == torch.__version__.split("+")[0] and info["recipe"] == standins.recipe_key(QUICK)
    again, _, _ = standins.build_tiny_pretrained(QUICK, cache_dir=tmp_path / "b")  # trained afresh elsewhere
    assert _same_weights(model, again)

    monkeypatch.setattr(standins, "pretrain_tiny", lambda *a, **k: pytest.fail("a cached build must not train"))
    cached, _, cached_info = standins.build_tiny_pretrained(QUICK, cache_dir=tmp_path / "a")
    assert cached_info == info and _same_weights(model, cached)
    assert standins.recipe_key({**QUICK, "seed": 1}) != standins.recipe_key(QUICK)


def test_band_names_each_violation():
    inside = {"own": 0.95, "benchmark": 0.6, "chance": 0.2}
    assert standins.band_violations(inside) == []
    assert standins.band_violations({**inside, "own": 0.8, "benchmark": 0.5}) == ["own-look zero-shot 0.800 < 0.85"]
    assert standins.band_violations({**inside, "benchmark": 0.34}) == [
        "benchmark zero-shot 0.340 < chance 0.200 + 0.15"]
    assert standins.band_violations({**inside, "benchmark": 0.81}) == ["benchmark zero-shot 0.810 > own 0.950 - 0.15"]


def test_rebuild_command_compares_with_the_shipped_weights_and_ships(shipped_copy, tmp_path, monkeypatch, capsys):
    from biovlm import backbone

    monkeypatch.setattr(standins, "TINY_PRETRAIN", {**standins.TINY_PRETRAIN, **QUICK})
    before = standins.shipped_manifest()
    backbone.main(["tiny-pretrained", "--rebuild", "--seed", "5", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "rebuilt tiny-pretrained (seed 5" in out and f"vs {before['sha256'][:16]}" in out
    assert "weights: differ from the shipped file" in out and "band: OUTSIDE: own-look zero-shot" in out
    assert f"{before['gap']['own']:9.3f} {before['gap']['benchmark']:10.3f}" in out  # the shipped row
    assert standins.shipped_manifest() == before  # without --ship nothing shipped changes

    backbone.main(["tiny-pretrained", "--rebuild", "--seed", "5", "--ship", "--cache-dir", str(tmp_path / "cache")])
    after = standins.shipped_manifest()
    assert after["sha256"] == standins._sha256(shipped_copy / standins.SHIPPED_WEIGHTS) != before["sha256"]
    assert after["config"]["seed"] == 5 and load_backbone("tiny-pretrained").info["sha256"] == after["sha256"]
    with pytest.raises(SystemExit):
        backbone.main(["tiny", "--rebuild"])
    assert "--rebuild (with --seed, --ship) applies to tiny-pretrained alone" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_weights_have_the_recorded_domain_gap():
    """Measured again on this machine, the shipped model's zero-shot accuracies are those its manifest records (up
    to a few flipped predictions from another CPU's floats) and inside the band."""
    model = load_backbone("tiny-pretrained")
    gap = standins.measure_gap(model, standins.TINY_PRETRAIN["styles"])
    recorded = standins.shipped_manifest()["gap"]
    assert gap["own"] == pytest.approx(recorded["own"], abs=0.01)
    assert gap["benchmark"] == pytest.approx(recorded["benchmark"], abs=0.01)
    assert not standins.band_violations(gap), gap


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recipe_lands_in_its_band_for_every_seed(seed, tmp_path):
    """The domain gap is a property of the recipe, not of one seed or float path (about 1.5 CPU-minutes each)."""
    _, _, info = standins.build_tiny_pretrained({"seed": seed}, cache_dir=tmp_path)
    print(f"seed {seed}: {info['gap']}")
    assert not standins.band_violations(info["gap"]), info["gap"]
