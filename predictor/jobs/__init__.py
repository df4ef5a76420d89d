"""Async batch jobs: the job model and worker, their HTTP API, and the two stores."""
