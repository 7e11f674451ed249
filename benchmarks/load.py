"""Load test of the real API: `brainmets serve` (uvicorn) on a free loopback port, driven over HTTP.

    python benchmarks/load.py --models models [--requests 1000] [--concurrency 16] [--overload 100]
                              [--note TEXT] [--out docs/reliability.md]

1. Steady load: `--requests` POST /v1/segment of one 256² slice with at most `--concurrency` in flight,
   while /health is polled every 100 ms and the server's resident memory is sampled. Reports throughput,
   p50/p95/p99 latency, errors by status, the slowest /health, and memory at start, middle and end.
2. Overload: `--overload` requests at once, more than the server's workers + queue hold. The surplus must be
   answered 503 with Retry-After at once rather than pile up; the rest 200.

The server is started exactly as a user does, without --host, so the report also says where it listened.
The results replace the part of `--out` between the `load:begin` and `load:end` marker comments.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import httpx
import numpy as np

from brainmets.api.settings import Settings
from brainmets.app.launch import wait_until_up
from brainmets.precision import cpu_name

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "lgg"
BEGIN, END = "<!-- load:begin (written by benchmarks/load.py) -->", "<!-- load:end -->"
HEALTH_EVERY_S = 0.1


# ---- the server ------------------------------------------------------------------------------------

class Server:
    """`python -m brainmets serve --port P` with BRAINMETS_MODELS set; every other setting from the env."""

    def __init__(self, models: Path, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "BRAINMETS_MODELS": str(models.resolve())}
        self._log = log.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "brainmets", "serve", "--port", str(self.port)],
                                        env=env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until_up(f"{self.url}/health", self.process, "API", timeout_s=300)

    def memory_mb(self, field: str = "VmRSS") -> float:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(text.split(f"{field}:")[1].split()[0]) / 1024

    def listening_on(self) -> list[str]:
        """The addresses the server's port listens on, from /proc/net (IPv4 and IPv6)."""
        found = []
        for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
            for line in Path(table).read_text().splitlines()[1:] if Path(table).exists() else []:
                address, port = line.split()[1].split(":")
                if line.split()[3] == "0A" and int(port, 16) == self.port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    # the kernel prints each 32-bit word in host (little-endian) order
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, width // 2, 4))
                    found.append(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, words))
        return found

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


# ---- the load --------------------------------------------------------------------------------------

def test_slice() -> tuple[bytes, str]:
    """A 256² PNG: a lesion-bearing slice of the reference data when it is here (read, never copied), else noise."""
    masks = sorted(DATA.glob("*/*_mask.png"))
    for mask_path in masks[len(masks) // 2:]:
        if cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE).any():
            image = cv2.imread(str(mask_path).replace("_mask.png", ".webp"), cv2.IMREAD_UNCHANGED)
            return cv2.imencode(".png", image)[1].tobytes(), f"reference slice {mask_path.name[:-9]}"
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)
    return cv2.imencode(".png", image)[1].tobytes(), "random 256² RGB noise (reference data not found)"


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q) * 1000) if seconds else float("nan")


async def poll_health(url: str, stop: asyncio.Event) -> list[float]:
    """/health latencies, on a connection of its own, until `stop`; a failure counts as infinitely slow."""
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = (await client.get("/health")).status_code == 200
            except httpx.TransportError:
                ok = False
            latencies.append(time.perf_counter() - t0 if ok else float("inf"))
            await asyncio.sleep(HEALTH_EVERY_S)
    return latencies


async def post(client: httpx.AsyncClient, body: bytes, model: str) -> tuple[int | str, float, httpx.Response | None]:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/segment", files={"file": ("slice.png", body, "image/png")}, params={"model": model})
        return r.status_code, time.perf_counter() - t0, r
    except httpx.TransportError as e:  # counted as an error of its own kind, never hidden
        return type(e).__name__, time.perf_counter() - t0, None


