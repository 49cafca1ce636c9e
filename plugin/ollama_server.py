"""A real Ollama server: find or build the binary, start ``ollama serve`` on a free port, stop it.

Used by the tests (a throw-away server with temporary OLLAMA_MODELS) and by the demo
(``ensure_server``: reuse a running server, else start one on the user's models directory for
the length of the run).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from .embedded import cache_dir
from .errors import StageFailed, UserError, run_as_script
from .fsutil import atomic_path, make_temp_dir, remove_made
from .hosts import is_loopback, normalize_host

# Ollama is built from source with `go install` (Go modules + cgo; no cmake, no prebuilt download).
# v0.24.0 is the newest release the Go module proxy serves (`go list -m github.com/ollama/ollama@latest`
# says v0.17.4 and later tags up to v0.24.0 resolve; v0.24.1 and v0.25.0 are "not available").
# Its module archive leaves out three vendored headers, supplied here: nlohmann/json and stb from
# the system (SYSTEM_HEADERS), miniaudio.h from the `miniaudio` sdist on PyPI (MINIAUDIO_SDIST).
# .ci/install-ollama runs ``install_ollama`` below; this line is the one pin.
OLLAMA_VERSION = "v0.24.0"
OLLAMA_MODULE = "github.com/ollama/ollama"
# Stamp the version as Ollama's release builds do; a plain `go install` reports 0.0.0.
OLLAMA_LDFLAGS = (
    f"-X=github.com/ollama/ollama/version.Version={OLLAMA_VERSION.removeprefix('v')} "
    "-X=github.com/ollama/ollama/server.mode=release"
)
SYSTEM_HEADERS = {"nlohmann/json_fwd.hpp": "nlohmann-json3-dev", "stb/stb_image.h": "libstb-dev"}
MINIAUDIO_SDIST = "miniaudio==1.71"
LOG_TAIL_LINES = 15
# ggml's CPU code is compiled by cgo with -O3 but no -march, i.e. SSE2 only; building for the
# machine's own CPU (AVX2/AVX-512) makes generation about 6x faster. The binary then runs only
# on CPUs like the one that built it, which is how .ci/install-ollama uses it. AMX stays off: on a
# CPU with AMX, -march=native makes ggml-cpu call the AMX buffer type, whose source cgo does not
# compile, and the link fails (undefined ggml_backend_amx_buffer_type).
NATIVE_CFLAGS = "-O3 -march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


# ---------------------------------------------------------------- the binary
def pinned_ollama_path() -> Path:
    """Where ``install_ollama`` puts the pinned build: ``<cache>/ollama-VERSION/bin/ollama``."""
    return cache_dir() / f"ollama-{OLLAMA_VERSION.removeprefix('v')}" / "bin" / "ollama"


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


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_ollama() -> Path | None:
    """The ``ollama`` binary: the pinned build (``pinned_ollama_path``) first, then PATH, then
    ``$(go env GOPATH)/bin`` or ``~/go/bin``; None if there is none."""
    pinned = pinned_ollama_path()
    if _executable(pinned):
        return pinned
    on_path = shutil.which("ollama")
    if on_path:
        return Path(on_path)
    for folder in _go_bin_dirs():
        if _executable(folder / "ollama"):
            return folder / "ollama"
    return None


def binary_version(binary: Path) -> str | None:
    """The version an ollama binary reports (``ollama --version``, no server needed), or None."""
    env = {**os.environ, "OLLAMA_HOST": "127.0.0.1:9"}  # unreachable: it prints "client version is X"
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.findall(r"\d+\.\d+\.\d+", done.stdout + done.stderr)
    return found[-1] if found else None


def _header_dir() -> Path:
    """A folder with ``miniaudio/miniaudio.h`` (from the miniaudio sdist), for ``CGO_CPPFLAGS=-I``."""
    folder = cache_dir() / f"ollama-headers-{MINIAUDIO_SDIST.split('==')[1]}"
    header = folder / "miniaudio" / "miniaudio.h"
    if header.is_file():
        return folder
    with tempfile.TemporaryDirectory(prefix="miniaudio-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp, MINIAUDIO_SDIST]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("miniaudio-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise StageFailed(f"could not download the {MINIAUDIO_SDIST} sdist for miniaudio.h: "
                              f"{_last_lines(done.stderr)}")
        with tarfile.open(archives[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/miniaudio/miniaudio.h")), None)
            if member is None:
                raise StageFailed(f"{archives[0].name} has no miniaudio/miniaudio.h")
            header.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(header) as out:
                out.write_bytes(tar.extractfile(member).read())
    return folder


def _last_lines(text: str, n: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-n:]) or "no output"


def build_ollama(log: Callable[[str], None] | None = None) -> Path:
    """Build Ollama ``OLLAMA_VERSION`` with ``go install`` (cgo, CPU) into ``pinned_ollama_path()``.

    Supplies the headers the module archive lacks. Takes about 10 minutes on two busy cores
    (``log`` hears when it starts). Raises StageFailed when Go, a system header or the build fails.
    """
    go = shutil.which("go")
    if go is None:
        raise StageFailed(
            f"building Ollama {OLLAMA_VERSION} needs Go (>= 1.24) and a C/C++ compiler; install them "
            "(e.g. apt-get install golang-go build-essential) or install Ollama from https://ollama.com/download"
        )
    missing = [pkg for header, pkg in SYSTEM_HEADERS.items() if not (Path("/usr/include") / header).is_file()]
    if missing:
        raise StageFailed(f"building Ollama {OLLAMA_VERSION} needs headers its Go module leaves out: "
                          f"apt-get install {' '.join(missing)}")
    target = pinned_ollama_path()
    env = {**os.environ, "CGO_ENABLED": "1", "GOBIN": str(target.parent),
           "CGO_CPPFLAGS": f"{os.environ.get('CGO_CPPFLAGS', '')} -I{_header_dir()}".strip()}
    for flags in ("CGO_CFLAGS", "CGO_CXXFLAGS"):
        env.setdefault(flags, NATIVE_CFLAGS)
    cmd = [go, "install", f"-ldflags={OLLAMA_LDFLAGS}", f"{OLLAMA_MODULE}@{OLLAMA_VERSION}"]
    if log is not None:
        log(f"building Ollama {OLLAMA_VERSION} with 'go install' into {target.parent} (once; about 10 minutes)...")
    returncode, stderr = _run_with_progress(cmd, env, log)
    if returncode != 0:
        raise StageFailed(f"'{' '.join(cmd)}' failed: {_last_lines(stderr)}")
    if not _executable(target):
        raise StageFailed(f"'{' '.join(cmd)}' succeeded but {target} is missing")
    return target


def _run_with_progress(cmd: list[str], env: dict[str, str], log: Callable[[str], None] | None,
                       every: float = 60.0) -> tuple[int, str]:
    """Run ``cmd``; tell ``log`` every ``every`` seconds that it is still running. (exit code, stderr)"""
    with tempfile.TemporaryFile(mode="w+") as errors:
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors, text=True, env=env)
        started = time.monotonic()
        while True:
            try:
                returncode = process.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                if log is not None:
                    log(f"  still building Ollama ({time.monotonic() - started:.0f} s so far)")
        errors.seek(0)
        return returncode, errors.read()


def install_ollama(log: Callable[[str], None] = print) -> Path:
    """The pinned Ollama, built once (``.ci/install-ollama``); a build of another version is replaced."""
    target = pinned_ollama_path()
    wanted = OLLAMA_VERSION.removeprefix("v")
    if _executable(target):
        have = binary_version(target)
        if have == wanted:
            log(f"install-ollama: Ollama {have} already at {target}")
            return target
        log(f"install-ollama: {target} reports {have or 'no version'}; rebuilding {OLLAMA_VERSION}")
    started = time.monotonic()
    built = build_ollama(log)
    have = binary_version(built)
    if have != wanted:
        raise StageFailed(f"{built} reports version {have}, expected {wanted}")
    log(f"install-ollama: built Ollama {have} in {time.monotonic() - started:.0f} s at {built}")
    return built


def ollama_binary(build: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """The ollama binary; built with ``build_ollama`` when missing and ``build`` is true."""
    found = find_ollama()
    if found is not None:
        return found
    if build:
        return build_ollama(log)
    raise StageFailed(
        f"no ollama binary in {pinned_ollama_path().parent}, on PATH or in $(go env GOPATH)/bin; "
        "run 'bash .ci/install-ollama' or install Ollama from https://ollama.com/download"
    )


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
            self._state_dir = make_temp_dir("ollama-compress-serve-")
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
            remove_made(self._state_dir)
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
    port = parts.port if is_loopback(wanted) and parts.port and not port_in_use(parts.port) else free_port()
    binary = ollama_binary(build=build, log=log)
    models = Path(models_dir) if models_dir else default_models_dir()
    log_path = _log_dir() / f"ollama-serve-{port}.log"
    with OllamaServer(binary, models_dir=models, port=port, log_path=log_path) as server:
        if log is not None:
            log(f"started Ollama at {server.host} for this run (models in {models}, log {log_path})")
        yield ServerHandle(host=server.host, started=True, log_path=server.log_path)


def _log_dir() -> Path:
    path = cache_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":  # .ci/install-ollama
    run_as_script("install-ollama", install_ollama)
