"""A real Ollama server: find or build the binary, start ``ollama serve`` on a free port, stop it.

Used by the tests (a throw-away server with temporary OLLAMA_MODELS) and by the demo
(``ensure_server``: reuse a running server, else start one on the user's models directory for
the length of the run).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from .errors import StageFailed, UserError

# Ollama is built from source with `go install` (Go modules + cgo; no cmake, no prebuilt download).
# v0.11.4 is the newest release that builds that way: from v0.11.5 on, the Go module zips leave out
# llama.cpp's vendored headers (nlohmann/json_fwd.hpp, miniaudio, stb), so cgo fails; v0.25-v0.29
# are not served by the Go module proxy at all. .ci/install-ollama reads this line.
OLLAMA_VERSION = "v0.11.4"
OLLAMA_MODULE = "github.com/ollama/ollama"
# Stamp the version as Ollama's release builds do; a plain `go install` reports 0.0.0.
OLLAMA_LDFLAGS = (
    f"-X=github.com/ollama/ollama/version.Version={OLLAMA_VERSION.removeprefix('v')} "
    "-X=github.com/ollama/ollama/server.mode=release"
)
DEFAULT_PORT = 11434
DEFAULT_HOST = f"http://127.0.0.1:{DEFAULT_PORT}"
LOG_TAIL_LINES = 15
# ggml's CPU code is compiled by cgo with -O3 but no -march, i.e. SSE2 only; building for the
# machine's own CPU (AVX2/AVX-512) makes generation about 6x faster. The binary then runs only
# on CPUs like the one that built it, which is how .ci/install-ollama uses it.
NATIVE_CFLAGS = "-O3 -march=native"


# ---------------------------------------------------------------- the binary
def _go_bin_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("GOBIN"):
        dirs.append(Path(os.environ["GOBIN"]))
    go = shutil.which("go")
    if go:
        done = subprocess.run([go, "env", "GOBIN", "GOPATH"], capture_output=True, text=True)
        if done.returncode == 0:
            gobin, gopath = (done.stdout.splitlines() + ["", ""])[:2]
            if gobin:
                dirs.append(Path(gobin))
            dirs += [Path(p) / "bin" for p in gopath.split(os.pathsep) if p]
    dirs.append(Path.home() / "go" / "bin")
    return list(dict.fromkeys(dirs))


def find_ollama() -> Path | None:
    """The ``ollama`` binary on PATH, in ``$(go env GOPATH)/bin`` or ``~/go/bin``; None if none."""
    on_path = shutil.which("ollama")
    if on_path:
        return Path(on_path)
    for folder in _go_bin_dirs():
        candidate = folder / "ollama"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def build_ollama(log: Callable[[str], None] | None = None) -> Path:
    """Build Ollama ``OLLAMA_VERSION`` with ``go install`` (cgo, CPU); return the binary path.

    Takes several minutes on two cores (``log`` hears when it starts). Raises StageFailed when
    Go is missing or the build fails.
    """
    go = shutil.which("go")
    if go is None:
        raise StageFailed(
            "building Ollama needs Go (>= 1.24) and a C/C++ compiler; install them, or install "
            "Ollama from https://ollama.com/download, or run 'bash .ci/install-ollama'"
        )
    env = {**os.environ, "CGO_ENABLED": "1"}
    for flags in ("CGO_CFLAGS", "CGO_CXXFLAGS"):
        env.setdefault(flags, NATIVE_CFLAGS)
    cmd = [go, "install", f"-ldflags={OLLAMA_LDFLAGS}", f"{OLLAMA_MODULE}@{OLLAMA_VERSION}"]
    if log is not None:
        log(f"building Ollama {OLLAMA_VERSION} with 'go install' (once; several minutes)...")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = " | ".join(done.stderr.strip().splitlines()[-3:]) or "no output"
        raise StageFailed(f"'{' '.join(cmd)}' failed: {last}")
    found = find_ollama()
    if found is None:
        raise StageFailed(f"'{' '.join(cmd)}' succeeded but no ollama binary is in {_go_bin_dirs()[0]}")
    return found


def ollama_binary(build: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """The ollama binary; built with ``build_ollama`` when missing and ``build`` is true."""
    found = find_ollama()
    if found is not None:
        return found
    if build:
        return build_ollama(log)
    raise StageFailed(
        "no ollama binary on PATH or in $(go env GOPATH)/bin; run 'bash .ci/install-ollama' "
        "or install Ollama from https://ollama.com/download"
    )


# ---------------------------------------------------------------- hosts
def normalize_host(host: str | None = None) -> str:
    """``http://HOST:PORT`` for an OLLAMA_HOST-style value (``host``, ``host:port``, ``:port``, URL).

    None means ``$OLLAMA_HOST`` or ``http://127.0.0.1:11434``. A wildcard bind address
    (0.0.0.0, ::) is reached through 127.0.0.1.
    """
    raw = (host if host is not None else os.environ.get("OLLAMA_HOST", "")).strip()
    if not raw:
        return DEFAULT_HOST
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    scheme = parts.scheme or "http"
    hostname = parts.hostname or "127.0.0.1"
    if hostname in ("0.0.0.0", "::"):
        hostname = "127.0.0.1"
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise UserError(f"'{host}' is not a valid Ollama host (expected HOST:PORT or http://HOST:PORT)") from None
    if ":" in hostname:
        hostname = f"[{hostname}]"
    return f"{scheme}://{hostname}:{port}{parts.path.rstrip('/')}"


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (any OLLAMA_HOST spelling) names this machine (127.0.0.0/8, ::1, localhost)."""
    name = (urlsplit(normalize_host(host)).hostname or "").lower()
    return name in LOOPBACK_NAMES or name.startswith("127.")


