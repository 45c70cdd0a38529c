"""`transferbench export RUN_DIR`: a finished run as a verified ONNX file, optionally int8 (see `export`)."""
from __future__ import annotations

from .. import export

HELP = "export a finished run to ONNX (optionally int8-quantized), verified"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (with model.pt)")
    parser.add_argument("--format", default="onnx", choices=export.FORMATS, help="export format (default: onnx)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="output file (default RUN_DIR/model.onnx, or RUN_DIR/model.int8.onnx with --quantize "
                             "int8); "
                             "the preprocessing contract and the report go to FILE.json")
    parser.add_argument("--quantize", default=None, choices=export.QUANTIZE,
                        help="int8: static quantization calibrated on the run's training images, then evaluated "
                             "beside the float model on the test split")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--calibration-images", type=int, default=512, metavar="N",
                        help="--quantize: training images that calibrate activation ranges (default: 512)")
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation and timing batch size (default: 64)")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads for evaluation and timing (default: onnxruntime's choice)")
    parser.add_argument("--data-dir", default=None,
                        help="where the run's data lives now, if not where it was trained from: the CIFAR directory, "
                             "or the image folder of a folder: dataset (a relative folder: path is relative to where "
                             "the run was started)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def command(args) -> int:
    report = export.export_run(args.run_dir, out=args.out, quantize=args.quantize, overwrite=args.overwrite,
                        calibration_images=args.calibration_images, batch_size=args.batch_size, threads=args.threads,
                        data_dir=args.data_dir, progress=args.progress)
    print(export.format_report(report))
    return 0
