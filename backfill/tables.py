"""What gets embedded: per table, the rows that need an embedding and the one text recipe per row.

A row needs an embedding when its `embedding` is NULL, `''`, `'[]'`, or malformed (not a JSON
array of numbers), or, once the job knows its dimensions, a vector of another length.

Recipes are versioned. `mcp-memory-ts/1` reproduces the server's create path
(`EmbeddingService.createMemoryEmbeddingText` / `createEntityEmbeddingText` and
`prepareTextForEmbedding`): the same parts joined by blank lines, whitespace collapsed, and
every character outside JavaScript's ASCII `\\w`, whitespace and `-.,!?;:()[]{}'"` removed.
One improvement: the server cuts at 8,000 characters; we cut by the model's tokens instead
(see tokens.py). `unicode/1` is the same recipe keeping letters and digits of every script.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from backfill.schema import entities, memories

DEFAULT_RECIPE = "mcp-memory-ts/1"

# JavaScript's \s (Unicode whitespace incl. U+FEFF); Python's \s lacks U+FEFF and has \x1c-\x1f
_JS_WS = r"\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_JS_STRIP = "\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff" + "".join(map(chr, range(0x2000, 0x200B)))
_COLLAPSE = re.compile(f"[{_JS_WS}]+")
_ASCII_KEEP = re.compile(f"[^A-Za-z0-9_{_JS_WS}\\-.,!?;:()\\[\\]{{}}'\"]")
_UNICODE_KEEP = re.compile(f"[^\\w{_JS_WS}\\-.,!?;:()\\[\\]{{}}'\"]")


# The ASCII characters the server's recipe deletes (outside \w, whitespace and its punctuation).
_ASCII_DROP = bytes(c for c in range(128) if _ASCII_KEEP.match(chr(c)) and not _COLLAPSE.match(chr(c)))
_PY_ONLY_WS = "\x1c\x1d\x1e\x1f"  # str.split() splits on these; JavaScript's \s does not


def _clean(text: str, keep: re.Pattern[str]) -> str:
    if keep is _ASCII_KEEP and text.isascii() and not any(c in text for c in _PY_ONLY_WS):
        # the same result for ASCII text, 4x faster: the regex collapse dominates a page's preparation
        return " ".join(text.split()).encode().translate(None, _ASCII_DROP).decode().strip(" ")
    text = _COLLAPSE.sub(" ", text)
    text = keep.sub("", text)
    return text.strip(_JS_STRIP)


def _tags(raw: Any) -> list[str]:
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except ValueError:
            return [t.strip() for t in raw.split(",") if t.strip()]
        raw = parsed
    if isinstance(raw, list):
        return [str(t) for t in raw if t is not None and str(t) != ""]
    return [str(raw)]


def _memory_parts(row: Mapping[Any, Any]) -> list[str]:
    parts = [row.get("title") or "", row.get("content") or ""]
    if row.get("memory_type"):
        parts.append(f"Type: {row['memory_type']}")
    tags = _tags(row.get("tags"))
    if tags:
        parts.append(f"Tags: {', '.join(tags)}")
    return parts


def _entity_parts(row: Mapping[Any, Any]) -> list[str]:
    parts = [row.get("name") or ""]
    if row.get("description"):
        parts.append(row["description"])
    if row.get("company"):
        parts.append(f"Company: {row['company']}")
    if row.get("title"):
        parts.append(f"Title: {row['title']}")
    if row.get("notes"):
        parts.append(row["notes"])
    tags = _tags(row.get("tags"))
    if tags:
        parts.append(f"Tags: {', '.join(tags)}")
    return parts


@dataclass(frozen=True)
class Spec:
    """One embeddable table."""

    name: str
    table: sa.Table
    text_columns: tuple[str, ...]
    parts: Callable[[Mapping[Any, Any]], list[str]]

    @property
    def key(self) -> sa.Column:
        return self.table.c.id

    @property
    def embedding(self) -> sa.Column:
        return self.table.c.embedding

    @property
    def user_id(self) -> sa.Column:
        return self.table.c.user_id


SPECS: dict[str, Spec] = {
    "memories": Spec("memories", memories, ("title", "content", "memory_type", "tags"), _memory_parts),
    "entities": Spec(
        "entities", entities, ("name", "description", "company", "title", "notes", "tags"), _entity_parts
    ),
}
TARGET_CHOICES = ("memories", "entities", "all")


def specs_for(target: str) -> list[Spec]:
    return list(SPECS.values()) if target == "all" else [SPECS[target]]


# --- reading a row's text: one text per row whatever the URL, and no value that can stop a job -------------
#
# On the SQLite family a "TEXT" column holds whatever it was given: bytes that are not UTF-8 (libSQL's driver
# panics decoding them), a NUL inside the text (libSQL's driver cuts there, the stdlib's does not), a BLOB or a
# number. Text columns are therefore read as `CAST(col AS BLOB)`, the stored bytes whole, and decoded here,
# undecodable bytes as lone surrogates that every recipe removes (what the stdlib driver's lenient reading
# did before); a BLOB value is named in `_blobs`, and the runner records that row as a failure with its reason.
# PostgreSQL's text is valid UTF-8 without NUL by construction: its columns are read as they are.

BLOBS = "_blobs"


class _LenientText(FunctionElement):
    """A text column read as its stored bytes on the SQLite family, as itself elsewhere."""

    type = sa.types.NullType()
    name = "lenient_text"
    inherit_cache = True


@compiles(_LenientText)
def _lenient_plain(element: _LenientText, compiler: Any, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(_LenientText, "sqlite")
def _lenient_sqlite(element: _LenientText, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS BLOB)"


class _BlobColumns(FunctionElement):
    """The names of the given columns that hold a BLOB (SQLite family), space-separated; '' elsewhere."""

    type = sa.types.NullType()
    name = "blob_columns"
    inherit_cache = True


@compiles(_BlobColumns)
def _blobs_plain(element: _BlobColumns, compiler: Any, **kw: Any) -> str:
    return "''"


@compiles(_BlobColumns, "sqlite")
def _blobs_sqlite(element: _BlobColumns, compiler: Any, **kw: Any) -> str:
    parts = []
    for col in element.clauses:
        ref = compiler.process(col, **kw)
        parts.append(f"(CASE WHEN typeof({ref}) = 'blob' THEN '{col.name} ' ELSE '' END)")
    return "(" + " || ".join(parts) + ")"


def text_columns(spec: Spec, table: sa.Table | None = None) -> list[sa.ColumnElement]:
    """The recipe's columns, each read so that no stored value can fail the read, plus `_blobs`."""
    t = spec.table if table is None else table
    cols = [_LenientText(t.c[name]).label(name) for name in spec.text_columns]
    return [*cols, _BlobColumns(*(t.c[name] for name in spec.text_columns)).label(BLOBS)]


