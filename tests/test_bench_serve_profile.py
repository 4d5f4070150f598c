"""bench/serve_profile.py: py-spy's stacks sorted into waiting and what busy time served (pure)."""

from __future__ import annotations

from bench.serve_profile import summary

PROC = 'process 1:"cairn serving start"'
LOOP = "Server.run (uvicorn/server.py:70);Runner.run (asyncio/runners.py:118)"
COLLAPSED = "\n".join(
    [
        # the loop waiting in epoll: idle, though uvicorn started it
        f"{PROC};{LOOP};uv__io_poll (linux.c:1400);epoll_wait (libc.so.6) 40",
        # the predict thread waiting on its queue: idle
        f"{PROC};_worker (concurrent/futures/thread.py:81);PyThread_acquire_lock_timed (libpython3.11.so) 20",
        # a socket write under uvicorn's send, run by the loop: HTTP, not the loop
        f"{PROC};{LOOP};RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:549);"
        "write (libc.so.6) 30",
        # json inside xgboost's predict: predict
        f"{PROC};_worker (concurrent/futures/thread.py:83);predict (services/serving/batching.py:33);"
        "Booster.inplace_predict (xgboost/core.py:2796);dumps (json/__init__.py:231) 5",
        # a collection set off while parsing: garbage collection
        f"{PROC};{LOOP};Intake.parse_json (services/serving/intake.py:96);"
        "gc_collect_main (libpython3.11.so) 15",
        # the loop's own C code: the event loop
        f"{PROC};{LOOP};Handle__run (loop.c:100) 10",
    ]
)


def test_waiting_is_apart_and_busy_time_goes_to_what_it_serves():
    report = summary(COLLAPSED)
    assert report["samples"] == 120
    assert report["busy_samples"] == 60
    waiting = dict(report["waiting_pct_of_all"])
    assert waiting["idle: the loop waiting for sockets (epoll)"] == 33.3
    assert waiting["idle: the predict thread waiting for a batch"] == 16.7
    busy = dict(report["buckets_pct_of_busy"])
    assert busy == {
        "HTTP protocol (serving.wire, httptools)": 50.0,
        "garbage collection (gc)": 25.0,
        "event loop (uvloop, asyncio)": 16.7,
        "predict (xgboost inplace_predict)": 8.3,
    }
    own = dict(report["python_self_pct_of_busy"])
    assert own["uvicorn/protocols/http/httptools_impl.py:RequestResponseCycle.send"] == 50.0
