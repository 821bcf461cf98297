import os
import signal
import sys

_received: list[int] = []


def _interrupt(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def _exit_interrupted() -> None:
    # os._exit, not sys.exit: a KeyboardInterrupt that passed through a C extension's own
    # PyRun_* call (e.g. during an import) marks it "unhandled" for the interpreter, which then
    # replaces our 130 by killing itself with SIGINT at shutdown. Staging is already removed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


# before the heavy imports, so that an early SIGTERM is an orderly interruption too
signal.signal(signal.SIGTERM, _interrupt)
signal.signal(signal.SIGINT, _interrupt)
try:
    from .cli import main
except (KeyboardInterrupt, ImportError) as stopped:
    # an interrupt inside a C extension's initialisation surfaces as ImportError
    if isinstance(stopped, ImportError) and not _received:
        raise
    print("onnxsnp: interrupted; nothing written", file=sys.stderr)
    _exit_interrupted()

code = main()
if code == 130:
    _exit_interrupted()
# the work is done and its outputs are in place: a late signal must not turn that into a failure
# (a signal already in flight here is caught above by main; SIG_IGN also survives interpreter shutdown)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(code)
