"""`python -m serving.model_server ...` runs the server's command line.

Arguments are parsed before gRPC, NumPy and TensorFlow are imported, so `--help` and argument
errors answer at once.
"""
import sys

from serving.model_server.flags import build_parser


def main() -> int:
    args = build_parser().parse_args()
    from serving.model_server.server import run  # heavy imports only once the flags are valid

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
