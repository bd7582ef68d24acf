"""Tests of service/http_api against real uvicorn servers (or in-process ASGI) and real clients."""
