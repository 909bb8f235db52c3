"""Print the scenario format's JSON Schema (kept in ``docs/scenario.schema.json``; a test
checks that the file matches):

    python -m billing.simulate.schema > docs/scenario.schema.json
"""

from __future__ import annotations

import json

from billing.simulate.scenario import scenario_json_schema


def schema_text() -> str:
    return json.dumps(scenario_json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(schema_text(), end="")
