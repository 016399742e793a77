"""Export a retrieval checkpoint's image and text encoders to ONNX (see `beit3.cli.use.export_onnx_main`)."""
import sys

from beit3.cli.use import export_onnx_main

if __name__ == "__main__":
    sys.exit(export_onnx_main())
