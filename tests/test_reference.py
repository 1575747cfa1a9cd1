"""The ``reference`` attribute source: download from a pinned commit, sha256 refusal, offline message, atomic
writes, the registry's class-key mapping, the stage, and ``data.class_names``.

Every test is offline: the reference files are a fixture in the real format (class key -> 10 attributes) with
made-up texts, served from a local HTTP server on 127.0.0.1, and the pinned sha256s are monkeypatched to theirs.
The real files are the paper authors' text and are never part of this project.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import COMMITTED_PARAMS

from biovlm import attributes as A
from biovlm import reference as R
from biovlm.config import ConfigError, load_config
from biovlm.data import CLASS_NAMES, DATASETS, REFERENCE_NAMES, REFERENCE_PHRASES, get_dataset
from stages import attributes as stage

# A local git clone of the paper's code (github.com/mainaksingha01/BioVLM) to check the pins and the registry
# against, where one exists: BIOVLM_REFERENCE_CLONE=<path to the clone> python -m pytest tests/test_reference.py
CLONE = os.environ.get("BIOVLM_REFERENCE_CLONE")


def clone_file(path: str) -> bytes:
    """A file of the paper's code at the pinned commit, from the clone (skips the test without one)."""
    if not CLONE:
        pytest.skip("set BIOVLM_REFERENCE_CLONE to a clone of github.com/mainaksingha01/BioVLM to check against it")
    try:
        return subprocess.run(["git", "-C", CLONE, "show", f"{R.COMMIT}:{path}"], capture_output=True,
                              check=True).stdout
    except subprocess.CalledProcessError:
        pytest.skip(f"the clone at {CLONE} lacks {path} at commit {R.COMMIT}")


def fixture_file(dataset: str, shuffle: bool = True) -> bytes:
    """A reference file in the real format: every class key of the registry, 10 made-up attributes each, keys
    in reverse label order (mapping must go by key, never by position)."""
    keys = REFERENCE_NAMES[dataset][::-1] if shuffle else REFERENCE_NAMES[dataset]
    doc = {key: [f"made-up trait {i} of {dataset} class {REFERENCE_NAMES[dataset].index(key)}" for i in range(10)]
           for key in keys}
    return json.dumps(doc, indent=4).encode()


def expected_attributes(dataset: str, n: int = 10) -> list[list[str]]:
    return [[f"made-up trait {i} of {dataset} class {label}" for i in range(n)]
            for label in range(len(REFERENCE_NAMES[dataset]))]


class FileServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; ``cut`` paths announce their length and send 10 bytes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:10] if self.path in server.cut else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def served(monkeypatch, tmp_path):
    """Every dataset's fixture file served at <base>/<commit>/<dataset>.json, pins set to the fixture's sha256s,
    and ``$BIOVLM_CACHE`` in the test's folder."""
    server = FileServer()
    for ds in DATASETS:
        server.files[f"/{R.COMMIT}/{ds}.json"] = fixture_file(ds)
    monkeypatch.setattr(R, "URL", server.base + "/{commit}/{dataset}.json")
    monkeypatch.setattr(R, "SHA256", {ds: hashlib.sha256(fixture_file(ds)).hexdigest() for ds in DATASETS})
    monkeypatch.setenv("BIOVLM_CACHE", str(tmp_path / "cache"))
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def closed_port_url() -> str:
    """A 127.0.0.1 URL nobody listens on: what a download looks like without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}" + "/{commit}/{dataset}.json"


# ---------------------------------------------------------------------------------------------- the pins


def test_the_pinned_table_covers_the_11_datasets_at_one_commit():
    assert list(R.SHA256) == list(DATASETS) and len(R.SHA256) == 11
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in R.SHA256.values())
    assert re.fullmatch(r"[0-9a-f]{40}", R.COMMIT)
    assert R.url("retinamnist") == ("https://raw.githubusercontent.com/mainaksingha01/BioVLM/"
                                    "53e34ddc5d472548fba6d3b16b14ccf64958bb90/attributes_medmnist/retinamnist.json")


def test_registry_maps_every_reference_key_once_and_covers_every_label():
    assert set(REFERENCE_NAMES) == set(DATASETS)
    for name, info in DATASETS.items():
        keys = info.reference_names
        assert keys == REFERENCE_NAMES[name] and len(keys) == info.n_classes == len(set(keys)), name
        assert all(isinstance(k, str) and k for k in keys), name
        # loading the fixture maps each key to its label: class <label> texts land at index <label>
        assert get_dataset(name, "reference").prompt_names == keys


def test_pins_and_registry_keys_match_the_papers_files():
    """Against a local clone of the paper's repository at the pinned commit, where one exists."""
    for ds in DATASETS:
        blob = clone_file(f"attributes_medmnist/{ds}.json")
        assert hashlib.sha256(blob).hexdigest() == R.SHA256[ds], ds
        keys = list(json.loads(blob))
        assert sorted(keys) == sorted(REFERENCE_NAMES[ds]), ds
        assert keys == list(REFERENCE_NAMES[ds]), f"{ds}: the file lists its keys in label order too"


