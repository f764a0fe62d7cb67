"""Kubernetes mode of the node agent: device plugin wiring, exact pod<->slice matching,
HAMi node annotations, and the one-call node assembly (:func:`node.start_node`)."""
