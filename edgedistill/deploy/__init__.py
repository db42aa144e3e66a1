"""Deploying: a release to one board or a fleet over OpenSSH, results back, rollback."""
