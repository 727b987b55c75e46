"""The preprocess service: owns the models' tokenizers and turns texts into the compact, unpadded
token tensors the inference service takes (`fmserve.v1.Preprocess`: Tokenize)."""
