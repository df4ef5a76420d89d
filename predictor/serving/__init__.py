"""The request path: HTTP and gRPC routes, gates, decoding, batching, errors and metrics."""
