"""`--workers N`: KServe's worker processes, wired like the serving process and given time to start.

KServe spawns each worker with the model pickled and has it import `kserve.model_server.app` by
name; the worker must put our routes, guard and error format on that app (`predictor.app.install`)
before KServe adds its own. KServe's parent also pings each worker every 0.5 s and kills one that
does not answer within 5 s. A spawned worker answers only once it has imported torch and unpickled
the model, which takes longer than 5 s on a busy 2-core node: KServe then kills it and starts
another, forever (seen here: no worker ever served). The check stays; it waits as long as a worker
may take to start.
"""

from kserve.protocol.rest.multiprocess import server as multiprocess

WORKER_ANSWER_TIMEOUT_S = 60.0


class PatientWorkerProcess(multiprocess.RESTServerProcess):
    """A KServe worker process that wires our app first and whose liveness ping may take up to
    WORKER_ANSWER_TIMEOUT_S."""

    def is_alive(self, timeout: float = WORKER_ANSWER_TIMEOUT_S) -> bool:
        return super().is_alive(timeout)

    def target(self, *args, **kwargs):
        # Runs in the worker process: the REST server it is about to run holds the unpickled model.
        from kserve import model_server

        from .app import install

        rest_server = self._real_target.__self__
        for model in rest_server.dataplane.model_registry.get_models().values():
            install(model_server.app, model)
        return super().target(*args, **kwargs)


def use_patient_workers() -> None:
    """Make KServe's multi-process server start and watch its workers as PatientWorkerProcess."""
    multiprocess.RESTServerProcess = PatientWorkerProcess
