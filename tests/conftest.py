"""Shared fixtures. Add yours below; keep the session cache fixtures.

``make test`` runs the suite on pytest-xdist workers, one per core (``-n auto``, ``--dist loadgroup``
from pyproject.toml). All workers of a run share one throwaway qsweep cache, so the digits ViT is
trained, and each FP32 reference measured, once per run rather than once per worker. Tests that
must not overlap one another carry ``@pytest.mark.xdist_group("serial")``: one worker runs them all,
one after another.

Most tests that record runs do so into a throwaway SQLite store, ``tmp_path/mlflow.db``. MLflow creates and
migrates a new store's schema on first use, seconds of CPU each time: the ``mlflow_store`` fixture starts a
test's store as a copy of one migrated once per run instead. Tests of a new store's first use (several
processes creating it at once) do not use it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qsweep.locks import file_lock


def _worker(config) -> str | None:
    """This process's xdist worker id ("gw0", ...), or None when not running under xdist."""
    return getattr(config, "workerinput", {}).get("workerid")


def pytest_configure(config):
    # No MLflow telemetry thread (mlflow decides when imported, at collection, before pytest marks a test
    # as running): no network from the tests, and no thread to hold a lock when a test forks.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if _worker(config):
        # One worker per core: one torch thread each, in the CLI processes they start too; more threads
        # only spin-wait on cores the other workers are using (the digits ViT's ops are tiny anyway).
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def _uses_digits_vit(item) -> bool:
    return "digits_vit" in getattr(item, "fixturenames", ())


# Seconds each of the longest tests takes on a worker (2 idle cores, `make test`), by module::function (all
# of a function's parameter sets): ``pytest_collection_modifyitems`` starts them first. A test not named
# here counts as SLOW_S if marked ``slow``, else 0 (these keep their file order). Rough is enough: an
# outdated entry only moves a test in the queue.
COST_S = {
    "test_search_workers.py::test_a_killed_worker_trial_is_retried_journal": 27,
    "test_search_workers.py::test_a_killed_worker_trial_is_retried_sqlite": 27,
    "test_launchers.py::test_a_launcher_runs_the_grid_and_loses_no_job": 28,
    "test_search_workers.py::test_two_processes_share_one_journal_study": 24,
    "test_multirun_summary.py::test_a_multirun_prints_and_logs_one_table_and_names_the_key_without_effect": 20,
    "test_ui.py::test_mlflow_server_on_loopback_serves_the_study": 20,
    "test_hf_search.py::test_hf_deit_lab_search_grades_the_best_layout": 19,
    "test_faults.py::test_a_write_failing_mid_artifact_is_exit_1_with_the_error_not_an_abort": 18,
    "test_search_budget.py::test_a_budgeted_pareto_study_evaluates_only_layouts_that_fit_and_its_best_run_"
    "reproduces_it": 16,
    "test_readme_commands.py::test_the_clipping_example_runs_and_warns_once": 15,
    "test_untrusted_artifacts.py::test_cli_refuses_with_exit_2_and_trust_flag_skips_the_check": 14,
    "test_hf.py::test_hf_vit_run_end_to_end_with_post_ln": 13,
    "test_readme_commands.py::test_the_default_command_runs_prints_its_result_and_registers_the_best_model": 12,
    "test_faults.py::test_a_multirun_with_failed_jobs_exits_nonzero_and_fails_its_parent": 12,
    "test_analysis.py::test_analyze_cnn_with_batchnorm": 12,
    "test_hf_search.py::test_hf_deit_runs_the_lab_recipe_once_its_timm_rule_is_renamed": 12,
    "test_faults.py::test_sigterm_marks_the_run_killed_and_leaves_no_result": 11,
    "test_deit_artifact.py::test_deit_s_w4_artifact_size": 11,
    "test_search.py::test_study_end_to_end_records_parent_and_trials_and_resumes": 11,
    "test_swap_identity.py::test_cnn_w4a8_on_a_depthwise_separable_net": 10,
    "test_servers.py::test_a_silent_postgresql_tracking_store_is_an_error_within_seconds": 10,
    "test_servers.py::test_a_silent_postgresql_study_storage_is_an_error_within_seconds": 10,
    "test_servers.py::test_a_silent_http_tracking_server_is_an_error_within_seconds": 10,
    "test_runs_table.py::test_the_readme_glob_example_is_a_finished_run_that_compares": 9,
    "test_app.py::test_analyze_mode_writes_and_logs_plots": 9,
    "test_lab_eval.py::test_cli_table_json_and_errors": 9,
    "test_search_interrupt.py::test_an_interrupted_search_retries_its_layout_and_its_runs_say_so": 9,
    "test_swap_identity.py::test_w8a8_int_layers_compute_the_fake_quant_layers": 8,
    "test_readme_commands.py::test_a_readme_command_runs_as_written": 8,
    "test_analysis.py::test_analyze_digits_vit": 8,
    "test_search_budget.py::test_a_layouts_size_is_its_exported_artifacts_bytes_exactly": 8,
    "test_lab_run.py::test_lab_run_on_fabricated_cifar": 8,
    "test_faults.py::test_a_failed_write_names_the_file_and_leaves_nothing_under_its_name": 7,
    "test_ui.py::test_the_runs_table_link_names_the_experiment": 7,
    "test_hf_attention.py::test_hf_attn_matmul_through_the_app": 7,
    "test_intops.py::test_export_round_trip_and_int_backend": 7,
    "test_search.py::test_a_search_composes_with_adaround_lsq_and_vit_options": 7,
    "test_search.py::test_a_study_of_the_same_name_with_another_space_is_refused": 7,
    "test_intkernel_attention.py::test_digits_vit_int_attention": 7,
    "test_hf_attention.py::test_hf_attn_matmul_int_backend_and_artifacts": 6,
    "test_hostile_inputs.py::test_a_legal_hugging_face_folder_runs_and_writes_only_its_run_folder": 6,
    "test_faults.py::test_a_run_whose_process_was_killed_is_marked_killed_by_the_next_run": 6,
    "test_intexport.py::test_digits_vit_int_artifact_reproduces_the_int_backend": 6,
}
SLOW_S = 10


