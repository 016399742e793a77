"""BLIP CapFilt over an image-text source: new captions, ITM filtering, a new source (see `beit3.cli.capfilt`)."""
import sys

from beit3.cli.capfilt import main

if __name__ == "__main__":
    sys.exit(main())