def select_columns(spec: Spec) -> list[sa.ColumnElement]:
    return [spec.key, *text_columns(spec)]


def as_text(value: Any) -> str | None:
    """A stored value as text: bytes decoded (undecodable bytes kept as lone surrogates), numbers as written."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def unreadable(spec: Spec, row: Mapping[Any, Any]) -> str | None:
    """Why this row has no text to embed (a BLOB in a text column), or None."""
    blobs = (row.get(BLOBS) or "").split()
    if not blobs:
        return None
    return (f"{spec.name}.{', '.join(blobs)} holds a BLOB, not text: store the text there (the row is left as it is; "
            "`backfill retry-failed` takes it again)")


def scope(spec: Spec, user_id: str | None) -> list[sa.ColumnElement[bool]]:
    return [] if user_id is None else [spec.user_id == user_id]


RECIPES = {"mcp-memory-ts/1": _ASCII_KEEP, "unicode/1": _UNICODE_KEEP}


def recipe_text(spec: Spec, row: Mapping[Any, Any], recipe: str = DEFAULT_RECIPE) -> str:
    """The text the server would embed for this row (before truncation by tokens)."""
    row = {**row, **{name: as_text(row.get(name)) for name in spec.text_columns}}
    joined = "\n\n".join(spec.parts(row))
    return _clean(joined, RECIPES[recipe])


def content_hash(text: str) -> str:
    """Hash of a row's full recipe text (before truncation by tokens, which the recorded model fixes);
    the one place that defines it (stale detection and dedupe compare it)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# --- predicates -------------------------------------------------------------------------------

_NUM = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
_PG_VECTOR_RE = rf"^\s*\[\s*{_NUM}(\s*,\s*{_NUM})*\s*\]\s*$"


def missing(col: sa.ColumnElement) -> ColumnElement[bool]:
    """NULL, '' or '[]' (whitespace ignored). Never parses JSON, so a '' row cannot crash it."""
    return sa.or_(col.is_(None), sa.func.trim(col).in_(["", "[]"]))


def valid_vector(col: sa.ColumnElement, dialect: str) -> ColumnElement[bool]:
    """A non-empty JSON array whose every element is a number."""
    if dialect == "postgresql":
        return col.op("~")(sa.literal(_PG_VECTOR_RE))
    # CASE guarantees json_type/json_each only ever see valid JSON
    ref = f"{col.table.name}.{col.name}"
    return sa.literal_column(
        f"(CASE WHEN {ref} IS NOT NULL AND json_valid({ref}) "
        f"AND json_type({ref}) = 'array' AND json_array_length({ref}) > 0 "
        f"THEN NOT EXISTS (SELECT 1 FROM json_each({ref}) WHERE type NOT IN ('integer', 'real')) "
        f"ELSE 0 END) = 1",
        sa.Boolean,
    )


def vector_length(col: sa.ColumnElement, dialect: str) -> ColumnElement[int]:
    """Length of a valid vector (callers guard with `valid_vector`)."""
    if dialect == "postgresql":
        return sa.case((valid_vector(col, dialect), sa.func.json_array_length(sa.cast(col, sa.JSON))), else_=None)
    table, name = col.table.name, col.name
    return sa.literal_column(
        f"(CASE WHEN json_valid({table}.{name}) THEN json_array_length({table}.{name}) END)", sa.Integer
    )


def needs_embedding(spec: Spec, dialect: str, dimensions: int | None = None) -> ColumnElement[bool]:
    col = spec.embedding
    cond = sa.not_(valid_vector(col, dialect))
    if dimensions:
        cond = sa.or_(cond, vector_length(col, dialect) != dimensions)
    return sa.or_(missing(col), cond)
