"""`cairn events` lists the whole log when the log comes slowly.

A proxy between the executable and a real nats-server holds the server's bytes back for 2.5 s half
way through the listing, as a busy server or a slow link does. The listing used to end at the first
quiet second and exit 0: an auditor got half the log and nothing said so.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import nats
import pytest

from contracts import DataArrived, new_event, subject_for
from tests.test_journeys import cairn, user_env

EVENTS = 400
STALL_S = 2.5


class StallingProxy:
    """TCP both ways on its own event loop; the server-to-client bytes stop once, for `stall_s`,
    when `after` bytes have gone down."""

    def __init__(self, target_port: int, after: int, stall_s: float):
        self.target_port, self.after, self.stall_s = target_port, after, stall_s
        self.sent, self.stalled = 0, False
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def __enter__(self) -> StallingProxy:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(reader, up_writer, down=False),
            self._pipe(up_reader, writer, down=True),
            return_exceptions=True,
        )

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, down: bool) -> None:
        while data := await source.read(16384):
            if down and not self.stalled and self.sent + len(data) > self.after:
                self.stalled = True
                await asyncio.sleep(self.stall_s)
            if down:
                self.sent += len(data)
            sink.write(data)
            await sink.drain()
        sink.close()


@pytest.mark.slow
def test_a_listing_outlasts_a_stalled_server(nats_server, tmp_path: Path) -> None:
    env = user_env(tmp_path / "home", CAIRN_NATS_URL=nats_server.url)
    provisioned = cairn("provision", env=env, cwd=tmp_path)
    assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr

    async def publish() -> int:
        nc = await nats.connect(nats_server.url)
        js, size = nc.jetstream(), 0
        for i in range(EVENTS):
            event = new_event(
                DataArrived(uri=f"file:///data/part-{i}.csv", target="y"), source="/test/events-listing"
            )
            body = event.encode()
            size += len(body)
            await js.publish(subject_for(DataArrived), body)
        await nc.close()
        return size

    size = asyncio.run(publish())
    port = int(nats_server.url.rsplit(":", 1)[1])
    with StallingProxy(port, after=size // 2, stall_s=STALL_S) as proxy:
        listing = cairn(
            "events", env={**env, "CAIRN_NATS_URL": f"nats://127.0.0.1:{proxy.port}"}, cwd=tmp_path
        )
    assert proxy.stalled, "the proxy never held the log back: the test did not test"
    assert listing.returncode == 0, listing.stdout + listing.stderr
    lines = [line for line in listing.stdout.splitlines() if "cairn.data.arrived.v1" in line]
    assert len(lines) == EVENTS, f"{len(lines)} of {EVENTS} events listed"
