"""Faults lose nothing: parallel first use of a store, kills, a full disk, failed multirun jobs, early checks."""

import multiprocessing
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from qsweep import app
from qsweep.errors import QsweepError
from qsweep.files import OutputError, atomic_write, ensure_space, free_mb
from qsweep.hydra_callbacks import FAILED_FILE
from qsweep.job import EnvironmentCheckError
from qsweep.tracking import Recorder, TrackingError

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def compose_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false",
                                             *overrides])


def runs_of(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("qsweep")
    return client, client.search_runs([exp.experiment_id]) if exp else []


def _first_use(uri: str, barrier, results) -> None:
    barrier.wait()  # all processes open the new store at once
    try:
        rec = Recorder(uri, "qsweep")
        rec.start("parallel", {})
        rec.finish()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"{type(exc).__name__}: {exc}")


def test_parallel_first_runs_share_a_new_store_safely(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # fork: the children need only qsweep.tracking, already imported here (spawned, each re-imported this
    # module, torch and all, for ~8 s of CPU); each still opens the new store on its own, at once
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_first_use, args=(uri, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    assert outcomes == ["ok"] * 3
    _, found = runs_of(uri)
    assert sorted(r.info.status for r in found) == ["FINISHED"] * 3
    assert MlflowClient(uri).get_experiment_by_name("qsweep").tags["mlflow.experimentKind"] == \
        "custom_model_development"


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_a_run_whose_process_was_killed_is_marked_killed_by_the_next_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    victim = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom qsweep.tracking import Recorder\n"
         f"print(Recorder({uri!r}, 'qsweep').start('victim', {{}}), flush=True)\ntime.sleep(3600)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    run_id = victim.stdout.readline().strip()
    victim.kill()
    victim.wait()
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # a zombie, until someone looks

    alive = Recorder(uri, "qsweep")
    alive.start("alive", {})
    assert client.get_run(run_id).info.status == "KILLED"
    assert f":{victim.pid}) is gone" in client.get_run(run_id).data.tags["error"]
    assert alive.reap_dead_runs() == []  # this process's own running run is left alone
    assert client.get_run(alive.run_id).info.status == "RUNNING"


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_sigterm_marks_the_run_killed_and_leaves_no_result(tmp_path, digits_vit):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qsweep", f"hydra.run.dir={run_dir}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
         "progress=false"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # config.yaml is written once the MLflow run exists; quantizing, evaluating and exporting follow
    while not (run_dir / "config.yaml").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    (run,) = runs_of(f"sqlite:///{tmp_path}/mlflow.db")[1]
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["error"]
    assert "SIGTERM" in (run_dir / FAILED_FILE).read_text()
    assert not (run_dir / "result.json").exists()
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_a_multirun_with_failed_jobs_exits_nonzero_and_fails_its_parent(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run(
        [sys.executable, "-m", "qsweep", "-m", "seed=0,1", "data=cifar100", f"data.root={tmp_path}/no_such_data",
         f"hydra.sweep.dir={tmp_path}/sweep", f"tracking.uri={uri}", "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "2 of 2 jobs of the multirun" in proc.stderr and "no_such_data" in proc.stderr
    client, found = runs_of(uri)
    (parent,) = [r for r in found if r.data.tags.get("qsweep.kind") == "sweep"]
    assert parent.info.status == "FAILED" and parent.data.tags["error"] == "2 of 2 jobs failed"
    assert sorted(r.info.status for r in found if r is not parent) == ["FAILED", "FAILED"]


def test_a_full_disk_is_refused_before_export_naming_the_path(tmp_path):
    target = tmp_path / "quantized.pt2"
    with pytest.raises(OutputError, match=f"No space left on device for {target}"):
        ensure_space(target, free_mb(tmp_path) + 1024)
    ensure_space(target, 1.0)


def _write_big_tensor_under_a_file_size_limit(path: str) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    atomic_write(Path(path), lambda tmp: torch.save(torch.zeros(1 << 20), tmp))


def test_a_failed_write_names_the_file_and_leaves_nothing_under_its_name(tmp_path):
    target = tmp_path / "quantized.pt2"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        with pytest.raises(OutputError, match=f"cannot write {target}"):
            pool.apply(_write_big_tensor_under_a_file_size_limit, (str(target),))
    assert list(tmp_path.iterdir()) == []  # neither a truncated artifact nor a temp file


# ``python -m qsweep ARGS`` under a file-size limit: a write past it fails with EFBIG, as on a full disk.
# Set here and exec'd (the limit and the ignored signal carry over): no code runs between fork and exec.
UNDER_FILE_SIZE_LIMIT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
os.execv(sys.executable, [sys.executable, "-m", "qsweep", *sys.argv[2:]])
"""


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_a_write_failing_mid_artifact_is_exit_1_with_the_error_not_an_abort(tmp_path, digits_vit):
    uri, run_dir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    Recorder(uri, "qsweep")  # the store exists before the limit: the run only adds its records to it
    limit = (tmp_path / "mlflow.db").stat().st_size + 128 * 1024  # room for those, not for the 1.4 MB artifact
    proc = subprocess.run([sys.executable, "-c", UNDER_FILE_SIZE_LIMIT, str(limit), f"hydra.run.dir={run_dir}",
                           f"tracking.uri={uri}", "progress=false"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # not -6: SIGABRT (134 in a shell) from torch at exit
    artifact = run_dir / "quantized.pt2"
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("qsweep: error:")]
    assert line.startswith(f"qsweep: error: cannot write {artifact}: ") and "file-size limit" in line
    assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr
    (run,) = runs_of(uri)[1]
    assert run.info.status == "FAILED" and f"cannot write {artifact}" in run.data.tags["error"]
    assert f"cannot write {artifact}" in (run_dir / FAILED_FILE).read_text()
    assert not artifact.exists() and not [p for p in run_dir.iterdir() if ".tmp" in p.name]


@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_checks_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cache_dir=.*is not writable"):
        app.run(compose_cfg(tmp_path, f"cache_dir={blocker}/cache"), tmp_path / "out")
    assert "cache_dir" in (tmp_path / "out" / FAILED_FILE).read_text()
    with pytest.raises(OutputError, match="run's output folder"):
        app.run(compose_cfg(tmp_path), blocker / "out")
    if not torch.cuda.is_available():
        with pytest.raises(EnvironmentCheckError, match="device='cuda' but this torch sees no CUDA GPU"):
            app.run(compose_cfg(tmp_path, "device=cuda"), tmp_path / "out")
    try:
        import executorch  # noqa: F401
    except ImportError:
        with pytest.raises(EnvironmentCheckError, match="export.pte=true needs ExecuTorch"):
            app.run(compose_cfg(tmp_path, "export.pte=true"), tmp_path / "out")
    _, found = runs_of(f"sqlite:///{tmp_path}/mlflow.db")  # each refusal is a FAILED run with its reason
    assert found and all(r.info.status == "FAILED" and r.data.tags["error"] for r in found)
    assert any("cache_dir" in r.data.tags["error"] for r in found)


@pytest.mark.xdist_group("serial")  # binds a port on 127.0.0.1 (see conftest.py)
def test_an_unreachable_tracking_server_is_named_within_seconds(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingError, match=f"tracking.uri='http://127.0.0.1:{port}' cannot be reached"):
        app.run(compose_cfg(tmp_path, f"tracking.uri=http://127.0.0.1:{port}"), tmp_path / "out")


def test_nan_weights_name_the_tensor_and_the_file(tmp_path, digits_vit):
    state = {k: v.clone() for k, v in digits_vit.state_dict().items()}
    name = next(k for k, v in state.items() if k.endswith("weight") and v.ndim == 2)
    state[name][0, 0] = float("nan")
    ckpt = tmp_path / "diverged.pt"
    torch.save(state, ckpt)
    with pytest.raises(QsweepError, match=rf"diverged.pt.*tensor '{name}' holds 1 NaN or infinite values"):
        app.run(compose_cfg(tmp_path, f"model.checkpoint={ckpt}", "tracking.enabled=false"), tmp_path / "out")


def test_a_run_can_be_named_on_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "qsweep", "name=my_try", "--cfg", "job"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\nname: my_try\n" in proc.stdout
