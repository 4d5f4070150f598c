"""The `cairn` command line: run the system, feed it data, watch it, query it.

Exit codes: 0 success (a run deployed), 1 failure (a run failed, a server unreachable),
2 usage error (a bad option, an unknown name), 3 a run's model was not promoted by the gate.

One module per command group (system, data, models, audit) over the client; rendering in `render`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from services.platform.bus.availability import NO_PEERS_FOR_PLACEMENT
from services.tools.cli.common import EXIT_FAILED, EXIT_USAGE, CliError, app, lift_tenant_option

# Each module registers its commands; `cairn --help` lists them in this order.
# isort: off
from services.tools.cli import system  # noqa: E402, F401
from services.tools.cli import data  # noqa: E402, F401
from services.tools.cli import models  # noqa: E402, F401
from services.tools.cli import audit  # noqa: E402, F401
from services.tools.cli import store  # noqa: E402, F401
from services.tools.cli import serving  # noqa: E402, F401
from services.tools.cli import tenant  # noqa: E402, F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """Run a command; a user error ends in one line on stderr and its exit code, never a traceback."""
    usage = _click_exceptions()
    try:
        code = app(args=lift_tenant_option(sys.argv[1:], os.environ), standalone_mode=False)
    except CliError as exc:
        _fail(exc.message, exc.code)
    except usage.NoArgsIsHelpError:
        sys.exit(EXIT_USAGE)  # building the message printed the help already
    except usage.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "cairn"
        _fail(f"{exc.format_message()} (see `{command} --help`)", EXIT_USAGE)
    except usage.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except typer.Abort:
        _fail("aborted", EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)
    except ServiceUnavailableError:
        _fail(
            "NATS JetStream is temporarily unavailable (a cluster electing a leader, or a server "
            "catching up after a restart or a partition): try again in a few seconds",
            EXIT_FAILED,
        )
    except NoStreamResponseError:
        _fail(
            "no stream stored the event: none is provisioned for its subject (`cairn provision`), "
            "or the stream had no leader all along (`cairn status` shows the cluster)",
            EXIT_FAILED,
        )
    except APIError as exc:
        if exc.err_code != NO_PEERS_FOR_PLACEMENT:
            _internal_error(exc)
        _fail(
            f"NATS JetStream cannot place the replicas ({exc.description}): CAIRN_STREAM_REPLICAS "
            "needs that many servers up; `cairn status` shows which is offline",
            EXIT_FAILED,
        )
    except Exception as exc:  # noqa: BLE001 - a bug, not a user error: still one line unless asked
        _internal_error(exc)
    sys.exit(code if isinstance(code, int) else 0)


def _internal_error(exc: Exception) -> None:
    if os.environ.get("CAIRN_DEBUG"):
        raise exc
    _fail(f"internal error: {type(exc).__name__}: {exc} (CAIRN_DEBUG=1 shows the traceback)", EXIT_FAILED)


def _click_exceptions() -> Any:
    """Click's exception classes as Typer raises them: recent Typer vendors its own copy of Click."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _fail(message: str, code: int) -> None:
    typer.echo(f"cairn: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
