"""nkat-search: a two-stage Optuna search for the NKAT Vision Transformer."""

import logging


def configure_logging(verbose: bool, tag: str = "") -> None:
    """Our log lines on stderr at INFO (DEBUG with -v), everyone else's at WARNING: torch and its
    compiler log at INFO too (cache statistics at exit, among others), which would bury ours and
    trail the one line an interrupted command ends with. One place for the CLI and its worker
    processes; tag names the process in each line (device and pid for a worker)."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s {tag}%(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nkat_search").setLevel(logging.DEBUG if verbose else logging.INFO)
