"""The user's path: the product driven only through the `cairn` executable, in subprocesses, on a
fresh temp home, with data files in a temp dir outside the checkout, stopped with SIGTERM and SIGKILL.

Nothing here imports a service or prepares the home: what a user types is what is tested.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from services.platform.bus.embedded import EmbeddedNats
from services.tools.supervisor import free_port

pytestmark = pytest.mark.slow

CAIRN = str(Path(sys.executable).with_name("cairn"))
# As a terminal starts it: SIGINT at its default. A suite started in the background by a shell
# without job control (`make test &`) hands its children SIGINT ignored, and a process that starts
# with SIGINT ignored keeps ignoring it (Python installs no KeyboardInterrupt handler then), as the
# convention for background jobs wants: this execs `cairn` with SIGINT reset, whatever the suite got.
AS_IN_A_TERMINAL = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]
SERVICES = ("ingestion", "features", "tuning", "training", "evaluation", "deployment", "lineage")
FAST_TABLE = ["--trials", "6", "--max-budget", "20", "--strategy", "random", "--families", "xgboost,linear"]


# Helpers ---------------------------------------------------------------------------------------
def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no CAIRN_ variable from the test run, a home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return {**env, "CAIRN_HOME": str(home), "CAIRN_LOG_LEVEL": "INFO", **extra}


def cairn(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CAIRN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_until(predicate, timeout: float, what: str):
    """Poll `predicate` until it is truthy. Between calls it waits at least as long as the call
    took: a predicate that runs the `cairn` executable (about a second of CPU) then takes at most
    half a core from the system it waits for, instead of a whole one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.monotonic()
        if value := predicate():
            return value
        time.sleep(max(0.1, time.monotonic() - started))
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has exited; only its parent has not read its status yet)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    return alive


def stop_all(procs) -> None:
    """SIGTERM every process at once, then wait for each; kill what is still up after 20 s."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def write_table(folder: Path, rows: int = 240, seed: int = 0) -> Path:
    """A small regression table with a clear signal, written where a user keeps data."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=rows), rng.uniform(0, 10, size=rows)
    colour = rng.choice(["red", "green", "blue"], size=rows)
    y = 3 * x1 + 0.5 * x2 + (colour == "red") * 2 + rng.normal(scale=0.1, size=rows)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "houses.csv"
    lines = ["x1,x2,colour,price"] + [
        f"{a:.5f},{b:.5f},{c},{d:.5f}" for a, b, c, d in zip(x1, x2, colour, y, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_corpus(folder: Path) -> Path:
    """Python source from the standard library: a real corpus every machine has."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(
        (stdlib / m).read_text(encoding="utf-8") for m in ("textwrap.py", "string.py", "bisect.py")
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.txt"
    path.write_text(text[:60_000], encoding="utf-8")
    return path


class Up:
    """`cairn up` in the foreground, as a user starts it in a terminal or a process manager does."""

    def __init__(self, home: Path, cwd: Path, **env: str):
        self.home = home
        self.proc = subprocess.Popen(
            [*AS_IN_A_TERMINAL, CAIRN, "up", "--timeout", "240"],
            env=user_env(home, CAIRN_SERVE_PORT="0", **env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []

    def wait_up(self, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.output.append(line)
            if line.startswith("cairn is up"):
                return json.loads((self.home / "runtime.json").read_text())
            assert time.monotonic() < deadline, "cairn up did not come up in time:\n" + "".join(self.output)
        raise AssertionError("cairn up exited before it was up:\n" + "".join(self.output))

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def kill_all(self) -> None:
        for p in running(self.tree()):
            p.kill()
        self.proc.kill()
        self.proc.wait(10)


# Lifecycle -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_stops_every_child_on_sigterm_and_sigint(tmp_path: Path, sig: signal.Signals) -> None:
    up = Up(tmp_path / "home", cwd=tmp_path)
    try:
        runtime = up.wait_up()
        children = up.tree()
        assert {p.pid for p in children} >= set(runtime["pids"].values()), "every child is in the tree"
        assert len(runtime["pids"]) == len(SERVICES) + 2  # seven services, the endpoint, nats-server
        up.proc.send_signal(sig)
        up.proc.wait(timeout=20)
        wait_until(lambda: not running(children), 15, "every child to exit")
        assert not (up.home / "runtime.json").exists()
    finally:
        if up.proc.poll() is None:
            up.kill_all()


def test_up_killed_with_sigkill_leaves_no_orphan(tmp_path: Path) -> None:
    up = Up(tmp_path / "home", cwd=tmp_path)
    try:
        up.wait_up()
        children = up.tree()
        assert len(children) >= len(SERVICES) + 2
        up.proc.kill()  # cannot be caught: the children must notice on their own
        up.proc.wait(10)
        wait_until(lambda: not running(children), 20, "every child of a SIGKILLed `cairn up` to exit")
    finally:
        for p in running(up.tree() if up.proc.poll() is None else []):
            p.kill()


def test_detached_up_then_down_from_another_directory(tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = user_env(home, CAIRN_SERVE_PORT="0")
    started = cairn("up", "--detach", "--timeout", "240", env=env, cwd=tmp_path, timeout=300)
    assert started.returncode == 0, started.stderr
    pids = json.loads((home / "runtime.json").read_text())["pids"]
    procs = [psutil.Process(p) for p in pids.values()]
    try:
        assert len(running(procs)) == len(SERVICES) + 2, "the detached children outlive `cairn up --detach`"
        again = cairn("up", "--detach", env=env, cwd=elsewhere)
        assert again.returncode == 1 and "already up" in again.stderr, again.stderr
        assert len(running(procs)) == len(SERVICES) + 2, "a second `cairn up` left the first one alone"
        stopped = cairn("down", env=env, cwd=elsewhere, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert "nats-server" in stopped.stdout
        wait_until(lambda: not running(procs), 20, "every child to exit after `cairn down`")
    finally:
        for p in running(procs):
            p.kill()


def test_a_second_up_and_a_busy_port_say_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cairn("up", env=user_env(tmp_path / "home", CAIRN_SERVE_PORT=str(port)), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0] and "CAIRN_SERVE_PORT" in lines[0]
    assert not (tmp_path / "home" / "nats").exists(), "nothing was started"


# Operator mode, submit, lineage, text -----------------------------------------------------------
@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Operator mode from nothing: an external NATS, a home that does not exist yet, seven
    `cairn run` processes and `cairn serve` started at the same instant before `cairn provision`."""
    root = tmp_path_factory.mktemp("operator")
    nats = EmbeddedNats(root / "nats-server")
    nats.start()
    home = root / "home-not-created-yet"
    serve_port = free_port()
    env = user_env(home, CAIRN_NATS_URL=nats.url or "", CAIRN_SERVE_PORT=str(serve_port))
    logs = root / "logs"
    logs.mkdir()
    procs = {}
    for name, args in [*((n, ["run", n]) for n in SERVICES), ("serve", ["serve"])]:
        with open(logs / f"{name}.log", "w") as log:  # the child keeps its own descriptor
            procs[name] = subprocess.Popen(
                [CAIRN, *args], env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT
            )
    try:
        yield {
            "root": root,
            "home": home,
            "env": env,
            "logs": logs,
            "procs": procs,
            "url": f"http://127.0.0.1:{serve_port}",
        }
    finally:
        stop_all(procs.values())
        nats.stop()


def test_operator_mode_from_nothing_waits_for_provision_then_runs(operated: dict) -> None:
    logs, procs, env, root = operated["logs"], operated["procs"], operated["env"], operated["root"]

    def waiting_services() -> set[str]:
        return {n for n in SERVICES if "run `cairn provision`" in (logs / f"{n}.log").read_text()}

    wait_until(lambda: waiting_services() == set(SERVICES), 120, "every service to say the stream is missing")
    assert all(p.poll() is None for p in procs.values()), "a service died instead of waiting"
    provisioned = cairn("provision", env=env, cwd=root)
    assert provisioned.returncode == 0, provisioned.stderr
    assert "stream CAIRN: created" in provisioned.stdout

    def all_live() -> bool:
        return cairn("status", env=env, cwd=root, timeout=60).returncode == 0

    wait_until(all_live, 180, "`cairn status` to report every consumer live")
    for name in SERVICES:
        text = (logs / f"{name}.log").read_text()
        assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-3000:]}"
        assert procs[name].poll() is None


