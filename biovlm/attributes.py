"""Class attributes: the shipped curated set, and live LLM querying through a committed response cache.

Attributes are short visual descriptions of a class ("large empty polygonal spaces left by dissolved fat") that
BioVLM pairs with the class name in ``"<modality> of <class>, which has <attribute>"``. Three sources
(``llm.source``):

- ``curated(dataset)``: attributes written by this project from domain knowledge and shipped in
  ``biovlm/resources/curated_attributes.json``, keyed by dataset and label id (never by fuzzy names).
- ``reference``: the paper's published attributes, downloaded and sha256-verified (``biovlm.reference``).
- ``query(dataset, model, ...)``: asks an OpenAI-compatible chat endpoint (``openai`` package; ``OPENAI_API_KEY``
  and ``OPENAI_BASE_URL``) for N attributes per class in JSON mode, parses strictly, retries 429/5xx/timeouts with
  exponential backoff, and stores every accepted answer in a content-addressed cache (one JSON file per request,
  key = sha256 of model + messages + sampling parameters). A cache hit needs no network and no key.

Credentials (the API key, the user info and token-like query parameters of ``OPENAI_BASE_URL``, auth headers)
are never written to the cache, logs or error messages: a cache entry holds only the request this module built and
the answer's content, id, model and token usage, never what the server echoed (see ``redact``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_N = 10
MAX_CHARS = 120  # an attribute is a short phrase; longer items are rejected as prose
CURATED_RESOURCE = "curated_attributes.json"
SOURCES = ("reference", "curated", "llm")


class AttributeResponseError(ValueError):
    """A model answer (or an attribute list) that does not hold N valid attributes. The message says what came
    back and what was wrong with it."""


class AttributeQueryError(RuntimeError):
    """The endpoint failed: a non-retryable status, or retryable failures beyond the allowed retries."""


class MissingAPIKeyError(RuntimeError):
    """Cache misses without ``OPENAI_API_KEY``: raised once, listing every missing (dataset, class)."""


class CacheEntryError(RuntimeError):
    """A cache file that cannot be read or does not match its key. The message names the file."""


# ---------------------------------------------------------------------------------------------------- parsing


def _norm(text: str) -> str:
    """Lower-case words only: used to compare an item with the class name ("The Melanoma." == "melanoma")."""
    words = re.sub(r"[^0-9a-z]+", " ", text.lower()).split()
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def clean_attributes(items: Any, class_name: str, n: int) -> list[str]:
    """Validate a list of attributes: strings, whitespace-collapsed, trailing period dropped, de-duplicated
    case-insensitively, each 1..MAX_CHARS characters, none merely repeating the class name. Returns the first
    ``n`` valid items; raises ``AttributeResponseError`` when fewer than ``n`` are valid."""
    if not isinstance(items, list):
        raise AttributeResponseError(f"{class_name!r}: 'attributes' must be a list of strings, got "
                                     f"{type(items).__name__}")
    kept: list[str] = []
    seen: set[str] = set()
    rejected: list[str] = []
    for item in items:
        if not isinstance(item, str):
            rejected.append(f"non-string {type(item).__name__}")
            continue
        text = " ".join(item.split()).rstrip(".").strip()
        if not text:
            rejected.append("empty")
        elif len(text) > MAX_CHARS:
            rejected.append(f"longer than {MAX_CHARS} chars")
        elif _norm(text) == _norm(class_name) or not _norm(text):
            rejected.append(f"{text!r} repeats the class name or has no words")
        elif text.lower() in seen:
            rejected.append(f"duplicate {text!r}")
        else:
            seen.add(text.lower())
            kept.append(text)
    if len(kept) < n:
        why = "; ".join(rejected[:5]) + (f"; ... ({len(rejected)} rejected)" if len(rejected) > 5 else "")
        raise AttributeResponseError(f"{class_name!r}: expected {n} valid attributes, got {len(kept)}"
                                     + (f" (rejected: {why})" if rejected else ""))
    return kept[:n]


def parse_attributes(text: str, class_name: str, n: int) -> list[str]:
    """Parse a model answer ``{"attributes": [...]}`` into exactly ``n`` attributes (see ``clean_attributes``).

    A single surrounding Markdown code fence is tolerated (some local servers add one even in JSON mode).
    Raises ``AttributeResponseError`` (a ``ValueError``) on anything else, naming what came back."""
    shown = repr(text[:300]) + ("..." if len(text) > 300 else "") if isinstance(text, str) else repr(text)
    if not isinstance(text, str):
        raise AttributeResponseError(f"{class_name!r}: expected a JSON text, got {type(text).__name__}")
    body = text.strip()
    fence = re.fullmatch(r"```[a-zA-Z]*\s*(.*?)\s*```", body, flags=re.S)
    if fence:
        body = fence.group(1)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge ints, absurd nesting
        raise AttributeResponseError(f"{class_name!r}: answer is not valid JSON ({type(e).__name__}); "
                                     f"it was {shown}") from None
    if not isinstance(data, dict) or "attributes" not in data:
        raise AttributeResponseError(f"{class_name!r}: expected a JSON object with key 'attributes'; "
                                     f"it was {shown}")
    try:
        return clean_attributes(data["attributes"], class_name, n)
    except AttributeResponseError as e:
        raise AttributeResponseError(f"{e}; answer was {shown}") from None


# ---------------------------------------------------------------------------------------------------- curated


def _curated_file() -> dict:
    return json.loads(resources.files("biovlm").joinpath("resources", CURATED_RESOURCE).read_text("utf-8"))


def curated(dataset: str, n: int = DEFAULT_N, class_names: str = "medmnist") -> list[list[str]]:
    """The shipped curated attributes of ``dataset``, indexed by label id (first ``n`` of each class); they are
    checked against the prompt names ``class_names`` (see ``clean_attributes``)."""
    from biovlm.data import get_dataset

    info = get_dataset(dataset, class_names)
    doc = _curated_file()
    if dataset not in doc["datasets"]:
        raise ValueError(f"no curated attributes for {dataset!r}; the file covers {sorted(doc['datasets'])}")
    by_label = doc["datasets"][dataset]["classes"]
    out = []
    for label, name in enumerate(info.prompt_names):
        if str(label) not in by_label:
            raise ValueError(f"curated attributes of {dataset!r} miss label {label} ({name!r})")
        items = by_label[str(label)]["attributes"]
        if n > len(items):
            raise ValueError(f"curated attributes hold {len(items)} per class, {n} were asked for "
                             f"(set llm.n <= {len(items)} or use an LLM source)")
        out.append(clean_attributes(items, name, n))
    return out


# ---------------------------------------------------------------------------------------------------- requests


def build_messages(modality: str, class_name: str, n: int) -> list[dict[str, str]]:
    """The chat messages for one class. The word JSON appears, as OpenAI's JSON mode requires."""
    system = ("You are an expert in medical image analysis. You describe what is visible in images, "
              "and you answer with a JSON object only.")
    article = "an" if modality[:1].lower() in "aeiou" else "a"
    user = (f'List {n} short visual attributes that identify "{class_name}" in {article} {modality}. '
            f"Each attribute is a short phrase (at most 12 words) about what can be seen in such an image: "
            f"shape, size, colour or intensity, texture, boundaries, location. Each one must complete the "
            f'sentence "{modality} of {class_name}, which has ...". Do not repeat the class name, give no '
            f'explanations. Answer with a JSON object of the form {{"attributes": ["...", "..."]}} '
            f"holding exactly {n} distinct attributes.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class Request:
    dataset: str
    label: int
    class_name: str
    n: int
    body: dict  # exactly what is sent to chat.completions.create (minus the timeout)

    @property
    def key(self) -> str:
        canon = json.dumps(self.body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    @property
    def label_text(self) -> str:
        return f"{self.dataset}[{self.label}] {self.class_name!r}"


def plan(dataset: str, model: str, n: int = DEFAULT_N, temperature: float = 0.0,
         seed: int | None = 0, class_names: str = "medmnist") -> list[Request]:
    """One request per class of ``dataset``, in label order, about the prompt names ``class_names``."""
    from biovlm.data import get_dataset

    if not model:
        raise ValueError("an LLM model name is required to query attributes (llm.model)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    info = get_dataset(dataset, class_names)
    reqs = []
    for label, name in enumerate(info.prompt_names):
        body = {"model": model, "messages": build_messages(info.modality, name, n),
                "temperature": float(temperature), "response_format": {"type": "json_object"}}
        if seed is not None:
            body["seed"] = int(seed)
        reqs.append(Request(dataset, label, name, n, body))
    return reqs


# ---------------------------------------------------------------------------------------------------- cache


def cache_path(cache_dir: str | Path, req: Request) -> Path:
    return Path(cache_dir) / f"{req.key}.json"


def read_cache(cache_dir: str | Path, req: Request) -> list[str] | None:
    """Attributes of ``req`` from the cache, or None on a miss. A damaged entry raises ``CacheEntryError``."""
    path = cache_path(cache_dir, req)
    if not path.exists():
        return None
    fix = "delete it to query again"
    try:
        entry = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise CacheEntryError(f"corrupt attribute cache entry {path}: {type(e).__name__}: {e}; {fix}") from None
    if not isinstance(entry, dict) or entry.get("request") != req.body or not isinstance(entry.get("content"), str):
        raise CacheEntryError(f"corrupt attribute cache entry {path}: it does not hold the request of its key "
                              f"with a text 'content'; {fix}")
    try:
        return parse_attributes(entry["content"], req.class_name, req.n)
    except AttributeResponseError as e:
        raise CacheEntryError(f"corrupt attribute cache entry {path}: {e}; {fix}") from None


def _response_record(completion: dict) -> dict:
    """What the cache keeps of an answer besides its content: id, model, creation time, finish reason and token
    counts. Everything else a server returned (an echo of the request, its headers) is dropped."""
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    usage = completion.get("usage")
    record = {
        "id": completion.get("id"),
        "model": completion.get("model"),
        "created": completion.get("created"),
        "finish_reason": choice.get("finish_reason"),
        "usage": {k: v for k, v in usage.items() if k in USAGE_KEYS and isinstance(v, int)}
        if isinstance(usage, dict) else None,
    }
    for k in ("id", "model", "finish_reason"):
        record[k] = redact(record[k])[:200] if isinstance(record[k], str) else None
    if not isinstance(record["created"], int):
        record["created"] = None
    return record


def write_cache(cache_dir: str | Path, req: Request, completion: dict, content: str, attributes: list[str]) -> Path:
    """Store one accepted answer atomically: a temporary file in the same folder, then ``os.replace``. Of
    ``completion`` only ``_response_record`` is kept."""
    path = cache_path(cache_dir, req)
    path.parent.mkdir(parents=True, exist_ok=True)
    response = _response_record(completion)
    entry = {
        "key": req.key,
        "dataset": req.dataset, "label": req.label, "class_name": req.class_name,
        "request": req.body,
        "model": response["model"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "content": content,
        "attributes": attributes,
        "response": response,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{req.key[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------- endpoint


# Query parameters whose value is a credential (Azure-style ``?api-key=``, signed URLs, tokens).
SECRET_PARAMS = frozenset({"api-key", "api_key", "apikey", "key", "token", "access_token", "auth", "secret",
                           "password", "client_secret", "sig", "signature"})
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]+@")
_SECRET_PARAM = re.compile(r"(?i)([?&;](?:" + "|".join(re.escape(p) for p in sorted(SECRET_PARAMS))
                           + r")=)[^&#\s\"']+")
_AUTH_HEADER = re.compile(r"(?i)(?<![?&;])((?:proxy-)?authorization|(?:x-)?api[-_]key)([\"']?\s*[:=]\s*[\"']?)"
                          r"(?:(?:bearer|basic|token)\s+)?[^\s\"',}]+")
_OPENAI_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}")
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def credentials(client=None) -> list[str]:
    """Every credential requests may carry, longest first: ``OPENAI_API_KEY`` (and the client's key), the password
    and user info of ``OPENAI_BASE_URL`` (also as the Basic auth token the HTTP client derives from them) and the
    values of its token-like query parameters."""
    found = [os.environ.get("OPENAI_API_KEY"), getattr(client, "api_key", None)]
    for url in (os.environ.get("OPENAI_BASE_URL"), getattr(client, "base_url", None)):
        parts = urllib.parse.urlsplit(str(url or ""))
        if "@" in parts.netloc:
            info = parts.netloc.rsplit("@", 1)[0]
            user, _, password = info.partition(":")
            plain = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
            found += [info, password, urllib.parse.unquote(password), plain,
                      base64.b64encode(plain.encode()).decode()]
        found += [v for k, v in urllib.parse.parse_qsl(parts.query) if k.lower() in SECRET_PARAMS]
    return sorted({s for s in found if isinstance(s, str) and s}, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with credentials masked as ``***``: the literal ``secrets`` (default: ``credentials()``), URL user
    info, token-like query parameters, Authorization/api-key header values and OpenAI-style keys."""
    for s in credentials() if secrets is None else secrets:
        if s:
            text = text.replace(s, "***")
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _SECRET_PARAM.sub(r"\1***", text)
    text = _AUTH_HEADER.sub(r"\1\2***", text)
    return _OPENAI_KEY.sub("sk-***", text)


class RedactingFilter(logging.Filter):
    """Masks credentials in log records. The HTTP client logs every request URL at INFO (user info and query
    included), and a log is as public as the terminal or CI job it goes to."""

    def __init__(self):
        super().__init__()
        self.secrets: set[str] = set()  # keys of explicit clients, besides the environment's

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact(text, sorted(self.secrets | set(credentials()), key=len, reverse=True))
        if clean != text:
            record.msg, record.args = clean, ()
        return True


LOG_FILTER = RedactingFilter()
# Loggers that see request URLs, headers or bodies (a filter on a logger applies to its own records only).
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "openai", "openai._base_client", __name__)


def install_log_redaction(handlers: list[logging.Handler] | None = None) -> None:
    """Add ``LOG_FILTER`` to the HTTP client's loggers and to ``handlers`` (those of an application that logs)."""
    targets = [logging.getLogger(name) for name in HTTP_LOGGERS] + list(handlers or [])
    for target in targets:
        if LOG_FILTER not in target.filters:
            target.addFilter(LOG_FILTER)


def _holds_credential(text: str, secrets: list[str]) -> bool:
    """Whether an answer repeats a credential (8+ characters: shorter ones would match ordinary words)."""
    return any(len(s) >= 8 and s in text for s in secrets)


MAX_ANSWER_BYTES = 4 << 20  # a chat completion is a few kB: more is not an answer
_CHECK_ENDPOINT = ("check that OPENAI_BASE_URL is the server's OpenAI-compatible API root (usually ending in /v1, "
                   "not a web page or a login proxy)")


class _DeadlineExceeded(Exception):
    """The whole request (connect, send, every byte of the answer) took longer than ``llm.timeout``."""


def _post(client, req: Request, timeout: float) -> tuple[bytes, str]:
    """The raw answer to ``req``, (body, content type), received within ``timeout`` seconds in all.

    The HTTP client's timeouts bound each phase (connect, every read), so a server that sends a byte now and then
    never trips them. The request therefore runs in a daemon thread that the caller stops waiting for at the
    deadline, and that thread stops reading the body (closing the connection) once the deadline has passed."""
    import openai

    deadline = time.monotonic() + timeout
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def fetch() -> None:
        try:
            with client.chat.completions.with_streaming_response.create(**req.body, timeout=timeout) as response:
                http = sys.modules[type(response.http_response).__module__.partition(".")[0]]  # httpx or httpx2
                body = bytearray()
                try:
                    for chunk in response.iter_bytes():
                        body += chunk
                        if time.monotonic() > deadline:
                            return  # the caller has given up; leaving the block closes the connection
                        if len(body) > MAX_ANSWER_BYTES:
                            raise AttributeResponseError(f"the answer is larger than {MAX_ANSWER_BYTES:,} bytes, "
                                                         f"not a chat completion")
                except http.TimeoutException:
                    raise openai.APITimeoutError(request=response.http_request) from None
                except http.RequestError as e:
                    raise openai.APIConnectionError(message=f"answer cut off ({type(e).__name__})",
                                                    request=response.http_request) from None
                outcome["answer"] = bytes(body), response.headers.get("content-type", "")
        except BaseException as e:  # handed to the caller
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=fetch, name=f"attribute request {req.key[:12]}", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())) or not outcome:
        raise _DeadlineExceeded
    if "error" in outcome:
        raise outcome["error"]
    return outcome["answer"]


def _excerpt(text: str, secrets: list[str] | None = None, limit: int = 200) -> str:
    """The start of an answer for an error message: one line, credentials masked."""
    flat = redact(" ".join(text.split()), secrets)
    return repr(flat[:limit]) + ("..." if len(flat) > limit else "")


def parse_completion(body: bytes, content_type: str = "", secrets: list[str] | None = None) -> dict:
    """The chat completion in a raw answer. Anything that is not JSON holding text at ``choices[0].message.content``
    (a proxy's HTML error page, a cut-off body, another API's JSON) raises ``AttributeResponseError``."""
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        html = "html" in content_type.lower() or text.lstrip()[:1] == "<"
        what = "an HTML page" if html else f"invalid JSON (Content-Type {content_type or 'missing'})"
        raise AttributeResponseError(f"the endpoint answered {what}, not a chat completion: "
                                     f"{_excerpt(text, secrets)}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise AttributeResponseError(f"the endpoint's JSON is not a chat completion (no text at "
                                     f"choices[0].message.content): {_excerpt(text, secrets)}")
    return data


def endpoint_name(client=None) -> str:
    """The endpoint's URL for messages, credentials masked."""
    url = getattr(client, "base_url", None) or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    return redact(str(url).rstrip("/"), credentials(client))


def _complete(client, req: Request, *, max_retries: int, timeout: float, backoff: float) -> tuple[dict, str, list]:
    """Send one request; retry 429, 5xx, timeouts, connection errors and invalid answers (not a chat completion,
    or not N attributes) with exponential backoff (``backoff * 2**i`` seconds, at most 60). Each attempt ends within
    ``timeout`` seconds. Returns (completion as dict, content, attributes)."""
    import openai

    secrets = credentials(client)
    LOG_FILTER.secrets.update(secrets)
    endpoint = endpoint_name(client)
    attempts = max_retries + 1
    problem = ""
    bad_answer: AttributeResponseError | None = None
    fix = ""
    for i in range(attempts):
        if i:
            time.sleep(min(backoff * 2 ** (i - 1), 60.0))
        try:
            body, content_type = _post(client, req, timeout)
        except (openai.RateLimitError, openai.InternalServerError) as e:
            problem, bad_answer = f"HTTP {e.status_code}", None
        except (openai.APITimeoutError, _DeadlineExceeded):
            problem, bad_answer = f"timed out after {timeout:g} s", None
        except openai.APIConnectionError as e:
            problem, bad_answer = f"connection error ({redact(str(e), secrets)})", None
        except openai.APIStatusError as e:
            raise AttributeQueryError(f"{req.label_text}: {endpoint} refused the request with HTTP "
                                      f"{e.status_code}: {redact(str(e), secrets)[:500]}") from None
        except AttributeResponseError as e:  # a body too large to be an answer
            problem, bad_answer, fix = "not a chat completion", e, _CHECK_ENDPOINT
        else:
            try:
                completion = parse_completion(body, content_type, secrets)
            except AttributeResponseError as e:
                problem, bad_answer, fix = "not a chat completion", e, _CHECK_ENDPOINT
            else:
                content = completion["choices"][0]["message"]["content"]
                try:
                    attrs = parse_attributes(content, req.class_name, req.n)
                    if _holds_credential(content, secrets):
                        raise AttributeResponseError(f"{req.class_name!r}: the answer repeats a credential (does "
                                                     f"the endpoint echo the request?); it is not stored")
                    return completion, content, attrs
                except AttributeResponseError as e:
                    problem, bad_answer = "invalid answer", e
                    fix = "raise llm.max_retries or try another llm.model or llm.temperature"
        log.warning("%s: attempt %d/%d failed: %s", req.label_text, i + 1, attempts, problem)
    if bad_answer is not None:
        msg = redact(str(bad_answer), secrets).replace("\n", " ")
        raise AttributeResponseError(f"{req.label_text}: no valid answer from {endpoint} after {attempts} attempts: "
                                     f"{msg}; {fix}") from None
    raise AttributeQueryError(f"{req.label_text}: gave up after {attempts} attempts on {endpoint}, last failure: "
                              f"{problem}. Raise llm.max_retries / llm.timeout or check the endpoint (OPENAI_BASE_URL)")


def make_client(timeout: float):
    """An ``openai.OpenAI`` client from OPENAI_API_KEY / OPENAI_BASE_URL, with the client's own retries off."""
    import openai

    return openai.OpenAI(max_retries=0, timeout=timeout)


def query_datasets(datasets: list[str], model: str, n: int = DEFAULT_N, cache_dir: str | Path = "attributes/cache",
                   *, temperature: float = 0.0, seed: int | None = 0, max_retries: int = 4,
                   timeout: float = 60.0, backoff: float = 1.0, client=None,
                   class_names: str = "medmnist") -> dict[str, list[list[str]]]:
    """Attributes of every class of every dataset, from the cache where present and from the endpoint otherwise.

    The cache is read (and checked) for all requests first; misses without ``OPENAI_API_KEY`` (and without an
    explicit ``client``) raise ``MissingAPIKeyError`` once, listing every missing (dataset, class)."""
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    reqs = [r for ds in datasets for r in plan(ds, model, n, temperature, seed, class_names)]
    found = {r.key: read_cache(cache_dir, r) for r in reqs}
    misses = [r for r in reqs if found[r.key] is None]
    if misses and client is None and not os.environ.get("OPENAI_API_KEY"):
        listing = "\n".join(f"  {r.label_text}" for r in misses)
        raise MissingAPIKeyError(
            f"{len(misses)} of {len(reqs)} attribute requests for model {model!r} are not in the cache "
            f"{cache_dir} and OPENAI_API_KEY is not set. Missing:\n{listing}\n"
            f"Set OPENAI_API_KEY (and OPENAI_BASE_URL for a non-OpenAI server), or use another source: "
            f"llm.source=reference or curated with llm.model=null.")
    if misses:
        install_log_redaction()
        client = client or make_client(timeout)
        log.info("querying %d of %d attribute requests from %s", len(misses), len(reqs), model)
    for r in misses:
        if found[r.key] is None:  # two requests may share a key
            completion, content, attrs = _complete(client, r, max_retries=max_retries, timeout=timeout,
                                                   backoff=backoff)
            write_cache(cache_dir, r, completion, content, attrs)
            found[r.key] = attrs
    out: dict[str, list[list[str]]] = {ds: [] for ds in datasets}
    for r in reqs:
        out[r.dataset].append(found[r.key])
    return out


def query(dataset: str, model: str, n: int = DEFAULT_N, cache_dir: str | Path = "attributes/cache", *,
          temperature: float = 0.0, seed: int | None = 0, max_retries: int = 4, timeout: float = 60.0,
          backoff: float = 1.0, client=None, class_names: str = "medmnist") -> list[list[str]]:
    """The ``n`` attributes of every class of ``dataset`` (indexed by label id) from ``model``, via the cache."""
    return query_datasets([dataset], model, n, cache_dir, temperature=temperature, seed=seed,
                          max_retries=max_retries, timeout=timeout, backoff=backoff, client=client,
                          class_names=class_names)[dataset]


# ---------------------------------------------------------------------------------------------------- records


def build_records(datasets: list[str], llm: dict, class_names: str = "medmnist", **kwargs) -> dict[str, dict]:
    """The per-dataset attribute records the ``attributes`` stage writes, from the ``llm`` config section and the
    prompt names ``class_names`` (``data.class_names``). ``llm.source`` picks the source; without it, ``llm.model``
    null or empty selects the curated attributes, anything else live querying through the cache."""
    from biovlm import reference
    from biovlm.data import get_dataset

    model = llm.get("model") or None
    source = llm.get("source") or ("llm" if model else "curated")
    n = int(llm.get("n", DEFAULT_N))
    if source not in SOURCES:
        raise ValueError(f"unknown attribute source {source!r}; valid: {', '.join(SOURCES)}")
    if source == "curated":
        attrs = {ds: curated(ds, n, class_names) for ds in datasets}
    elif source == "reference":
        attrs = {ds: reference.load(ds, n, class_names) for ds in datasets}
    else:
        attrs = query_datasets(datasets, model, n, llm.get("cache_dir", "attributes/cache"),
                               temperature=float(llm.get("temperature", 0.0)), seed=llm.get("seed", 0),
                               max_retries=int(llm.get("max_retries", 4)), timeout=float(llm.get("timeout", 60.0)),
                               backoff=float(llm.get("backoff", 1.0)), class_names=class_names, **kwargs)
    extra = {"commit": reference.COMMIT} if source == "reference" else {}
    return {ds: {"dataset": ds, "source": source, "model": model if source == "llm" else None, **extra,
                 "classes": list(get_dataset(ds, class_names).prompt_names), "attributes": attrs[ds]}
            for ds in datasets}


def load_attributes(path: str | Path) -> dict:
    """Read and check a record written by the ``attributes`` stage."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"attribute file {path} not found; run the 'attributes' stage (dvc repro attributes)")
    rec = json.loads(path.read_text("utf-8"))
    attrs, classes = rec.get("attributes"), rec.get("classes")
    if not isinstance(attrs, list) or not isinstance(classes, list) or len(attrs) != len(classes):
        raise ValueError(f"{path}: expected 'classes' and one attribute list per class")
    return rec
