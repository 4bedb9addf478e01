"""The data model of a synthesised domain: tables of flat records with typed fields, and its validators.

A data model is `{"tables": {name: {"description", "key", "key_prefix", "fields": {field: spec}}}}`; a field spec
has a `type` (string, integer, number, boolean) and optionally `enum`, `ref` (a table whose key it holds),
`unique`, `nullable`, `minimum`, `maximum`. A database is `{table: {key: record}}`. Every error names its place
(`table/key.field: problem`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema

FIELD_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def check_data_model(data_model: Mapping[str, Any]) -> list[str]:
    """Structural errors of a data model `{"tables": {name: {"key", "description", "fields": {...}}}}`."""
    tables = data_model.get("tables") if isinstance(data_model, Mapping) else None
    if not isinstance(tables, Mapping) or not tables:
        return ["data model: 'tables' must be a non-empty object"]
    errors: list[str] = []
    for name, table in tables.items():
        fields = table.get("fields") if isinstance(table, Mapping) else None
        if not isinstance(fields, Mapping) or not fields:
            errors.append(f"table {name}: 'fields' must be a non-empty object")
            continue
        key = table.get("key")
        if not isinstance(key, str) or not isinstance(fields.get(key), Mapping) or fields[key].get("type") != "string":
            errors.append(f"table {name}: key {key!r} must name a string field")
        if not isinstance(table.get("key_prefix", ""), str):
            errors.append(f"table {name}: key_prefix must be a string")
        for fname, spec in fields.items():
            where = f"{name}.{fname}"
            if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str) or spec["type"] not in FIELD_TYPES:
                errors.append(f"{where}: type must be one of {sorted(FIELD_TYPES)}")
                continue
            if "ref" in spec and (not isinstance(spec["ref"], str) or spec["ref"] not in tables):
                errors.append(f"{where}: ref {spec['ref']!r} is not a table")
            for bound in ("minimum", "maximum"):
                value = spec.get(bound)
                if bound in spec and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    errors.append(f"{where}: {bound} must be a number")
            if "enum" in spec:
                enum = spec["enum"]
                ok = isinstance(enum, list) and enum and all(_is_type(v, spec["type"]) for v in enum)
                if not ok:
                    errors.append(f"{where}: enum must be a non-empty list of {spec['type']} values")
    return errors


def _is_type(value: Any, type_name: str) -> bool:
    if isinstance(value, bool) and type_name != "boolean":
        return False
    return isinstance(value, FIELD_TYPES[type_name])


def record_schema(table: Mapping[str, Any]) -> dict:
    """The JSON schema of one record of a table (every field required, nothing extra)."""
    properties = {}
    for fname, spec in table["fields"].items():
        prop: dict[str, Any] = {"type": [spec["type"], "null"] if spec.get("nullable") else spec["type"]}
        if "enum" in spec:
            prop["enum"] = list(spec["enum"]) + ([None] if spec.get("nullable") else [])
        prop.update({k: spec[k] for k in ("minimum", "maximum") if k in spec})
        properties[fname] = prop
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def check_record(data_model: Mapping, db: Mapping, table_name: str, key: str, record: Any) -> list[str]:
    """Errors of one record: schema, key consistency, references to existing records, unique fields."""
    table = data_model["tables"][table_name]
    where = f"{table_name}/{key}"
    validator = jsonschema.Draft202012Validator(record_schema(table))
    errors = [f"{where}.{'.'.join(map(str, e.path)) or '(record)'}: {e.message}" for e in validator.iter_errors(record)]
    if errors:
        return errors
    if record[table["key"]] != key:
        errors.append(f"{where}: field {table['key']} is {record[table['key']]!r}, not its key")
    for fname, spec in table["fields"].items():
        value = record[fname]
        target = db.get(spec["ref"]) if "ref" in spec else None
        if "ref" in spec and value is not None and (not isinstance(target, Mapping) or value not in target):
            errors.append(f"{where}.{fname}: no {spec['ref']} record {value!r}")
        if spec.get("unique") and value is not None:
            clash = [k for k, r in db.get(table_name, {}).items()
                     if k != key and isinstance(r, Mapping) and r.get(fname) == value]
            if clash:
                errors.append(f"{where}.{fname}: {value!r} is not unique (also {clash[0]})")
    return errors


def check_database(data_model: Mapping, db: Any) -> list[str]:
    """Every error of a database against its data model (an empty list when it validates)."""
    if not isinstance(db, Mapping):
        return ["database: must be an object of tables"]
    tables = data_model["tables"]
    errors = [f"database: unknown table {name!r}" for name in db if name not in tables]
    for name in tables:
        records = db.get(name)
        if not isinstance(records, Mapping):
            errors.append(f"database: table {name!r} missing or not an object")
            continue
        for key, record in records.items():
            errors += check_record(data_model, db, name, key, record)
    return errors
