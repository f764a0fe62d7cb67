"""The node agent as a CSI node plugin: each GPU container's slice directory as an
ephemeral inline volume (no hostPath in user pods). See :mod:`.server`."""
