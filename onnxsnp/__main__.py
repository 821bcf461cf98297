import signal
import sys


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# before the heavy imports, so that an early SIGTERM is an orderly interruption too
signal.signal(signal.SIGTERM, _interrupt)
def _interrupted(exc: BaseException | None) -> bool:
    """A KeyboardInterrupt, or an error it caused (an extension module's import wraps it)."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


try:
    from .cli import main
except BaseException as exc:
    if not _interrupted(exc):
        raise
    print("onnxsnp: interrupted; nothing written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
