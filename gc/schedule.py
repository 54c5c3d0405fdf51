"""Runs the registry's periodic jobs on cron schedules (APScheduler 3.x; imported here only).

Every worker process runs a scheduler; each job takes its lease in the metadata store
before it works, so at most one run happens at a time across processes and nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from cargohold.engine.jobs import JobAlreadyRunning

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledJob:
    name: str
    crontab: str
    run: Callable[[], object]


def _guarded(job: ScheduledJob) -> Callable[[], None]:
    def run() -> None:
        try:
            result = job.run()
            log.info("scheduled %s finished: %s", job.name, getattr(result, "summary", lambda: result)())
        except JobAlreadyRunning:
            log.info("scheduled %s skipped: another process is running it", job.name)
        except Exception:  # a failed run must not stop the schedule
            log.exception("scheduled %s failed", job.name)

    return run


def cron_trigger(expression: str) -> CronTrigger:
    """A crontab expression (five fields), or six fields with seconds first."""
    fields = expression.split()
    if len(fields) == 6:
        second, minute, hour, day, month, day_of_week = fields
        return CronTrigger(
            second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week
        )
    return CronTrigger.from_crontab(expression)


def start_scheduler(jobs: list[ScheduledJob]) -> BackgroundScheduler | None:
    """Start a background scheduler for ``jobs``; None when there is nothing to schedule."""
    if not jobs:
        return None
    scheduler = BackgroundScheduler(daemon=True)
    for job in jobs:
        scheduler.add_job(
            _guarded(job), cron_trigger(job.crontab), id=job.name, max_instances=1, coalesce=True
        )
    scheduler.start()
    log.info("scheduled jobs: %s", ", ".join(f"{job.name} ({job.crontab})" for job in jobs))
    return scheduler
