"""The rule: a private internal of a third-party library that the code uses has its test here.

Private means what a library does not promise to keep: an underscored name, an undocumented
attribute, an internal module, a method overridden from outside. The code uses a few, each for a
measured reason (see the module that uses it); pyproject.toml bounds each such library below its
next minor, and requirements.lock pins it. An upgrade (docs/DEPENDENCIES.md) that changes one
fails its test here, with a message naming the library and version, the internal and the code that
uses it, instead of failing somewhere downstream or not at all.

Each test checks one internal, on real objects where that is cheap (a nats-server for this module,
MLflow on SQLite), for the shape the code relies on: present, of the type it is used as, called
with the arguments the code passes, behaving as the code assumes. Each stands alone: code that
stops using an internal deletes that internal's test and nothing else.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import nats
import pytest
from faststream.nats import JStream, NatsBroker, PullSub
from nats.aio.client import Client
from nats.js.api import ConsumerConfig
from nats.js.client import JetStreamContext

from services.platform.bus.embedded import EmbeddedNats

STREAM = "INTERNALS"


@dataclass(frozen=True)
class Internal:
    """One private internal: the distribution it belongs to, its name, and the code that uses it."""

    dist: str
    name: str
    user: str

    def changed(self, detail: str) -> str:
        return f"{self.dist} {version(self.dist)} changed private `{self.name}` used by {self.user}: {detail}"

    def expect(self, ok: bool, detail: str) -> None:
        if not ok:
            pytest.fail(self.changed(detail), pytrace=False)

    def attr(self, obj: Any, name: str) -> Any:
        """`obj.name`, or a failure naming the internal."""
        try:
            return getattr(obj, name)
        except AttributeError:
            pytest.fail(self.changed(f"{type(obj).__qualname__} has no `{name}`"), pytrace=False)

    def binds(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """The code's call still fits the signature."""
        try:
            inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as exc:
            pytest.fail(self.changed(f"{fn.__qualname__}{inspect.signature(fn)}: {exc}"), pytrace=False)


# A nats-server and a connection, shared by the module (each test only reads them).
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def nc(server: EmbeddedNats) -> AsyncIterator[Client]:
    nc = await nats.connect(server.url)
    yield nc
    await nc.close()


# nats-py: services/platform/bus --------------------------------------------------------------------
async def test_nats_jetstream_nc(nc: Client) -> None:
    internal = Internal("nats-py", "JetStreamContext._nc", "services/platform/bus/provision.py")
    js_nc = internal.attr(nc.jetstream(), "_nc")
    internal.expect(js_nc is nc, f"expected the connection the context was made from, got {js_nc!r}")
    server = js_nc.connected_server_version
    internal.expect(server.major >= 2, f"connected_server_version gave {server!r}")


# FastStream: the runtime, the bus and services/tools/nats_auth.py ------------------------------------
async def test_faststream_broker_connection_state(server: EmbeddedNats) -> None:
    internal = Internal(
        "faststream", "NatsBroker.config.connection_state", "services/platform/runtime.py and the bus"
    )
    broker = NatsBroker(server.url)
    await broker.connect()
    try:
        state = internal.attr(internal.attr(broker, "config"), "connection_state")
        connection, stream = internal.attr(state, "connection"), internal.attr(state, "stream")
        internal.expect(
            isinstance(connection, Client) and connection.is_connected,
            f"expected `.connection` to be the connected nats-py Client, got {connection!r}",
        )
        internal.expect(
            isinstance(stream, JetStreamContext),
            f"expected `.stream` to be a JetStreamContext, got {stream!r}",
        )
    finally:
        await broker.stop()


def declared_pull_subscriber() -> tuple[NatsBroker, Any]:
    """A durable pull subscriber declared as services/platform/bus/consumer.subscribe declares it."""
    broker = NatsBroker("nats://127.0.0.1:4222")  # never connected
    config = ConsumerConfig(durable_name="d", filter_subject="internals.x")
    sub = broker.subscriber(
        "internals.x",
        stream=JStream(STREAM, declare=False),
        durable="d",
        config=config,
        pull_sub=PullSub(batch_size=2),
        inbox_prefix=b"_INBOX_internals.",
    )
    return broker, sub


def test_faststream_subscriber_config() -> None:
    internal = Internal("faststream", "subscriber.config", "services/tools/nats_auth.py")
    broker, sub = declared_pull_subscriber()
    internal.expect(sub in broker.subscribers, "the declared subscriber is not in `broker.subscribers`")
    config = internal.attr(sub, "config")
    internal.expect(
        getattr(config, "durable_name", None) == "d"
        and getattr(config, "filter_subject", None) == "internals.x",
        f"expected the ConsumerConfig given (durable_name, filter_subject), got {config!r}",
    )


