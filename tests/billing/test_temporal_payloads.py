"""The project's Temporal data converter writes the SDK's payloads byte for byte and reads
them into the same values, while looking a dataclass's field types up once per class
instead of once per payload (``billing.temporal_payloads``).

The payloads compared are every typed payload of every recorded history (tests/histories,
old versions included): workflow inputs and continue-as-new inputs, activity inputs and
results (local activities' from their markers), signals, and updates with their results."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import temporalio.activity
import temporalio.workflow
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter

import activities
import billing.temporal_payloads as temporal_payloads
import workflows
from billing.contracts import SubscriptionWorkflowInput
from billing.temporal_payloads import DATA_CONVERTER

HISTORIES = sorted((Path(__file__).parents[1] / "histories").rglob("*.json"))
SDK = DataConverter.default.payload_converter
OURS = DATA_CONVERTER.payload_converter


@dataclass(frozen=True)
class _Types:
    #: Activity name: (argument type, result type).
    activities: dict[str, tuple[Any, Any]]
    #: Workflow type: its definition (input, result, signals, updates).
    workflows: dict[str, Any]


def _types() -> _Types:
    found: dict[str, tuple[Any, Any]] = {}
    for module_info in pkgutil.iter_modules(activities.__path__):
        module = importlib.import_module(f"activities.{module_info.name}")
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and cls.__module__ == module.__name__):
                continue
            for attribute in vars(cls).values():
                definition = (
                    temporalio.activity._Definition.from_callable(attribute)
                    if callable(attribute)
                    else None
                )
                if definition is not None and definition.name:
                    argument = definition.arg_types[0] if definition.arg_types else None
                    found[definition.name] = (argument, definition.ret_type)
    defined: dict[str, Any] = {}
    for module_info in pkgutil.iter_modules(workflows.__path__):
        module = importlib.import_module(f"workflows.{module_info.name}")
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == module.__name__:
                definition = temporalio.workflow._Definition.from_class(cls)
                if definition is not None and definition.name:
                    defined[definition.name] = definition
    return _Types(found, defined)


def _typed(payloads: Payloads, hints: Any) -> Iterator[tuple[Payload, Any]]:
    for payload, hint in zip(payloads.payloads, hints or [], strict=False):
        if hint is not None:
            yield payload, hint


def typed_payloads(events: list[HistoryEvent], types: _Types) -> Iterator[tuple[Payload, Any]]:
    """Each payload of the history with the type its reader decodes it as."""
    scheduled: dict[int, str] = {}
    updates: dict[str, str] = {}
    workflow: Any = None
    for event in events:
        if event.HasField("workflow_execution_started_event_attributes"):
            started = event.workflow_execution_started_event_attributes
            workflow = types.workflows[started.workflow_type.name]
            yield from _typed(started.input, workflow.arg_types)
        elif event.HasField("workflow_execution_continued_as_new_event_attributes"):
            continued = event.workflow_execution_continued_as_new_event_attributes
            yield from _typed(
                continued.input, types.workflows[continued.workflow_type.name].arg_types
            )
        elif event.HasField("workflow_execution_completed_event_attributes"):
            completed = event.workflow_execution_completed_event_attributes
            yield from _typed(completed.result, [workflow.ret_type])
        elif event.HasField("activity_task_scheduled_event_attributes"):
            activity = event.activity_task_scheduled_event_attributes
            scheduled[event.event_id] = activity.activity_type.name
            yield from _typed(activity.input, [types.activities[activity.activity_type.name][0]])
        elif event.HasField("activity_task_completed_event_attributes"):
            result = event.activity_task_completed_event_attributes
            name = scheduled[result.scheduled_event_id]
            yield from _typed(result.result, [types.activities[name][1]])
        elif event.HasField("marker_recorded_event_attributes"):
            marker = event.marker_recorded_event_attributes
            if marker.marker_name == "core_local_activity" and "result" in marker.details:
                data = json.loads(marker.details["data"].payloads[0].data)
                hint = types.activities[data["activity_type"]][1]
                yield from _typed(marker.details["result"], [hint])
        elif event.HasField("workflow_execution_signaled_event_attributes"):
            signal = event.workflow_execution_signaled_event_attributes
            yield from _typed(signal.input, workflow.signals[signal.signal_name].arg_types)
        elif event.HasField("workflow_execution_update_accepted_event_attributes"):
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            update = workflow.updates[request.input.name]
            updates[request.meta.update_id] = request.input.name
            yield from _typed(request.input.args, update.arg_types)
        elif event.HasField("workflow_execution_update_completed_event_attributes"):
            done = event.workflow_execution_update_completed_event_attributes
            name = updates[done.meta.update_id]
            if done.outcome.HasField("success"):
                yield from _typed(done.outcome.success, [workflow.updates[name].ret_type])


def test_every_recorded_payload_decodes_alike_and_encodes_to_the_same_bytes() -> None:
    types = _types()
    compared = 0
    dataclass_types: set[type] = set()
    for path in HISTORIES:
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        for payload, hint in typed_payloads(list(history.events), types):
            theirs = SDK.from_payloads([payload], [hint])[0]
            ours = OURS.from_payloads([payload], [hint])[0]
            assert ours == theirs and type(ours) is type(theirs), f"{path.name}: {hint}"
            assert OURS.to_payloads([ours]) == SDK.to_payloads([theirs]), f"{path.name}: {hint}"
            compared += 1
            if dataclasses.is_dataclass(ours):
                dataclass_types.add(type(ours))
    # Enough of the contracts to mean something: the recordings cover dozens of them.
    assert compared > 2000
    assert len(dataclass_types) > 30


def test_a_dataclass_s_field_types_are_looked_up_once_per_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looked_up: list[type] = []
    real = typing.get_type_hints

    def counting(obj: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        looked_up.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(typing, "get_type_hints", counting)
    monkeypatch.setattr(temporal_payloads, "_PLANS", {})
    payload = SDK.to_payloads([_subscription_input()])[0]
    for _ in range(5):
        decoded = OURS.from_payloads([payload], [SubscriptionWorkflowInput])[0]
        assert decoded == _subscription_input()
    assert looked_up, "decoded without looking the field types up at all?"
    assert len(looked_up) == len(set(looked_up)), f"looked up more than once: {looked_up}"


def test_encoding_does_not_deep_copy_through_asdict(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = SDK.to_payloads([_subscription_input()])

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("dataclasses.asdict called")

    monkeypatch.setattr(dataclasses, "asdict", refused)
    assert OURS.to_payloads([_subscription_input()]) == expected


def test_a_class_not_importable_by_its_name_is_decoded_but_not_remembered() -> None:
    # What a sandboxed workflow's own copy of a contract looks like from here.
    @dataclass
    class Local:
        at: datetime
        amounts: list[int]

    value = Local(datetime(2030, 1, 31, tzinfo=UTC), [1, 2])
    payload = SDK.to_payloads([value])[0]
    assert OURS.to_payloads([value])[0] == payload
    assert OURS.from_payloads([payload], [Local])[0] == value
    assert Local not in temporal_payloads._PLANS


def _subscription_input() -> SubscriptionWorkflowInput:
    history = WorkflowHistory.from_json("h", HISTORIES[0].read_text())
    started = history.events[0].workflow_execution_started_event_attributes
    value: SubscriptionWorkflowInput = SDK.from_payloads(
        list(started.input.payloads), [SubscriptionWorkflowInput]
    )[0]
    return value
