"""Temporal's payload converter, minus its per-payload reflection: the same bytes, the same
values, less CPU.

The SDK's JSON converter (``temporalio.converter.JSONPlainPayloadConverter``) spends a
simulated billing cycle's CPU in two places that depend only on a dataclass's *type*:

- decoding calls ``typing.get_type_hints`` on every dataclass of every payload, which
  evaluates the string annotations (``from __future__ import annotations``) again each time;
- encoding turns a dataclass into a dict with ``dataclasses.asdict``, which deep-copies every
  value before ``json.dumps`` reads it.

``PAYLOAD_CONVERTER`` / ``DATA_CONVERTER`` keep the SDK's converters and their order, and
change only these two steps: a dataclass's field types are looked up once per class, and it
is encoded as a shallow ``{field: value}`` dict whose values the JSON encoder then encodes
as ``asdict``'s copies would have been (nested dataclasses through this same step, datetimes
as ISO 8601). Every payload is byte for byte what the SDK writes, so histories recorded
before decode alike, and clients, workers and replayers with the SDK's default converter
read and write the same payloads (``tests/billing/test_temporal_payloads.py``).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from temporalio.converter import (
    AdvancedJSONEncoder,
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    EncodingPayloadConverter,
    JSONPlainPayloadConverter,
    JSONTypeConverter,
    value_to_type,
)

#: (field name, field type, passed to ``__init__``) for each field of a dataclass.
_FieldPlan = tuple[tuple[str, Any, bool], ...]


class _DataclassJSONEncoder(AdvancedJSONEncoder):
    """The SDK's encoder, with a dataclass as a shallow dict of its fields instead of
    ``dataclasses.asdict``'s deep copy: the encoder reaches the same leaves either way (a
    nested dataclass comes back here; lists, tuples and dicts are walked by ``json``)."""

    def default(self, o: Any) -> Any:
        if isinstance(o, datetime):
            return o.isoformat()
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
        return super().default(o)


class _CachedDataclassHints(JSONTypeConverter):
    """Decodes into a dataclass as the SDK's ``value_to_type`` does, field by field, with the
    class's field types looked up once instead of per payload.

    Only classes the process imported itself are remembered (in ``_PLANS``, shared by every
    converter: a workflow worker makes one per workflow run): a sandboxed workflow imports
    its own copies of the contracts for each run, and remembering those would keep every
    run's modules alive. The SDK decodes those (and everything that is not a dataclass)."""

    def to_typed_value(self, hint: type, value: Any) -> Any:
        if not isinstance(hint, type):
            return JSONTypeConverter.Unhandled  # list[X], X | None, Literal, ...: the SDK's
        plan = _PLANS.get(hint)
        if plan is None:
            plan = _plan(hint)
            if plan is None:
                return JSONTypeConverter.Unhandled
        if not isinstance(value, dict):
            raise TypeError(f"Cannot convert to dataclass {hint}, value is {type(value)} not dict")
        converters = (self,)
        init_values: dict[str, Any] = {}
        other_values: dict[str, Any] = {}
        for name, field_type, init in plan:
            field_value = value.get(name, dataclasses.MISSING)
            if field_value is dataclasses.MISSING:
                continue  # the class's __init__ says whether it was required
            try:
                converted = value_to_type(field_type, field_value, converters)
            except Exception as err:
                raise TypeError(f"Failed converting field {name} on dataclass {hint}") from err
            if init:
                init_values[name] = converted
            else:
                other_values[name] = converted
        decoded = hint(**init_values)
        for name, field_value in other_values.items():
            object.__setattr__(decoded, name, field_value)
        return decoded


#: Each dataclass's fields, by class: only classes of ``_imported_by_this_process``.
_PLANS: dict[Any, _FieldPlan] = {}


def _plan(hint: Any) -> _FieldPlan | None:
    """The dataclass ``hint``'s fields and their types (remembered), or None for anything
    else the SDK should decode."""
    if not (
        isinstance(hint, type)
        and dataclasses.is_dataclass(hint)
        # The SDK reads a dataclass that is also a mapping as a mapping.
        and not issubclass(hint, Mapping)
        and _imported_by_this_process(hint)
    ):
        return None
    field_types = typing.get_type_hints(hint)
    plan = tuple((f.name, field_types[f.name], f.init) for f in dataclasses.fields(hint))
    _PLANS[hint] = plan
    return plan


def _imported_by_this_process(cls: type) -> bool:
    """Whether ``cls`` is what its module in ``sys.modules`` names (not a sandbox's copy, nor a
    class made in a function)."""
    found: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is cls


def _with_cached_json(
    converters: tuple[EncodingPayloadConverter, ...],
) -> tuple[EncodingPayloadConverter, ...]:
    """The SDK's default converters in their order, its JSON one replaced by ours."""
    replaced = tuple(
        JSONPlainPayloadConverter(
            encoder=_DataclassJSONEncoder, custom_type_converters=[_CachedDataclassHints()]
        )
        if type(c) is JSONPlainPayloadConverter
        else c
        for c in converters
    )
    if replaced == converters:
        raise RuntimeError("temporalio's default payload converters have no JSON converter")
    return replaced


class BillingPayloadConverter(CompositePayloadConverter):
    """``DefaultPayloadConverter`` with the JSON converter described above (no arguments: the
    workflow worker instantiates it per workflow)."""

    def __init__(self) -> None:
        super().__init__(
            *_with_cached_json(DefaultPayloadConverter.default_encoding_payload_converters)
        )


#: For ``Client.connect`` and the test environments: workers use their client's.
DATA_CONVERTER = DataConverter(payload_converter_class=BillingPayloadConverter)
