"""Revision checksums: a hash of what a revision file does, not of how it is written.

The checksum is a SHA-256 of the module's syntax tree with its docstrings left out, so comments,
docstrings and formatting (whitespace, line breaks, quotes, parentheses, trailing commas) do not
change it, and any change to the code does: an operation, a literal, an import, an annotation.

Why the syntax tree and not the revision's offline SQL: the SQL is not what runs. 001 introspects
the database online and emits only ``CREATE ... IF NOT EXISTS`` offline, so an edit to its
adoption logic would not show in the SQL; producing the SQL of every revision would also cost a
full offline run at each boot. The tree covers online-only logic and costs a parse per file.

What it cannot see: code outside the file. A change to a helper in ``backend/migrations/ops.py``
changes what every revision using it does without changing their checksums, which is why that
module must stay backwards compatible (its docstring says so).

The tree is serialised here rather than with ``ast.dump``, whose output changes between Python
versions (3.12 added ``type_params=[]`` to every function, 3.13 leaves empty fields out): a
Python upgrade would otherwise flag every applied revision as edited. Empty fields are skipped,
so the serialisation is the same on every supported version.

Pure (no files, no database): ``backend/migrations/revisions.py`` reads each revision file once
and computes its checksum from the same parse.
"""

from __future__ import annotations

import ast
import hashlib
import json

# Fields that record how something was written, not what it does: a string's u prefix, and
# type comments (comments, which the tree otherwise leaves out).
_SPELLING_FIELDS = frozenset({"kind", "type_comment", "type_ignores"})
_WITH_DOCSTRING = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def _canonical(node: object) -> object:
    """The tree as plain JSON values: node type and non-empty fields, docstrings left out."""
    if isinstance(node, ast.AST):
        fields: dict[str, object] = {}
        for name, value in ast.iter_fields(node):
            if name in _SPELLING_FIELDS:
                continue
            if name == "body" and isinstance(node, _WITH_DOCSTRING) and value and _is_docstring(value[0]):
                value = value[1:]
            canonical = _canonical(value)
            if canonical is not None and canonical != []:
                fields[name] = canonical
        return [type(node).__name__, fields]
    if isinstance(node, list):
        return [_canonical(item) for item in node]
    if node is None:
        return None
    # Literals: repr keeps 1, 1.0, True, "1" and b"1" apart.
    return repr(node)


def checksum(source: str) -> str:
    """The SHA-256 (hex) of a revision's source, ignoring comments, docstrings and formatting."""
    return tree_checksum(ast.parse(source))


def tree_checksum(tree: ast.Module) -> str:
    """``checksum`` of a module already parsed (the revision reader parses each file once)."""
    return hashlib.sha256(json.dumps(_canonical(tree), separators=(",", ":")).encode()).hexdigest()
