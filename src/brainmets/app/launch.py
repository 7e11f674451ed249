"""Start the page (`brainmets app`), or the API and the page together (`brainmets run`).

Both are child processes: `brainmets serve` for the API and `streamlit run page.py` for the page; the
page learns the API's address from $BRAINMETS_API.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from brainmets.app.client import ApiError, Client
from brainmets.registry import models_dir

PAGE = Path(__file__).with_name("page.py")
START_TIMEOUT_S = 120.0  # the API loads every model before it answers: seconds, more on a busy machine


def page_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(PAGE),
            "--server.address", host, "--server.port", str(port),
            "--server.headless", "true",  # never try to open a browser on the serving machine
            "--server.fileWatcherType", "none",  # an installed page does not change under it
            "--browser.gatherUsageStats", "false",
            "--client.showErrorDetails", "type",  # an unexpected failure shows its type, not a traceback
            "--client.toolbarMode", "minimal"]


def page_env(api: str, docs: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "BRAINMETS_API": api}
    if docs is not None:
        env["BRAINMETS_DOCS"] = str(Path(docs).resolve())
    return env


def serve_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "brainmets", "serve", "--host", host, "--port", str(port)]


def exec_page(host: str, port: int, api: str, docs: Path | None = None) -> None:
    """Become the Streamlit server, so Ctrl-C and signals reach it directly."""
    os.execve(sys.executable, page_command(host, port), page_env(api, docs))


def wait_until_up(url: str, process: subprocess.Popen, what: str, timeout_s: float = START_TIMEOUT_S,
                  log: Path | None = None) -> None:
    """Return once `url` answers 200; raise if the process exits first or the time runs out, quoting the end
    of its `log` where there is one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {what} exited with code {process.returncode} before answering at {url}"
                               + _log_tail(log))
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the {what} did not answer at {url} within {timeout_s:.0f} s" + _log_tail(log))


def _log_tail(log: Path | None, chars: int = 3000) -> str:
    return f"; the end of {log}:\n{log.read_text(errors='replace')[-chars:]}" if log and log.exists() else ""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], health_url: str, what: str, log: Path | None = None, env: dict | None = None,
            cwd: Path | None = None, timeout_s: float = START_TIMEOUT_S) -> Iterator[subprocess.Popen]:
    """`command` as a child process (output to `log`, else inherited), once it answers at `health_url`;
    stopped when the block ends. Tests and the screenshot script start their servers with this."""
    with open(log, "w") if log else contextlib.nullcontext() as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT if out else None)
        try:
            wait_until_up(health_url, process, what, timeout_s, log)
            yield process
        finally:
            stop([process])


def stop(processes: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in processes:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_both(host: str, api_port: int, page_port: int, say=print) -> int:
    """Start the API and the page, print both addresses, stop both on Ctrl-C or when either exits."""
    api = f"http://{host}:{api_port}"
    page = f"http://{host}:{page_port}"
    _stop_on_signals()
    processes = [subprocess.Popen(serve_command(host, api_port))]
    try:
        processes.append(subprocess.Popen(page_command(host, page_port), env=page_env(api)))
        wait_until_up(f"{api}/health", processes[0], "API")
        wait_until_up(f"{page}/_stcore/health", processes[1], "page")
        models = Client(api).health()["models"]
        if not models:
            say(f"warning: no shipped model under {models_dir()}: the page has nothing to run (see the README)")
        say(f"API:  {api}  (docs at {api}/docs; models: {', '.join(models) or 'none'})")
        say(f"page: {page}")
        say("Ctrl-C stops both.")
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        ended = next(p for p in processes if p.poll() is not None)
        say(f"{'API' if ended is processes[0] else 'page'} exited with code {ended.returncode}; stopping the other")
        return ended.returncode or 1
    except (RuntimeError, ApiError) as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        say("stopping the API and the page")
        return 0
    finally:
        stop(processes)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """Ctrl-C and `kill` both end in run_both's KeyboardInterrupt path, which stops the children. Python
    leaves SIGINT ignored when it started ignored, as every `&` job of a shell without job control does (a
    script, CI): Ctrl-C then did nothing. SIGTERM's default would end this process alone, leaving the API and
    the page running without a parent."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
