"""The forward pass: engine choice, ONNX Runtime int8, torch, and the fp32 reference network."""
