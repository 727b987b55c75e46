"""The five fmserve services, one package each; they share only `fmserve` and never import
each other."""
