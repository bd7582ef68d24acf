"""The HTTP front-end (FastAPI on uvicorn): rnnserve's REST API and the V2 protocol over HTTP."""
