"""`fmserve export`: a model version as ONNX (optionally int8), written as a new version folder
of the same model, checked against the torch fp32 version before it is written.

    convert.py   the torch module to model.onnx, and onnxruntime's dynamic int8 quantisation
    quality.py   the sample, the metric (cosine or top-1 agreement) and the gate
    version.py   the version folder and its model.toml table
"""

# The default gates (`--min-cosine`, `--min-agreement`); here, so that the CLI reads them without
# importing torch.
COSINE_GATE = 0.99
AGREEMENT_GATE = 0.98
