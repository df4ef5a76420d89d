"""Build time only (never imported by the server): training, evaluation, quantization, reports."""
