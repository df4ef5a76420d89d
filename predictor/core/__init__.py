"""The serving core, free of any transport: decoding, batching, the result cache, the drain, metrics,
admission primitives (keys, rate limits) and the domain errors. Nothing here knows HTTP or gRPC."""