def test_reference_wording_matches_the_papers_code():
    """Every dataset's prefix and suffix as trainers/biovlm.py writes them (load_gpt_descriptions)."""
    code = clone_file("trainers/biovlm.py").decode()
    pattern = r"if cfg\.DATASET\.NAME == '(\w+)':\s*prefix = \"([^\"]*)\"\s*suffix = \"([^\"]*)\""
    found = {name.lower(): (prefix, suffix) for name, prefix, suffix in re.findall(pattern, code)}
    assert {ds: found[ds] for ds in DATASETS} == REFERENCE_PHRASES


# ---------------------------------------------------------------------------------------------- download


def test_download_is_verified_kept_and_reused_without_network(served, tmp_path):
    path = R.fetch("breastmnist")
    assert path == tmp_path / "cache" / "reference-attributes" / R.COMMIT / "breastmnist.json"
    assert path.read_bytes() == fixture_file("breastmnist")
    assert served.hits == [f"/{R.COMMIT}/breastmnist.json"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["breastmnist.json"]  # no temporary file left
    served.files.clear()  # the server now knows nothing: the kept file is used without asking
    assert R.fetch("breastmnist") == path and len(served.hits) == 1


def test_load_maps_keys_to_label_ids_whatever_their_order_in_the_file(served):
    assert R.load("bloodmnist") == expected_attributes("bloodmnist")
    assert R.load("bloodmnist", n=3, class_names="medmnist") == expected_attributes("bloodmnist", 3)


def test_a_file_url_works_as_well(monkeypatch, tmp_path):
    (tmp_path / "site" / R.COMMIT).mkdir(parents=True)
    (tmp_path / "site" / R.COMMIT / "octmnist.json").write_bytes(fixture_file("octmnist"))
    monkeypatch.setattr(R, "URL", (tmp_path / "site").as_uri() + "/{commit}/{dataset}.json")
    monkeypatch.setitem(R.SHA256, "octmnist", hashlib.sha256(fixture_file("octmnist")).hexdigest())
    assert R.load("octmnist", folder=tmp_path / "ref") == expected_attributes("octmnist")
    assert (tmp_path / "ref" / "octmnist.json").read_bytes() == fixture_file("octmnist")


def test_a_present_file_with_another_sha256_is_refused_and_kept(served, tmp_path):
    folder = tmp_path / "cache" / "reference-attributes" / R.COMMIT
    folder.mkdir(parents=True)
    changed = fixture_file("breastmnist").replace(b"trait 3", b"trait 4")
    (folder / "breastmnist.json").write_bytes(changed)
    actual = hashlib.sha256(changed).hexdigest()
    message = (f"{folder / 'breastmnist.json'}: sha256 {actual} does not match the pinned {R.SHA256['breastmnist']} "
               f"(biovlm.reference.SHA256): it is not the file of commit {R.COMMIT}. Delete it to download it again "
               f"from {served.base}/{R.COMMIT}/breastmnist.json")
    with pytest.raises(R.ReferenceFileError, match=f"^{re.escape(message)}$"):
        R.load("breastmnist")
    assert (folder / "breastmnist.json").read_bytes() == changed and served.hits == []


def test_a_download_with_another_sha256_is_not_kept(served, tmp_path, monkeypatch):
    monkeypatch.setitem(R.SHA256, "breastmnist", "0" * 64)
    actual = hashlib.sha256(fixture_file("breastmnist")).hexdigest()
    message = (f"{served.base}/{R.COMMIT}/breastmnist.json: the download has sha256 {actual}, not the pinned "
               f"{'0' * 64} (biovlm.reference.SHA256); nothing was kept. Check the commit "
               f"(biovlm.reference.COMMIT = {R.COMMIT})")
    with pytest.raises(R.ReferenceFileError, match=f"^{re.escape(message)}$"):
        R.fetch("breastmnist")
    assert list((tmp_path / "cache" / "reference-attributes" / R.COMMIT).iterdir()) == []


def test_offline_names_the_url_and_the_exact_path(served, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "URL", closed_port_url())
    source = R.url("dermamnist")
    target = tmp_path / "cache" / "reference-attributes" / R.COMMIT / "dermamnist.json"
    with pytest.raises(R.ReferenceDownloadError) as err:
        R.fetch("dermamnist", timeout=5)
    assert re.fullmatch(rf"could not download {re.escape(source)} \(URLError: .+\)\. Without network access, fetch "
                        rf"that file elsewhere and place it at {re.escape(str(target))}", str(err.value))
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_an_http_error_is_a_download_error(served):
    del served.files[f"/{R.COMMIT}/pathmnist.json"]
    with pytest.raises(R.ReferenceDownloadError, match=r"^could not download .*/pathmnist\.json \(HTTPError: HTTP "
                                                       r"Error 404: Not Found\)\. Without network access"):
        R.fetch("pathmnist")


def test_an_interrupted_download_leaves_no_file(served, tmp_path):
    served.cut.add(f"/{R.COMMIT}/pathmnist.json")
    with pytest.raises(R.ReferenceDownloadError, match=r"\(IncompleteRead: IncompleteRead\(10 bytes read, \d+ more "
                                                       r"expected\)\)"):
        R.fetch("pathmnist")
    assert list((tmp_path / "cache" / "reference-attributes" / R.COMMIT).iterdir()) == []
    served.cut.clear()  # the next run downloads it whole
    assert R.fetch("pathmnist").read_bytes() == fixture_file("pathmnist")


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match=r"^no reference attributes for 'chestmnist'; the paper's code covers "
                                         r"pathmnist, dermamnist, "):
        R.fetch("chestmnist")


# ---------------------------------------------------------------------------------------------- the mapping


def write_file(tmp_path: Path, monkeypatch, dataset: str, doc) -> Path:
    """``doc`` as the present reference file of ``dataset``, with the pin set to its sha256."""
    body = json.dumps(doc).encode()
    (tmp_path / f"{dataset}.json").write_bytes(body)
    monkeypatch.setitem(R.SHA256, dataset, hashlib.sha256(body).hexdigest())
    return tmp_path / f"{dataset}.json"


def test_a_file_with_other_class_keys_is_refused_naming_them(tmp_path, monkeypatch):
    doc = json.loads(fixture_file("breastmnist"))
    doc["normal, benign"] = doc.pop("benign")  # medmnist's text instead of the reference key
    doc["normal"] = list(doc["malignant"])
    path = write_file(tmp_path, monkeypatch, "breastmnist", doc)
    message = (f"{path}: its class keys are not those of breastmnist in biovlm.data.REFERENCE_NAMES: "
               f"missing ['benign'], unexpected ['normal', 'normal, benign']")
    with pytest.raises(R.ReferenceFileError, match=f"^{re.escape(message)}$"):
        R.load("breastmnist", folder=tmp_path)


def test_a_file_that_is_not_an_object_or_holds_too_few_attributes_is_refused(tmp_path, monkeypatch):
    path = write_file(tmp_path, monkeypatch, "breastmnist", [["a"]])
    with pytest.raises(R.ReferenceFileError, match=f"^{re.escape(str(path))}: expected a JSON object"):
        R.load("breastmnist", folder=tmp_path)
    path = write_file(tmp_path, monkeypatch, "breastmnist", json.loads(fixture_file("breastmnist")))
    with pytest.raises(R.ReferenceFileError, match=f"^{re.escape(str(path))}: 'malignant': expected 11 valid "
                                                   f"attributes, got 10$"):
        R.load("breastmnist", n=11, folder=tmp_path)


# ---------------------------------------------------------------------------------------------- class names


def test_class_names_choose_the_prompt_names_and_nothing_else():
    assert CLASS_NAMES == ("reference", "medmnist")
    retina = get_dataset("retinamnist", "reference")
    assert retina.prompt_names[2] == "moderate diabetic retinopathy" and retina.classes[2] == "2"
    assert get_dataset("retinamnist").prompt_names[2] == "diabetic retinopathy grade 2"
    assert get_dataset("breastmnist", "reference").prompt_names == ("malignant", "benign")
    assert get_dataset("breastmnist", "medmnist") is DATASETS["breastmnist"]
    assert get_dataset("tissuemnist", "reference").n_classes == 8
    with pytest.raises(ValueError, match=r"^unknown class names 'paper'; valid: reference, medmnist$"):
        get_dataset("breastmnist", "paper")


def test_curated_attributes_load_by_label_id_under_either_class_names():
    assert A.curated("breastmnist", class_names="reference") == A.curated("breastmnist", class_names="medmnist")
    rec = A.build_records(["breastmnist"], {"source": "curated", "model": None}, "reference")["breastmnist"]
    assert rec["classes"] == ["malignant", "benign"] and rec["attributes"] == A.curated("breastmnist")


def test_an_unknown_source_is_refused_by_build_records():
    with pytest.raises(ValueError, match=r"^unknown attribute source 'web'; valid: reference, curated, llm$"):
        A.build_records(["breastmnist"], {"source": "web"})


