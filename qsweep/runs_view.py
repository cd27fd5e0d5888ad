"""The MLflow UI's runs table as qsweep shows it: sorted by score, with the columns people compare.

MLflow 3.17's UI keeps a runs-table view in an experiment tag ``mlflow.sharedViewState.<key>`` (what its
"Share" and "Save as new view" write) and opens it for ``?viewStateShareKey=<key>``: the search facets
(``orderByKey``, ``orderByAsc``, ``searchFilter``, ...) and the table's state (``selectedColumns``,
``columnOrder``, ``columnWidths``). Its columns are ``metrics.`KEY```, ``params.`KEY``` and
``attributes.`Models```-style ids. ``workflowType=machine_learning`` opens the model-training pages:
the UI picks GenAI or model training from that (or the browser's last choice), not from the experiment's
``mlflow.experimentKind`` tag.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

VIEW_KEY = "qsweep"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_NAME = "qsweep: by score"

# Left to right after the run's name (a laptop screen shows the first ones beside MLflow's side panels).
METRICS = ("score", "top1", "size_mb", "fp_top1", "delta_top1", "compression", "avg_weight_bits", "lab_score")
PARAMS = ("quant.name", "model.name", "data.name", "rounding")
ATTRIBUTES = ("Models", "Dataset")
WIDTHS = {"score": 70, "top1": 90, "size_mb": 85, "fp_top1": 90, "delta_top1": 95, "compression": 105,
          "avg_weight_bits": 125, "lab_score": 85}


def column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def view_state() -> dict:
    """Sorted by score (best first); the compared metrics and recipe params shown, first after the run name."""
    columns = ([column("metrics", k) for k in METRICS] + [column("params", k) for k in PARAMS]
               + [column("attributes", k) for k in ATTRIBUTES])
    return {"orderByKey": column("metrics", "score"), "orderByAsc": False, "selectedColumns": columns,
            "columnOrder": [column("attributes", "Run Name"), *columns],
            "columnWidths": {column("metrics", k): w for k, w in WIDTHS.items()}}


def view_tag_value(now_ms: int) -> str:
    """The tag's value: the envelope of a saved view (``name``, ``createdAt``, ``updatedAt``, ``state`` as JSON)."""
    return json.dumps({"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(view_state())})


def is_current(value: str | None) -> bool:
    """Whether a tag's ``value`` holds this view (whenever it was written)."""
    try:
        return json.loads(json.loads(value)["state"]) == view_state()
    except (TypeError, ValueError, KeyError):
        return False


def runs_url(ui: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI at ``ui``, opened on qsweep's view."""
    query = urlencode({"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY})
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
