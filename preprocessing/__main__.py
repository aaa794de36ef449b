"""`python -m preprocessing --help`: raw search logs -> TFRecords, metadata and feature store."""
import logging
import sys

import common  # noqa: F401  (legacy-Keras switch before TensorFlow loads)


def main(argv=None) -> int:
    from preprocessing import options

    options.parse_args(argv)  # --help and invalid arguments answer before Beam is imported
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from preprocessing import pipeline

    try:
        pipeline.run(argv, progress=lambda msg: print(msg, flush=True))
    except pipeline.InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
