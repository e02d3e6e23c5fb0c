"""The local stack and the device simulator: for developers and tests, never imported by a
service."""
