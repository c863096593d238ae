"""Protocol buffer messages of the gRPC front ends (generated; see generate.py)."""
