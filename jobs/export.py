"""Export a finished run's defended model: `python jobs/export.py --name RUN [--storage PATH_OR_S3_URI]
[--defense uddn_kt] [--format torchscript|onnx]`.

Writes <storage>/<RUN>/export/<defense>/: model.pt (TorchScript), model.onnx (where the graph
exports) and card.json (classes, input, preprocessing, config hash, the report's accuracies).
"""
from raydefense.cli import run_main
from raydefense.export import main

if __name__ == "__main__":
    run_main(main)
