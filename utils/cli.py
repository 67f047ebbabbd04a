"""The one command-line convention of every entry point and tool.

Each script defines ``get_args_parser()`` (a reusable parent parser, ``add_help=False``) and
``main(args)``, and ends with::

    if __name__ == "__main__":
        sys.exit(run_cli(get_args_parser, main, __doc__))

:func:`run_cli` parses the flags (abbreviations off: ``--max_iter`` must not silently mean
``--max_iters``), sets up logging, runs ``main`` and turns a :class:`~utils.errors.UserError`
into one line on stderr, ``<prog>: error: <message>`` (also written to the run's log file when
one is open), with exit status 2 instead of a traceback; Ctrl-C exits with 130. A distributed
process group is torn down after a success only: after an error the other ranks may still be
inside a collective, and NCCL's teardown can wait on them; the process exits and torchrun stops
the rest. Booleans are ``argparse.BooleanOptionalAction`` flags (``--overwrite`` /
``--no-overwrite``) everywhere.

One spelling per flag: ``--help`` and the usage line show each flag by its first long option
string, the hyphenated one (``--data-root``); the other spellings of the same flag (the published
underscore ones, ``--data_root``, and older names such as infer.py's ``--cam_npy``) are hidden
aliases that parse to the same action, so the same ``dest``, and a required flag given by an
alias counts as given. :func:`add_flag` declares a flag with its underscore twin;
``utils/flags.py`` declares the flags several entry points share, once.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from typing import Callable, List, Optional, Sequence

from utils.errors import UserError

logger = logging.getLogger("cli")


def one_line(message: str) -> str:
    """A message as one line (some messages list several problems on separate lines)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def report_error(prog: str, message: str) -> None:
    """``<prog>: error: <message>`` on stderr, and into the log file of the run when one is open.
    Under torchrun every rank prints its own error, prefixed with its rank: an error only one
    rank meets (its share of the list, its GPU) would otherwise vanish when that rank is not 0."""
    from utils import dist
    who = f"[rank {dist.launched_rank()}] " if dist.launched_world_size() > 1 else ""
    line = f"{prog}: error: {who}{message}\n".encode(errors="backslashreplace")
    # One write(2) of the whole line: the ranks share one stderr pipe, and a line up to PIPE_BUF
    # (4 KiB) written at once is never split by another rank's (print() may write twice)
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line)
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor (tests)
        sys.stderr.write(line.decode())
        sys.stderr.flush()
    # console=False: the log file gets it, the console already has it (utils/run.py)
    logging.getLogger(prog).error("%s", message, extra={"console": False})


# torchrun's own options (torch/distributed/run.py). Given to a script they show that a
# distributed launch was meant: say how, rather than argparse's bare "unrecognized arguments".
LAUNCHER_FLAGS = frozenset((
    "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "rdzv_backend",
    "rdzv_endpoint", "rdzv_id", "rdzv_conf", "standalone", "max_restarts", "monitor_interval",
    "start_method", "run_path", "no_python", "log_dir", "redirects", "tee", "local_addr"))


def refuse_launcher_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """argparse's error (usage, one error line, exit 2) for a torchrun option given to a
    script that does not define it, with the command that was meant."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if (flag.startswith("--") and flag not in parser._option_string_actions
                and flag[2:].replace("-", "_") in LAUNCHER_FLAGS):
            parser.error(f"{flag} is an option of torchrun, not of {parser.prog}: launch as "
                         f"'torchrun {flag} ... {parser.prog} <its flags>' (docs/training.md, "
                         f"docs/pipelines.md)")


def shown_option_strings(action: argparse.Action) -> List[str]:
    """The spellings ``--help`` shows for a flag: its short options, its first long option and,
    for a boolean, that option's ``--no-`` twin. The rest are hidden aliases."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    if not longs:
        return list(action.option_strings)
    first = longs[0]
    keep = {first, "--no-" + first[2:]} if isinstance(action, argparse.BooleanOptionalAction) else {first}
    return [s for s in action.option_strings if not s.startswith("--") or s in keep]


def _shown(action: argparse.Action) -> argparse.Action:
    strings = shown_option_strings(action)
    if strings == list(action.option_strings):
        return action
    shown = copy.copy(action)  # only for formatting: parsing keeps every spelling
    shown.option_strings = strings
    return shown


class OneSpellingFormatter(argparse.RawDescriptionHelpFormatter):
    """Help and usage with one spelling per flag (:func:`shown_option_strings`); descriptions
    keep their line breaks, as the entry points' docstrings are written."""

    def _format_action_invocation(self, action):
        return super()._format_action_invocation(_shown(action))

    def _format_usage(self, usage, actions, groups, prefix):
        return super()._format_usage(usage, [_shown(a) for a in actions], groups, prefix)


def parent_parser(title: str) -> argparse.ArgumentParser:
    """The parser ``get_args_parser()`` returns: a reusable parent (no ``-h``), abbreviations
    off, one spelling per flag in its help."""
    return argparse.ArgumentParser(title, add_help=False, allow_abbrev=False,
                                   formatter_class=OneSpellingFormatter)


def add_flag(container, name: str, *aliases: str, **kwargs) -> argparse.Action:
    """``container.add_argument`` with ``name`` (hyphenated, shown in the help) first, then its
    underscore twin and any other ``aliases`` (accepted, hidden). ``dest`` defaults to the
    name's (``--data-root`` -> ``data_root``), as argparse derives it."""
    if not name.startswith("--"):
        raise ValueError(f"add_flag declares long options only, not {name!r}")
    twin = "--" + name[2:].replace("-", "_")
    strings = [name] + [s for s in (twin,) + aliases if s != name]
    strings = list(dict.fromkeys(strings))
    kwargs.setdefault("dest", name[2:].replace("-", "_"))
    return container.add_argument(*strings, **kwargs)


ALIAS_NOTE = ("Each flag is shown in one spelling. The published spellings (underscored, "
              "e.g. --data_root; older names, as the help says) are accepted as aliases.")


def build_parser(get_args_parser: Callable[[], argparse.ArgumentParser],
                 doc: Optional[str] = None) -> argparse.ArgumentParser:
    parent = get_args_parser()
    aliased = any(shown_option_strings(a) != list(a.option_strings) for a in parent._actions)
    return argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]) or None, parents=[parent], allow_abbrev=False,
        description=doc, epilog=ALIAS_NOTE if aliased else None,
        formatter_class=OneSpellingFormatter)


def run_cli(get_args_parser: Callable[[], argparse.ArgumentParser], main: Callable,
            doc: Optional[str] = None, argv: Optional[Sequence[str]] = None,
            exit_code: Optional[Callable[[object], int]] = None) -> int:
    """Run ``main(args)`` as a command and return the process exit status (0 on success, or
    ``exit_code(result)``; 2 for a user error; 130 on Ctrl-C)."""
    from utils import dist
    from utils.run import setup_logging

    parser = build_parser(get_args_parser, doc)
    refuse_launcher_flags(parser, sys.argv[1:] if argv is None else [str(a) for a in argv])
    args = parser.parse_args(argv)
    setup_logging()
    try:
        result = main(args)
    except UserError as e:
        report_error(parser.prog, one_line(e))
        return 2
    except KeyboardInterrupt:
        report_error(parser.prog, "interrupted")
        return 130
    except Exception as e:  # a peer that vanished mid-collective: one line naming it
        lost = dist.failure_message(e)
        if lost is None:
            raise
        report_error(parser.prog, lost)
        return 2
    dist.cleanup()
    return exit_code(result) if exit_code is not None else 0
