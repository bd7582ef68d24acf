"""rnnserve's Python client: REST or gRPC, one server or several, no torch.

    from rnnserve_client import Client

    with Client("http://127.0.0.1:8000") as client:        # or "grpc://127.0.0.1:8001"
        print(client.encode("surnames", texts=["Virtanen"]).labels)   # ['Finnish']

`Client` blocks; `AsyncClient` is the same for asyncio. Errors are `rnnserve_client.errors`.
The generated gRPC stubs are `rnnserve_client.proto.rnnserve.v1.rnnserve_pb2(_grpc)` (and the
Open Inference Protocol's, `rnnserve_client.proto.inference.grpc_service_pb2(_grpc)`).
"""

from rnnserve_client.aio import AsyncClient, AsyncSession
from rnnserve_client.client import Client, Session
from rnnserve_client.errors import (
    ComputeError,
    Conflict,
    ConnectionFailed,
    DeadlineExceeded,
    Draining,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    PermissionDenied,
    RnnserveError,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from rnnserve_client.results import (
    ChunkResult,
    EncodeResult,
    GeneratedOutput,
    GenerateResult,
    ModelInfo,
    TokenEvent,
    VersionInfo,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "ChunkResult",
    "Client",
    "ComputeError",
    "Conflict",
    "ConnectionFailed",
    "DeadlineExceeded",
    "Draining",
    "EncodeResult",
    "GenerateResult",
    "GeneratedOutput",
    "InvalidInput",
    "ModelInfo",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PermissionDenied",
    "RnnserveError",
    "ServerError",
    "Session",
    "TokenEvent",
    "Unauthenticated",
    "Unavailable",
    "VersionInfo",
]
