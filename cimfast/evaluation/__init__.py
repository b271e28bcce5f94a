"""Measuring a frozen enhancer: labelled data, k-NN, linear probe, loading."""
