"""The one results store: one durable JSON record per finished run, written atomically.

``results/<experiment>/records/<cell id>.json`` holds the cell (coordinates and the full threat spec), the attack's
result (metrics, curve, queries, wall time, versions) and where its artifacts are. A record exists only once its run
finished, so a kill at any moment loses no finished record; a re-run skips every cell that has one.
"""

import json
import pathlib

from toolkit.artifacts import now
from toolkit.training.checkpoint import atomic_write_json


class ResultsStore:
    def __init__(self, root):
        self.root = pathlib.Path(root)
        self.records = self.root / "records"

    def path(self, cell_id):
        return self.records / f"{cell_id}.json"

    def done(self, cell_id):
        return self.path(cell_id).exists()

    def put(self, cell, result, run_folder):
        record = {"id": cell["id"], "cell": {k: v for k, v in cell.items() if k != "threat_spec"},
                  "threat_spec": cell["threat_spec"], "run_folder": str(run_folder), "recorded": now(),
                  "result": {k: v for k, v in result.items() if k != "spec"}}
        atomic_write_json(self.path(cell["id"]), record)
        return record

    def get(self, cell_id):
        return json.loads(self.path(cell_id).read_text())

    def all(self):
        if not self.records.exists():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.records.glob("*.json"))]
