"""The classifier: a compact CNN extracts feature maps, a HOSVD subspace classifier decides."""
