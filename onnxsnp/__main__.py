import signal
import sys

_received: list[int] = []


def _interrupt(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


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
    sys.exit(130)

sys.exit(main())
