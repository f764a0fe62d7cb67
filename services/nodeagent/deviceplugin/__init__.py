"""Kubelet device plugin layer of the node agent (gRPC over unix sockets)."""