@pytest.fixture
def provisioned(operated: dict) -> dict:
    """The operated system, provisioned (idempotent) and live: for journeys that start from there."""
    env, root = operated["env"], operated["root"]
    assert cairn("provision", env=env, cwd=root).returncode == 0
    wait_until(
        lambda: cairn("status", env=env, cwd=root, timeout=60).returncode == 0, 180, "all consumers live"
    )
    return operated


def test_submit_from_another_directory_then_lineage_by_short_id(provisioned: dict, tmp_path: Path) -> None:
    env = provisioned["env"]
    data = write_table(tmp_path / "elsewhere" / "data")
    shell_dir = tmp_path / "somewhere-else"
    shell_dir.mkdir()
    relative = os.path.relpath(data, shell_dir)
    run = cairn(
        "submit",
        relative,
        "--target",
        "price",
        *FAST_TABLE,
        "--wait",
        "--timeout",
        "300",
        env=env,
        cwd=shell_dir,
        timeout=330,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "landing/sha256/" in run.stderr, "the file went into the store's landing area"
    assert "cairn.model.deployed.v1" in run.stdout

    # `cairn events` prints 8-character ids; `cairn lineage` takes one right away (read your writes).
    listing = cairn("events", env=env, cwd=shell_dir)
    assert listing.returncode == 0, listing.stderr
    deployed = [line for line in listing.stdout.splitlines() if "cairn.model.deployed.v1" in line][-1]
    short = deployed.split()[3]
    assert re.fullmatch(r"[0-9a-f]{8}", short), deployed
    lineage = cairn("lineage", short, env=env, cwd=shell_dir)
    assert lineage.returncode == 0, lineage.stderr
    assert "cairn.data.arrived.v1" in lineage.stdout and "houses.csv" in lineage.stdout
    assert str(data) not in lineage.stdout, "the services never saw the user's disk"

    # A one-character prefix shared by several events is refused as ambiguous, like git does.
    ids = [line.split()[3] for line in listing.stdout.splitlines() if len(line.split()) > 3]
    first = {i[0] for i in ids if sum(j[0] == i[0] for j in ids) > 1}
    assert first, "some first character is shared"
    ambiguous = cairn("lineage", sorted(first)[0], env=env, cwd=shell_dir)
    assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr, ambiguous.stderr


def _served(url: str) -> list[str]:
    import httpx

    try:
        listing = httpx.get(url + "/v1/models", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return []
    return list(listing) if isinstance(listing, dict) else []  # {name: what is served}


def test_text_corpus_from_the_cli_to_generate(provisioned: dict, tmp_path: Path) -> None:
    env = provisioned["env"]
    corpus = write_corpus(tmp_path / "texts")
    run = cairn(
        "submit",
        str(corpus),
        "--task",
        "text-generation",
        "--trials",
        "2",
        "--strategy",
        "random",
        "--max-budget",
        "30",
        "--model-name",
        "stdlib-text",
        "--wait",
        "--timeout",
        "480",
        env=env,
        cwd=tmp_path,
        timeout=510,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # The endpoint swaps to a deployed champion on its own time (it loads and verifies the bundle):
    # `--wait` ends at model.deployed, so wait until the endpoint lists the model.
    wait_until(lambda: "stdlib-text" in _served(provisioned["url"]), 60, "the endpoint to serve stdlib-text")
    generated = cairn(
        "generate",
        "def ",
        "--model",
        "stdlib-text",
        "--max-tokens",
        "12",
        "--url",
        provisioned["url"],
        env=env,
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("def ") and len(generated.stdout.strip()) > len("def")


# Errors a person can act on -------------------------------------------------------------------
USER_ERRORS = [
    (["run", "nope"], {}, 2, "unknown service 'nope'"),
    (["status"], {"CAIRN_NATS_URL": "nats://127.0.0.1:9"}, 1, "cannot reach NATS"),
    (["events"], {}, 1, "no NATS to talk to"),
    (["predict", '{"x1": 1}', "--url", "http://127.0.0.1:9"], {}, 1, "no inference endpoint"),
    (["predict", "{not json"], {}, 2, "not JSON"),
    (
        ["submit", "{data}", "--target", "price", "--families", "xgboost,nope"],
        {},
        2,
        "unknown model family nope",
    ),
    (["submit", "{data}"], {}, 2, "--target is required"),
    (["submit", "/no/such/file.csv", "--target", "price"], {}, 1, "no such file"),
    (["submit", "{data}", "--target", "price", "--task", "poetry"], {}, 2, "unknown task"),
    (["up", "--bogus"], {}, 2, "No such option"),
    (["status"], {"CAIRN_MAX_DELIVER": "many"}, 2, "CAIRN_MAX_DELIVER"),
    (["status"], {"CAIRN_ALLOWED_ROOTS": "/data"}, 2, "CAIRN_ALLOWED_ROOTS is not JSON"),
    (["audit", "verify", "--bundle", "/no/such/bundle"], {}, 2, "no such file"),
]


@pytest.mark.parametrize(("args", "extra", "code", "says"), USER_ERRORS, ids=lambda v: str(v)[:40])
def test_user_errors_are_one_line_with_an_exit_code(tmp_path: Path, args, extra, code, says) -> None:
    data = write_table(tmp_path / "data")
    args = [a.replace("{data}", str(data)) for a in args]
    result = cairn(*args, env=user_env(tmp_path / "home", **extra), cwd=tmp_path, timeout=60)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert says in lines[0]


def test_help_documents_the_exit_codes(tmp_path: Path) -> None:
    result = cairn("--help", env=user_env(tmp_path / "home"), cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for fragment in ("0 success", "1 failure", "2 usage error", "3 a run's model was not promoted"):
        assert fragment in text


def test_no_command_needs_anything_beside_the_repository() -> None:
    """Docs and tests never point outside the repository (a clean clone has nothing beside it)."""
    root = Path(__file__).resolve().parents[1]
    outside = re.compile(r"\.\./shared|parents\[\d\] / \"shared\"")
    offenders = [
        str(p.relative_to(root))
        for folder in ("docs", "tests", "services", "bench")
        for p in (root / folder).rglob("*")
        if p.suffix in {".md", ".py"} and p.name != Path(__file__).name and outside.search(p.read_text())
    ]
    offenders += ["README.md"] if outside.search((root / "README.md").read_text()) else []
    assert offenders == []


def test_services_starting_together_create_the_mlflow_schema_once(tmp_path: Path) -> None:
    """Seven services on a fresh home each open MLflow at once: without the schema lock alembic's
    migrations collide (`table _alembic_tmp_experiments already exists`)."""
    code = "import sys; from services.platform.tracking import Tracker; Tracker(sys.argv[1])"
    uri = f"sqlite:///{tmp_path / 'fresh-home' / 'mlflow.db'}"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(len(SERVICES))
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(outputs)
