"""``make ui-check``: a README walk-through into a fresh MLflow store, then headless Chromium screenshots of the
runs-table link the runs print and of ``make ui``'s landing page, into a folder it prints.

It also checks what they must show: top-1, size and score columns in the runs table, and fewer than 40
param columns in the experiment. Needs Chromium (``make ui-check`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from qsweep.tracking import Recorder
from qsweep.ui import free_port, mlflow_server

WALK = [  # README commands, small and fast on the embedded default
    ["quant=w8a8"],
    ["quant.skip=[head]", "++quant.layers={blocks.0.*: {w_bits: 8}}"],
    ["-m", "quant.act.observer=minmax,percentile"],
]
SHOTS = {"runs_table.png": (1920, 1080), "runs_table_wide.png": (3000, 900),  # wide: the Models, Dataset columns
         "make_ui_landing.png": (1440, 900), "mlflow_home.png": (1440, 900)}
SHOWN = ("top1", "size_mb", "score")
MAX_PARAM_COLUMNS = 40
RENDER_MS = 15000  # virtual time for the JS app to fetch the runs and render before the shot


def qsweep(folder: Path, args: list[str]) -> str:
    """``python -m qsweep ARGS`` from ``folder``, so its default store is ``folder/mlflow.db``; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    print(f"$ python -m qsweep {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "qsweep", *args, "progress=false"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode:
        raise SystemExit(f"ui-check: python -m qsweep {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("ui-check: no chromium on PATH (Debian: apt-get install chromium)")


def browse(browser: str, url: str, size: tuple[int, int], *action: str) -> str:
    """Headless Chromium on ``url`` after :data:`RENDER_MS` of virtual time, doing ``action``; its stdout."""
    # --no-sandbox: Chromium refuses to run as root with its sandbox (containers, CI)
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={RENDER_MS}", *action, url],
                          capture_output=True, text=True, timeout=300)
    return proc.stdout


def param_columns(store: str) -> int:
    """Param columns the experiment's runs table offers: the union of its runs' param keys."""
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("qsweep").experiment_id], max_results=1000)
    return len({key for run in runs for key in run.data.params})


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="qsweep-ui-check-"))
    printed = [m for args in WALK for m in re.findall(r"runs table\s+(http\S+)", qsweep(folder, args))]
    store = f"sqlite:///{folder / 'mlflow.db'}"
    browser = chromium()
    with open(folder / "mlflow-server.log", "w") as log, \
            mlflow_server(store, "127.0.0.1", free_port(), log=log) as (base, _):
        printed_url = printed[0].replace("http://127.0.0.1:5000", base)  # as a run prints it
        urls = {"runs_table.png": printed_url, "runs_table_wide.png": printed_url,
                "make_ui_landing.png": Recorder(store, "qsweep").runs_url(base),  # what `make ui` opens
                "mlflow_home.png": base + "/"}
        for name, url in urls.items():
            browse(browser, url, SHOTS[name], f"--screenshot={folder / name}")
            print(f"{folder / name}: {url}", flush=True)
        columns = set(re.findall(r'col-id="([^"]+)"', browse(browser, urls["runs_table.png"], SHOTS["runs_table.png"],
                                                              "--dump-dom")))
    missing = [key for key in SHOWN if f"metrics.`{key}`" not in columns]
    params = param_columns(store)
    print(f"runs table columns: {', '.join(sorted(columns))}\nparam columns in the experiment: {params}")
    ok = not missing and params < MAX_PARAM_COLUMNS
    print(f"ui-check {'passed' if ok else 'FAILED'}: screenshots in {folder}"
          + (f"; not shown: {', '.join(missing)}" if missing else "")
          + (f"; {params} param columns (limit {MAX_PARAM_COLUMNS})" if params >= MAX_PARAM_COLUMNS else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
