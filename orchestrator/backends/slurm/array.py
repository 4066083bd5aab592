"""A sweep's elements as ONE SLURM job array, run by submitit's job runner (login node).

submitit's own array path (`map_array`) cannot serve here: it needs one folder for all tasks, and it
submits with a plain SlurmExecutor (not the rendered `#SBATCH` block). So the array is built here
from the same pieces as a single submission:

- the `#SBATCH` block is the rendered one of the sweep's first element (all elements share their
  SLURM options: `lifecycle/sweep.py` refuses a grid that changes them), with `--array=0-(n-1)%P`
  and the batch script's output in `<sweep>/elements/%a/logs/%A_%a_sbatch.out|err`;
- each task runs `python -u -m submitit.core._submit <sweep>/elements/%a/logs`: submitit names an
  array task's job `<array id>_<index>` and fills in `%a`, so task k loads its pickle from element
  k's `logs/` (`elements/<k>` is a symlink to the element's run directory) and its ranks write
  `<array id>_<k>_<rank>_log.out|err` there, the names `logs` reads for a single job;
- the pickles (`<run>/logs/<array id>_<k>_submitted.pkl`) are moved into place right after
  sbatch answers, as submitit does for its own arrays (its runner waits up to 60 s for one).
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import SubmissionError

if TYPE_CHECKING:
    from orchestrator.backends.base import ArrayTask

logger = logging.getLogger(__name__)

_OWN_PATHS = ("#SBATCH --output=", "#SBATCH --error=")
_SUBMITTED = re.compile(r"Submitted batch job (\d+)")


def array_sbatch_lines(
    sbatch_lines: Sequence[str], *, count: int, max_parallel: int | None, array_folder: Path
) -> list[str]:
    """The first element's rendered `#SBATCH` lines for the whole array: `--array=0-(n-1)%P` and
    the batch script's output per element (`%A_%a`, under `array_folder`)."""
    from orchestrator.render.files import sbatch_quote

    parallel = min(count, max_parallel or count)
    lines = [ln for ln in sbatch_lines if not ln.startswith(_OWN_PATHS)]
    lines.append(f"#SBATCH --array=0-{count - 1}%{parallel}")
    lines.append(f"#SBATCH --output={sbatch_quote(str(array_folder / '%A_%a_sbatch.out'))}")
    lines.append(f"#SBATCH --error={sbatch_quote(str(array_folder / '%A_%a_sbatch.err'))}")
    return lines


def array_script(
    executor_class: Any,
    *,
    count: int,
    array_folder: Path,
    parameters: Mapping[str, Any],
    python: str,
    sbatch_lines: Sequence[str],
    max_num_timeout: int,
) -> str:
    """The array's batch script: submitit's own text for an array of `count` tasks (srun output
    `%A_%a_%t`), with the array's `#SBATCH` block."""
    ex = executor_class(folder=array_folder, max_num_timeout=max_num_timeout, python=shlex.quote(python))
    ex.sbatch_lines = list(sbatch_lines)
    ex.update_parameters(**parameters)
    ex.parameters["map_count"] = count  # submitit's array spelling of the srun output paths
    text: str = ex._make_submission_file_text(ex._submitit_command_str, "array")
    return text


def submit_array(
    fn: Callable[..., Any],
    tasks: Sequence[ArrayTask],
    *,
    script: str,
    script_path: Path,
    timeout_min: int,
    max_num_timeout: int,
) -> list[str]:
    """Pickle every task, `sbatch` the script once, move each pickle to `<array>_<k>_submitted.pkl`
    in its folder; the job ids `<array>_<k>`, in task order."""
    from submitit.core.utils import DelayedSubmission

    staged: list[Path] = []
    try:
        for task in tasks:
            delayed = DelayedSubmission(fn, *task.args)
            delayed.set_timeout(timeout_min, max_num_timeout)
            tmp = task.folder / f".submitted-{uuid.uuid4().hex}.pkl"
            task.folder.mkdir(parents=True, exist_ok=True)
            delayed.dump(tmp)
            staged.append(tmp)
        script_path.write_text(script)
        try:
            res = subprocess.run(
                ["sbatch", str(script_path)], capture_output=True, text=True, timeout=120, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SubmissionError(f"sbatch failed: {exc}") from None
        found = _SUBMITTED.search(res.stdout or "")
        if res.returncode != 0 or found is None:
            message = (res.stderr or res.stdout).strip() or f"exit code {res.returncode}"
            raise SubmissionError(f"sbatch refused the array: {message}")
        array_id = found.group(1)
        job_ids = []
        for k, (task, tmp) in enumerate(zip(tasks, staged, strict=True)):
            job_id = f"{array_id}_{k}"
            tmp.rename(task.folder / f"{job_id}_submitted.pkl")
            job_ids.append(job_id)
        staged.clear()
        logger.info("submitted a job array of %d tasks as %s", len(tasks), array_id)
        return job_ids
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