def _cost_s(item) -> float:
    """COST_S's estimate for ``item`` (its module::function)."""
    key = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
    return COST_S.get(key, SLOW_S if item.get_closest_marker("slow") else 0)


def _groups(item) -> list[str]:
    """The item's ``xdist_group`` names, sorted."""
    return sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                   for m in item.iter_markers("xdist_group")})


def _join_groups(items) -> None:
    """Give each grouped test its ``@group`` nodeid suffix, the one thing ``--dist loadgroup`` reads.

    pytest-xdist 3.8 adds it by writing ``item._nodeid``; pytest 9.2 keeps a structured ``item._id``
    and no longer reads that attribute, so the suffix silently went missing and xdist spread each
    group's tests over all workers (pytest-xdist#1386). Where xdist's suffix took, nothing is changed.
    """
    for item in items:
        names = _groups(item)
        if not names:
            continue
        suffix = "@" + "_".join(names)
        if item.nodeid.endswith(suffix):
            continue
        if hasattr(item, "_id"):  # pytest >= 9.2
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(item.nodeid + suffix)
        else:
            item._nodeid = item.nodeid + suffix


@pytest.hookimpl(trylast=True)  # after xdist's own hook, which adds the group suffix where it can
def pytest_collection_modifyitems(config, items):
    """Under xdist, the serial group made one unit, and an order that keeps both cores busy (a plain
    ``pytest`` keeps the file order).

    xdist hands out the tests in this order (the serial group first, being its largest unit). One worker
    trains the digits ViT before its first test (``_digits_vit_early``); the tests that do not need the
    ViT come first, so the other worker runs them meanwhile instead of waiting for the training, and the
    ViT's tests follow (in the serial group too: its tests without the ViT first). Within each part the
    longest tests (``COST_S``) come first, so that no long test is left alone at the end, the short
    ones filling in; the rest keep their file order.
    """
    if not _worker(config):
        return
    _join_groups(items)

    def rank(item):
        return "serial" not in _groups(item), _uses_digits_vit(item), -_cost_s(item)

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def qsweep_cache(tmp_path_factory, request):
    """A throwaway qsweep cache for the whole run (``$QSWEEP_CACHE``, inherited by subprocesses).

    Under xdist each worker's base temp folder lies in the run's, and the cache is made beside them,
    one for all workers: every qsweep cache writer is atomic (temp file + rename), so they can share it.
    """
    if _worker(request.config):
        path = tmp_path_factory.getbasetemp().parent / "qsweep_cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("qsweep_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QSWEEP_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def _migrated_mlflow_store(qsweep_cache) -> Path:
    """An empty MLflow SQLite store with its schema created, made once per run for all workers."""
    path = qsweep_cache.parent / "mlflow_migrated.db"
    with file_lock(qsweep_cache.parent / "mlflow_migrated.lock"):
        if not path.exists():
            from mlflow.tracking import MlflowClient

            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            MlflowClient(f"sqlite:///{tmp}").search_experiments()  # creates and migrates the schema
            os.replace(tmp, path)
    return path


@pytest.fixture
def mlflow_store(tmp_path, _migrated_mlflow_store) -> str:
    """``sqlite:///<tmp_path>/mlflow.db``, an empty store as MLflow creates it, copied rather than migrated anew."""
    shutil.copyfile(_migrated_mlflow_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(scope="session")
def digits_bundle():
    """The digits data with the default split."""
    from qsweep.config import DigitsDataConfig
    from qsweep.data import build_data

    return build_data(DigitsDataConfig())


@pytest.fixture(scope="session")
def digits_vit(digits_bundle, qsweep_cache):
    """The embedded digits ViT, trained once per run into the throwaway cache.

    Under the lock the first worker to need it trains it, and the others, once it is written, load
    the same weights from the cache instead of each training its own.
    """
    from qsweep.models import load_digits_vit

    with file_lock(qsweep_cache.parent / "qsweep_cache.lock"):
        return load_digits_vit(digits_bundle, qsweep_cache, progress=False)


@pytest.fixture(scope="session", autouse=True)
def _digits_vit_early(request, qsweep_cache):
    """Worker gw0 trains the digits ViT before its first test, while the others start on the tests that
    do not need it (see ``pytest_collection_modifyitems``); without xdist it is trained when first needed."""
    if _worker(request.config) == "gw0" and any(map(_uses_digits_vit, request.session.items)):
        request.getfixturevalue("digits_vit")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the digits ViT's ops are tiny, and one thread is faster
    (much faster when other processes share the cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calib(digits_bundle):
    """64 class-balanced calibration images of the digits train split, in batches of 32."""
    from qsweep.config import CalibConfig
    from qsweep.data import calibration_batches

    return calibration_batches(digits_bundle, CalibConfig(num_images=64, batch_size=32))
