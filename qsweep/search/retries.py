"""Trials to run again: a stopped worker's, and a dead worker's where Optuna's heartbeat does not reach.

Optuna fails the trials of a dead worker only on RDB storages (heartbeats). So that a journal
study loses nothing either, each trial records its owner: the host and process running it
(``pid:start time``, so a reused pid is not taken for the worker). A RUNNING trial whose owner
process on this host has ended is failed and its layout queued again. Only this host's
processes can be checked: a dead worker's trial on another host waits for a worker there.
"""

from __future__ import annotations

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from qsweep.tracking import HOST, own_process, process_gone

OWNER = "qsweep:owner"  # trial system attr: "<host>/<pid>:<start time>" of the process running it


def claim(study: optuna.Study, trial_id: int) -> None:
    """Record this process as the owner of a trial it is about to run.

    A worker killed between taking a trial and this write (two storage calls, no work between)
    leaves a trial without owner: it stays RUNNING, as it would without this sweep.
    """
    study._storage.set_trial_system_attr(trial_id, OWNER, f"{HOST}/{own_process()}")


def owner_gone(owner: str) -> bool:
    """Whether ``owner`` (an :data:`OWNER` value) is a process of this host that has ended."""
    host, _, process = owner.partition("/")
    return host == HOST and process_gone(process)


def fail_dead_trials(study: optuna.Study, retries: int) -> list[int]:
    """Fail the RUNNING trials whose owner on this host is gone and queue each layout again, at most
    ``retries`` times (``search.retries``, as Optuna's heartbeat does); returns their numbers.

    Workers sweeping at once fail each trial once: the storage refuses the later updates of a
    finished trial, and only the worker whose update failed it queues the retry.
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(OWNER)
        if owner is None or not owner_gone(owner):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "error", f"its worker ({owner}) is gone: it was killed")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker failed it first, and retried it
        if retries >= len(trial.system_attrs.get("retry_history", [])) + 1:
            enqueue_retry(study, trial)
        failed.append(trial.number)
    return failed


def enqueue_retry(study: optuna.Study, trial: FrozenTrial) -> int:
    """A waiting copy of ``trial`` (same layout), marked as optuna's heartbeat retries are; returns its number.

    The copy has no owner until a worker claims it (the dead owner's would make it look dead),
    no ``error`` (it has not failed) and no size constraint (set again when it runs).
    """
    # Its constraint is measured again (optuna keeps the first value a trial sets).
    attrs = {key: value for key, value in trial.system_attrs.items()
             if key != OWNER and key.partition(":")[0] != "constraints"}
    attrs.update(failed_trial=trial.system_attrs.get("failed_trial", trial.number),
                 retry_history=[*trial.system_attrs.get("retry_history", []), trial.number])
    user_attrs = {key: value for key, value in trial.user_attrs.items() if key != "error"}
    copy = optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
                                     user_attrs=user_attrs, system_attrs=attrs)
    return study._storage.get_trial_number_from_id(study._storage.create_new_trial(study._study_id, copy))


def claim_retry(study: optuna.Study) -> optuna.Trial | None:
    """The oldest waiting retry of a failed trial, now RUNNING for this worker (None if there is none).

    Optuna would run it after every other waiting trial (a whole warm start): maybe never within
    ``n_trials``.
    """
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if "failed_trial" not in t.system_attrs:
            continue
        try:
            if study._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):  # False: another took it
                return optuna.Trial(study, t._trial_id)
        except UpdateFinishedTrialError:
            pass  # another worker took it and finished it meanwhile
    return None
