"""rnnserve's Python client package; `rnnserve_client.proto` holds the gRPC stubs generated from
proto/ (the server imports the same ones)."""
