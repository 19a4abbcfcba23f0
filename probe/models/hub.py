"""`hf:` references: a config.json on disk, or a model on the Hugging Face Hub by its id.

Memory needs the architecture, not the weights, so only `config.json` is ever fetched, through
huggingface_hub's own cache (`HF_HUB_CACHE`, `HF_TOKEN` and `HF_HUB_OFFLINE` work as everywhere
else). A config whose architecture only exists as code inside the repo (`auto_map` with a
`model_type` transformers does not know) is refused: fitprobe never runs a repository's code.

A reference is a local path when it names an existing file or directory or looks like one
(`./`, `/`, `~`, `.json`); otherwise it must be a Hub id, `org/name` or `org/name@revision`,
checked character by character before anything touches the cache or the network. The service
never asks the filesystem (`looks_like_path` and `parse_hub_id`, never `read_config`): a request must
not learn what the server holds.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fitprobe.probe.spec import SpecError

MAX_REPO_ID_CHARS = 96
MAX_REVISION_CHARS = 128
# Hub rules (huggingface_hub.utils.validate_repo_id): letters, digits, '-', '_', '.', each part starting
# and ending with a letter or digit, no '--' or '..'; the namespace is required (bare names are legacy).
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
# branch, tag or commit; '/' allowed (refs/pr/1) but never '..', which would climb out of the cache's refs/
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse_hub_id(text: str) -> HubId:
    """`org/name` or `org/name@revision` -> HubId, or a SpecError that says what a Hub id looks like."""
    repo_id, _, revision = text.partition("@")
    if len(repo_id) > MAX_REPO_ID_CHARS or not _REPO_ID.fullmatch(repo_id) or "--" in repo_id \
            or ".." in repo_id or repo_id.endswith(".git"):
        raise SpecError(
            f"hf:{text[:200]!r} is not a Hub id: use org/name or org/name@revision (letters, digits, '-', '_', "
            f"'.', at most {MAX_REPO_ID_CHARS} characters), or the path of a config.json or its directory"
        )
    if "@" in text and (len(revision) > MAX_REVISION_CHARS or not _REVISION.fullmatch(revision)
                        or ".." in revision or revision.endswith("/")):
        raise SpecError(f"hf:{text[:200]!r}: revision must be a branch, tag or commit hash "
                        f"(letters, digits, '-', '_', '.', '/', at most {MAX_REVISION_CHARS} characters)")
    return HubId(repo_id, revision or None)


def looks_like_path(text: str) -> bool:
    """Whether the reference is spelled as a path, judged by its text alone."""
    head = text.partition("@")[0]  # a revision may hold '/' (refs/pr/1)
    return head.startswith((".", "/", "~")) or head.endswith(".json") or head.count("/") > 1 or "\\" in head


def read_config(text: str) -> dict[str, Any]:
    """The command line's `hf:` reference -> config fields: an existing path first, else a Hub id."""
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise SpecError(f"hf: directory {text!r} holds no config.json")
    if path.is_file():
        return _checked(_load_json(path, text), text)
    if looks_like_path(text):
        raise SpecError(f"hf: config file {text!r} not found; give the path to a config.json or its directory, "
                        "or a Hub id (org/name)")
    return fetch_config(parse_hub_id(text))[0]


# one connection attempt, not huggingface_hub's five retries with backoff (~30 s) on an unreachable Hub
HUB_CONNECT_TIMEOUT_S = 3.0


def _offline_by_environment() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (one TCP connection, to its proxy if one is set), or None if it can."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = next((os.environ[name] for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(name)), None)
    target = urlsplit(proxy or endpoint)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname or "", port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        via = f" through the proxy {target.hostname}:{port}" if proxy else ""
        return f"the Hub at {endpoint} could not be reached{via} ({exc.strerror or exc})"
    return None


def fetch_config(hub_id: HubId, local_files_only: bool = False) -> tuple[dict[str, Any], str | None]:
    """config.json of a Hub model -> (its fields, the commit they come from).

    `local_files_only` (or HF_HUB_OFFLINE) reads the cache only, and so does a Hub that one connection
    attempt cannot reach: a user with no network gets one line in seconds, not a minute of retries.
    The environment is read here, at the call, rather than when huggingface_hub was imported, so a
    server set up later still obeys it.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as exc:
        raise SpecError("hf:org/name needs huggingface_hub: pip install 'fitprobe[hf]'") from exc
    repo = hub_id.repo_id
    why: str | None  # why the Hub is not asked (None: it is)
    if local_files_only:
        why = "this service reads its cache only (FITPROBE_HUB_ACCESS=offline; set it to online to fetch)"
    elif _offline_by_environment():
        why = "downloads are off: HF_HUB_OFFLINE is set (unset it to let fitprobe fetch config.json)"
    else:
        why = _hub_unreachable()  # then the cache alone may still answer
    try:
        local = hf_hub_download(repo, "config.json", revision=hub_id.revision,
                                cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=why is not None)
    except LocalEntryNotFoundError as exc:
        raise SpecError(
            f"config.json of {hub_id} is not in the local Hugging Face cache and {why or 'the Hub did not answer'}; "
            f"fetch it where fitprobe runs with `hf download {repo} config.json"
            f"{f' --revision {hub_id.revision}' if hub_id.revision else ''}` (`huggingface-cli download` on "
            "older huggingface_hub); gated or private models also need HF_TOKEN set there"
        ) from exc
    except GatedRepoError as exc:
        raise SpecError(f"{repo} is gated: accept its license on huggingface.co, then set HF_TOKEN where "
                        "fitprobe runs") from exc
    except RevisionNotFoundError as exc:
        raise SpecError(f"{repo} has no revision {hub_id.revision!r}; name a branch, tag or commit") from exc
    except RepositoryNotFoundError as exc:
        raise SpecError(f"no model {repo} on the Hub, or it is private (then set HF_TOKEN where fitprobe "
                        "runs)") from exc
    except EntryNotFoundError as exc:
        raise SpecError(f"{hub_id} has no config.json (fitprobe reads transformers models)") from exc
    except OSError as exc:  # network and HTTP errors
        raise SpecError(f"could not fetch config.json of {hub_id}: {exc}") from exc
    commit = Path(local).parent.name
    return _checked(_load_json(Path(local), str(hub_id)), str(hub_id)), commit if _COMMIT.fullmatch(commit) else None


def _load_json(path: Path, source: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"hf:{source}: config.json could not be read as JSON ({exc})") from exc


def _checked(fields: Any, source: str) -> dict[str, Any]:
    """Refuse what cannot be built without running the repo's own code."""
    if not isinstance(fields, dict):
        raise SpecError(f"hf:{source}: config.json must hold a JSON object")
    auto_map = fields.get("auto_map")
    if auto_map and not _transformers_knows(fields.get("model_type")):
        raise SpecError(
            f"hf:{source}: model_type {fields.get('model_type')!r} exists only as code inside the repo "
            "(auto_map, trust_remote_code); fitprobe never runs a repository's code. Use a preset, or a "
            "config whose model_type transformers ships"
        )
    return fields


def _transformers_knows(model_type: Any) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES
