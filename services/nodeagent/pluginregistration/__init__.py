"""The kubelet's plugin registration API (how a CSI plugin announces itself)."""