def make_client(host: str | None = None, **kwargs):
    """An ``ollama.Client`` for ``host`` that sends nothing from the environment: no
    ``OLLAMA_API_KEY`` bearer token, no ``.netrc`` credentials, no proxy settings (httpx
    ``trust_env=False``). Models are uploaded to the server we name and nowhere else."""
    import ollama

    client = ollama.Client(host=normalize_host(host), trust_env=False, **kwargs)
    inner = getattr(client, "_client", None)
    if inner is not None:
        for header in ("authorization", "proxy-authorization"):
            inner.headers.pop(header, None)
    return client


def server_version(host: str | None = None, timeout: float = 2.0) -> str | None:
    """The version an Ollama server at ``host`` reports on ``/api/version``; None if none answers."""
    import httpx

    try:
        response = httpx.get(normalize_host(host) + "/api/version", timeout=timeout, trust_env=False)
        response.raise_for_status()
        return str(response.json()["version"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def server_running(host: str | None = None) -> bool:
    """Whether an Ollama server answers at ``host`` (default ``$OLLAMA_HOST`` or 127.0.0.1:11434)."""
    return server_version(host) is not None


def client_version(client) -> str:
    """``/api/version`` through an ``ollama.Client`` (ollama-python 0.6 has no ``version()``)."""
    version = getattr(client, "version", None)
    if callable(version):
        return str(version()["version"])
    return str(client._client.get("/api/version").json()["version"])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def default_models_dir() -> Path:
    """Where the user's Ollama keeps models: ``$OLLAMA_MODELS`` or ``~/.ollama/models``."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


# ---------------------------------------------------------------- the server
class OllamaServer:
    """``ollama serve`` on 127.0.0.1:<port> for as long as the ``with`` block (or until ``stop``).

    ``models_dir`` defaults to a temporary directory removed on stop. The server's output goes
    to ``log_path`` (default: a file in the temporary state directory, or beside ``models_dir``).
    """

    def __init__(
        self,
        binary: Path | None = None,
        *,
        models_dir: Path | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ):
        self.binary = Path(binary) if binary else ollama_binary()
        self.port = port or free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self._extra_env = dict(env or {})
        self._state_dir: Path | None = None
        if models_dir is None:
            self._state_dir = Path(tempfile.mkdtemp(prefix="ollama-compress-serve-"))
            models_dir = self._state_dir / "models"
        self.models_dir = Path(models_dir)
        if log_path is None:
            log_dir = self._state_dir or self.models_dir.parent
            log_path = log_dir / f"ollama-serve-{self.port}.log"
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "OllamaServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self._extra_env}
        env["OLLAMA_HOST"] = f"127.0.0.1:{self.port}"
        env["OLLAMA_MODELS"] = str(self.models_dir)
        return env

    def start(self) -> None:
        """Start the server and wait until ``/api/version`` answers (StageFailed otherwise)."""
        if self.process is not None:
            return
        if port_in_use(self.port):
            raise StageFailed(f"port {self.port} is already in use; choose another port for ollama serve")
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot use {self.models_dir} as the Ollama models directory: {exc.strerror or exc}") from None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,  # own process group: stop() also ends its model runners
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StageFailed(
                    f"ollama serve exited with code {self.process.returncode}: {self.log_tail()}"
                )
            if server_version(self.host, timeout=1.0) is not None:
                return
            time.sleep(0.2)
        raise StageFailed(
            f"ollama serve did not answer on {self.host} within {self.startup_timeout:.0f} s: {self.log_tail()}"
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the server log, joined with ' | ' for one-line errors."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(empty log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server's process group, kill it if it lingers; remove temporary state."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=timeout)
        if process is not None:
            _signal_group(process, signal.SIGKILL)  # runners left behind by the server
        if self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs):
        """An ``ollama.Client`` for this server (``make_client``: nothing from the environment)."""
        return make_client(self.host, **kwargs)

    def version(self) -> str:
        return client_version(self.client())


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


# ---------------------------------------------------------------- for the demo
@dataclass
class ServerHandle:
    """A server the caller may use: ``host``, and whether it was started for this run."""

    host: str
    started: bool
    log_path: Path | None = None

    def client(self, **kwargs):
        return make_client(self.host, **kwargs)


@contextlib.contextmanager
def ensure_server(
    host: str | None = None,
    models_dir: Path | None = None,
    *,
    build: bool = True,
    log: Callable[[str], None] | None = None,
) -> Iterator[ServerHandle]:
    """Use the Ollama server at ``host`` (default ``$OLLAMA_HOST``/127.0.0.1:11434) if one answers;
    else start one for the block, on the user's models directory so registered models persist.

    A server started here listens on the host's port when that is a free local port, otherwise on
    a free port; it is stopped when the block ends. The binary is built if missing and ``build``.
    ``log`` hears about a build or a start.
    """
    wanted = normalize_host(host)
    if server_running(wanted):
        yield ServerHandle(host=wanted, started=False)
        return
    parts = urlsplit(wanted)
    local = parts.hostname in ("127.0.0.1", "localhost")
    port = parts.port if local and parts.port and not port_in_use(parts.port) else free_port()
    binary = ollama_binary(build=build, log=log)
    models = Path(models_dir) if models_dir else default_models_dir()
    log_path = _log_dir() / f"ollama-serve-{port}.log"
    with OllamaServer(binary, models_dir=models, port=port, log_path=log_path) as server:
        if log is not None:
            log(f"started Ollama at {server.host} for this run (models in {models}, log {log_path})")
        yield ServerHandle(host=server.host, started=True, log_path=server.log_path)


def _log_dir() -> Path:
    from .embedded import cache_dir

    path = cache_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path
