"""`brainmets predict --ray ADDRESS`: the batch's jobs on a Ray cluster, one model load per worker.

    Cluster(address, workers)     connect: `HOST:PORT` of a head node (`ray start --head`), `ray://HOST:PORT`
                                  (Ray Client), `auto` (RAY_ADDRESS, or the cluster this machine belongs to),
                                  or `local`: a cluster on this machine started for the run and stopped after
    cluster.run(jobs, out, engine) (index, row) as jobs finish, for `batch.run_batch`'s progress bar and summary

Each worker is a Ray actor holding one Predictor, loaded once with the driver's model, runtime and precisions
(`batch.Engine`), so every mask of a run comes from one model version; each row names the version its worker
ran (`brainmets.provenance`). The driver reads a job's input files and sends them with it, and writes what
comes back (`batch.write_outputs`): the nodes need brainmets and the models (`BRAINMETS_MODELS`), not the
inputs or `--out`. A worker that dies (killed, out of memory) is restarted by Ray and its job tried once more;
dying again, the job is reported failed and the run goes on.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from brainmets.batch import Engine, Job, failed_row, job_inputs, run_job, write_outputs

TRIES = 2  # a job whose worker died is tried once more, then reported failed
CONNECT_TIMEOUT_S = 5.0  # an address that does not answer fails the run at once, not after Ray's minute of retries


class Segmenter:
    """A Ray actor: one Predictor for the worker's life, one job at a time."""

    def __init__(self, engine: Engine, threads: int):
        self.engine, self.predictor = engine, engine.load(threads)

    def run(self, job: Job, inputs: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
        return run_job(self.predictor, job, inputs.__getitem__, self.engine.tta, self.engine.register)


class Cluster:
    def __init__(self, address: str, workers: int | None = None):
        import ray

        self.address, self.local = address, address == "local"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a hospital's batch reports nothing to anyone
        if not self.local and address != "auto":
            _answers(address)
        try:
            ray.init(address=None if self.local else address, include_dashboard=False if self.local else None,
                     log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
        except RuntimeError as e:
            if "version mismatch" in str(e).lower():
                raise ValueError(f"the Ray cluster at {address} runs another Ray or Python than this driver (Ray "
                                 f"{ray.__version__}); install the same versions on every node: {e}") from None
            raise ConnectionError(f"cannot join the Ray cluster at {address}: {e}") from None
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < 1:
            ray.shutdown()
            raise ValueError(f"the Ray cluster at {address} offers no CPU to run workers on")
        self.workers = max(1, min(workers or cpus, cpus))
        self.threads = max(1, cpus // self.workers)  # cores a worker reserves, and its inference threads

    def describe(self) -> str:
        where = "a local Ray cluster" if self.local else f"the Ray cluster at {self.address}"
        return f"{self.workers} Ray worker{'s' if self.workers > 1 else ''} of {self.threads} thread" \
               f"{'s' if self.threads > 1 else ''} on {where}"

    def run(self, jobs: list[tuple[int, Job]], out: Path, engine: Engine) -> Iterator[tuple[int, dict]]:
        import ray
        from ray.exceptions import RayActorError

        # max_restarts: a dead worker comes back (its model loaded again) for the jobs still to do
        actor = ray.remote(Segmenter).options(num_cpus=self.threads, max_restarts=-1, max_task_retries=0)
        idle = deque(actor.remote(engine, self.threads) for _ in range(min(self.workers, len(jobs))))
        pending, tries, running = deque(jobs), {i: 0 for i, _ in jobs}, {}
        try:
            while pending or running:
                while idle and pending:
                    i, job = pending.popleft()
                    try:
                        inputs = job_inputs(job)
                    except OSError as e:
                        yield i, failed_row(job, e)
                        continue
                    worker = idle.popleft()
                    running[worker.run.remote(job, inputs)] = worker, i, job
                if not running:
                    continue
                [ref], _ = ray.wait(list(running), num_returns=1)
                worker, i, job = running.pop(ref)
                idle.append(worker)
                try:
                    row, files = ray.get(ref)
                except RayActorError as e:  # its process died: Ray restarts it
                    tries[i] += 1
                    if tries[i] < TRIES:
                        pending.appendleft((i, job))
                        continue
                    row, files = failed_row(job, ChildProcessError(
                        f"its Ray worker died {TRIES} times ({_first_line(e)})")), {}
                yield i, write_outputs(out, row, files)
        finally:  # done, Ctrl-C or an error: the workers go, and a cluster started for the run with them
            for worker in {id(w): w for w in [*idle, *(w for w, _, _ in running.values())]}.values():
                ray.kill(worker)
            ray.shutdown()


def _answers(address: str) -> None:
    """Fail fast, naming the address, where nothing listens there."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray {address}: expected HOST:PORT of the head node (`ray start --head` prints it), "
                         f"ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host, int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                              f"`ray start --head --port {port}`, or use --ray local") from None


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
