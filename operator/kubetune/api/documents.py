"""A user's bytes as the objects `kubectl apply -f` would send: YAML read as sigs.k8s.io/yaml reads it
(go-yaml v2's resolver, then JSON), with kubectl's limits, and the shape checks `validate` needs.

Every refusal is an `InputError` naming the source, the document and the field. What is refused and
the upstream source of each limit: docs/cli.md, "What `kubetune validate` reads".
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .k8s_values import MAX_REQUEST_BYTES

KUBECTL_MAX_DEPTH = 10000  # go-yaml v2 scannerc.go max_flow_level / max_indents; encoding/json's maxNestingDepth
MAX_DEPTH = 100  # kubetune's: no field of its objects (Kubernetes types in them included) nests deeper than ~20
MAX_FILE_BYTES = 8 * 1024 * 1024  # kubetune's own bound on what it reads (memory); each document is held to 3 MiB
GENERATED_SUFFIX = 5  # apiserver/pkg/storage/names: generateName + 5 random characters, the base cut to 58
MAX_GENERATED_BASE = 63 - GENERATED_SUFFIX
_ALIAS_RANGE_LOW, _ALIAS_RANGE_HIGH = 400_000, 4_000_000  # go-yaml v2 decode.go alias_ratio_range_*

_BOOLS = {**dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"), True),
          **dict.fromkeys(("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"), False)}
_NULLS = ("", "~", "null", "Null", "NULL")
_NOT_JSON = {**dict.fromkeys((".nan", ".NaN", ".NAN"), "NaN"),
             **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), "+Inf"),
             **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), "-Inf")}
_YAML_STYLE_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")  # go-yaml v2 resolve.go
_DOT_FLOAT = re.compile(r"\.[0-9]+([eE][-+]?[0-9]+)?")
_INT_DIGITS = {"0x": (16, "0123456789abcdefABCDEF"), "0o": (8, "01234567"), "0b": (2, "01")}
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
_TAG = "tag:yaml.org,2002:"
_SEPARATOR = re.compile(r"^---(\s|$)")


class InputError(Exception):
    """Bytes that are not Kubernetes objects: one line, FILE:LINE: document N: FIELD: problem (exit 2)."""

    def __init__(self, source: str, message: str, *, document: str = "", line: int | None = None):
        self.source, self.document, self.line, self.message = source, document, line, message
        where = source + (f":{line}" if line else "") + (f": {document}" if document else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Document:
    """One object of a file: its position (1-based document, and item of a `kind: List`) and value."""

    value: Any
    index: int
    item: int | None = None
    line: int = 1

    @property
    def where(self) -> str:
        item = f", items[{self.item}]" if self.item is not None else ""
        return f"document {self.index}{item}"

    @property
    def name(self) -> str:
        """Kind/name as kubectl prints it; a generateName shows as PREFIX*."""
        value = self.value if isinstance(self.value, dict) else {}
        meta = value.get("metadata") if isinstance(value.get("metadata"), dict) else {}
        name, prefix = (text if isinstance(text, str) else "" for text in (meta.get("name"), meta.get("generateName")))
        kind = value.get("kind") if isinstance(value.get("kind"), str) else "?"
        return f"{kind}/{name or (prefix + '*' if prefix else '?')}"


def decode(raw: bytes, source: str) -> str:
    """The bytes as text, as kubectl's reader takes them: a UTF-8 BOM dropped, UTF-16 with a BOM
    transcoded (cli-runtime FileVisitor: unicode.BOMOverride), anything else must be UTF-8."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise InputError(source, f"starts with a UTF-16 byte order mark but byte {exc.start} is not UTF-16; "
                                     "write it as UTF-8") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(source, f"not UTF-8: byte 0x{raw[exc.start]:02x} at column {column} (kubectl would send "
                                 "U+FFFD in its place); write it as UTF-8", line=line) from None


