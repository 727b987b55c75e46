"""The postprocess service: turns model outputs into answers people read (`fmserve.v1.Postprocess`):
labels with probabilities, labelled spans of text, embedding vectors."""
