"""When a failed task is worth a second attempt: a Prefect `retry_condition_fn` made from a test of the error."""

from __future__ import annotations

from collections.abc import Callable


def retry_if(worth_retrying: Callable[[BaseException], bool]) -> Callable:
    """A retry condition that retries a failed task run when `worth_retrying(its exception)` holds."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except Exception as err:
            return worth_retrying(err)
        return False

    return condition