def _check_sizes(text: str, source: str) -> None:
    """Each document (split at `---` lines, as apimachinery's YAMLReader does) within the API server's
    request limit, checked before anything is parsed. Comment lines do not count: they are not sent."""
    start, size, index = 1, 0, 1
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if _SEPARATOR.match(line):
            start, size, index = number, 0, index + 1
            continue
        if not line.lstrip().startswith("#"):
            size += len(line.encode("utf-8", "surrogatepass"))
        if size > MAX_REQUEST_BYTES:
            raise InputError(source, f"more than {MAX_REQUEST_BYTES} bytes (3 MiB), the API server's limit on one "
                                     "request (413 Request Entity Too Large)", document=f"document {index}",
                             line=start)


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(s, 0, 64), then ParseUint: Go's base prefixes (0x, 0o, 0b, a leading 0 for octal)."""
    sign, body = (-1, text[1:]) if text[:1] == "-" else (1, text[1:] if text[:1] == "+" else text)
    base, digits = _INT_DIGITS.get(body[:2].lower(), (0, ""))
    if base:
        body = body[2:]
    elif len(body) > 1 and body[0] == "0":
        base, digits, body = 8, "01234567", body[1:]
    else:
        base, digits = 10, "0123456789"
    if not body or any(c not in digits for c in body):
        return None
    value = sign * int(body, base)
    if _INT64_MIN <= value <= _UINT64_MAX and not (text[:1] == "+" and value > 2**63 - 1):
        return value
    return None


def _number(plain: str) -> int | float | None:
    """go-yaml v2's resolve() for a plain scalar starting with a digit, sign or dot (None: a string)."""
    if plain[0] == ".":
        return _finite(plain) if _DOT_FLOAT.fullmatch(plain) else None
    plain = plain.replace("_", "")
    if not plain:
        return None
    value = _go_int(plain)
    if value is None and _YAML_STYLE_FLOAT.fullmatch(plain):
        return _finite(plain)
    return value


def _finite(text: str) -> float | None:
    """strconv.ParseFloat fails on an overflow (1e400): go-yaml then keeps the text as a string."""
    value = float(text)
    return value if math.isfinite(value) else None


def _as_json_number(value: float) -> int | float:
    """What the API server reads back: json.Marshal writes an integral float64 below 1e21 as digits."""
    return int(value) if value.is_integer() and abs(value) < 1e21 else value


class _NotJson(Exception):
    def __init__(self, written: str, why: str):
        super().__init__(written)
        self.written, self.why = written, why


@functools.lru_cache(maxsize=4096)
def _short_scalar(value: str, tag: str | None, plain: bool) -> tuple[Any, int]:
    """`scalar` and its compact JSON size, remembered: files repeat their short values (1, true, q_proj)."""
    resolved = scalar(value, tag, plain)
    return resolved, len(json.dumps(resolved))


def resolved_scalar(value: str, tag: str | None, plain: bool) -> tuple[Any, int]:
    if len(value) <= 64:
        return _short_scalar(value, tag, plain)
    resolved = scalar(value, tag, plain)
    return resolved, (len(value) + 2 if isinstance(resolved, str) and resolved is value else len(json.dumps(resolved)))


def scalar(value: str, tag: str | None, plain: bool) -> Any:
    """A scalar as go-yaml v2 resolves it into interface{} (timestamps stay strings), then as JSON."""
    if (tag in (None, "!") and not plain) or tag == _TAG + "str":
        return value
    if value == "<<" and tag is None:
        return MERGE
    if value in _NOT_JSON and tag in (None, _TAG + "float"):
        raise _NotJson(value, f"json: unsupported value: {_NOT_JSON[value]}")
    if tag not in (None, _TAG + "int", _TAG + "float", _TAG + "bool", _TAG + "null"):
        return value  # go-yaml keeps an unknown tag's scalar as its text
    resolved: Any = value
    if value in _BOOLS:
        resolved = _BOOLS[value]
    elif value in _NULLS:
        resolved = None
    elif value[:1] in "0123456789+-.":
        number = _number(value)
        resolved = value if number is None else number
    wanted = {_TAG + "int": int, _TAG + "float": (int, float), _TAG + "bool": bool, _TAG + "null": type(None)}
    bool_as_number = isinstance(resolved, bool) and tag in (_TAG + "int", _TAG + "float")
    if tag in wanted and (not isinstance(resolved, wanted[tag]) or bool_as_number):
        raise _NotJson(value, f"cannot decode `{value}` as a !!{tag.removeprefix(_TAG)}")
    return _as_json_number(resolved) if isinstance(resolved, float) else resolved


