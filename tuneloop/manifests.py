"""Read manifest files safely: size-capped, alias-bomb-proof, depth-capped YAML.

A manifest is untrusted input (a pull request, a file from a colleague). PyYAML's
``safe_load`` does not execute code, but it happily builds a "billion laughs" document
whose aliases expand to billions of nodes when anything walks it, and it recurses once
per nesting level. So we compose the node graph first, measure its expanded size and
depth with memoisation, and only then construct Python objects.

Two more differences from a plain ``safe_load``, so that a file means here what it means to
``kubectl``:

* a key written twice in one mapping is an error (PyYAML keeps the last value silently; the
  YAML spec forbids duplicate keys);
* plain scalars are read the way Kubernetes' YAML parser reads them: ``5e-3`` and ``1e3`` are
  numbers (PyYAML's YAML 1.1 rules make them strings, which strict validation then refuses),
  ``1:30`` is a string (not the sexagesimal integer 90), and so is an unquoted date or time
  (``2024-01-31``, not a date object).
"""

from __future__ import annotations

import re
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
#: Most nodes a document may hold as written, counted while it is parsed (a FineTuneJob has a few
#: hundred). Without it, a 4 MiB file of one-character list items (a million nodes) took 74 s and
#: about 250 MB in `tuneloop validate` before the expanded-size check ever ran.
MAX_COMPOSED_NODES: Final = 20_000

_INT_TAG: Final = "tag:yaml.org,2002:int"
_FLOAT_TAG: Final = "tag:yaml.org,2002:float"
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_TIMESTAMP_TAG: Final = "tag:yaml.org,2002:timestamp"
#: Integers as Kubernetes' YAML parser (go-yaml) reads them: decimal, 0x, 0o, 0b, leading-0 octal,
#: '_' separators. No sexagesimal (1:30).
_INT: Final = re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$""")
#: Floats as go-yaml reads them: the fraction and the exponent's sign are optional (5e-3, 1e3, 2.).
_FLOAT: Final = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"""
)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with plain scalars resolved as kubectl resolves them (see the module doc),
    refusing a document once it holds more than :data:`MAX_COMPOSED_NODES` nodes."""

    composed = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self.composed += 1
        if self.composed > MAX_COMPOSED_NODES:
            raise ManifestError(
                f"document holds more than {MAX_COMPOSED_NODES:,} YAML nodes; a FineTuneJob has a few hundred"
            )
        node: Node | None = super().compose_node(parent, index)
        return node


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "-+0123456789.":
    # Integers first: "10" matches both patterns.
    _Loader.yaml_implicit_resolvers.setdefault(_first, [])[:0] = [(_INT_TAG, _INT), (_FLOAT_TAG, _FLOAT)]


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


def _where(path: tuple[str | int, ...]) -> str:
    if not path:
        return "at the top level"
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return f"in {out}"


def _key_name(key: Node) -> str | None:
    return key.value if isinstance(key, ScalarNode) and isinstance(key.value, str) else None


def _check_keys(node: MappingNode, path: tuple[str | int, ...]) -> None:
    """Refuse a key written twice in one mapping (YAML would keep the last value silently)."""
    seen: dict[tuple[str, str], int] = {}
    for key, _value in node.value:
        name = _key_name(key)
        if name is None or key.tag == _MERGE_TAG:
            continue
        line = key.start_mark.line + 1
        first = seen.get((key.tag, name))
        if first is None:
            seen[(key.tag, name)] = line
        else:
            shown = name if len(name) <= 60 else name[:57] + "..."
            raise ManifestError(
                f"duplicate key {shown!r} {_where(path)} (lines {first} and {line}); only one of the two "
                "values would be used: remove or rename one of them"
            )


def _measure(node: Node, memo: dict[int, int], depth: int, path: tuple[str | int, ...] = ()) -> int:
    """Expanded node count below ``node``; raises when too deep, too large, or a key is repeated."""
    if depth > MAX_DEPTH:
        raise ManifestError(f"nesting deeper than {MAX_DEPTH} levels (line {node.start_mark.line + 1})")
    key = id(node)
    if key in memo:
        return memo[key]
    total = 1
    if isinstance(node, SequenceNode):
        total += sum(_measure(child, memo, depth + 1, (*path, i)) for i, child in enumerate(node.value))
    elif isinstance(node, MappingNode):
        _check_keys(node, path)
        total += sum(
            _measure(k, memo, depth + 1, path) + _measure(v, memo, depth + 1, (*path, _key_name(k) or "?"))
            for k, v in node.value
        )
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
    loader = _Loader(text)
    try:
        index = 0
        while loader.check_node():
            loader.composed = 0
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
    if not jobs and len(documents) == 1:
        return documents[0]  # validating it says what is wrong (kind missing, another kind...)
    if len(jobs) != 1:
        raise ManifestError(f"{source} must hold exactly one FineTuneJob (found {len(jobs)})")
    return jobs[0]
