"""Serve an exported defended model over HTTP with Ray Serve:
`python jobs/serve.py --model PATH_OR_S3_URI [--host 127.0.0.1] [--port 8000]`.

PATH_OR_S3_URI is an export folder (<storage>/<run>/export/<defense>/ from jobs/export.py).
Then `curl --data-binary @face.png http://127.0.0.1:8000/` answers with the top identities.
"""
from raydefense.__main__ import serve_main
from raydefense.cli import run_main

if __name__ == "__main__":
    run_main(serve_main)
