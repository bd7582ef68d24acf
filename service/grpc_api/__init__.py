"""The gRPC front-end (grpc.aio): rnnserve.v1 and the V2 protocol's GRPCInferenceService."""