def _key_text(key: Any) -> str | None:
    """sigs.k8s.io/yaml's convertToJSONableObject: int, float and bool keys become strings."""
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, (str, int, float)):
        return str(key)
    return None


def _path(parts: list) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _alias_ratio(decodes: int) -> float:
    if decodes <= _ALIAS_RANGE_LOW:
        return 0.99
    if decodes >= _ALIAS_RANGE_HIGH:
        return 0.10
    return 0.99 - 0.89 * (decodes - _ALIAS_RANGE_LOW) / (_ALIAS_RANGE_HIGH - _ALIAS_RANGE_LOW)


class _Merge(str):
    """A plain `<<` key: go-yaml v2 merges the mapping(s) it names into the enclosing one."""


MERGE = _Merge("<<")


@dataclass
class _Node:
    """A container being built, with what building it cost so far (for anchors: what each alias of it
    costs again): go-yaml's decode count, compact JSON bytes, height."""

    value: Any
    line: int
    anchor: str | None
    decodes: int
    size: int
    key: Any = None  # the pending key of a mapping, and the line it is on
    key_line: int = 0
    has_key: bool = False
    explicit: dict = field(default_factory=dict)  # key -> line, merged keys excluded
    height: int = 1


class _Builder:
    """Events (libyaml's parser, iterative) into JSON values, without recursion, so the depth, alias
    and size limits hold before anything deep or large exists."""

    def __init__(self, source: str, index: int):
        self.source, self.index = source, index
        self.stack: list[_Node] = []
        self.anchors: dict[str, tuple[Any, int, int, int]] = {}  # value, decodes, JSON bytes, height
        self.decodes = self.aliased = self.size = 0

    def fail(self, message: str, line: int) -> InputError:
        return InputError(self.source, message, document=f"document {self.index}", line=line)

    def where(self, nodes: list[_Node] | None = None) -> str:
        parts: list = []
        for node in self.stack if nodes is None else nodes:
            if isinstance(node.value, list):
                parts.append(len(node.value))
            elif node.has_key:
                parts.append(str(node.key))
        return _path(parts)

    def grow(self, size: int, line: int) -> None:
        self.size += size
        if self.size > MAX_REQUEST_BYTES:
            raise self.fail(f"more than {MAX_REQUEST_BYTES} bytes as JSON once aliases are expanded: over the API "
                            "server's 3 MiB limit on one request", line)

    def push(self, value: Any, line: int, anchor: str | None) -> None:
        if len(self.stack) >= MAX_DEPTH:
            raise self.fail(f"{self.where() or 'the document'}: nested more than {MAX_DEPTH} levels deep; no field "
                            "of a kubetune object nests that deep (kubectl itself stops at "
                            f"{KUBECTL_MAX_DEPTH})", line)
        self.decodes += 1
        self.grow(2, line)
        self.stack.append(_Node(value, line, anchor, self.decodes - 1, self.size - 2))

    def finish(self) -> Any:
        node = self.stack.pop()
        if node.anchor:
            self.anchors[node.anchor] = (node.value, self.decodes - node.decodes, self.size - node.size, node.height)
        return self.add(node.value, node.line, node.height)

    def add(self, value: Any, line: int, height: int) -> Any:
        """Attach a finished value to its parent; the document's value when there is none."""
        if not self.stack:
            return "<<" if value is MERGE else value
        parent = self.stack[-1]
        parent.height = max(parent.height, height + 1)
        if isinstance(parent.value, list):
            parent.value.append("<<" if value is MERGE else value)
            return None
        if not parent.has_key:
            key = value if value is MERGE else _key_text(value)
            if key is None:
                raise self.fail(f"{self.where() or 'the document'}: a mapping key is a "
                                f"{'null' if value is None else 'collection'}; JSON keys are strings", line)
            parent.key, parent.key_line, parent.has_key = key, line, True
            return None
        key, parent.has_key = parent.key, False
        if key is MERGE:
            self._merge(parent, value, line)
        elif key in parent.explicit:
            path = _path([*([self.where(self.stack[:-1])] if self.where(self.stack[:-1]) else []), key])
            raise self.fail(f'{path}: mapping key "{key}" already defined at line {parent.explicit[key]} (YAML '
                            "forbids it; kubectl apply would keep the last one silently)", parent.key_line)
        else:
            parent.explicit[key] = parent.key_line
            parent.value[key] = "<<" if value is MERGE else value
        return None

    def _merge(self, parent: _Node, value: Any, line: int) -> None:
        """`<<: *defaults` (go-yaml v2: a mapping, or a list of them merged from the last to the first);
        keys written in the mapping itself win."""
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(each, dict) for each in sources):
            raise self.fail("map merge (<<) requires a mapping or a list of mappings as its value", line)
        for each in reversed(sources):
            for key, item in each.items():
                if key not in parent.explicit:
                    parent.value[key] = item

    def alias(self, name: str, line: int) -> Any:
        if name not in self.anchors:
            raise self.fail(f"unknown anchor '{name}' referenced", line)
        value, decodes, size, height = self.anchors[name]
        self.decodes += decodes
        self.aliased += decodes
        if self.aliased > 100 and self.decodes > 1000 and self.aliased / self.decodes > _alias_ratio(self.decodes):
            raise self.fail(f"document contains excessive aliasing (*{name}; go-yaml's alias limit, which kubectl "
                            "applies too)", line)
        if len(self.stack) + height > MAX_DEPTH:
            raise self.fail(f"nested more than {MAX_DEPTH} levels deep once *{name} is expanded", line)
        self.grow(size + 1, line)
        return self.add(value, line, height)

    def scalar(self, event: yaml.ScalarEvent) -> Any:
        line = event.start_mark.line + 1
        self.decodes += 1
        try:
            value, size = resolved_scalar(event.value, event.tag, event.implicit[0])
        except _NotJson as exc:
            where = f"{self.where()}: " if self.where() else ""
            raise self.fail(f"{where}{exc.written} is not a value JSON can carry ({exc.why})", line) from None
        size += 1
        self.grow(size, line)
        if event.anchor:
            self.anchors[event.anchor] = (value, 1, size, 0)
        return self.add(value, line, 0)


