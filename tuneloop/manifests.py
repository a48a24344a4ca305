"""Read manifest files safely: size-capped, alias-bomb-proof, depth-capped YAML.

A manifest is untrusted input (a pull request, a file from a colleague). PyYAML's
``safe_load`` does not execute code, but it happily builds a "billion laughs" document
whose aliases expand to billions of nodes when anything walks it, and it recurses once
per nesting level. So we compose the node graph first, measure its expanded size and
depth with memoisation, and only then construct Python objects.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

#: Largest manifest read. The API server refuses objects above ~1.5 MiB (etcd's limit);
#: 4 MiB leaves room for many documents in one file.
MAX_FILE_BYTES: Final = 4 * 1024 * 1024
#: Most nodes a document may expand to, aliases counted at every use.
MAX_EXPANDED_NODES: Final = 200_000
#: Deepest nesting accepted (a FineTuneJob is about 8 levels deep).
MAX_DEPTH: Final = 64


class ManifestError(Exception):
    """A file or document that cannot be read as a manifest; the message says why.

    ``documents`` holds the documents of the file read before the broken one, so they
    can still be checked.
    """

    def __init__(self, message: str, documents: list[Document] | None = None) -> None:
        super().__init__(message)
        self.documents: list[Document] = documents or []


@dataclass(frozen=True)
class Document:
    """One YAML document of a file."""

    source: str
    """File name (or ``<stdin>``)."""
    index: int
    """1-based position in the file."""
    line: int
    """1-based line where it starts."""
    body: Any
    """The parsed document."""

    def describe(self) -> str:
        """``jobs.yaml: document 2 (FineTuneJob "sentiment", line 14)``."""
        what = ""
        if isinstance(self.body, dict):
            kind = self.body.get("kind")
            meta = self.body.get("metadata")
            name = meta.get("name") if isinstance(meta, dict) else None
            if isinstance(kind, str):
                what = f"{kind} {name!r}" if isinstance(name, str) else kind
        detail = f"{what}, line {self.line}" if what else f"line {self.line}"
        return f"{self.source}: document {self.index} ({detail})"


def _measure(node: Node, memo: dict[int, int], depth: int) -> int:
    """Expanded node count below ``node``; raises when too deep or too large."""
    if depth > MAX_DEPTH:
        raise ManifestError(f"nesting deeper than {MAX_DEPTH} levels (line {node.start_mark.line + 1})")
    key = id(node)
    if key in memo:
        return memo[key]
    total = 1
    if isinstance(node, SequenceNode):
        total += sum(_measure(child, memo, depth + 1) for child in node.value)
    elif isinstance(node, MappingNode):
        total += sum(_measure(k, memo, depth + 1) + _measure(v, memo, depth + 1) for k, v in node.value)
    elif not isinstance(node, ScalarNode):  # pragma: no cover - PyYAML has no other node kinds
        raise ManifestError(f"unexpected YAML node {type(node).__name__}")
    if total > MAX_EXPANDED_NODES:
        raise ManifestError(
            f"document expands to more than {MAX_EXPANDED_NODES:,} nodes through YAML aliases "
            "(a 'billion laughs' document?); write it out without aliases"
        )
    memo[key] = total
    return total


def _documents(text: str, source: str) -> Iterator[Document]:
    loader = yaml.SafeLoader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            index += 1
            if node is None:  # pragma: no cover - check_node() said there is one
                continue
            _measure(node, {}, 0)
            body = loader.construct_document(node)
            if body is None:  # an empty document between two '---'
                continue
            yield Document(source=source, index=index, line=node.start_mark.line + 1, body=body)
    finally:
        loader.dispose()


def read_manifests(path: str) -> list[Document]:
    """Every non-empty document of a file (``-`` reads standard input)."""
    source = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            file = Path(path)
            if file.is_dir():
                raise ManifestError(f"{path} is a directory; pass the files in it (e.g. {path}/*.yaml)")
            with file.open("rb") as handle:
                raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except PermissionError:
        raise ManifestError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ManifestError(
            f"{source}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; a manifest this big is not a "
            "FineTuneJob (the API server refuses objects over about 1.5 MiB)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{source}: not UTF-8 text (byte {exc.start}); is this a binary file?") from None
    documents: list[Document] = []
    try:
        documents.extend(_documents(text, source))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        raise ManifestError(f"{source}: invalid YAML at {where}: {exc.problem or exc}", documents) from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: invalid YAML: {exc}", documents) from None
    except RecursionError:
        raise ManifestError(f"{source}: nesting too deep to be a manifest", documents) from None
    except ManifestError as exc:
        raise ManifestError(f"{source}: {exc}", documents) from None
    return documents


def single_fine_tune_job(documents: list[Document], source: str) -> Document:
    """The one FineTuneJob of a file that ``tuneloop run`` runs; ManifestError otherwise."""
    jobs = [d for d in documents if isinstance(d.body, dict) and d.body.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        raise ManifestError(f"{source} must hold exactly one FineTuneJob (found {len(jobs)})")
    return jobs[0]
