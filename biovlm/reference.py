"""The paper's published attributes (attribute source ``reference``): downloaded, sha256-verified, mapped to labels.

The BioVLM paper's public code ships LLM-written attributes for the 11 MedMNIST datasets,
``attributes_medmnist/<dataset>.json``: a JSON object, class name as that code prompts it -> list of 10 attributes.
They are the paper authors' text, so this project does not ship them. ``fetch(dataset)`` downloads one file from
the commit pinned in ``COMMIT`` into ``reference_dir()`` and checks it against the sha256 pinned in ``SHA256``:

- a file already there is used without network (offline, copy it there by hand: the error says where);
- a file with another sha256 is refused, never overwritten; a download with another sha256 is not kept;
- a download is written to a temporary file and renamed once complete and verified, so an interrupted
  download leaves nothing behind.

``load(dataset, n, class_names)`` maps the file's class keys to label ids through the registry's
``DatasetInfo.reference_names`` and refuses a file whose keys are not exactly those.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tempfile
import urllib.request
from pathlib import Path

from biovlm.attributes import AttributeResponseError, clean_attributes
from biovlm.data import get_dataset

COMMIT = "53e34ddc5d472548fba6d3b16b14ccf64958bb90"  # github.com/mainaksingha01/BioVLM
URL = "https://raw.githubusercontent.com/mainaksingha01/BioVLM/{commit}/attributes_medmnist/{dataset}.json"
TIMEOUT = 60.0  # seconds to connect and between reads
SHA256 = {  # of attributes_medmnist/<dataset>.json at COMMIT
    "pathmnist": "7ce6ba2654d857a9c61cbc7117fd0f06ef3974593d3b0ccbbee041eb29fdffed",
    "dermamnist": "8e462823de958bed2ea637efca70bea3fc51c094cd0c648df8de8619f9bfb552",
    "octmnist": "ae9789df67d2beec14d9dab3340cd3c78eaaca311883b4a309ec9ec93410ec93",
    "pneumoniamnist": "360667b6294e6cff5482969bf9206e6092dd72a2ed64ef442fdf8dd71d113d0e",
    "retinamnist": "583ac84a75398b24f0207ad0f62fc84a8103fe997b8a66c432a1fdce0f9ad1d0",
    "breastmnist": "b3353e35ab3859998e7eee8cde956a5c1d656718b81730f262263fc2b6d4e827",
    "bloodmnist": "8878cf5a89ed9f315cf64d02f935cb35f984f3ab11fc21a370dea4f30d5ff3fa",
    "tissuemnist": "ce1d4fa4efbd6ea8796c7e4e73ed57a2a285893204b18b5d2d546a118e0f5c33",
    "organamnist": "83df66e7aba7e91dbd4aa7d07b8720d9fb75995fcf6591b49543291f40249ec2",
    "organcmnist": "a71f5e89651704cc9b8c17163d6ee61aa3ed613b636df080d759879c6699651e",
    "organsmnist": "8f9112f978db96d02b86f7644e50656e513a52a9778befe4db2215e718f5d64b",
}


class ReferenceFileError(ValueError):
    """A reference file that is not the pinned one (sha256) or whose class keys do not match the registry."""


class ReferenceDownloadError(RuntimeError):
    """A reference file that is absent and could not be downloaded (no network, HTTP error, cut-off transfer)."""


def url(dataset: str) -> str:
    return URL.format(commit=COMMIT, dataset=dataset)


def reference_dir() -> Path:
    """Where the files go: ``$BIOVLM_CACHE`` (or ``~/.cache/biovlm``) ``/reference-attributes/<commit>``."""
    return Path(os.environ.get("BIOVLM_CACHE") or Path.home() / ".cache" / "biovlm") / "reference-attributes" / COMMIT


def fetch(dataset: str, folder: str | Path | None = None, timeout: float = TIMEOUT) -> Path:
    """The verified file of ``dataset`` in ``folder`` (default ``reference_dir()``), downloaded when absent."""
    if dataset not in SHA256:
        raise ValueError(f"no reference attributes for {dataset!r}; the paper's code covers {', '.join(SHA256)}")
    path = Path(folder or reference_dir()) / f"{dataset}.json"
    if path.exists():
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != SHA256[dataset]:
            raise ReferenceFileError(
                f"{path}: sha256 {actual} does not match the pinned {SHA256[dataset]} (biovlm.reference.SHA256): "
                f"it is not the file of commit {COMMIT}. Delete it to download it again from {url(dataset)}")
        return path
    _download(dataset, path, timeout)
    return path


def _download(dataset: str, path: Path, timeout: float) -> None:
    """Download to a temporary file in ``path``'s folder; rename it to ``path`` only when complete and verified."""
    source = url(dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(source, timeout=timeout) as response:
                    body = response.read()  # a few kB; a transfer cut short raises IncompleteRead
            except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError and timeouts are OSErrors
                raise ReferenceDownloadError(
                    f"could not download {source} ({type(e).__name__}: {e}). Without network access, fetch that "
                    f"file elsewhere and place it at {path}") from None
            f.write(body)
        actual = hashlib.sha256(body).hexdigest()
        if actual != SHA256[dataset]:
            raise ReferenceFileError(
                f"{source}: the download has sha256 {actual}, not the pinned {SHA256[dataset]} "
                f"(biovlm.reference.SHA256); nothing was kept. Check the commit (biovlm.reference.COMMIT = {COMMIT})")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load(dataset: str, n: int = 10, class_names: str = "reference", folder: str | Path | None = None,
         timeout: float = TIMEOUT) -> list[list[str]]:
    """The first ``n`` reference attributes of every class of ``dataset``, indexed by label id."""
    info = get_dataset(dataset, class_names)
    path = fetch(dataset, folder, timeout)
    doc = json.loads(path.read_text("utf-8"))
    if not isinstance(doc, dict):
        raise ReferenceFileError(f"{path}: expected a JSON object (class name -> attributes)")
    keys = info.reference_names
    missing = [k for k in keys if k not in doc]
    extra = sorted(set(doc) - set(keys))
    if missing or extra:
        raise ReferenceFileError(f"{path}: its class keys are not those of {dataset} in biovlm.data.REFERENCE_NAMES: "
                                 f"missing {missing}, unexpected {extra}")
    try:
        return [clean_attributes(doc[key], name, n) for key, name in zip(keys, info.prompt_names, strict=True)]
    except AttributeResponseError as e:
        raise ReferenceFileError(f"{path}: {e}") from None
