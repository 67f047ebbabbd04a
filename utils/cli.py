"""The command-line wrapper shared by the tools: parse the reusable parser, run ``main`` and turn
the project's expected errors (missing files, bad metadata, ...) into one clear line and exit
status 2 instead of a traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Tuple, Type


def run_cli(get_args_parser: Callable[[], argparse.ArgumentParser], main: Callable,
            errors: Tuple[Type[BaseException], ...], doc: Optional[str] = None,
            level: int = logging.INFO):
    """Run ``main(args)`` as a command; returns what main returns."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(parents=[get_args_parser()], description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        return main(parser.parse_args())
    except errors as e:
        sys.exit(f"error: {e}")
