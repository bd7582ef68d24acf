"""Tests of service/grpc_api against real grpc.aio servers through generated stubs."""
