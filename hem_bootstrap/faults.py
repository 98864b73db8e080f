"""Test-only fault injection: a process kills itself at a named point when ``HEM_KILL_AT`` asks.

Kept apart from the run directory so that the readers, the training chips and the bank can
offer kill points without depending on the orchestration layer.
"""

from __future__ import annotations

import os
import signal

KILL_ENV = "HEM_KILL_AT"
"""Fault-injection hook for tests (see :func:`fault_point`); never set it in production."""

_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test-only fault injection: kill this process at a named point when ``HEM_KILL_AT`` asks for it.

    ``HEM_KILL_AT=NAME`` (first time ``NAME`` is reached) or ``NAME#N`` (the N-th time, counted in
    this process) sends SIGKILL to the process itself, which is the harshest crash there is: no
    handler, no ``finally``, no flush. A ``:TERM`` or ``:INT`` suffix sends that signal instead, to
    check the graceful stop; several points may be given, comma-separated. The crash-safety tests
    use it to stop a real ``hem run`` at a chosen step deterministically. Points: ``round{r}.{step}.start`` / ``round{r}.{step}.end`` (step files
    written, manifest not yet), ``bank.replace`` (bank written under its temporary name, not yet
    renamed), ``train.batch`` (a training batch collated) and ``detect.tile`` (a tile read; in a
    CPU scan with model replicas, :mod:`hem_bootstrap.model.replicas`, that is in a replica, which
    counts its own tiles; ``runtime.cpu_replicas: 0`` keeps the reads in the scan's process).
    Costs one environment lookup when unset.
    """
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    hits = _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    for want in wanted.split(","):
        sig = signal.SIGKILL
        if ":" in want:
            want, sig_name = want.rsplit(":", 1)
            sig = {"TERM": signal.SIGTERM, "INT": signal.SIGINT}.get(sig_name, signal.SIGKILL)
        target, _, nth = want.strip().partition("#")
        if target == name and hits == (int(nth) if nth.isdigit() else 1):
            os.kill(os.getpid(), sig)
