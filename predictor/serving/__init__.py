"""The edges: HTTP routes and their guard, admission shared with gRPC, the gRPC server, the OpenAPI
document, the demo page, explanations, the mapping of domain errors to each protocol, KServe's patches."""