async def steady(server: Server, body: bytes, model: str, requests: int, concurrency: int) -> dict:
    statuses, latencies, inference_ms, memory = Counter(), [], [], {"start": server.memory_mb()}
    todo = iter(range(requests))  # shared: each worker takes the next request number

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            status, seconds, r = await post(client, body, model)
            statuses[status] += 1
            latencies.append(seconds)
            if status == 200:
                inference_ms.append(r.json()["inference_ms"])
            if i == requests // 2:
                memory["middle"] = server.memory_mb()

    stop = asyncio.Event()
    health = asyncio.create_task(poll_health(server.url, stop))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    stop.set()
    memory["end"], memory["peak"] = server.memory_mb(), server.memory_mb("VmHWM")
    return {"requests": requests, "concurrency": concurrency, "wall_s": wall, "statuses": statuses,
            "latencies": latencies, "inference_ms": inference_ms, "health": await health, "memory": memory}


async def overload(server: Server, body: bytes, model: str, requests: int) -> dict:
    stop = asyncio.Event()
    health = asyncio.create_task(poll_health(server.url, stop))
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(post(client, body, model) for _ in range(requests)))
        wall = time.perf_counter() - t0
        after = (await post(client, body, model))[0]
    stop.set()
    return {"requests": requests, "wall_s": wall, "statuses": Counter(s for s, _, _ in results),
            "served_s": [t for s, t, _ in results if s == 200], "refused_s": [t for s, t, _ in results if s == 503],
            "retry_after": Counter(r.headers.get("retry-after") for s, _, r in results if s == 503),
            "health": await health, "after": after}


# ---- the report ------------------------------------------------------------------------------------

def statuses_text(statuses: Counter) -> str:
    return ", ".join(f"{count} × {status}" for status, count in sorted(statuses.items(), key=str))


def report(args, slice_name: str, settings: Settings, listening: list[str], load: dict, over: dict | None,
           loads: tuple[float, float]) -> str:
    errors = sum(n for status, n in load["statuses"].items() if status != 200)
    health = [h for h in load["health"] if h != float("inf")]
    memory = load["memory"]
    command = [a for i, a in enumerate(sys.argv[1:]) if "--note" not in (a.split("=")[0], sys.argv[i])]  # shown below
    lines = [
        BEGIN,
        f"Generated by `python benchmarks/load.py {shlex.join(command)}` on "
        f"{datetime.date.today().isoformat()}; rerun it to regenerate this section.",
        "",
        f"Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}. "
        f"Load average (1 min) {loads[0]:.1f} at the start, {loads[1]:.1f} at the end.",
        *([f"", f"Note: {args.note}"] if args.note else []),
        "",
        f"Server: `brainmets serve` started without `--host`; it listened on {', '.join(listening) or 'unknown'}. "
        f"Settings: workers {settings.workers}, threads per inference {settings.threads or 'one per core'}, "
        f"queue {settings.queue}: at most {settings.workers + settings.queue} requests in the server. "
        f"Input: {slice_name}, model `{args.model}`, JSON answer with both PNGs.",
        "",
        f"**Steady load**: {load['requests']} requests, {load['concurrency']} in flight at a time.",
        "",
        "| requests | errors | by status | throughput | p50 | p95 | p99 | max | inference p50 (server) "
        "| /health polls | /health max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {load['requests']} | {errors} | {statuses_text(load['statuses'])} | "
        f"{load['requests'] / load['wall_s']:.1f} req/s | {percentile_ms(load['latencies'], 50):.0f} ms | "
        f"{percentile_ms(load['latencies'], 95):.0f} ms | {percentile_ms(load['latencies'], 99):.0f} ms | "
        f"{max(load['latencies']) * 1000:.0f} ms | {np.median(load['inference_ms'] or [np.nan]):.0f} ms | "
        f"{len(load['health'])} ({len(load['health']) - len(health)} failed) | "
        f"{max(health, default=float('nan')) * 1000:.0f} ms |",
        "",
        "Server memory (resident):",
        "",
        "| after warm-up | middle | end | growth middle → end | peak |",
        "|---|---|---|---|---|",
        f"| {memory['start']:.0f} MB | {memory.get('middle', float('nan')):.0f} MB | {memory['end']:.0f} MB | "
        f"{memory['end'] - memory.get('middle', memory['start']):+.0f} MB | {memory['peak']:.0f} MB |",
    ]
    if over:
        refused, served = over["refused_s"], over["served_s"]
        over_health = [h for h in over["health"] if h != float("inf")]
        lines += [
            "",
            f"**Overload**: {over['requests']} requests sent at once, "
            f"{over['requests'] / (settings.workers + settings.queue):.1f}x what the server holds.",
            "",
            "| by status | 503 with Retry-After | 503 answered in (p50 / max) | 200 answered in (p50 / max) "
            "| /health max meanwhile | next request after |",
            "|---|---|---|---|---|---|",
            f"| {statuses_text(over['statuses'])} | {sum(n for v, n in over['retry_after'].items() if v)} of "
            f"{len(refused)} (Retry-After: {', '.join(sorted(str(v) for v in over['retry_after']))} s) | "
            f"{percentile_ms(refused, 50):.0f} / {max(refused, default=float('nan')) * 1000:.0f} ms | "
            f"{percentile_ms(served, 50):.0f} / {max(served, default=float('nan')) * 1000:.0f} ms | "
            f"{max(over_health, default=float('nan')) * 1000:.0f} ms | {over['after']} |",
        ]
    return "\n".join(lines + ["", END])


