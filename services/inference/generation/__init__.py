"""Text generation in the inference service: continuous batching over a KV cache.

params.py     a request's sampling and stopping parameters, checked against the model
sampling.py   logits → next token per sequence (repetition penalty, temperature, top-k,
              top-p, seeded generators), as transformers' `generate` does it
stopping.py   when a sequence ends, and why ("stop" or "length")
budget.py     admission: the KV-cache budget in tokens and the sequence limit
batch.py      the running sequences' KV cache as one left-padded batch
engine.py     the model's forward passes: prefill one prompt, decode one step for all
scheduler.py  the step loop: admits waiting sequences, steps every running one, streams
              their tokens, frees the finished and the cancelled at once
instance.py   one loaded generation model version, as the registry holds it
"""
