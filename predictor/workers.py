"""`--workers N`: KServe's worker processes, with a liveness check that allows for their start-up.

KServe's parent pings each worker every 0.5 s and kills one that does not answer within 5 s. A
spawned worker answers only once it has imported torch and unpickled the model, which takes longer
than 5 s on a busy 2-core node: KServe then kills it and starts another, forever (seen here: no
worker ever served). The check stays; it waits as long as a worker may take to start.
"""

from kserve.protocol.rest.multiprocess import server as multiprocess

WORKER_ANSWER_TIMEOUT_S = 60.0


class PatientWorkerProcess(multiprocess.RESTServerProcess):
    """A KServe worker process whose liveness ping may take up to WORKER_ANSWER_TIMEOUT_S."""

    def is_alive(self, timeout: float = WORKER_ANSWER_TIMEOUT_S) -> bool:
        return super().is_alive(timeout)


def use_patient_workers() -> None:
    """Make KServe's multi-process server start and watch its workers as PatientWorkerProcess."""
    multiprocess.RESTServerProcess = PatientWorkerProcess
