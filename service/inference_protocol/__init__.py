"""The Open Inference Protocol (KServe V2): what its requests and tensors mean, for both wires."""
