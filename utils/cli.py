"""The one command-line convention of every entry point and tool.

Each script defines ``get_args_parser()`` (a reusable parent parser, ``add_help=False``) and
``main(args)``, and ends with::

    if __name__ == "__main__":
        sys.exit(run_cli(get_args_parser, main, __doc__))

:func:`run_cli` parses the flags (abbreviations off: ``--max_iter`` must not silently mean
``--max_iters``), sets up logging, runs ``main`` and turns a :class:`~utils.errors.UserError`
into one line on stderr (and in the run's log file) with exit status 2 instead of a traceback;
Ctrl-C exits with 130. A distributed process group is always torn down. Booleans are
``argparse.BooleanOptionalAction`` flags (``--overwrite`` / ``--no-overwrite``) everywhere.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from utils.errors import UserError

logger = logging.getLogger("cli")


def one_line(message: str) -> str:
    """A message as one line (some messages list several problems on separate lines)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def build_parser(get_args_parser: Callable[[], argparse.ArgumentParser],
                 doc: Optional[str] = None) -> argparse.ArgumentParser:
    parent = get_args_parser()
    return argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]) or None, parents=[parent], allow_abbrev=False,
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def run_cli(get_args_parser: Callable[[], argparse.ArgumentParser], main: Callable,
            doc: Optional[str] = None, argv: Optional[Sequence[str]] = None,
            exit_code: Optional[Callable[[object], int]] = None) -> int:
    """Run ``main(args)`` as a command and return the process exit status (0 on success, or
    ``exit_code(result)``; 2 for a user error; 130 on Ctrl-C)."""
    from utils import dist
    from utils.run import setup_logging

    args = build_parser(get_args_parser, doc).parse_args(argv)
    setup_logging()
    try:
        result = main(args)
    except UserError as e:
        rank = f"[rank {dist.get_rank()}] " if dist.get_world_size() > 1 else ""
        logger.error("%s%s", rank, one_line(e))
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    finally:
        dist.cleanup()
    return exit_code(result) if exit_code is not None else 0
