import signal
import sys


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# before the heavy imports, so that an early SIGTERM is an orderly interruption too
signal.signal(signal.SIGTERM, _interrupt)
try:
    from .cli import main
except KeyboardInterrupt:
    print("onnxsnp: interrupted; nothing written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
