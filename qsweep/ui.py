"""``python -m qsweep.ui``: the MLflow UI over a store, landing on qsweep's runs table (``make ui``).

MLflow 3.17 has no server option for its "MLflow Assistant" panel: the UI opens it once per browser
when the server's address is localhost or 127.0.0.1 (close it with its x; it stays closed).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
import webbrowser
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qsweep.tracking import Recorder

START_TIMEOUT_S = 120.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(store: str, host: str, port: int, log=None) -> Iterator[tuple[str, subprocess.Popen]]:
    """An MLflow server over ``store`` on ``host:port``, answering for the ``with`` block: its base URL and process.

    Without MLflow's job runner: seven more Python processes that serve GenAI jobs, none of them a qsweep run's.
    """
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                             "--host", host, "--port", str(port), "--workers", "1"], stdout=log, stderr=log, env=env)
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the MLflow server on {base} did not start (exit {proc.poll()})") from None
                time.sleep(0.5)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def has_display() -> bool:
    """Whether a browser opened here would show: a desktop session (a headless box may run a text browser)."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qsweep.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}", help="tracking URI")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--experiment", default="qsweep")
    parser.add_argument("--no-browser", action="store_true", help="only print the runs table's link")
    args = parser.parse_args(argv)
    url = Recorder(args.store, args.experiment).runs_url(f"http://{args.host}:{args.port}")
    with mlflow_server(args.store, args.host, args.port) as (base, proc):
        print(f"MLflow UI on {base}; runs of experiment {args.experiment!r}, by score:\n  {url}", flush=True)
        if not args.no_browser and has_display():
            webbrowser.open(url)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # Ctrl-C stops the server too
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