def write_section(out: Path, section: str) -> None:
    text = out.read_text() if out.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + section + "\n"
    out.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=REPO / "models", help="folder of <name>/model.pt (+ model.onnx)")
    ap.add_argument("--model", default="best", help="model query parameter of every request")
    ap.add_argument("--requests", type=int, default=1000, help="requests of the steady run")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight at a time in the steady run")
    ap.add_argument("--overload", type=int, default=100, help="requests sent at once in the overload run (0: skip)")
    ap.add_argument("--warmup", type=int, default=5, help="requests before measuring")
    ap.add_argument("--note", default="", help="a sentence on the conditions, printed in the report")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "reliability.md")
    args = ap.parse_args()

    settings = Settings()  # the server reads the same BRAINMETS_* environment
    if args.overload and args.overload <= settings.workers + settings.queue:
        ap.error(f"--overload {args.overload} fits in the server's {settings.workers} worker(s) + queue of "
                 f"{settings.queue}: send more to overload it")
    body, slice_name = test_slice()
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args.models, Path(tmp) / "server.log")
        try:
            listening = server.listening_on()
            with httpx.Client(base_url=server.url, timeout=300) as client:
                for _ in range(args.warmup):
                    client.post("/v1/segment", files={"file": ("slice.png", body)}, params={"model": args.model}
                                ).raise_for_status()
            print(f"server at {server.url} (listening on {', '.join(listening)}); {args.requests} requests, "
                  f"{args.concurrency} at a time", flush=True)
            load = asyncio.run(steady(server, body, args.model, args.requests, args.concurrency))
            print(f"steady: {statuses_text(load['statuses'])} in {load['wall_s']:.1f} s", flush=True)
            over = asyncio.run(overload(server, body, args.model, args.overload)) if args.overload else None
            if over:
                print(f"overload: {statuses_text(over['statuses'])} in {over['wall_s']:.1f} s", flush=True)
        finally:
            server.stop()
            log = (Path(tmp) / "server.log").read_text()
    loads.append(os.getloadavg()[0])
    if "Traceback" in log:
        print(f"the server logged an exception:\n{log[-3000:]}", file=sys.stderr)
    section = report(args, slice_name, settings, listening, load, over, tuple(loads))
    write_section(args.out, section)
    print(section)


if __name__ == "__main__":
    main()
