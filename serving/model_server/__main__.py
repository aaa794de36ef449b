"""`python -m serving.model_server ...` runs the server's command line (see server.py)."""
import sys

from serving.model_server.server import main

if __name__ == "__main__":
    sys.exit(main())