def _parse(text: str, source: str) -> list[tuple[Any, int, int]]:
    """Every document of the stream as (value, its number, its first line); empty ones are dropped, as
    kubectl drops them."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    documents: list[tuple[Any, int, int]] = []
    builder = _Builder(source, 1)
    index, start, value = 0, 1, None
    try:
        for event in yaml.parse(text, Loader=loader):
            line = event.start_mark.line + 1 if event.start_mark else 0
            if type(event) is yaml.ScalarEvent:  # most events: first
                value = builder.scalar(event)
            elif isinstance(event, yaml.DocumentStartEvent):
                index, start, value = index + 1, line, None
                builder = _Builder(source, index)
            elif isinstance(event, yaml.DocumentEndEvent):
                if value is not None:
                    documents.append((value, index, start))
            elif isinstance(event, yaml.ScalarEvent):
                value = builder.scalar(event)
            elif isinstance(event, yaml.SequenceStartEvent):
                builder.push([], line, event.anchor)
            elif isinstance(event, yaml.MappingStartEvent):
                builder.push({}, line, event.anchor)
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                value = builder.finish()
            elif isinstance(event, yaml.AliasEvent):
                value = builder.alias(event.anchor, line)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        if "maximum nesting depth" in problem:  # libyaml's own limit (1000), met while it scans ahead
            problem = (f"nested more than {MAX_DEPTH} levels deep; no field of a kubetune object nests that deep "
                       f"(kubectl itself stops at {KUBECTL_MAX_DEPTH})")
        else:
            problem = f"not valid YAML: {problem}"
        raise InputError(source, problem, document=f"document {max(index, 1)}",
                         line=mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, other control characters)
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        raise InputError(source, f"not valid YAML: {exc.reason}", document=f"document {max(index, 1)}",
                         line=line) from None
    except yaml.YAMLError as exc:
        raise InputError(source, f"not valid YAML: {exc}") from None
    return documents


def _expand(value: Any, index: int, line: int, source: str) -> list[Document]:
    """A `kind: List` stands for its items, as kubectl's FlattenListVisitor expands it."""
    if not (isinstance(value, dict) and value.get("kind") == "List" and "items" in value):
        return [Document(value, index, line=line)]
    items = value["items"]
    if not isinstance(items, list):
        raise InputError(source, "items: a List's items must be a list of objects", document=f"document {index}",
                         line=line)
    return [Document(item, index, item=number, line=line) for number, item in enumerate(items)]


