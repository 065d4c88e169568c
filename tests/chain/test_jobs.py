"""Job rows and the poison guard, in the core (the farm's generate task calls these)."""

from __future__ import annotations

from fragjobs.chain.jobs import count_delivery, ensure_job, give_up_if_poison

PROMPT = "a red circle"


def test_deliveries_are_counted_on_one_row(ws):
    assert count_delivery(ws, "job-a", PROMPT, [0, 1], "tiny-sd") == 1
    assert count_delivery(ws, "job-a", PROMPT, [0, 1], "tiny-sd") == 2
    job = ensure_job(ws, "job-a", PROMPT, [0, 1], "tiny-sd")
    assert job.attempts == 2 and job.seeds == [0, 1]


def test_past_the_limit_the_job_is_failed_with_the_reason(ws):
    for _ in range(3):
        attempts = count_delivery(ws, "job-b", PROMPT, [0], "tiny-sd")
    assert give_up_if_poison(ws, "job-b", attempts, limit=3) is None
    attempts = count_delivery(ws, "job-b", PROMPT, [0], "tiny-sd")
    reason = give_up_if_poison(ws, "job-b", attempts, limit=3)
    assert "delivered 4 times (limit 3" in reason
    job = ws.catalog.get_job("job-b")
    assert job.status == "failed" and job.finished_at is not None
