"""Development and test tooling: the local control plane, S3 server and their launchers (not shipped in images)."""