def test_the_paper_config_uses_reference_names_and_attributes_the_demo_keeps_its_own(tmp_path):
    paper = load_config(COMMITTED_PARAMS)
    assert paper["data"]["class_names"] == "reference" and paper["llm"]["source"] == "reference"
    demo = load_config(COMMITTED_PARAMS, {"profile": "demo"})
    assert demo["data"]["class_names"] == "medmnist" and demo["llm"]["source"] == "curated"
    assert demo["llm"]["model"] is None


@pytest.mark.parametrize("override, message", [
    ({"data.class_names": "paper"}, "params.yaml: data.class_names must be one of reference, medmnist, got 'paper'"),
    ({"llm.source": "gpt"}, "params.yaml: llm.source must be one of reference, curated, llm, got 'gpt'"),
    ({"llm.source": "llm"}, "params.yaml: llm.model must be a model name when llm.source is llm, got None"),
    ({"llm.model": "gpt-4o"}, "params.yaml: llm.model must be null when llm.source is reference, got 'gpt-4o'; "
                              "set llm.source=llm to query that model, or llm.model=null"),
])
def test_bad_source_or_class_names_fail_in_one_line(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(COMMITTED_PARAMS, override)


# ---------------------------------------------------------------------------------------------- the stage


def test_the_stage_writes_reference_records(served, tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load(COMMITTED_PARAMS.read_text())
    raw["datasets"] = ["retinamnist", "breastmnist"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    stage.main([])
    out = capsys.readouterr().out
    assert out.startswith("attributes: profile 'paper'; source: reference; class names: reference\n")
    for ds in ("retinamnist", "breastmnist"):
        rec = json.loads((tmp_path / "data" / "attributes" / f"{ds}.json").read_text())
        assert rec == {"dataset": ds, "source": "reference", "model": None, "commit": R.COMMIT,
                       "classes": list(REFERENCE_NAMES[ds]), "attributes": expected_attributes(ds)}
    assert sorted(p.name for p in (tmp_path / "data" / "attributes").iterdir()) == ["breastmnist.json",
                                                                                     "retinamnist.json"]
    # the medmnist names with the same files: same attributes by label id, medmnist's names beside them
    raw["data"]["class_names"] = "medmnist"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    stage.main(["--out", "medmnist"])
    rec = json.loads((tmp_path / "medmnist" / "retinamnist.json").read_text())
    assert rec["classes"][2] == "diabetic retinopathy grade 2"
    assert rec["attributes"] == expected_attributes("retinamnist")


# ---------------------------------------------------------------------------------------------- end to end
def test_the_published_texts_run_through_the_pipeline_offline(served, tmp_path, monkeypatch):
    """The paper profile's text settings (reference attributes from a local fixture in the real format, reference
    class names and wording, the published template) through download, attributes, features, filter and train,
    on the tiny backbone."""
    import torch
    from test_stages import write_params

    from biovlm.filtering import load_table
    from biovlm.prompts import attribute_text
    from stages import download, features, filter, train

    published = {"llm.source": "reference", "data.class_names": "reference",
                 "data.attribute_template": "reference",
                 "data.template": "a photo of a {}.", "methods": ["zeroshot", "biomedcoop", "biovlm"]}
    write_params(tmp_path / "params.yaml", **published)
    monkeypatch.chdir(tmp_path)
    for ds in ("breastmnist", "bloodmnist"):
        download.main([ds])
    stage.main([])
    features.main([])
    filter.main([])
    train.main([])

    record = json.loads(Path("data/attributes/bloodmnist.json").read_text())
    assert record["classes"] == list(REFERENCE_NAMES["bloodmnist"])
    assert record["attributes"] == expected_attributes("bloodmnist")  # by label id, whatever the file's key order
    table = load_table(Path("data/filtered/bloodmnist.json"))
    info = get_dataset("bloodmnist", "reference", "reference", "a photo of a {}.")
    assert table.attribute_template == "reference" and table.class_names == list(REFERENCE_NAMES["bloodmnist"])
    assert attribute_text(info, info.prompt_names[0], table.attributes[0][0]) == (
        "a microscopic image of basophil type of blood cell, which has made-up trait 0 of bloodmnist class 0")
    for method in ("zeroshot", "biomedcoop", "biovlm"):
        assert Path(f"checkpoints/bloodmnist/{method}").is_dir(), method
    state = torch.load(next(Path("checkpoints/bloodmnist/biovlm/fewshot/bloodmnist").glob("*.pt")),
                       weights_only=False)
    assert state["rows"] and all(0 <= r["accuracy"] <= 100 for r in state["rows"])
    assert sorted(h.split("/")[-1] for h in served.hits) == sorted(["breastmnist.json", "bloodmnist.json"])
