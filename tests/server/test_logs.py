"""Server logs: job and worker on each line inside job_context (and only there, per thread and per task),
as text or one JSON object per line, from ``lienzo serve --log-format``."""

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading
from datetime import datetime

import httpx
import pytest

from lienzo.server.logs import ContextFilter, JSONFormatter, TextFormatter, job_context, setup_logging
from servers import lienzo_server


class Records(logging.Handler):
    """Keeps the records it is given, after its filters ran."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logger():
    logger = logging.getLogger("lienzo.test_logs")
    logger.setLevel(logging.INFO)
    yield logger
    logger.handlers.clear()


def lines_from(logger: logging.Logger, formatter: logging.Formatter) -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    return stream


def test_json_lines_carry_the_job_inside_job_context_only(logger):
    stream = lines_from(logger, JSONFormatter())
    logger.info("before")
    with job_context("abc123", "cuda:1"):
        logger.warning("step %d of %d", 3, 20)
        with job_context("inner"):  # contexts nest and give the outer values back
            logger.info("nested")
        logger.info("back")
    logger.info("after")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["message"], line["job_id"], line["worker"]) for line in lines] == [
        ("before", None, None), ("step 3 of 20", "abc123", "cuda:1"), ("nested", "inner", None),
        ("back", "abc123", "cuda:1"), ("after", None, None),
    ]
    assert set(lines[1]) == {"time", "level", "logger", "message", "job_id", "worker"}
    assert lines[1]["level"] == "WARNING" and lines[1]["logger"] == "lienzo.test_logs"
    assert datetime.fromisoformat(lines[1]["time"]).utcoffset().total_seconds() == 0


def test_json_line_has_the_exception_text(logger):
    stream = lines_from(logger, JSONFormatter())
    with job_context("j1", "cpu"):
        try:
            1 / 0
        except ZeroDivisionError:
            logger.exception("job failed: %s", "ünïcode")
    line = json.loads(stream.getvalue())
    assert line["message"] == "job failed: ünïcode" and line["job_id"] == "j1"
    assert line["exception"].startswith("Traceback") and "ZeroDivisionError: division by zero" in line["exception"]


def test_text_lines_name_the_job_and_worker(logger):
    stream = lines_from(logger, TextFormatter())
    logger.info("idle")
    with job_context("abc123", "cpu"):
        logger.info("running")
    with job_context("def456"):
        logger.info("no worker")
    logger.info("explicit", extra={"job_id": "given", "worker": "cuda:0"})  # extra= wins over the context
    first, second, third, fourth = stream.getvalue().splitlines()
    assert first.endswith(" INFO lienzo.test_logs: idle")
    assert second.endswith(" INFO lienzo.test_logs: [job abc123 on cpu] running")
    assert third.endswith(": [job def456] no worker")
    assert fourth.endswith(": [job given on cuda:0] explicit")


def test_job_ids_do_not_cross_threads(logger):
    records = Records()
    logger.addHandler(records)
    both_inside = threading.Barrier(2)
    seen_outside = []

    def run(job: str) -> None:
        with job_context(job, f"worker-{job}"):
            both_inside.wait(5)  # both contexts are set at once
            logger.info("mine")
            both_inside.wait(5)
            # A thread started inside a job starts with no context of its own.
            child = threading.Thread(target=lambda: logger.info("child"))
            child.start()
            child.join()
        seen_outside.append(job)

    threads = [threading.Thread(target=run, args=(job,), name=job) for job in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(seen_outside) == ["a", "b"]
    mine = [(r.threadName, r.job_id, r.worker) for r in records.records if r.msg == "mine"]
    assert sorted(mine) == [("a", "a", "worker-a"), ("b", "b", "worker-b")]
    assert [(r.job_id, r.worker) for r in records.records if r.msg == "child"] == [(None, None), (None, None)]


def test_job_ids_do_not_cross_asyncio_tasks(logger):
    records = Records()
    logger.addHandler(records)

    async def job(name: str) -> None:
        with job_context(name, "cpu"):
            await asyncio.sleep(0.01)  # the other task runs and sets its own meanwhile
            logger.info(name)

    async def both() -> None:
        await asyncio.gather(job("x"), job("y"))

    asyncio.run(both())
    assert sorted((r.msg, r.job_id) for r in records.records) == [("x", "x"), ("y", "y")]


def test_setup_logging_sends_every_logger_to_stderr_as_json():
    script = (
        "import logging\n"
        "from lienzo.server.logs import job_context, setup_logging\n"
        "logging.basicConfig(format='%(message)s')\n"  # replaced, not doubled
        "setup_logging('json', 'INFO')\n"
        "logging.getLogger('uvicorn.error').info('started')\n"
        "with job_context('j9', 'cpu'):\n"
        "    logging.getLogger('lienzo.server.jobs').info('loading %s', 'sd15')\n"
        "logging.getLogger('lienzo').debug('below the level')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stderr.splitlines()]
    assert [(line["logger"], line["message"], line["job_id"], line["worker"]) for line in lines] == [
        ("uvicorn.error", "started", None, None), ("lienzo.server.jobs", "loading sd15", "j9", "cpu"),
    ]


def test_setup_logging_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="log format: 'xml' is not one of text, json"):
        setup_logging("xml")


def test_lienzo_serve_logs_json_lines(tmp_path):
    (tmp_path / "models").mkdir()
    with lienzo_server(tmp_path, "--log-format", "json") as url:
        # A request for a Host this server does not answer to is refused, with a warning in the log.
        refused = httpx.get(f"{url}/api/v1/models", headers={"Host": "rebound.example"})
        assert refused.status_code == 403
        log_file = next(tmp_path.glob("server-*.log"))
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    warning = next(line for line in lines if line["logger"] == "lienzo.server.app")
    assert warning["level"] == "WARNING" and "refused GET /api/v1/models" in warning["message"]
    assert warning["job_id"] is None and warning["worker"] is None
