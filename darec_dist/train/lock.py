"""One training job per run_dir: two jobs writing one run's checkpoints and metrics would mix both runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from darec_dist.config import ConfigError
from darec_dist.distributed.collectives import max_over_ranks
from darec_dist.files import exclusive_lock


@contextmanager
def exclusive_run_dir(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Rank 0 holds an exclusive lock on run_dir for the job's life (the kernel drops it when the process dies,
    so a restarted or requeued job takes it over); every rank fails alike when another job holds it. Collective.
    A run_dir created here and left empty (a run refused before writing anything) is removed on the way out."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} is a file; give a directory (a new one for a new run)")
    created = is_main and not run_dir.exists()
    with ExitStack() as held:
        # 0: taken, 1: another job holds it, 2: rank 0 cannot create it. Shared, so that every rank fails alike.
        problem, reason = 0, "see rank 0"
        if is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:  # a file where a parent directory should be, or no permission
                problem, reason = 2, err.strerror
            else:
                problem = 0 if held.enter_context(exclusive_lock(run_dir)) else 1
        (problem,) = max_over_ranks(problem)
        if problem == 2:
            raise ConfigError(f"run_dir: cannot create {run_dir} ({reason})")
        if problem == 1:
            raise ConfigError(
                f"{run_dir}: another training job is using this run_dir (a run in progress, or the workers of a killed "
                "torchrun still running: see `ps`); wait for it, stop it, or give this run another run_dir"
            )
        try:
            yield
        finally:
            if created and run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()