def test_faststream_subscriber_extra_options() -> None:
    internal = Internal("faststream", "subscriber.extra_options", "services/tools/nats_auth.py")
    _, sub = declared_pull_subscriber()
    options = internal.attr(sub, "extra_options")
    prefix = options.get("inbox_prefix") if isinstance(options, dict) else None
    internal.expect(
        prefix == b"_INBOX_internals.", f"expected a dict holding the inbox_prefix given, got {options!r}"
    )


# MLflow: services/platform/trial_runs.py ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from services.platform.tracking import Tracker

    return Tracker(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


def test_mlflow_client_tracking_client_store(tracker: Any) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    internal = Internal("mlflow", "MlflowClient._tracking_client.store", "services/platform/trial_runs.py")
    store = internal.attr(internal.attr(tracker.client, "_tracking_client"), "store")
    internal.expect(
        isinstance(store, SqlAlchemyStore), f"expected a SqlAlchemyStore for a sqlite URI, got {store!r}"
    )


def test_mlflow_sqlalchemy_store_engine(tracker: Any) -> None:
    import sqlalchemy

    internal = Internal("mlflow", "SqlAlchemyStore.engine", "services/platform/trial_runs.py")
    engine = internal.attr(tracker.client._tracking_client.store, "engine")
    internal.expect(isinstance(engine, sqlalchemy.Engine), f"expected a SQLAlchemy Engine, got {engine!r}")


def test_mlflow_sqlalchemy_store_sanitize_metric_value(tracker: Any) -> None:
    internal = Internal("mlflow", "SqlAlchemyStore.sanitize_metric_value", "services/platform/trial_runs.py")
    sanitize = internal.attr(tracker.client._tracking_client.store, "sanitize_metric_value")
    got = sanitize(float("nan")), sanitize(1.5)
    internal.expect(
        got[0] == (True, 0) and got[1] == (False, 1.5), f"expected (is_nan, stored value) pairs, got {got!r}"
    )


def test_mlflow_sqlalchemy_store_artifacts_folder_name() -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    internal = Internal("mlflow", "SqlAlchemyStore.ARTIFACTS_FOLDER_NAME", "services/platform/trial_runs.py")
    name = internal.attr(SqlAlchemyStore, "ARTIFACTS_FOLDER_NAME")
    internal.expect(
        name == "artifacts", f"expected 'artifacts' (a run's artifact_uri ends in it), got {name!r}"
    )


def orm_models() -> list[Any]:
    from services.platform.trial_runs import TABLES

    return list(TABLES)


@pytest.mark.parametrize("model", orm_models(), ids=lambda m: m.__name__)
def test_mlflow_orm_table(model: Any, tracker: Any) -> None:
    """The rows trial_runs builds for a run fill the table: every column, and no column it lacks.

    Every column, not only the required ones: a column MLflow adds is one its own create_run or
    log_batch may fill, and trial_runs must then decide what to write there."""
    from services.platform.trial_runs import TrialRun, TrialRunWriter

    internal = Internal(
        "mlflow", f"mlflow.store.tracking.dbmodels.models.{model.__name__}", "services/platform/trial_runs.py"
    )
    writer = TrialRunWriter.for_tracker(tracker)
    assert writer is not None, "a sqlite store qualifies (test_mlflow_client_tracking_client_store)"
    run = TrialRun("internals", "r", "event-1", {"p": 1}, {"m": 0.5}, {"t": "v"})
    rows = writer._rows(run)[model]
    table = model.__table__
    written, columns = set().union(*(row.keys() for row in rows)), set(table.columns.keys())
    internal.expect(written <= columns, f"table {table.name} has no column(s) {sorted(written - columns)}")
    internal.expect(
        columns <= written,
        f"table {table.name} has column(s) {sorted(columns - written)} that trial_runs does not write: "
        "see what SqlAlchemyStore.create_run and log_batch put there now",
    )


def test_mlflow_validate_param() -> None:
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, _validate_param

    internal = Internal(
        "mlflow", "mlflow.utils.validation._validate_param", "services/platform/trial_runs.py"
    )
    internal.binds(_validate_param, "key", "value", path="params[0]")
    long = "x" * (MAX_PARAM_VAL_LENGTH + 1)
    param = _validate_param("key", long, path="params[0]")
    internal.expect(
        isinstance(param, Param) and param.key == "key" and param.value == long[:MAX_PARAM_VAL_LENGTH],
        f"expected a Param with the value truncated to {MAX_PARAM_VAL_LENGTH}, got {param!r}",
    )


def test_mlflow_validate_metric() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric

    internal = Internal(
        "mlflow", "mlflow.utils.validation._validate_metric", "services/platform/trial_runs.py"
    )
    internal.binds(_validate_metric, "rmse", 1.0, 0, 0, path="metrics[0]")
    _validate_metric("rmse", 1.0, 1_700_000_000_000, 0, path="metrics[0]")
    _validate_metric("rmse", math.nan, 1_700_000_000_000, 0, path="metrics[0]")
    with pytest.raises(MlflowException):  # what makes a bad run fail only its own caller
        _validate_metric("../rmse", 1.0, 1_700_000_000_000, 0, path="metrics[0]")


def test_mlflow_sqlite_session_pragmas() -> None:
    """trial_runs runs on its own connection the pragmas MLflow's sessions run on SQLite."""
    import mlflow.store.db.utils

    from services.platform.trial_runs import SQLITE_PRAGMAS

    internal = Internal(
        "mlflow", "mlflow.store.db.utils (its SQLite session pragmas)", "services/platform/trial_runs.py"
    )
    source = inspect.getsource(mlflow.store.db.utils)
    for pragma in SQLITE_PRAGMAS:
        internal.expect(pragma in source, f"its sessions no longer run {pragma!r}: copy what they run now")


# uvicorn: services/platform/http_server.py (QuietServer) ----------------------------------------------
async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    """Never called: the server below is never started."""


def test_uvicorn_server_main_loop() -> None:
    import uvicorn

    internal = Internal("uvicorn", "Server.main_loop", "QuietServer (services/platform/http_server.py)")
    main_loop = internal.attr(uvicorn.Server, "main_loop")
    internal.expect(
        inspect.iscoroutinefunction(main_loop) and list(inspect.signature(main_loop).parameters) == ["self"],
        f"expected `async def main_loop(self)`, got {inspect.signature(main_loop)}",
    )
    internal.expect(
        "await self.main_loop()" in inspect.getsource(uvicorn.Server),
        "the server no longer awaits `self.main_loop()`: the override would never run",
    )


async def test_uvicorn_server_on_tick() -> None:
    import uvicorn

    internal = Internal("uvicorn", "Server.on_tick", "QuietServer (services/platform/http_server.py)")
    server = uvicorn.Server(uvicorn.Config(asgi_app))
    on_tick = internal.attr(server, "on_tick")
    internal.binds(on_tick, 10)
    stop = await on_tick(10)
    headers = dict(server.server_state.default_headers)
    internal.expect(stop is False, f"expected False while the server runs, got {stop!r}")
    internal.expect(
        b"date" in headers, f"a tick at a multiple of ten should refresh the Date header: {headers}"
    )
    server.should_exit = True
    internal.expect(await on_tick(20) is True, "expected True once `should_exit` is set")


def test_uvicorn_server_leaves_exit_free() -> None:
    """QuietServer adds `exit` and `_exit`: uvicorn must not use those names itself."""
    import uvicorn

    internal = Internal(
        "uvicorn", "Server (no `exit`, `_exit`)", "QuietServer (services/platform/http_server.py)"
    )
    server = uvicorn.Server(uvicorn.Config(asgi_app))
    taken = [name for name in ("exit", "_exit") if hasattr(server, name)]
    internal.expect(not taken, f"uvicorn.Server now has {taken}, which QuietServer overrides")


# Typer: services/tools/cli/__init__.py ----------------------------------------------------------------
def test_typer_vendored_click_exceptions() -> None:
    import typer

    from services.tools.cli import _click_exceptions

    internal = Internal("typer", "typer._click.exceptions", "services/tools/cli/__init__.py")
    usage = _click_exceptions()
    for name in ("UsageError", "NoArgsIsHelpError", "ClickException"):
        internal.attr(usage, name)
    app = typer.Typer()

    @app.command()
    def hello(name: str) -> None:
        """Never reached."""

    try:
        app(["--no-such-option"], standalone_mode=False)
    except usage.UsageError:
        return
    except Exception as exc:  # noqa: BLE001 - the failure names what came instead
        pytest.fail(
            internal.changed(f"a bad option raised {exc!r}, which `main` does not catch"), pytrace=False
        )
    pytest.fail(internal.changed("a bad option raised nothing"), pytrace=False)
