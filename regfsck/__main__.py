"""Allow `python -m regfsck`; also the console entry point (`entry`).

Importing the CLI (typer, rich and every command) takes a noticeable fraction of a second;
a Ctrl-C in that window must end like any other interrupt (one line, exit 130), not with
a KeyboardInterrupt traceback from deep inside an import.
"""

import os
import signal

from regfsck.errors import ExitCode


def _interrupted_while_starting(signum: int, frame: object) -> None:
    # Nothing has been read or written yet. Raising here would unwind through importlib's
    # locks (seen to hang the interpreter at exit), so leave at once.
    os.write(2, b"regfsck: interrupted\n")
    os._exit(ExitCode.INTERRUPTED)


def entry() -> None:
    """Run the CLI; Ctrl-C during start-up exits 130 quietly (unless SIGINT is ignored)."""
    guarded = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if guarded:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    from regfsck.cli.app import main

    if guarded:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    main()


if __name__ == "__main__":
    entry()
