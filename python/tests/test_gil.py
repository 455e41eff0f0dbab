"""Blocking calls release the GIL: other Python threads run while one waits."""

from __future__ import annotations

import threading
import time

import pytest

import xcp


def test_other_threads_run_during_a_blocking_recv(python_peer, url_for):
    peer = python_peer("silent", url_for("unix"))
    with xcp.connect(peer.url) as s:
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                s.recv(timeout=2)
            except BaseException as e:  # noqa: BLE001 - the test reports what it was
                outcome.append(e)

        t = threading.Thread(target=wait)
        start = time.monotonic()
        t.start()
        count = 0
        while t.is_alive():
            count += 1
        elapsed = time.monotonic() - start
        assert len(outcome) == 1 and isinstance(outcome[0], xcp.TimeoutError), outcome
        assert elapsed >= 1.9
        # Pure Python runs millions of iterations a second; with the GIL held by the waiting
        # thread this loop would not have run at all until the wait ended.
        assert count > 100_000, count


def test_blocking_request_in_a_thread_with_pings_meanwhile(python_peer, url_for):
    peer = python_peer("silent", url_for("tcp"))
    with xcp.connect(peer.url) as s:
        t = threading.Thread(
            target=lambda: pytest.raises(xcp.TimeoutError, s.request, xcp.Ether("q"), timeout=1.5)
        )
        t.start()
        rtts = [s.ping() for _ in range(20)]
        t.join()
        assert all(r > 0 for r in rtts)
