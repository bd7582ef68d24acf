"""rnnserve's serving layer, in layers: `core` (transport-free), `inference_protocol` (what V2
requests mean), the front-ends `http_api` and `grpc_api`, and `process` (the command)."""