def load(raw: bytes, source: str) -> list[Document]:
    """The objects in a file's bytes, as kubectl would send them; InputError when it would not."""
    if len(raw) > MAX_FILE_BYTES:
        raise InputError(source, f"larger than {MAX_FILE_BYTES // 2**20} MiB; kubetune reads at most that")
    text = decode(raw, source)
    _check_sizes(text, source)
    documents = []
    for value, index, line in _parse(text, source):
        documents.extend(_expand(value, index, line, source))
    if not documents:
        raise InputError(source, "no objects in it, only comments or `---` separators (kubectl: no objects passed "
                                 "to apply)")
    for doc in documents:
        if not isinstance(doc.value, dict):
            raise InputError(source, f"a {_type_name(doc.value)}, not a Kubernetes object (a mapping with "
                                     "apiVersion, kind, metadata and spec)", document=doc.where, line=doc.line)
    return documents


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
            dict: "mapping", type(None): "null"}.get(type(value), "value")


def shown(value: Any) -> str:
    """A value as JSON when it is short and on one line, else what it is (a mapping, a list...)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 and "\\" not in text else f"a {_type_name(value)}"


def parse_value(text: str, source: str) -> Any:
    """One value (a `--set` value) read with the same rules; an empty text is an empty string."""
    if text == "":
        return ""
    documents = _parse(decode(text.encode("utf-8", "surrogatepass"), source), source)
    return documents[0][0] if documents else None


def shape_errors(document: dict) -> list[tuple[str, str]]:
    """(field, problem) for a top level that `validate` cannot read: the API server's words where
    it has them (apimachinery's ObjectMeta validation)."""
    errors = []
    for name in ("apiVersion", "kind"):
        if name not in document or document[name] in (None, ""):
            errors.append((name, "Required value"))
        elif not isinstance(document[name], str):
            errors.append((name, f"Invalid value: {shown(document[name])}: must be a string"))
    meta = document.get("metadata")
    if meta is None:
        errors.append(("metadata.name", "Required value: name or generateName is required"))
    elif not isinstance(meta, dict):
        errors.append(("metadata", f"Invalid value: {shown(meta)}: must be an object"))
    else:
        for name in ("name", "generateName", "namespace"):
            if name in meta and not isinstance(meta[name], str):
                errors.append((f"metadata.{name}", f"Invalid value: {shown(meta[name])}: must be a string"))
        if not meta.get("name") and not meta.get("generateName"):
            errors.append(("metadata.name", "Required value: name or generateName is required"))
    if "spec" in document and not isinstance(document["spec"], dict):
        errors.append(("spec", f"Invalid value: {shown(document['spec'])}: must be an object"))
    return errors


def as_created(document: dict) -> tuple[dict, list[tuple[str, str]]]:
    """A document with only a generateName, named as the API server names it on create (the prefix cut
    to 58 characters, then 5 random ones: apiserver/pkg/storage/names), so the names kubetune derives
    from it are checked at their longest; with the warning that apply and GitOps need a name."""
    meta = document.get("metadata")
    if not isinstance(meta, dict) or meta.get("name") or not isinstance(meta.get("generateName"), str):
        return document, []
    name = meta["generateName"][:MAX_GENERATED_BASE] + "x" * GENERATED_SUFFIX
    warning = ("metadata.generateName", "accepted by `kubectl create`; `kubectl apply` refuses it (cannot use generate "
               "name with apply) and GitOps tools need metadata.name to find the object again; checked as " + name)
    return {**document, "metadata": {**meta, "name": name}}, [warning]
