"""A real OpenAI-compatible server process for the autointerp tests: `python tests/autointerp_server.py
MODEL_FOLDER MODEL_NAME` serves LocalClient(MODEL_FOLDER) on a free port and prints `PORT <n>` once listening."""

import sys

from tasks.autointerp import LocalClient
from tasks.autointerp.serve import make_server

if __name__ == "__main__":
    folder, name = sys.argv[1], sys.argv[2]
    server = make_server(LocalClient(folder), name)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()
